//! Constrained decoding: grammars that decide, token by token, what a sequence
//! may sample.
//!
//! JSON schemas, Lark grammars and regexes compile with llguidance into a
//! matcher that yields an allowed-token mask per step (tens of µs). Raw GBNF
//! (llama.cpp's grammar language, which existing clients send) goes through
//! llama.cpp's own grammar sampler, checked the way llama.cpp's `common_sampler`
//! does it: the token sampled without the grammar is kept when the grammar
//! accepts it, and only otherwise is the whole vocabulary filtered (that filter
//! costs several times a decode step on a large vocabulary).
//!
//! Either way the constrained token is drawn by the request's own sampler chain
//! from the allowed tokens only, so output never leaves the grammar: there is no
//! repair afterwards, and a grammar that cannot be compiled is refused before
//! anything is generated.

use std::sync::{Arc, OnceLock};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::sampling::Penalties;
use crate::EngineError;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON schema (draft 2020-12 subset llguidance supports). Output is one
    /// JSON value that validates, with bounded whitespace between tokens
    /// (a space, or a newline and bounded indentation, as llama.cpp allows).
    JsonSchema(Value),
    /// llguidance's Lark dialect, with `%json {schema}` for embedded JSON.
    Lark(String),
    /// llama.cpp GBNF with a `root` rule.
    Gbnf(String),
    /// Free output until `trigger` is generated, then the Lark grammar `then`
    /// for the rest: a model that may answer in prose or call a tool writes
    /// whatever it likes until it opens a call, and then a valid call. For a
    /// thinking model the scheduler shows it only the answer's text (see
    /// `Sequence::answer_part`): a trigger inside the `<think>` block is thought.
    Triggered { trigger: String, then: String },
}

impl Constraint {
    /// This constraint after a thinking model's `<think>` block, as llama-server
    /// lets a thinking model think before a constrained answer: the block, then
    /// the answer the constraint describes. When the prompt `open`ed the block,
    /// the model must close it first; otherwise the block is optional. A
    /// triggered grammar needs nothing (it waits freely and sees only the
    /// answer's text); a GBNF grammar cannot be joined to it. Both come back
    /// as they were.
    pub fn after_thought(self, open: bool) -> Self {
        let answer = match self {
            Self::JsonSchema(schema) => format!(
                "thinking_answer: %json {}\n",
                serde_json::to_string(&with_json_options(&schema)).expect("values serialize")
            ),
            // Our Lark grammars open with their `start` rule and do not
            // refer back to it.
            Self::Lark(source) => match source.strip_prefix("start:") {
                Some(rules) => format!("thinking_answer:{rules}\n"),
                None => {
                    debug_assert!(false, "a Lark grammar without a leading start rule");
                    return Self::Lark(source);
                }
            },
            other => return other,
        };
        let thought = if open {
            "thinking_thought thinking_gap?"
        } else {
            r#"("<think>" thinking_thought thinking_gap?)?"#
        };
        Self::Lark(format!(
            "start: {thought} thinking_answer\n{THOUGHT}\n{answer}"
        ))
    }
}

/// A thought: anything up to the first `</think>` (lazy: the lexeme ends
/// there), then the whitespace that sets the answer off.
const THOUGHT: &str = r"thinking_thought[lazy]: /(.|\n)*<\/think>/
thinking_gap: /[ \t\n]{1,4}/";

/// A constraint checked against the model's vocabulary, ready to start a sequence.
#[derive(Clone)]
pub struct CompiledConstraint(Compiled);

#[derive(Clone)]
enum Compiled {
    Llg(Box<Matcher>),
    Gbnf(String),
    Triggered { trigger: String, then: Box<Matcher> },
}

impl std::fmt::Debug for CompiledConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Compiled::Llg(_) => f.write_str("CompiledConstraint(llguidance)"),
            Compiled::Gbnf(_) => f.write_str("CompiledConstraint(gbnf)"),
            Compiled::Triggered { trigger, .. } => {
                write!(f, "CompiledConstraint(llguidance after {trigger:?})")
            }
        }
    }
}

/// Whitespace JSON output may have between two tokens: nothing, one space, or
/// one or two newlines and up to 20 spaces or tabs of indentation, the bound
/// llama.cpp's schema converter uses. Small models write indented, multi-line
/// JSON by habit; forcing compact output pushes them off their path and they
/// ramble inside strings until `max_tokens`. Unbounded whitespace would let them
/// pad forever instead, so every gap is bounded.
const JSON_WHITESPACE: &str = r"( |\n{1,2}[ \t]{0,20})";

/// Whitespace in a free JSON object (`json_object` mode without a schema):
/// nothing or one space, on one line. With no schema to fix its shape, a small
/// model given room for line breaks writes deep, indented structures that
/// repeat until `max_tokens`; on one line it writes a short flat object. Over
/// 36 prompts ("Describe a cat as JSON.", SmolLM2-135M, `max_tokens` 400) this
/// finishes 35 at temperature 0 and 34 at 0.7, against 30 and 32 with
/// [`JSON_WHITESPACE`]; with a schema the multi-line pattern finishes more
/// (BENCHMARKS.md, constrained output), so only this case uses it.
const FREE_JSON_WHITESPACE: &str = " ?";

/// The schema `json_object` mode means: any JSON object, written on one line
/// (see [`FREE_JSON_WHITESPACE`]).
pub fn any_json_object() -> Value {
    serde_json::json!({
        "type": "object",
        "x-guidance": {"whitespace_pattern": FREE_JSON_WHITESPACE},
    })
}

/// llguidance's options for JSON: separators without their own space (the
/// bounded whitespace above comes after them, as in llama.cpp's grammars).
fn json_options() -> Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "whitespace_pattern": JSON_WHITESPACE,
        "item_separator": ",",
        "key_separator": ":",
        // oneOf is taken as anyOf: generated values are disjoint in practice,
        // and refusing every schema with oneOf (pydantic writes them for
        // discriminated unions) would be worse.
        "coerce_one_of": true,
    })
}

/// Adds our JSON options to a schema (its own `x-guidance` settings win), and
/// closes its objects: see [`close_objects`].
pub fn with_json_options(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if !mentions_key(&schema, "allOf") {
        close_objects(&mut schema);
    }
    if let Value::Object(map) = &mut schema {
        let mut options = json_options();
        if let (Some(Value::Object(own)), Value::Object(opts)) =
            (map.get("x-guidance"), &mut options)
        {
            for (k, v) in own {
                opts.insert(k.clone(), v.clone());
            }
        }
        map.insert("x-guidance".into(), options);
    }
    schema
}

/// An object schema with `properties` and no word on other keys allows any
/// other key; a small model given that freedom invents keys and rambles on in
/// them until `max_tokens` cuts the JSON. Like llama.cpp's schema converter
/// (and OpenAI's strict mode), generation sticks to the listed properties:
/// every output is still valid under the schema as written, it is only never
/// padded with keys nobody asked for. Schemas with `allOf` are left alone,
/// since closing each branch would exclude the other branches' properties.
fn close_objects(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    let open = map.contains_key("properties")
        && ![
            "additionalProperties",
            "patternProperties",
            "unevaluatedProperties",
        ]
        .iter()
        .any(|k| map.contains_key(*k));
    if open {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (keyword, value) in map.iter_mut() {
        match (keyword.as_str(), value) {
            // Maps from names to schemas.
            (
                "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas",
                Value::Object(schemas),
            ) => schemas.values_mut().for_each(close_objects),
            // Lists of schemas.
            ("anyOf" | "oneOf" | "prefixItems" | "items", Value::Array(schemas)) => {
                schemas.iter_mut().for_each(close_objects)
            }
            // One schema.
            (
                "items" | "additionalProperties" | "not" | "if" | "then" | "else" | "contains",
                value,
            ) => close_objects(value),
            _ => {}
        }
    }
}

fn mentions_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Object(map) => map.contains_key(key) || map.values().any(|v| mentions_key(v, key)),
        Value::Array(items) => items.iter().any(|v| mentions_key(v, key)),
        _ => false,
    }
}

/// The per-model grammar compiler: the vocabulary trie is built on first use
/// (a few hundred ms for a large vocabulary) and shared by every request.
pub(crate) struct Grammars {
    model: Arc<LlamaModel>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl Grammars {
    pub fn new(model: Arc<LlamaModel>) -> Self {
        Self {
            model,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<Arc<ParserFactory>, EngineError> {
        self.factory
            .get_or_init(|| {
                let env = LlamaSampler::llguidance_tok_env(&self.model);
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                Ok(Arc::new(factory))
            })
            .clone()
            .map_err(|e| EngineError::Inference(format!("grammar engine: {e}")))
    }

    /// Compiles a constraint against this model's vocabulary. Blocking (a large
    /// schema takes milliseconds): call it off the async threads.
    pub fn compile(&self, constraint: &Constraint) -> Result<CompiledConstraint, EngineError> {
        let grammar = match constraint {
            Constraint::Gbnf(source) => {
                // Compiled here only to report errors now; each sequence builds its own.
                gbnf_sampler(&self.model, source)?;
                return Ok(CompiledConstraint(Compiled::Gbnf(source.clone())));
            }
            Constraint::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(EngineError::InvalidGrammar(
                        "a JSON schema must be an object".to_owned(),
                    ));
                }
                TopLevelGrammar::from_json_schema(with_json_options(schema))
            }
            Constraint::Lark(source) => TopLevelGrammar::from_lark(source.clone()),
            Constraint::Triggered { trigger, then } => {
                if trigger.is_empty() {
                    return Err(EngineError::InvalidGrammar(
                        "a triggered grammar needs a trigger".to_owned(),
                    ));
                }
                let then = self.matcher(TopLevelGrammar::from_lark(then.clone()))?;
                return Ok(CompiledConstraint(Compiled::Triggered {
                    trigger: trigger.clone(),
                    then,
                }));
            }
        };
        Ok(CompiledConstraint(Compiled::Llg(self.matcher(grammar)?)))
    }

    fn matcher(&self, grammar: TopLevelGrammar) -> Result<Box<Matcher>, EngineError> {
        let factory = self.factory()?;
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| EngineError::InvalidGrammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(EngineError::InvalidGrammar(error));
        }
        Ok(Box::new(matcher))
    }
}

fn gbnf_sampler(model: &LlamaModel, source: &str) -> Result<LlamaSampler, EngineError> {
    crate::gbnf::check_shape(source)?;
    LlamaSampler::grammar(model, source, "root").map_err(|e| {
        EngineError::InvalidGrammar(format!(
            "the GBNF grammar does not compile ({e}); it needs a `root` rule, \
             and llama.cpp's log names the failing rule"
        ))
    })
}

/// One sequence's live constraint.
pub(crate) enum ConstraintState {
    Llg(Box<Matcher>),
    Gbnf(LlamaSampler),
    /// Sampling is free until `trigger` shows up in the output; `seen` is the
    /// end of the output so far, long enough to hold a trigger cut across tokens.
    Waiting {
        trigger: String,
        seen: String,
        then: Box<Matcher>,
    },
}

/// What constrained sampling decided.
pub(crate) struct Step {
    /// `None` when the grammar was already complete.
    pub token: Option<LlamaToken>,
    /// The grammar is complete and allows nothing more: the output ends here.
    pub complete: bool,
}

impl ConstraintState {
    /// A fresh state for one sequence (each choice of `n` gets its own).
    pub fn start(model: &LlamaModel, compiled: &CompiledConstraint) -> Result<Self, EngineError> {
        Ok(match &compiled.0 {
            Compiled::Llg(matcher) => Self::Llg(Box::new(matcher.deep_clone())),
            Compiled::Gbnf(source) => Self::Gbnf(gbnf_sampler(model, source)?),
            Compiled::Triggered { trigger, then } => Self::Waiting {
                trigger: trigger.clone(),
                seen: String::new(),
                then: Box::new(then.deep_clone()),
            },
        })
    }

    /// Whether the next token is sampled freely (a triggered grammar that has
    /// not seen its trigger yet).
    pub fn is_waiting(&self) -> bool {
        matches!(self, Self::Waiting { .. })
    }

    /// Records a freely sampled token's text: once the output holds the
    /// trigger, the grammar governs every token after it. A trigger that a
    /// token carries on past (into text the grammar would have to judge)
    /// starts nothing, and the output stays free.
    pub fn observe(&mut self, piece: &[u8]) {
        let Self::Waiting {
            trigger,
            seen,
            then,
        } = self
        else {
            return;
        };
        seen.push_str(&String::from_utf8_lossy(piece));
        while let Some(at) = seen.find(trigger.as_str()) {
            if seen[at + trigger.len()..].trim().is_empty() {
                let grammar = Self::Llg(Box::new(then.deep_clone()));
                *self = grammar;
                return;
            }
            seen.drain(..at + trigger.len());
        }
        // Keep only what could still be the start of a trigger.
        let keep = trigger.len().saturating_sub(1);
        if seen.len() > keep {
            let mut cut = seen.len() - keep;
            while !seen.is_char_boundary(cut) {
                cut += 1;
            }
            seen.drain(..cut);
        }
    }

    /// Draws the next token with `chain` (after `penalties`) from the tokens
    /// the grammar allows. `logits` are the raw logits of this position. The
    /// chain, the penalties and the grammar all record the token. With
    /// `end_if_complete`, a grammar that may end here ends: the end token is
    /// drawn whatever the logits say.
    pub fn sample(
        &mut self,
        chain: &mut LlamaSampler,
        mut penalties: Option<&mut Penalties>,
        logits: &[f32],
        is_eog: impl Fn(LlamaToken) -> bool,
        end_if_complete: bool,
    ) -> Result<Step, EngineError> {
        let failed =
            |e: String| EngineError::Inference(format!("constrained sampling failed: {e}"));
        let token = match self {
            Self::Llg(matcher) => {
                if matcher.is_stopped() {
                    return Ok(Step {
                        token: None,
                        complete: true,
                    });
                }
                if end_if_complete && matcher.is_accepting().map_err(|e| failed(e.to_string()))? {
                    let env = matcher.tok_env().map_err(|e| failed(e.to_string()))?;
                    let end = i32::try_from(env.tok_trie().eos_token()).map(LlamaToken);
                    // Only a token the model ends on (a vocabulary without one
                    // draws as usual).
                    if let Some(end) = end.ok().filter(|&t| is_eog(t)) {
                        chain.accept(end);
                        return Ok(Step {
                            token: Some(end),
                            complete: false,
                        });
                    }
                }
                let mask = matcher.compute_mask().map_err(|e| failed(e.to_string()))?;
                let mut allowed = Vec::new();
                mask.iter_set_entries(|id| {
                    if let Some(&logit) = logits.get(id) {
                        allowed.push(LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0));
                    }
                });
                if let Some(penalties) = &penalties {
                    penalties.apply(&mut allowed);
                }
                draw(chain, allowed)?
            }
            Self::Waiting { .. } => {
                return Err(EngineError::Inference(
                    "a triggered grammar was asked to sample before its trigger".to_owned(),
                ))
            }
            Self::Gbnf(grammar) => draw_gbnf(grammar, chain, penalties.as_deref(), logits)?,
        };
        chain.accept(token);
        if let Some(penalties) = penalties.as_mut() {
            penalties.accept(token);
        }
        let mut complete = false;
        if !is_eog(token) {
            match self {
                Self::Llg(matcher) => {
                    matcher
                        .consume_token(token.0 as u32)
                        .map_err(|e| failed(e.to_string()))?;
                    // Stopping now saves decoding a token only to learn that
                    // the grammar allows nothing after it.
                    complete = matcher.is_stopped();
                }
                Self::Gbnf(grammar) => grammar.accept(token),
                Self::Waiting { .. } => {}
            }
        }
        Ok(Step {
            token: Some(token),
            complete,
        })
    }
}

/// Draws with `chain` (after `penalties`) from the tokens a GBNF grammar allows.
fn draw_gbnf(
    grammar: &mut LlamaSampler,
    chain: &mut LlamaSampler,
    penalties: Option<&Penalties>,
    logits: &[f32],
) -> Result<LlamaToken, EngineError> {
    let all = || {
        logits
            .iter()
            .enumerate()
            .map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0))
    };
    // Fast path: most tokens a model picks are ones the grammar allows.
    let mut free = LlamaTokenDataArray::from_iter(all(), false);
    if let Some(penalties) = penalties {
        penalties.apply(&mut free.data);
    }
    free.apply_sampler(chain);
    let candidate = free.selected_token();
    let accepted = candidate.filter(|&t| {
        let mut one = LlamaTokenDataArray::new(vec![LlamaTokenData::new(t, 0.0, 0.0)], false);
        one.apply_sampler(grammar);
        one.data.first().is_some_and(|d| d.logit().is_finite())
    });
    match accepted {
        Some(token) => Ok(token),
        None => {
            let mut filtered = LlamaTokenDataArray::from_iter(all(), false);
            filtered.apply_sampler(grammar);
            let mut allowed: Vec<_> = filtered
                .data
                .into_iter()
                .filter(|d| d.logit().is_finite())
                .collect();
            if let Some(penalties) = penalties {
                penalties.apply(&mut allowed);
            }
            draw(chain, allowed)
        }
    }
}

/// Runs the sampler chain over `allowed` only and returns what it selected.
fn draw(chain: &mut LlamaSampler, allowed: Vec<LlamaTokenData>) -> Result<LlamaToken, EngineError> {
    if allowed.is_empty() {
        // The grammar's fault, not the server's: it matches nothing here.
        return Err(EngineError::InvalidGrammar(
            "the grammar allows no token of this model's vocabulary at this point of the output"
                .to_owned(),
        ));
    }
    let mut array = LlamaTokenDataArray::new(allowed, false);
    array.apply_sampler(chain);
    array.selected_token().ok_or_else(|| {
        EngineError::Inference("constrained sampling failed: the sampler selected no token".into())
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use llama_cpp_2::model::params::LlamaModelParams;
    use serde_json::json;

    use super::*;
    use crate::SamplingParams;

    /// SmolLM2's real vocabulary (49,152 tokens), loaded once for these tests.
    fn smollm() -> Arc<LlamaModel> {
        static MODEL: OnceLock<Arc<LlamaModel>> = OnceLock::new();
        MODEL
            .get_or_init(|| {
                let path = PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf"
                ));
                let backend = crate::backend::shared_backend().unwrap();
                let params = LlamaModelParams::default().with_vocab_only(true);
                Arc::new(LlamaModel::load_from_file(backend, path, &params).unwrap())
            })
            .clone()
    }

    /// The single token spelling `text`.
    fn token(model: &LlamaModel, text: &str) -> LlamaToken {
        let tokens = model.vocab().tokenize(text.as_bytes(), false, false);
        assert_eq!(tokens.len(), 1, "{text:?} is one token: {tokens:?}");
        tokens[0]
    }

    fn sampler_chain(temperature: f32, seed: u32, n_vocab: i32) -> LlamaSampler {
        let params = SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        crate::sampling::build(&params, n_vocab).0
    }

    /// Draws until the grammar reports itself complete; returns the text.
    fn generate(
        model: &LlamaModel,
        state: &mut ConstraintState,
        chain: &mut LlamaSampler,
        logits: &[f32],
        forbidden: &[LlamaToken],
    ) -> String {
        let vocab = model.vocab();
        let mut out = Vec::new();
        for _ in 0..64 {
            let step = state
                .sample(chain, None, logits, |t| vocab.is_eog(t), false)
                .unwrap();
            let token = step.token.expect("the grammar is not complete yet");
            assert!(!forbidden.contains(&token), "drew {token:?}");
            out.extend(vocab.token_to_piece(token, false, None));
            if step.complete {
                return String::from_utf8(out).unwrap();
            }
        }
        panic!("no end after 64 tokens: {}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn a_json_schema_draws_only_what_it_allows_and_ends_when_complete() {
        let model = smollm();
        let grammars = Grammars::new(model.clone());
        let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
                            "required": ["ok"]});
        let compiled = grammars.compile(&Constraint::JsonSchema(schema)).unwrap();
        let n_vocab = model.n_vocab();
        // Every token equally likely, except a few the grammar never allows,
        // which are e^30 times likelier: unconstrained, they would be drawn.
        let forbidden = [
            model.vocab().eos(),
            token(&model, "Hello"),
            token(&model, " {"),
        ];
        let mut logits = vec![0.0f32; n_vocab as usize];
        for t in forbidden {
            logits[t.0 as usize] = 30.0;
        }
        let mut seen = std::collections::HashSet::new();
        for seed in 0..24 {
            let mut state = ConstraintState::start(&model, &compiled).unwrap();
            let mut chain = sampler_chain(1.0, seed, n_vocab);
            let text = generate(&model, &mut state, &mut chain, &logits, &forbidden);
            let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("{text:?}: {e}");
            });
            assert!(value["ok"].is_boolean(), "{text}");
            assert_eq!(value.as_object().map(|o| o.len()), Some(1), "{text}");
            assert!(whitespace_is_bounded(&text), "{text:?}");
            seen.insert(value["ok"].clone());
            // Complete: nothing more may be drawn, whatever the logits say.
            let after = state
                .sample(&mut chain, None, &logits, |_| false, false)
                .unwrap();
            assert!(after.token.is_none() && after.complete);
        }
        assert_eq!(
            seen.len(),
            2,
            "random draws among the allowed tokens reach both values: {seen:?}"
        );
    }

    #[test]
    fn a_free_json_object_stays_on_one_line() {
        let model = smollm();
        let grammars = Grammars::new(model.clone());
        let vocab = model.vocab();
        // A newline is the likeliest token everywhere, then an opening and a
        // closing brace.
        let mut logits = vec![0.0f32; model.n_vocab() as usize];
        logits[token(&model, "\n").0 as usize] = 40.0;
        logits[token(&model, "{").0 as usize] = 30.0;
        logits[token(&model, "}").0 as usize] = 20.0;
        let first_two = |schema: Value| {
            let compiled = grammars.compile(&Constraint::JsonSchema(schema)).unwrap();
            let mut state = ConstraintState::start(&model, &compiled).unwrap();
            let mut greedy = sampler_chain(0.0, 0, model.n_vocab());
            let mut text = Vec::new();
            for _ in 0..2 {
                let step = state
                    .sample(&mut greedy, None, &logits, |t| vocab.is_eog(t), false)
                    .unwrap();
                text.extend(vocab.token_to_piece(step.token.unwrap(), false, None));
            }
            String::from_utf8(text).unwrap()
        };
        assert_eq!(first_two(any_json_object()), "{}");
        // A schema's output may break lines.
        assert_eq!(first_two(json!({"type": "object"})), "{\n");
    }

    /// Every run of whitespace is one space, or one or two newlines and at most
    /// 20 spaces or tabs (the JSON output's bound; this test's JSON has no
    /// strings with spaces in them).
    fn whitespace_is_bounded(text: &str) -> bool {
        let mut runs = Vec::new();
        let mut run = String::new();
        for c in text.chars() {
            if c.is_whitespace() {
                run.push(c);
            } else if !run.is_empty() {
                runs.push(std::mem::take(&mut run));
            }
        }
        runs.push(run);
        runs.iter().filter(|r| !r.is_empty()).all(|r| {
            let indent = r.trim_start_matches('\n');
            let newlines = r.len() - indent.len();
            r == " "
                || ((1..=2).contains(&newlines)
                    && indent.len() <= 20
                    && indent.chars().all(|c| c == ' ' || c == '\t'))
        })
    }

    #[test]
    fn a_gbnf_grammar_overrides_the_likeliest_token_and_ends_with_an_end_token() {
        let model = smollm();
        let grammars = Grammars::new(model.clone());
        let compiled = grammars
            .compile(&Constraint::Gbnf(r#"root ::= "yes" | "no""#.to_owned()))
            .unwrap();
        let vocab = model.vocab();
        let (hello, no, yes) = (
            token(&model, "Hello"),
            token(&model, "no"),
            token(&model, "yes"),
        );
        let mut logits = vec![0.0f32; model.n_vocab() as usize];
        logits[hello.0 as usize] = 30.0;
        logits[vocab.eos().0 as usize] = 20.0;
        logits[no.0 as usize] = 10.0;
        logits[yes.0 as usize] = 5.0;
        let mut state = ConstraintState::start(&model, &compiled).unwrap();
        let mut greedy = sampler_chain(0.0, 0, model.n_vocab());
        let is_eog = |t| vocab.is_eog(t);
        // "Hello" and the end token are likelier, but only "yes" or "no" may
        // start the output: greedy takes the likelier of those.
        let first = state
            .sample(&mut greedy, None, &logits, is_eog, false)
            .unwrap();
        assert_eq!(first.token, Some(no));
        assert!(!first.complete);
        // After "no" the grammar allows only the end of generation, which is
        // how a GBNF-constrained sequence ends ("Hello" is likelier still).
        let second = state
            .sample(&mut greedy, None, &logits, is_eog, false)
            .unwrap();
        assert_eq!(second.token, Some(vocab.eos()));
        // Where the likeliest token is allowed, it is taken as drawn.
        let mut state = ConstraintState::start(&model, &compiled).unwrap();
        logits[hello.0 as usize] = 0.0;
        logits[yes.0 as usize] = 40.0;
        let first = state
            .sample(&mut greedy, None, &logits, is_eog, false)
            .unwrap();
        assert_eq!(first.token, Some(yes));
    }

    #[test]
    fn a_grammar_that_may_end_ends_when_asked_and_not_before() {
        let model = smollm();
        let grammars = Grammars::new(model.clone());
        // Calls on lines: one at least, more allowed, as a parallel call list.
        let compiled = grammars
            .compile(&Constraint::Lark(
                r#"start: "yes" ("\n" "yes"){0,7}"#.to_owned(),
            ))
            .unwrap();
        let vocab = model.vocab();
        let (yes, newline) = (token(&model, "yes"), token(&model, "\n"));
        let mut logits = vec![0.0f32; model.n_vocab() as usize];
        logits[yes.0 as usize] = 30.0;
        logits[newline.0 as usize] = 40.0;
        let is_eog = |t| vocab.is_eog(t);
        let mut greedy = sampler_chain(0.0, 0, model.n_vocab());
        let mut state = ConstraintState::start(&model, &compiled).unwrap();
        // Asked to end where the grammar may not: it draws as usual.
        let first = state
            .sample(&mut greedy, None, &logits, is_eog, true)
            .unwrap();
        assert_eq!(first.token, Some(yes));
        // Where it may end, it would rather go on ("\n" is likeliest)...
        let mut going_on = ConstraintState::start(&model, &compiled).unwrap();
        going_on
            .sample(&mut greedy, None, &logits, is_eog, false)
            .unwrap();
        let next = going_on
            .sample(&mut greedy, None, &logits, is_eog, false)
            .unwrap();
        assert_eq!(next.token, Some(newline));
        // ...unless asked to end: the end token, whatever the logits say.
        let end = state
            .sample(&mut greedy, None, &logits, is_eog, true)
            .unwrap();
        let end = end.token.unwrap();
        assert!(vocab.is_eog(end), "{end:?}");
    }

    #[test]
    fn a_triggered_grammar_is_free_until_its_trigger_then_constrains() {
        let model = smollm();
        let grammars = Grammars::new(model.clone());
        let compiled = grammars
            .compile(&Constraint::Triggered {
                trigger: "<call>".to_owned(),
                then: r#"start: "go(" ("a" | "b") ")""#.to_owned(),
            })
            .unwrap();
        let mut state = ConstraintState::start(&model, &compiled).unwrap();
        assert!(state.is_waiting());
        state.observe(b"Let me <ca");
        assert!(state.is_waiting(), "half a trigger starts nothing");
        state.observe(b"ll> and more");
        assert!(
            state.is_waiting(),
            "a trigger carried on past starts nothing"
        );
        state.observe(b" then <call");
        state.observe(b">");
        assert!(!state.is_waiting(), "the trigger, split across tokens");
        let forbidden = [token(&model, "Hello"), model.vocab().eos()];
        let mut logits = vec![0.0f32; model.n_vocab() as usize];
        for t in forbidden {
            logits[t.0 as usize] = 30.0;
        }
        for seed in 0..8 {
            let mut state = ConstraintState::start(&model, &compiled).unwrap();
            state.observe(b"<call>");
            let mut chain = sampler_chain(1.0, seed, model.n_vocab());
            let text = generate(&model, &mut state, &mut chain, &logits, &forbidden);
            assert!(text == "go(a)" || text == "go(b)", "{text:?}");
        }
    }

    /// Whether the whole of `text`, as the model would tokenize it, is a
    /// complete output of `compiled`.
    fn accepts(model: &LlamaModel, compiled: &CompiledConstraint, text: &str) -> bool {
        let Compiled::Llg(matcher) = &compiled.0 else {
            panic!("an llguidance grammar");
        };
        let mut matcher = matcher.deep_clone();
        let tokens: Vec<u32> = model
            .vocab()
            .tokenize(text.as_bytes(), false, false)
            .iter()
            .map(|t| t.0 as u32)
            .collect();
        matcher.validate_tokens(&tokens).unwrap() == tokens.len()
            && matcher.consume_tokens(&tokens).is_ok()
            && matcher.is_accepting().unwrap()
    }

    #[test]
    fn a_thinking_model_may_think_before_its_constrained_answer() {
        let model = smollm();
        let grammars = Grammars::new(model.clone());
        let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
                            "required": ["ok"]});
        let answer = r#"{"ok": true}"#;
        let thought = "<think>\nThe user wants a flag.\n</think>\n\n";
        let free = grammars
            .compile(&Constraint::JsonSchema(schema.clone()).after_thought(false))
            .unwrap();
        assert!(accepts(&model, &free, answer), "the block is optional");
        assert!(
            !accepts(&model, &free, &format!("\n{answer}")),
            "no gap without it"
        );
        assert!(accepts(&model, &free, &format!("{thought}{answer}")));
        assert!(!accepts(&model, &free, &format!("{thought}yes")));
        assert!(!accepts(&model, &free, "<think>only thoughts"));
        // The prompt opened the block: it closes before the answer.
        let open = grammars
            .compile(&Constraint::JsonSchema(schema).after_thought(true))
            .unwrap();
        assert!(accepts(&model, &open, &format!("Hmm.</think>{answer}")));
        assert!(!accepts(&model, &open, answer));
        // Our Lark grammars join the same way (answer_or_calls names a rule
        // `answer` of its own).
        let lark = Constraint::Lark("start: answer | \"no\"\nanswer: \"yes\"\n".into());
        let lark = grammars.compile(&lark.after_thought(false)).unwrap();
        assert!(accepts(&model, &lark, "<think>x</think>yes"));
        assert!(accepts(&model, &lark, "no"));
        let gbnf = Constraint::Gbnf("root ::= \"a\"".into());
        assert_eq!(gbnf.clone().after_thought(true), gbnf);
    }

    #[test]
    fn objects_keep_to_their_listed_properties() {
        let schema = json!({"type": "object", "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "c": {"type": "object", "additionalProperties": {"type": "integer"}},
            "d": {"const": {"properties": {}}},
            "properties": {"type": "string"},
        }, "$defs": {"e": {"type": "object", "properties": {}}}});
        let closed = with_json_options(&schema);
        assert_eq!(closed["additionalProperties"], false);
        assert_eq!(closed["properties"]["a"]["additionalProperties"], false);
        assert_eq!(
            closed["properties"]["c"]["additionalProperties"]["type"],
            "integer"
        );
        assert!(closed["properties"]["d"]["const"]
            .get("additionalProperties")
            .is_none());
        assert_eq!(closed["$defs"]["e"]["additionalProperties"], false);
        // A property named like a keyword is a property, not a keyword.
        assert!(closed["properties"].get("additionalProperties").is_none());
        let composed = json!({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]});
        assert!(with_json_options(&composed)["allOf"][0]
            .get("additionalProperties")
            .is_none());
    }
}
