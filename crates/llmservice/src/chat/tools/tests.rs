use super::grammar::*;
use super::history::*;
use super::*;
use engine::chat::ToolCallFormat;

fn request(extra: Value) -> ChatCompletionRequest {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    serde_json::from_value(body).unwrap()
}

fn weather() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

#[test]
fn reads_tool_choices() {
    let plan = plan(&request(json!({"tools": weather()})))
        .unwrap()
        .unwrap();
    assert_eq!(plan.choice, ToolChoice::Auto);
    assert!(plan.parallel);
    let named = json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
    let plan = plan_of(named);
    assert_eq!(plan.choice, ToolChoice::Named("get_weather".into()));
    let legacy = plan_of(
        json!({"functions": [weather()[0]["function"]], "function_call": {"name": "get_weather"}}),
    );
    assert!(legacy.legacy && !legacy.parallel);
    assert_eq!(legacy.choice, ToolChoice::Named("get_weather".into()));
}

fn plan_of(extra: Value) -> ToolPlan {
    plan(&request(extra)).unwrap().unwrap()
}

#[test]
fn every_family_grammar_compiles_against_a_real_vocabulary() {
    let path = std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models/SmolLM2-135M-Instruct-Q4_1.gguf"
    ));
    let engine = engine::Engine::load(&path, engine::EngineConfig::default()).unwrap();
    let control = |t: &str| engine.control_token(t);
    for format in [
        ToolCallFormat::Hermes,
        ToolCallFormat::Llama3,
        ToolCallFormat::MistralNemo,
        ToolCallFormat::MistralV11,
        ToolCallFormat::GenericJson,
    ] {
        for parallel in [true, false] {
            let plan = plan_of(json!({"tools": weather(), "parallel_tool_calls": parallel}));
            let forced = ToolPlan {
                choice: ToolChoice::Required,
                ..plan.clone()
            };
            let calls = call_constraint(&forced, format, &control);
            if let Err(e) = engine.compile_constraint(&calls) {
                panic!("{format:?} forced, parallel {parallel}: {e}\n{calls:?}");
            }
            match triggered_call_constraint(&plan, format, &control) {
                Some(triggered) => {
                    if let Err(e) = engine.compile_constraint(&triggered) {
                        panic!("{format:?} triggered, parallel {parallel}: {e}\n{triggered:?}");
                    }
                }
                None => assert_eq!(format, ToolCallFormat::GenericJson),
            }
        }
    }
}

#[test]
fn a_client_tool_named_like_a_builtin_stays_the_clients() {
    let own = json!([{"type": "function", "function": {"name": "get_current_time",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let plan = plan_of(json!({"tools": own, "execute_builtin_functions": true}));
    assert!(plan.builtin("get_current_time").is_none());
    assert!(plan.builtin("days_between").is_some());
    assert!(plan_of(json!({"tools": weather()}))
        .builtin("days_between")
        .is_none());
}

#[test]
fn rejects_bad_tools() {
    for (extra, param) in [
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": weather(), "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": weather(), "functions": [weather()[0]["function"]]}),
            "functions",
        ),
        (json!({"tools": [weather()[0], weather()[0]]}), "tools"),
    ] {
        let error = plan(&request(extra.clone())).unwrap_err();
        assert_eq!(error.param(), Some(param), "{extra}");
        assert!(!matches!(error, RequestError::Engine(_)), "{extra}");
    }
}

fn output_of(extra: Value) -> Result<Option<Constraint>, RequestError> {
    let req = request(extra);
    output_constraint(req.response_format.as_ref(), req.grammar.as_deref())
}

#[test]
fn reads_response_formats() {
    let c = output_of(json!({"response_format": {"type": "json_object"}})).unwrap();
    assert_eq!(c, Some(Constraint::JsonSchema(engine::any_json_object())));
    // llama-cpp-python's schema next to the type is the schema.
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let c =
        output_of(json!({"response_format": {"type": "json_object", "schema": schema}})).unwrap();
    assert_eq!(c, Some(Constraint::JsonSchema(schema.clone())));
    let c = output_of(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}})).unwrap();
    assert_eq!(c, Some(Constraint::JsonSchema(schema)));
    assert_eq!(
        output_of(json!({"response_format": {"type": "text"}})).unwrap(),
        None
    );
    for bad in [
        json!({"response_format": {"type": "yaml"}}),
        json!({"response_format": {"type": "json_schema"}}),
        json!({"response_format": "json"}),
        json!({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}),
        json!({"grammar": "  "}),
    ] {
        assert!(output_of(bad.clone()).is_err(), "{bad}");
    }
}

#[test]
fn history_checks() {
    let ok = json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]);
    check_history(ok.as_array().unwrap()).unwrap();
    for (bad, param) in [
        (
            json!([{"role": "assistant", "tool_calls": {"a": 1}}]),
            "messages[0].tool_calls",
        ),
        (
            json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            json!([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]),
            "messages[0].tool_calls[0].function.name",
        ),
        (
            json!([{"role": "tool", "content": "x"}]),
            "messages[0].tool_call_id",
        ),
        (
            json!([{"role": "user", "content": "x", "tool_calls": []}]),
            "messages[0].tool_calls",
        ),
    ] {
        let error = check_history(bad.as_array().unwrap()).unwrap_err();
        assert_eq!(error.param(), Some(param), "{bad}");
    }
}

#[test]
fn call_grammars_name_markers_by_id_when_they_are_control_tokens() {
    let plan = plan_of(
        json!({"tools": weather(), "tool_choice": "required", "parallel_tool_calls": false}),
    );
    let control = |text: &str| (text == "[TOOL_CALLS]").then_some(5);
    let Constraint::Lark(nemo) = call_constraint(&plan, ToolCallFormat::MistralNemo, &control)
    else {
        panic!("lark expected");
    };
    assert!(nemo.starts_with("start: <[5]> %json"), "{nemo}");
    assert!(nemo.contains("\"maxItems\":1"), "{nemo}");
    let Constraint::Lark(hermes) = call_constraint(&plan, ToolCallFormat::Hermes, &control) else {
        panic!("lark expected");
    };
    assert!(
        hermes.starts_with("start: \"<tool_call>\" \"\\n\" call \"\\n\" \"</tool_call>\""),
        "{hermes}"
    );
    assert!(hermes.contains("\ncall: %json"), "{hermes}");
    // The generic form: one call object per line, so the model may stop after one.
    assert!(matches!(
        call_constraint(&plan, ToolCallFormat::GenericJson, &control),
        Constraint::JsonSchema(_)
    ));
    let parallel = ToolPlan {
        parallel: true,
        ..plan
    };
    let Constraint::Lark(generic) =
        call_constraint(&parallel, ToolCallFormat::GenericJson, &control)
    else {
        panic!("lark expected for parallel generic calls");
    };
    assert!(
        generic.starts_with("start: call (\"\\n\" call){0,7} \"\\n\"?\ncall: %json"),
        "{generic}"
    );
}

#[test]
fn named_tool_choice_is_one_call() {
    let plan = plan_of(json!({"tools": weather(), "parallel_tool_calls": true,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}));
    assert!(!plan.parallel);
    assert!(plan_of(json!({"tools": weather(), "tool_choice": "required"})).parallel);
}

#[test]
fn generic_history_writes_one_call_per_line() {
    let mut messages = vec![
        json!({"role": "user", "content": "weather in Paris and Rome?"}),
        json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}),
    ];
    adapt_for_generic(&mut messages, None);
    assert_eq!(
        messages[1]["content"],
        "{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n\
         {\"name\":\"get_weather\",\"arguments\":{\"city\":\"Rome\"}}"
    );
}

#[test]
fn generic_history_turns_calls_into_text() {
    let mut messages = vec![
        json!({"role": "user", "content": "weather?"}),
        json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
    ];
    let plan = plan_of(json!({"tools": weather()}));
    adapt_for_generic(&mut messages, Some(&plan));
    assert_eq!(messages[0]["role"], "system");
    assert!(messages[0]["content"]
        .as_str()
        .unwrap()
        .contains("get_weather"));
    assert_eq!(
        messages[2]["content"],
        r#"{"name":"get_weather","arguments":{"city":"Paris"}}"#
    );
    assert!(messages[2].get("tool_calls").is_none());
}

#[test]
fn generic_history_tells_results_as_user_turns_that_alternate() {
    let mut messages = vec![
        json!({"role": "user", "content": "weather in Paris and Rome?"}),
        json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}),
        json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}),
        json!({"role": "tool", "tool_call_id": "c2", "content": "rain"}),
        json!({"role": "user", "content": "and so?"}),
    ];
    adapt_for_generic(&mut messages, None);
    let roles: Vec<_> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(
        messages[2]["content"],
        "{\"tool_result\":{\"name\":\"get_weather\",\"content\":\"sunny\"}}\n\n\
         {\"tool_result\":{\"name\":\"get_weather\",\"content\":\"rain\"}}\n\nand so?"
    );
    assert!(messages[2].get("tool_call_id").is_none());
}

#[test]
fn legacy_history_becomes_tool_calls_and_results() {
    let mut messages = vec![
        json!({"role": "user", "content": "weather?"}),
        json!({"role": "assistant", "content": null, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}),
        json!({"role": "function", "name": "get_weather", "content": "sunny"}),
    ];
    legacy_history_as_tools(&mut messages);
    let call = &messages[1]["tool_calls"][0];
    let id = call["id"].as_str().unwrap();
    assert_eq!(id.len(), 9, "Mistral's templates take 9 alphanumerics");
    assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\": \"Paris\"}");
    assert!(messages[1].get("function_call").is_none());
    assert_eq!(messages[2]["role"], "tool");
    assert_eq!(messages[2]["tool_call_id"], id);
    check_history(&messages).unwrap();
}
