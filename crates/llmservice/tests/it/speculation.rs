//! Speculation on the real model (prompt lookup, and a draft model): greedy
//! answers are the same token for token with and without guesses, across the
//! features that touch decoding (constraints, stops, `n`, logprobs, streaming).
//!
//! Both servers keep the KV window under 512 cells (`LIGHT_N_CTX=448`): from
//! 512 cells on, llama.cpp's CPU attention splits the keys of a single-query
//! step across threads and so rounds differently from a step of several rows.
//! Past that size any change of batch shape (another stream joining the step,
//! a cached prefix) can move a near-tie, with or without speculation.
//!
//! Where llama.cpp's matrix kernels themselves round by batch shape (its
//! AVX-512 build does; its AVX2 build does not, below 512 cells), a step of
//! several rows differs from a step of one in the last bits whatever the
//! scheduler does, and a greedy answer can flip at a near-tie with a second
//! stream in the step as with guesses. The test finds out which build it
//! runs on (one request alone and beside another) and there requires the
//! answers to agree token for token up to a near-tie, with logprobs within
//! rounding, instead of bit for bit.

use serde_json::{json, Value};

use crate::common::*;

const PASSAGE: &str = "The lighthouse stood on a rock at the mouth of the harbour. Every evening \
the keeper climbed the one hundred and twelve steps, wound the clockwork that turned the lens, \
and lit the lamp. Ships coming in from the north saw the light long before they saw the land.";

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "light", "max_tokens": 64, "temperature": 0,
        "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The requests both servers answer, by endpoint.
fn corpus() -> Vec<(&'static str, Value)> {
    let quote = format!("Repeat this passage word for word:\n\n{PASSAGE}");
    let code = "def total(items):\n    s = 0\n    for item in items:\n        s += item.price\n    return s\n";
    vec![
        ("/v1/chat/completions", chat(&quote, json!({}))),
        (
            "/v1/chat/completions",
            chat(&quote, json!({"repeat_penalty": 1.0})),
        ),
        (
            "/v1/chat/completions",
            chat(
                &format!("Rename `s` to `total_price` and return the whole code:\n\n{code}"),
                json!({"max_tokens": 80}),
            ),
        ),
        (
            "/v1/chat/completions",
            // Short: two streams in a step interleave their KV cells, and past a
            // few dozen tokens the plain server's own greedy choices drift apart
            // on a near-tie (attention rounds by layout).
            chat(
                &format!("{PASSAGE}\n\nWhat did the keeper do every evening?"),
                json!({"n": 2, "max_tokens": 24}),
            ),
        ),
        (
            "/v1/chat/completions",
            chat(
                &quote,
                json!({"logprobs": true, "top_logprobs": 2, "max_tokens": 40}),
            ),
        ),
        (
            "/v1/chat/completions",
            chat(
                &format!("{PASSAGE}\n\nGive the keeper's evening tasks as JSON."),
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "tasks",
                    "schema": {"type": "object", "properties": {
                        "tasks": {"type": "array", "items": {"type": "string"}}},
                        "required": ["tasks"]}}}}),
            ),
        ),
        (
            "/v1/completions",
            json!({"model": "light", "prompt": format!("{PASSAGE}\n{PASSAGE}\n"), "max_tokens": 60,
                   "temperature": 0, "stop": ["lamp"]}),
        ),
        (
            "/v1/chat/completions",
            chat(
                "Write a short story about a robot who paints.",
                json!({"max_tokens": 96}),
            ),
        ),
    ]
}

/// What must not change: each choice's text, tool calls, finish and logprobs,
/// and the token count.
fn answer(body: &Value) -> Value {
    let choices: Vec<Value> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            json!({"text": c.get("text").or(c["message"].get("content")), "finish": c["finish_reason"],
                   "logprobs": c["logprobs"]})
        })
        .collect();
    json!({"choices": choices, "completion_tokens": body["usage"]["completion_tokens"]})
}

/// A token, its logprob, and the top alternatives with theirs.
type Token = (String, f64, Vec<(String, f64)>);

/// Each choice's tokens, from chat's or legacy completions' logprobs.
fn tokens(body: &Value) -> Vec<Vec<Token>> {
    let choices = body["choices"].as_array().unwrap();
    choices
        .iter()
        .map(|c| {
            let logprobs = &c["logprobs"];
            if let Some(content) = logprobs["content"].as_array() {
                content.iter().map(chat_token).collect()
            } else {
                let texts = logprobs["tokens"].as_array().unwrap();
                let values = logprobs["token_logprobs"].as_array().unwrap();
                let tops = logprobs["top_logprobs"].as_array().unwrap();
                texts
                    .iter()
                    .zip(values)
                    .zip(tops)
                    .map(|((t, v), top)| {
                        let top = top.as_object().unwrap();
                        let top = top.iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap()));
                        (
                            t.as_str().unwrap().to_owned(),
                            v.as_f64().unwrap(),
                            top.collect(),
                        )
                    })
                    .collect()
            }
        })
        .collect()
}

fn chat_token(t: &Value) -> Token {
    let top = t["top_logprobs"].as_array().unwrap();
    let top = top.iter().map(|a| {
        (
            a["token"].as_str().unwrap().to_owned(),
            a["logprob"].as_f64().unwrap(),
        )
    });
    (
        t["token"].as_str().unwrap().to_owned(),
        t["logprob"].as_f64().unwrap(),
        top.collect(),
    )
}

/// Logprobs of one token computed in steps of different shapes differ by
/// about this much here (AVX-512 kernels); a wrong KV cell moves them by more.
const ROUNDING: f64 = 0.25;
/// A choice between two tokens this close can flip with rounding alone.
const NEAR_TIE: f64 = 0.5;

/// Whether two answers agree token for token up to rounding: equal tokens
/// with logprobs within `ROUNDING`, and where they part, at a near-tie of
/// the first answer (the second's token among its top choices, within
/// `NEAR_TIE` of the best).
fn agree_up_to_rounding(a: &[Vec<Token>], b: &[Vec<Token>]) -> Result<(), String> {
    assert_eq!(a.len(), b.len(), "choices");
    for (choice, (a, b)) in a.iter().zip(b).enumerate() {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if x.0 == y.0 {
                if (x.1 - y.1).abs() > ROUNDING {
                    return Err(format!(
                        "choice {choice} token {i} {:?}: logprob {} vs {}",
                        x.0, x.1, y.1
                    ));
                }
                continue;
            }
            let best = x.2.iter().map(|t| t.1).fold(f64::MIN, f64::max);
            let theirs = x.2.iter().find(|t| t.0 == y.0).map(|t| t.1);
            return match theirs {
                Some(lp) if best - lp <= NEAR_TIE => Ok(()),
                _ => Err(format!(
                    "choice {choice} token {i}: {:?} became {:?} (top {:?})",
                    x.0, y.0, x.2
                )),
            };
        }
        if a.len() != b.len() {
            return Err(format!(
                "choice {choice}: {} tokens vs {}",
                a.len(),
                b.len()
            ));
        }
    }
    Ok(())
}

/// The request with logprobs and the two best alternatives, and without a
/// repeat penalty: logprobs are the model's, before penalties, so only then
/// does the greedy choice have the best logprob and a near-tie show in them.
fn with_logprobs(path: &str, body: &Value) -> Value {
    let mut body = body.clone();
    body["repeat_penalty"] = json!(1.0);
    if path == "/v1/completions" {
        body["logprobs"] = json!(2);
    } else {
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(2);
    }
    body
}

fn guessed(body: &Value) -> (u64, u64) {
    let details = &body["usage"]["completion_tokens_details"];
    (
        details["accepted_prediction_tokens"].as_u64().unwrap_or(0),
        details["rejected_prediction_tokens"].as_u64().unwrap_or(0),
    )
}

/// Asks both servers every request of the corpus and holds the guessing
/// one's answers to the plain one's; the guesses it kept and threw away.
async fn same_answers(plain: &TestApp, guessing: &TestApp, exact: bool) -> (u64, u64) {
    let (mut accepted, mut rejected) = (0, 0);
    for (i, (path, body)) in corpus().into_iter().enumerate() {
        let body = if exact {
            body
        } else {
            with_logprobs(path, &body)
        };
        let (status, _, a) = plain.post(path, body.clone()).await;
        assert_eq!(status, 200, "{a}");
        assert!(a["usage"].get("completion_tokens_details").is_none(), "{a}");
        let (status, _, b) = guessing.post(path, body).await;
        assert_eq!(status, 200, "{b}");
        if exact {
            assert_eq!(answer(&b), answer(&a), "request {i} changed with guesses");
        } else if let Err(error) = agree_up_to_rounding(&tokens(&a), &tokens(&b)) {
            panic!("request {i} changed with guesses beyond rounding: {error}\n{a}\n{b}");
        }
        let (kept, thrown) = guessed(&b);
        accepted += kept;
        rejected += thrown;
    }
    (accepted, rejected)
}

#[tokio::test]
async fn greedy_answers_are_identical_with_and_without_guesses() {
    let window = [("LIGHT_N_CTX", "448"), ("LIGHT_PARALLEL", "2")];
    // Probed on a server of its own: the compared two must hold the same
    // cached prefixes (in slots and in host memory), whose layout can move a
    // near-tie on kernels that round by batch shape.
    let exact = kernels_round_alike(&TestApp::new(&[window[0], window[1]])).await;
    let plain = TestApp::new(&[window[0], window[1], ("LIGHT_SPECULATIVE", "off")]);
    let guessing = TestApp::new(&[window[0], window[1], ("LIGHT_SPECULATIVE", "ngram")]);
    let (accepted, rejected) = same_answers(&plain, &guessing, exact).await;
    assert!(accepted > 0, "guesses were kept ({rejected} rejected)");

    // A draft model guesses instead: SmolLM2 for itself, whose guesses all
    // hold, so that every kind of request verifies long runs of them (against
    // a fresh plain server, for the same reason as above).
    let smollm = smollm();
    let plain = TestApp::new(&[window[0], window[1], ("LIGHT_SPECULATIVE", "off")]);
    let drafting = TestApp::new(&[
        window[0],
        window[1],
        ("LIGHT_DRAFT_MODEL_PATH", smollm.as_str()),
    ]);
    let (accepted, rejected) = same_answers(&plain, &drafting, exact).await;
    assert!(
        accepted > 20,
        "the draft model's guesses were kept ({accepted}, {rejected} rejected)"
    );

    // A stream carries the same text, and the usage details at its end.
    let body = chat(
        &format!("Repeat this passage word for word:\n\n{PASSAGE}"),
        json!({"stream": true, "stream_options": {"include_usage": true},
               "logprobs": true, "top_logprobs": 2, "repeat_penalty": 1.0}),
    );
    let (_, _, whole) = plain.post("/v1/chat/completions", chat_whole(&body)).await;
    let (status, _, streamed) = guessing.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    let streamed = streamed.as_str().unwrap().to_owned();
    let mut text = String::new();
    let mut usage = Value::Null;
    let mut pieces = Vec::new();
    for payload in sse_payloads(&streamed) {
        if payload == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&payload).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
        if let Some(content) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            pieces.extend(content.iter().map(chat_token));
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    if exact {
        assert_eq!(
            text,
            whole["choices"][0]["message"]["content"].as_str().unwrap()
        );
        assert_eq!(
            usage["completion_tokens"],
            whole["usage"]["completion_tokens"]
        );
    } else {
        agree_up_to_rounding(&tokens(&whole), &[pieces]).unwrap();
        assert_eq!(
            usage["completion_tokens"].as_u64(),
            Some(text_tokens(&streamed))
        );
    }

    // The counters reach /metrics.
    let metrics = guessing.router().oneshot_get("/metrics").await;
    let drafted = metrics
        .lines()
        .find(|l| {
            l.starts_with("llmservice_speculative_tokens_total")
                && l.contains("outcome=\"drafted\"")
        })
        .unwrap_or_else(|| panic!("no drafted counter in\n{metrics}"));
    let count: f64 = drafted.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= (accepted + rejected) as f64, "{drafted}");
}

/// Tokens a stream's logprobs listed.
fn text_tokens(streamed: &str) -> u64 {
    sse_payloads(streamed)
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .map(Vec::len)
        })
        .sum::<usize>() as u64
}

/// Whether this build's kernels give a sequence the same numbers in a step
/// of one row as in a step shared with another sequence: a request's
/// logprobs alone, then beside a second stream.
async fn kernels_round_alike(app: &TestApp) -> bool {
    let (path, probe) = corpus().swap_remove(4);
    let (_, _, alone) = app.post(path, probe.clone()).await;
    let other = chat(
        "Write a short story about a robot who paints.",
        json!({"max_tokens": 48}),
    );
    let (beside, _) = tokio::join!(app.post(path, probe), app.post(path, other));
    let same = answer(&beside.2) == answer(&alone);
    if !same {
        eprintln!("this build's kernels round by batch shape: comparing up to rounding");
    }
    same
}

#[tokio::test]
async fn a_request_may_opt_out_and_sampled_requests_never_guess() {
    let app = TestApp::new(&[("LIGHT_SPECULATIVE", "ngram")]);
    let quote = format!("Repeat this passage word for word:\n\n{PASSAGE}");
    let (_, _, guessing) = app
        .post("/v1/chat/completions", chat(&quote, json!({})))
        .await;
    assert!(guessed(&guessing).0 > 0, "{guessing}");
    for extra in [
        json!({"speculative": false}),
        json!({"temperature": 0.8, "seed": 3}),
    ] {
        let (status, _, body) = app.post("/v1/chat/completions", chat(&quote, extra)).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["usage"].get("completion_tokens_details").is_none(),
            "{body}"
        );
    }
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            chat(&quote, json!({"speculative": "yes"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

fn chat_whole(stream: &Value) -> Value {
    let mut body = stream.clone();
    body.as_object_mut().unwrap().remove("stream");
    body.as_object_mut().unwrap().remove("stream_options");
    body
}

#[tokio::test]
async fn a_prediction_is_guessed_from_and_never_changes_the_answer() {
    // Speculation is off for the tier: a prediction still guesses.
    let app = TestApp::new(&[("LIGHT_N_CTX", "448"), ("LIGHT_SPECULATIVE", "off")]);
    let code = "def total(items):\n    s = 0\n    for item in items:\n        s += item.price\n    return s\n";
    let ask = |prediction: Value| {
        let mut body = chat(
            &format!("Rename `s` to `total_price` and return the whole code:\n\n{code}"),
            json!({"max_tokens": 80}),
        );
        if !prediction.is_null() {
            body["prediction"] = prediction;
        }
        body
    };
    let (_, _, plain) = app.post("/v1/chat/completions", ask(Value::Null)).await;
    assert!(
        plain["usage"].get("completion_tokens_details").is_none(),
        "{plain}"
    );
    let expected = plain["choices"][0]["message"]["content"].as_str().unwrap();

    // The answer itself as the prediction: most guesses hold.
    let (_, _, right) = app
        .post(
            "/v1/chat/completions",
            ask(json!({"type": "content", "content": expected})),
        )
        .await;
    assert_eq!(answer(&right), answer(&plain));
    let (kept, thrown) = guessed(&right);
    let tokens = right["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        kept > thrown && 2 * kept >= tokens,
        "kept {kept}, rejected {thrown} of {tokens}"
    );

    // A prediction in parts that is mostly wrong changes nothing either.
    let parts = json!({"type": "content", "content": [
        {"type": "text", "text": "class Basket:\n"}, {"type": "text", "text": "    pass\n"}]});
    let (_, _, wrong) = app.post("/v1/chat/completions", ask(parts)).await;
    assert_eq!(answer(&wrong), answer(&plain));

    for bad in [
        json!({"type": "text", "content": "x"}),
        json!({"type": "content", "content": 3}),
    ] {
        let (status, _, body) = app.post("/v1/chat/completions", ask(bad)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error_of(&body)["param"], "prediction", "{body}");
    }
}

#[tokio::test]
async fn a_draft_model_of_another_vocabulary_is_a_clear_load_error() {
    let minilm = shared_models()
        .join("all-MiniLM-L6-v2-f16.gguf")
        .display()
        .to_string();
    let app = TestApp::new(&[("LIGHT_DRAFT_MODEL_PATH", minilm.as_str())]);
    let (status, _, body) = app
        .post(
            "/v1/chat/completions",
            chat("Hello", json!({"max_tokens": 4})),
        )
        .await;
    assert_eq!(status, 500, "{body}");
    let message = error_of(&body)["message"].as_str().unwrap();
    assert!(
        message.contains("all-MiniLM-L6-v2-f16.gguf")
            && message.contains("does not share the model's vocabulary")
            && message.contains("30522 tokens, the model 49152"),
        "{message}"
    );
}
