//! Compiling a chat request's constraint against the model's vocabulary, off
//! the async threads: the output format it asked for, the forced call grammar,
//! or the triggered grammar that makes a call the model opens valid.

use std::sync::Arc;

use engine::chat::ToolCallFormat;
use engine::{CompiledConstraint, Constraint, Engine, EngineError};

use super::tools::{self, ToolPlan};
use super::ChatJob;
use crate::error::RequestError;

/// The compiled constraint for `job` on `engine`, if it needs one.
/// `output_param` names the field an output constraint came from. For a
/// thinking model, `thought` says whether the prompt opened its block: a
/// constraint from the first token comes after the block (see
/// [`Constraint::after_thought`]).
pub async fn compile_for(
    engine: &Arc<Engine>,
    job: &ChatJob,
    format: ToolCallFormat,
    output_param: &'static str,
    thought: Option<bool>,
) -> Result<Option<CompiledConstraint>, RequestError> {
    let after_thought = |constraint: Constraint| match thought {
        Some(open) => constraint.after_thought(open),
        None => constraint,
    };
    match (&job.output, &job.plan) {
        // A JSON answer, or calls of the tools the model may call.
        (Some(Constraint::JsonSchema(answer)), Some(plan)) if plan.active() && !plan.forced() => {
            let either = tools::answer_or_calls_constraint(
                plan,
                format,
                &|t| engine.control_token(t),
                answer,
            );
            Ok(Some(
                compile(engine, after_thought(either), output_param).await?,
            ))
        }
        (Some(output), plan) if !plan.as_ref().is_some_and(ToolPlan::forced) => {
            let output = after_thought(output.clone());
            Ok(Some(compile(engine, output, output_param).await?))
        }
        // Calls are forced: the answer is calls, whatever format a text
        // answer would have had.
        (_, Some(plan)) if plan.forced() => {
            let calls = tools::call_constraint(plan, format, &|t| engine.control_token(t));
            let param = if plan.legacy { "functions" } else { "tools" };
            Ok(Some(compile(engine, after_thought(calls), param).await?))
        }
        // Free to answer, but a call the model opens is made valid.
        (None, Some(plan)) if plan.active() => triggered_calls(engine, plan, format).await,
        _ => Ok(None),
    }
}

/// Compiles what the request asked for; one that cannot be compiled is the
/// client's 400, naming `param`.
pub async fn compile(
    engine: &Arc<Engine>,
    constraint: Constraint,
    param: &'static str,
) -> Result<CompiledConstraint, RequestError> {
    let compiler = engine.clone();
    let compiled = tokio::task::spawn_blocking(move || compiler.compile_constraint(&constraint))
        .await
        .map_err(|e| EngineError::Inference(format!("grammar compiler failed: {e}")))?;
    compiled.map_err(|error| match error {
        EngineError::InvalidGrammar(message) => {
            RequestError::invalid(param, format!("{param} cannot be used: {message}"))
                .with_code("invalid_grammar")
        }
        other => other.into(),
    })
}

/// The compiled grammar that makes a call the model opens valid, when the
/// model's syntax has a marker to wait for (a thinking model's scheduler shows
/// it only the text after the block). Tools that do not compile into it are
/// the client's 400, as they are for a forced call.
pub(super) async fn triggered_calls(
    engine: &Arc<Engine>,
    plan: &ToolPlan,
    format: ToolCallFormat,
) -> Result<Option<CompiledConstraint>, RequestError> {
    let Some(constraint) =
        tools::triggered_call_constraint(plan, format, &|t| engine.control_token(t))
    else {
        return Ok(None);
    };
    let param = if plan.legacy { "functions" } else { "tools" };
    compile(engine, constraint, param).await.map(Some)
}
