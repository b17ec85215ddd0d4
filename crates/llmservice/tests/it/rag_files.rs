//! Uploads to `/v1/rag/files` on the real MiniLM encoder: text, Markdown,
//! HTML and PDF read through the binary's own child process, found by search
//! under their file names; files that cannot be read (or crash their parser)
//! are clear 400s and the server goes on; ingests streamed as progress.

use axum::body::Body;
use axum::http::Request;
use serde_json::{json, Value};

use crate::common::{error_of, sse_events, TestApp, OPERATOR_KEY};
use crate::rag::rag_app;

/// A server whose uploads are read by the built `llmservice` binary.
fn files_app(data: &std::path::Path, extra: &[(&str, &str)]) -> TestApp {
    let mut env = vec![("RAG_EXTRACTOR", env!("CARGO_BIN_EXE_llmservice"))];
    env.extend_from_slice(extra);
    rag_app(data, &env)
}

/// One part of a multipart form: (field, file name, content type, bytes).
type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

async fn upload(app: &TestApp, parts: &[Part<'_>]) -> (axum::http::StatusCode, Value) {
    let boundary = "llmservice-test-boundary-7f3a";
    let mut body = Vec::new();
    for (field, file_name, content_type, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let disposition = match file_name {
            Some(name) => format!("form-data; name=\"{field}\"; filename=\"{name}\""),
            None => format!("form-data; name=\"{field}\""),
        };
        body.extend_from_slice(format!("Content-Disposition: {disposition}\r\n").as_bytes());
        if let Some(content_type) = content_type {
            body.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let request = Request::post("/v1/rag/files")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("authorization", format!("Bearer {OPERATOR_KEY}"))
        .body(Body::from(body))
        .unwrap();
    let (status, _, body) = app.send(request).await;
    (status, body)
}

/// A PDF whose pages show these lines in Helvetica, with a correct cross
/// reference table (as any PDF writer makes it). `parent_of_first` replaces
/// the first page's /Parent (a broken page tree).
fn pdf(pages: &[&str], parent_of_first: Option<&str>) -> Vec<u8> {
    let n = pages.len();
    let font = 3 + 2 * n;
    let kids: Vec<String> = (0..n).map(|i| format!("{} 0 R", 3 + 2 * i)).collect();
    let mut objects = vec![
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        format!("<< /Type /Pages /Kids [{}] /Count {n} >>", kids.join(" ")),
    ];
    for (i, text) in pages.iter().enumerate() {
        let parent = match (i, parent_of_first) {
            (0, Some(parent)) => parent.to_owned(),
            _ => "2 0 R".to_owned(),
        };
        let resources = if parent_of_first.is_some() && i == 0 {
            String::new()
        } else {
            format!("/Resources << /Font << /F1 {font} 0 R >> >> ")
        };
        objects.push(format!(
            "<< /Type /Page /Parent {parent} /MediaBox [0 0 612 792] {resources}/Contents {} 0 R >>",
            4 + 2 * i
        ));
        let content = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
        objects.push(format!(
            "<< /Length {} >>\nstream\n{content}\nendstream",
            content.len()
        ));
    }
    objects.push("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned());
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

async fn search(app: &TestApp, query: &str, filter: Value) -> Value {
    let (status, _, body) = app
        .post(
            "/v1/rag/search",
            json!({"query": query, "top_k": 1, "score_threshold": 0.0, "filter": filter}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["results"][0].clone()
}

#[tokio::test]
async fn uploaded_files_are_read_and_found_under_their_names() {
    let data = tempfile::tempdir().unwrap();
    let app = files_app(data.path(), &[]);
    let html = br#"<html><head><title>Falconry</title><script>var hidden = "pelican";</script>
        <style>p { color: red }</style></head><body><h1>Falcons</h1>
        <p>Peregrine falcons dive faster than any other animal.</p></body></html>"#;
    let pdf = pdf(
        &[
            "Zebras migrate across the Serengeti every year.",
            "Wildebeest follow the rains in great herds.",
        ],
        None,
    );
    let markdown = b"# Baking\n\nSourdough bread rises slowly with wild yeast.\n";
    let latin1 = b"Caf\xe9 au lait is coffee with hot milk.";
    let (status, body) = upload(
        &app,
        &[
            ("file", Some("animals.pdf"), Some("application/pdf"), &pdf),
            ("file", Some("birds.html"), None, html),
            ("file", Some("bread.md"), None, markdown),
            // No extension: its declared type says what it is.
            ("file", Some("coffee"), Some("text/plain"), latin1),
            ("metadata", None, None, br#"{"team": "docs"}"#),
            ("id", None, None, b"pdf-1"),
            ("id", None, None, b"html-1"),
            ("id", None, None, b"md-1"),
            ("id", None, None, b"txt-1"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let documents = body["documents"].as_array().unwrap();
    let sources: Vec<&str> = documents
        .iter()
        .map(|d| d["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["animals.pdf", "birds.html", "bread.md", "coffee"]);
    assert_eq!(documents[0]["id"], "pdf-1");
    assert!(
        documents.iter().all(|d| d["chunks"].as_u64().unwrap() >= 1),
        "{body}"
    );

    // Each file's text is found, with its name and kind as metadata.
    for (query, source, kind, expected) in [
        (
            "Which animals migrate across the Serengeti?",
            "animals.pdf",
            "pdf",
            "Zebras migrate",
        ),
        (
            "What follows the rains?",
            "animals.pdf",
            "pdf",
            "Wildebeest follow the rains",
        ),
        (
            "Which bird dives fastest?",
            "birds.html",
            "html",
            "Peregrine falcons dive",
        ),
        (
            "How does sourdough rise?",
            "bread.md",
            "markdown",
            "Sourdough bread rises",
        ),
        ("coffee with milk", "coffee", "text", "Café au lait"),
    ] {
        let hit = search(&app, query, json!({"source": source})).await;
        assert!(
            hit["text"].as_str().unwrap().contains(expected),
            "{query}: {hit}"
        );
        assert_eq!(hit["metadata"]["file_type"], kind, "{hit}");
        assert_eq!(hit["metadata"]["team"], "docs", "{hit}");
    }
    // Scripts and styles are not text.
    let (_, document) = app.get("/v1/rag/documents/html-1").await;
    let text = document["chunks"].to_string();
    assert!(
        text.contains("Falcons") && !text.contains("pelican") && !text.contains("color"),
        "{document}"
    );
    // The pages stay apart: a blank line between them.
    let (_, document) = app.get("/v1/rag/documents/pdf-1").await;
    assert!(
        document["chunks"]
            .to_string()
            .contains("year.\\n\\nWildebeest"),
        "{document}"
    );

    // Sending an id again replaces its document.
    let (status, body) = upload(
        &app,
        &[
            ("file", Some("bread.md"), None, b"Rye bread is dense."),
            ("id", None, None, b"md-1"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["documents"][0]["replaced"], true, "{body}");
}

#[tokio::test]
async fn files_that_cannot_be_read_are_clear_errors_and_the_server_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let app = files_app(
        data.path(),
        &[
            ("RAG_MAX_UPLOAD_BYTES", "20000"),
            ("RAG_EXTRACT_TIMEOUT", "2"),
        ],
    );
    let big = vec![b'a'; 30_000];
    // A page that is its own parent, with nothing to inherit: pdf-extract
    // follows /Parent for the page's resources forever (a busy loop).
    let cyclic = pdf(&["Never read."], Some("3 0 R"));
    let cases: Vec<(Vec<Part>, u16, &str, &str)> = vec![
        (
            vec![(
                "file",
                Some("photo.png"),
                Some("image/png"),
                b"\x89PNG\r\n\x1a\n",
            )],
            400,
            "file",
            "photo.png",
        ),
        (
            vec![("file", Some("empty.txt"), None, b"")],
            400,
            "file",
            "empty.txt is empty",
        ),
        (
            vec![(
                "file",
                Some("fake.pdf"),
                None,
                b"%PDF-1.4 this is not a PDF",
            )],
            400,
            "file",
            "fake.pdf",
        ),
        (
            vec![("file", Some("blank.html"), None, b"<script>only()</script>")],
            400,
            "file",
            "no text",
        ),
        (
            vec![("file", Some("loop.pdf"), None, &cyclic)],
            400,
            "file",
            "loop.pdf",
        ),
        (
            vec![("file", Some("big.txt"), None, &big)],
            413,
            "",
            "RAG_MAX_UPLOAD_BYTES",
        ),
        (
            vec![("file", None, None, b"no name")],
            400,
            "file",
            "no file name",
        ),
        (
            vec![("collection", None, None, b"docs")],
            400,
            "file",
            "no file",
        ),
        (
            vec![
                ("file", Some("a.txt"), None, b"x"),
                ("colour", None, None, b"red"),
            ],
            400,
            "file",
            "colour",
        ),
        (
            vec![
                ("file", Some("a.txt"), None, b"x"),
                ("id", None, None, b"1"),
                ("id", None, None, b"2"),
            ],
            400,
            "id",
            "2 ids for 1 files",
        ),
        (
            vec![
                ("file", Some("a.txt"), None, b"x"),
                ("metadata", None, None, b"[1]"),
            ],
            400,
            "metadata",
            "JSON object",
        ),
        (
            vec![
                ("file", Some("a.txt"), None, b"x"),
                ("collection", None, None, b"no/slash"),
            ],
            400,
            "collection",
            "collection names",
        ),
        (
            vec![
                ("file", Some("a.txt"), None, b"x"),
                ("stream", None, None, b"maybe"),
            ],
            400,
            "stream",
            "maybe",
        ),
    ];
    for (parts, status, param, needle) in cases {
        let (got, body) = upload(&app, &parts).await;
        assert_eq!(got.as_u16(), status, "{needle}: {body}");
        let error = error_of(&body);
        if !param.is_empty() {
            assert_eq!(error["param"], param, "{body}");
        }
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{needle}: {body}"
        );
    }
    // A JSON body is not an upload.
    let (status, _, body) = app.post("/v1/rag/files", json!({"texts": ["x"]})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("multipart"),
        "{body}"
    );
    // Nothing was stored, and the server still reads files.
    let (status, body) = upload(
        &app,
        &[("file", Some("ok.txt"), None, b"Still reading files.")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, listed) = app.get("/v1/rag/documents").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
}

#[tokio::test]
async fn a_streamed_ingest_reports_progress_then_the_answer() {
    let data = tempfile::tempdir().unwrap();
    let app = files_app(data.path(), &[]);
    let texts: Vec<String> = (0..150)
        .map(|i| {
            format!(
                "Note {i}: the warehouse in city {i} stores {} crates.",
                i * 7
            )
        })
        .collect();
    let (status, headers, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": texts, "stream": true, "collection": "notes"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&headers, &body);
    let (done, progress) = events.split_last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["documents"].as_array().unwrap().len(), 150);
    assert_eq!(done["collection"], "notes");
    // From nothing written to everything, never backwards, in several steps.
    assert!(progress.len() >= 3, "{progress:?}");
    assert_eq!(progress[0]["documents"], 0);
    let last = progress.last().unwrap();
    assert_eq!(last["documents"], 150);
    assert_eq!(last["chunks"], last["chunks_total"]);
    assert_eq!(last["chunks"], done["chunks"]);
    for pair in progress.windows(2) {
        assert_eq!(pair[0]["type"], "progress");
        assert!(
            pair[0]["documents"].as_u64() <= pair[1]["documents"].as_u64(),
            "{progress:?}"
        );
    }
    // A refusal that needs no work comes as a plain error, not a stream.
    let (status, _, body) = app
        .post(
            "/v1/rag/documents",
            json!({"texts": ["x"], "stream": true, "collection": "a b"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    error_of(&body);
}
