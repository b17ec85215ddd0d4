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
    let mut child = tokio::process::Command::new(extractor)
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
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    // Writing, reading and waiting at once: a child that answers before it
    // has read everything must not deadlock on a full pipe.
    let write = async move {
        // A child that stops reading (it failed) closes the pipe: its exit
        // status says why, not this write's error.
        let _ = stdin.write_all(&bytes).await;
        drop(stdin);
    };
    let read = async {
        let mut text = Vec::new();
        (&mut stdout)
            .take(MAX_TEXT_BYTES as u64 + 1)
            .read_to_end(&mut text)
            .await
            .map(|_| text)
    };
    let read_err = async {
        let mut message = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut message).await;
        message
    };
    let ((), text, message) = tokio::join!(write, read, read_err);
    let status = child
        .wait()
        .await
        .map_err(|e| RagError::Store(format!("the file reader could not be waited on: {e}")))?;
    let text =
        text.map_err(|e| RagError::Store(format!("reading the file reader's output: {e}")))?;
    if status.success() {
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
    for (resource, limit) in [
        (Resource::As, CHILD_MEMORY),
        (Resource::Cpu, CHILD_CPU_SECONDS),
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
