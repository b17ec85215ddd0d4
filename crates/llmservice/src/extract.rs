//! Uploaded files to text. Plain text and Markdown are decoded here; HTML and
//! PDF go through parsers that meet hostile structure (a PDF's cyclic page
//! tree recurses until the stack is gone, a content stream can loop), so they
//! run in a child process of this same binary (`llmservice extract-text`)
//! with a memory and CPU limit and a deadline: a parser that crashes, loops
//! or swells costs that one upload a 400, never the server.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rag::extract::FileKind;
use rag::RagError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The child's address-space limit.
const CHILD_MEMORY: u64 = 4 << 30;
/// The child's CPU-time limit, in seconds (the kernel ends it past this).
const CHILD_CPU_SECONDS: u64 = 150;
/// Most text one file may give (a 64 MiB upload of text gives about that).
const MAX_TEXT_BYTES: usize = 96 << 20;
/// Parsers running at once, server-wide: each may take `CHILD_MEMORY`, so a
/// burst of hostile uploads waits here instead of exhausting the host.
const MAX_CHILDREN: usize = 2;

static CHILDREN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CHILDREN);

/// The text of one uploaded file of `kind`; `deadline` is the longest its
/// parser may take (`RAG_EXTRACT_TIMEOUT`).
pub async fn file_text(
    extractor: &Path,
    deadline: Duration,
    kind: FileKind,
    bytes: Vec<u8>,
) -> Result<String, RagError> {
    if !kind.needs_parser() {
        return tokio::task::spawn_blocking(move || rag::extract::extract(kind, &bytes))
            .await
            .map_err(|e| RagError::Store(format!("decoding a text upload failed: {e}")))?;
    }
    match tokio::time::timeout(deadline, in_child(extractor, kind, bytes)).await {
        Ok(result) => result,
        Err(_) => Err(RagError::invalid(
            "file",
            format!(
                "reading the {} took longer than {} s (RAG_EXTRACT_TIMEOUT); it was stopped",
                kind.name(),
                deadline.as_secs_f32()
            ),
        )),
    }
}

/// Runs `extractor extract-text --kind KIND` over `bytes`. The child is
/// killed if this future is dropped (deadline, client gone).
async fn in_child(extractor: &Path, kind: FileKind, bytes: Vec<u8>) -> Result<String, RagError> {
    let _slot = CHILDREN
        .acquire()
        .await
        .map_err(|e| RagError::Store(format!("the file readers are closed: {e}")))?;
    let mut command = tokio::process::Command::new(extractor);
    // The parser needs nothing of the server's environment (keys, tokens).
    command.env_clear();
    for name in ["PATH", "LD_LIBRARY_PATH", "TMPDIR"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    let mut child = command
        .args(["extract-text", "--kind", kind.name()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            RagError::Store(format!(
                "cannot start the file reader {}: {e}",
                extractor.display()
            ))
        })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    // Writing, reading and waiting at once: a child that answers before it
    // has read everything must not deadlock on a full pipe.
    let write = async move {
        // A child that stops reading (it failed) closes the pipe: its exit
        // status says why, not this write's error.
        let _ = stdin.write_all(&bytes).await;
        drop(stdin);
    };
    // Each reader owns its pipe and closes it at its cap: a child that writes
    // more then fails on the closed pipe instead of blocking until the deadline.
    let read = async move {
        let mut text = Vec::new();
        stdout
            .take(MAX_TEXT_BYTES as u64 + 1)
            .read_to_end(&mut text)
            .await
            .map(|_| text)
    };
    let read_err = async move {
        let mut message = Vec::new();
        let _ = stderr.take(64 << 10).read_to_end(&mut message).await;
        message
    };
    let ((), text, message) = tokio::join!(write, read, read_err);
    let status = child
        .wait()
        .await
        .map_err(|e| RagError::Store(format!("the file reader could not be waited on: {e}")))?;
    let text =
        text.map_err(|e| RagError::Store(format!("reading the file reader's output: {e}")))?;
    if text.len() > MAX_TEXT_BYTES {
        return Err(RagError::invalid(
            "file",
            format!(
                "the {} holds more than {} MiB of text",
                kind.name(),
                MAX_TEXT_BYTES >> 20
            ),
        ));
    }
    if status.success() {
        return String::from_utf8(text)
            .map_err(|_| RagError::Store("the file reader wrote text that is not UTF-8".into()));
    }
    let message = String::from_utf8_lossy(&message);
    // The child's own refusal is its last line (`extract-text: ...`).
    if status.code() == Some(REFUSED) {
        let reason = message
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("extract-text: "))
            .unwrap_or("it could not be read");
        return Err(RagError::invalid("file", reason.to_owned()));
    }
    tracing::warn!(kind = kind.name(), %status, stderr = %message.trim(), "a file reader failed");
    Err(RagError::invalid(
        "file",
        format!(
            "the {} could not be read (its parser failed: {status})",
            kind.name()
        ),
    ))
}

/// The child's exit code for a file it refuses (the message is on stderr).
const REFUSED: i32 = 3;

/// `llmservice extract-text --kind KIND`: the file on stdin, its text on
/// stdout. Limits itself first, so a hostile file meets a bounded process.
pub fn child_main(kind: &str) -> std::process::ExitCode {
    use rustix::process::{setrlimit, Resource, Rlimit};
    use std::io::{Read, Write};
    // If memory runs short, the kernel should end this process, not the server.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    // No core files: an abort or the CPU limit's signal would write one per upload.
    for (resource, limit) in [
        (Resource::As, CHILD_MEMORY),
        (Resource::Cpu, CHILD_CPU_SECONDS),
        (Resource::Core, 0),
    ] {
        let _ = setrlimit(
            resource,
            Rlimit {
                current: Some(limit),
                maximum: Some(limit),
            },
        );
    }
    let Some(kind) = FileKind::from_name(kind) else {
        eprintln!("extract-text: unknown kind {kind:?}");
        return std::process::ExitCode::from(2);
    };
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut bytes) {
        eprintln!("extract-text: cannot read the file: {e}");
        return std::process::ExitCode::from(2);
    }
    match rag::extract::extract(kind, &bytes) {
        Ok(text) => match std::io::stdout().lock().write_all(text.as_bytes()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(_) => std::process::ExitCode::from(2),
        },
        Err(e) => {
            eprintln!("extract-text: {e}");
            std::process::ExitCode::from(REFUSED as u8)
        }
    }
}
