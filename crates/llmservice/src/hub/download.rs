//! One file from the Hub into the models directory: resumable, checked
//! against the Hub's SHA-256, never visible under its final name until
//! whole and verified.
//!
//! While it downloads, the file is `.<name>.part` beside a `.<name>.part.json`
//! that records which object the bytes belong to (hash, size, commit). A
//! later run (after a dropped connection, a kill, a reboot) finds them and
//! asks only for the rest with `Range`; a part whose record names another
//! object starts over. Dot-names keep both out of the models listing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, RANGE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{Hub, HubError, RepoFile};

/// Attempts per file before a transfer error is given up on (each resumes
/// where the last stopped; one that makes progress does not count).
pub const MAX_ATTEMPTS: u32 = 5;

/// How far a download has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The file being fetched now (its path in the repository).
    pub file: String,
    pub done: u64,
    pub total: Option<u64>,
}

/// What the partial file's bytes belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartRecord {
    sha256: Option<String>,
    size: Option<u64>,
    url: String,
}

pub(super) struct FileJob<'a> {
    pub hub: &'a Hub,
    pub repo: &'a str,
    pub url: &'a str,
    pub file: &'a RepoFile,
    pub dir: &'a Path,
}

/// What the Hub says of a file before it is fetched.
struct Remote {
    sha256: Option<String>,
    size: Option<u64>,
}

fn io(context: &str, path: &Path, error: std::io::Error) -> HubError {
    HubError::Io(format!(
        "{context} {}: {error}",
        path.file_name().unwrap_or_default().to_string_lossy()
    ))
}

/// The partial file being written, where it stands, and the hash of what
/// it holds so far.
struct Part {
    path: PathBuf,
    record: PathBuf,
    out: tokio::fs::File,
    offset: u64,
    hasher: Sha256,
}

impl Part {
    /// Opens `.<name>.part` to continue it (when its record is for the same
    /// object) or to start it afresh, and writes the record.
    async fn open(dir: &Path, name: &str, record: &PartRecord) -> Result<Self, HubError> {
        let path = dir.join(format!(".{name}.part"));
        let record_path = dir.join(format!(".{name}.part.json"));
        let offset = resume_point(&path, &record_path, record).await;
        if offset == 0 {
            let _ = tokio::fs::remove_file(&path).await;
        }
        let json = serde_json::to_vec(record).unwrap_or_default();
        tokio::fs::write(&record_path, json)
            .await
            .map_err(|e| io("cannot write", &record_path, e))?;
        let hasher = hash_prefix(&path, offset).await?;
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .await
            .map_err(|e| io("cannot open", &path, e))?;
        out.set_len(offset)
            .await
            .map_err(|e| io("cannot resize", &path, e))?;
        out.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| io("cannot seek in", &path, e))?;
        Ok(Self {
            path,
            record: record_path,
            out,
            offset,
            hasher,
        })
    }

    /// Removes the partial file and its record.
    async fn discard(self) {
        drop(self.out);
        let _ = tokio::fs::remove_file(&self.path).await;
        let _ = tokio::fs::remove_file(&self.record).await;
    }

    /// Flushes and syncs; answers the SHA-256 of the whole.
    async fn seal(&mut self) -> Result<String, HubError> {
        self.out
            .flush()
            .await
            .map_err(|e| io("cannot write", &self.path, e))?;
        self.out
            .sync_all()
            .await
            .map_err(|e| io("cannot sync", &self.path, e))?;
        Ok(hex(&self.hasher.clone().finalize()))
    }
}

impl FileJob<'_> {
    /// Downloads the file (or finds it already there); answers its path and
    /// the bytes fetched.
    pub async fn run(
        self,
        progress: &mut (dyn FnMut(Progress) + Send),
        cancel: &CancellationToken,
    ) -> Result<(PathBuf, u64), HubError> {
        let name = self.file.file_name();
        let dest = self.dir.join(name);
        let remote = self.remote().await?;
        let file = self.file.path.clone();
        let total = remote.size;
        let mut report = |done| {
            progress(Progress {
                file: file.clone(),
                done,
                total,
            });
        };
        if let Some(existing) = self.already_here(&dest, &remote).await? {
            report(existing);
            return Ok((dest, 0));
        }
        let record = PartRecord {
            sha256: remote.sha256.clone(),
            size: remote.size,
            url: self.url.to_owned(),
        };
        let mut part = Part::open(self.dir, name, &record).await?;
        let started_at = part.offset;
        report(part.offset);
        if let Err(error) = self.transfer(&mut part, &remote, &mut report, cancel).await {
            // Bytes already fetched are kept for a later run to resume,
            // unless the download was called off.
            if matches!(error, HubError::Cancelled) || part.offset == 0 {
                part.discard().await;
            }
            return Err(error);
        }
        let actual = part.seal().await?;
        if let Some(expected) = remote.sha256.as_ref().filter(|e| **e != actual) {
            part.discard().await;
            return Err(HubError::Checksum {
                file: self.file.path.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        let size = part.offset;
        tokio::fs::rename(&part.path, &dest)
            .await
            .map_err(|e| io("cannot move into place", &dest, e))?;
        part.discard().await;
        if let Ok(dir) = tokio::fs::File::open(self.dir).await {
            let _ = dir.sync_all().await;
        }
        tracing::info!(repo = self.repo, file = %self.file.path, bytes = size, sha256 = %actual, "downloaded");
        Ok((dest, size - started_at))
    }

    /// Requests the rest of the file until it is whole, resuming after
    /// dropped connections and server errors (with a growing pause).
    async fn transfer(
        &self,
        part: &mut Part,
        remote: &Remote,
        report: &mut (dyn FnMut(u64) + Send),
        cancel: &CancellationToken,
    ) -> Result<(), HubError> {
        let mut failures = 0;
        while remote.size.is_none_or(|size| part.offset < size) {
            let before = part.offset;
            let outcome = match self.fetch_from(part, report, cancel).await {
                Ok(Fetched::Whole) if remote.size.is_some_and(|size| part.offset < size) => Err(
                    Failure::Retry(format!("the connection closed after {} bytes", part.offset)),
                ),
                other => other,
            };
            let message = match outcome {
                Ok(Fetched::Whole) => return Ok(()),
                Ok(Fetched::Restarted) => continue,
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Retry(message)) => message,
            };
            failures = if part.offset > before {
                1
            } else {
                failures + 1
            };
            if failures >= MAX_ATTEMPTS {
                let _ = part.out.flush().await;
                return Err(HubError::Transfer {
                    file: self.file.path.clone(),
                    message: format!(
                        "{message}; gave up after {MAX_ATTEMPTS} attempts with {} bytes kept: run the download again to resume",
                        part.offset
                    ),
                });
            }
            tracing::warn!(file = %self.file.path, offset = part.offset, %message, "download interrupted; resuming");
            let pause = Duration::from_millis(250 << failures.min(5));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = cancel.cancelled() => return Err(HubError::Cancelled),
            }
        }
        Ok(())
    }

    /// The file's hash and size: the listing's, else the Hub's headers for it.
    async fn remote(&self) -> Result<Remote, HubError> {
        if self.file.sha256.is_some() && self.file.size.is_some() {
            return Ok(Remote {
                sha256: self.file.sha256.clone(),
                size: self.file.size,
            });
        }
        let response = self
            .hub
            .head
            .head(self.url)
            .headers(self.hub.auth())
            .send()
            .await
            .map_err(|e| self.hub.network(e))?;
        let response = self.hub.check(response, self.repo, self.url).await?;
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.trim()
                        .trim_start_matches("W/")
                        .trim_matches('"')
                        .to_owned()
                })
        };
        // LFS files: X-Linked-Etag is the object's SHA-256; a plain ETag on a
        // small file is a git hash and says nothing about SHA-256.
        let sha256 = header("x-linked-etag")
            .or_else(|| header(ETAG.as_str()))
            .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(|e| e.to_ascii_lowercase());
        let size = header("x-linked-size")
            .or_else(|| {
                response
                    .status()
                    .is_success()
                    .then(|| header(CONTENT_LENGTH.as_str()))
                    .flatten()
            })
            .and_then(|s| s.parse().ok());
        Ok(Remote {
            sha256: self.file.sha256.clone().or(sha256),
            size: self.file.size.or(size),
        })
    }

    /// The size of `dest` when it is already the Hub's file; an error when
    /// another file has its name.
    async fn already_here(&self, dest: &Path, remote: &Remote) -> Result<Option<u64>, HubError> {
        let Ok(meta) = tokio::fs::metadata(dest).await else {
            return Ok(None);
        };
        let same = remote.size.is_none_or(|s| s == meta.len())
            && match &remote.sha256 {
                Some(expected) => {
                    hex(&hash_prefix(dest, meta.len()).await?.finalize()) == *expected
                }
                None => remote.size.is_some(),
            };
        if same {
            Ok(Some(meta.len()))
        } else {
            Err(HubError::Exists {
                file: self.file.file_name().to_owned(),
            })
        }
    }

    /// One request for the bytes from the part's offset on, written as
    /// they come.
    async fn fetch_from(
        &self,
        part: &mut Part,
        progress: &mut (dyn FnMut(u64) + Send),
        cancel: &CancellationToken,
    ) -> Result<Fetched, Failure> {
        let mut request = self.hub.http.get(self.url).headers(self.hub.auth());
        if part.offset > 0 {
            request = request.header(RANGE, format!("bytes={}-", part.offset));
        }
        let response = tokio::select! {
            sent = request.send() => sent.map_err(|e| Failure::Retry(e.without_url().to_string()))?,
            () = cancel.cancelled() => return Err(Failure::Fatal(HubError::Cancelled)),
        };
        if response.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            // Asked from past the end: the part is longer than the file.
            return restart(part).await;
        }
        let response = self
            .hub
            .check(response, self.repo, self.url)
            .await
            .map_err(|e| match e {
                HubError::Http { status, .. } if status >= 500 => Failure::Retry(e.to_string()),
                e => Failure::Fatal(e),
            })?;
        if part.offset > 0 {
            let resumes_here = response.status() == StatusCode::PARTIAL_CONTENT
                && content_range_start(response.headers()) == Some(part.offset);
            if !resumes_here {
                // The server sent the whole file: start over from it.
                return restart(part).await;
            }
        }
        let mut body = response.bytes_stream();
        loop {
            let chunk = tokio::select! {
                chunk = body.next() => chunk,
                () = cancel.cancelled() => return Err(Failure::Fatal(HubError::Cancelled)),
            };
            let Some(chunk) = chunk else {
                return Ok(Fetched::Whole);
            };
            let chunk = chunk.map_err(|e| Failure::Retry(e.without_url().to_string()))?;
            part.out.write_all(&chunk).await.map_err(|e| {
                Failure::Fatal(HubError::Io(format!("cannot write the download: {e}")))
            })?;
            part.hasher.update(&chunk);
            part.offset += chunk.len() as u64;
            progress(part.offset);
        }
    }
}

/// Empties the part to fetch the file from its start.
async fn restart(part: &mut Part) -> Result<Fetched, Failure> {
    let reset = async {
        part.out.set_len(0).await?;
        part.out.seek(std::io::SeekFrom::Start(0)).await
    };
    reset
        .await
        .map_err(|e| Failure::Fatal(HubError::Io(format!("cannot restart the download: {e}"))))?;
    part.offset = 0;
    part.hasher = Sha256::new();
    Ok(Fetched::Restarted)
}

enum Fetched {
    /// The response ended (whether the file is whole is checked after).
    Whole,
    /// The part was discarded; fetch again from the start.
    Restarted,
}

enum Failure {
    /// A dropped connection or a server error: resume.
    Retry(String),
    Fatal(HubError),
}

/// Where a partial download can continue: its length, when its record is
/// for the same object; 0 otherwise.
async fn resume_point(part: &Path, record_path: &Path, record: &PartRecord) -> u64 {
    let Ok(bytes) = tokio::fs::read(record_path).await else {
        return 0;
    };
    let Ok(kept) = serde_json::from_slice::<PartRecord>(&bytes) else {
        return 0;
    };
    let same = match (&kept.sha256, &record.sha256) {
        (Some(a), Some(b)) => a == b,
        _ => kept == *record,
    };
    let len = tokio::fs::metadata(part).await.map_or(0, |m| m.len());
    if same && record.size.is_none_or(|s| len <= s) {
        len
    } else {
        0
    }
}

/// The SHA-256 state after the first `len` bytes of `path`.
async fn hash_prefix(path: &Path, len: u64) -> Result<Sha256, HubError> {
    let mut hasher = Sha256::new();
    if len == 0 {
        return Ok(hasher);
    }
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| io("cannot read", path, e))?;
    let mut reader = tokio::io::BufReader::with_capacity(1 << 20, file.take(len));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| io("cannot read", path, e))?;
        if n == 0 {
            return Ok(hasher);
        }
        hasher.update(&buf[..n]);
    }
}

fn content_range_start(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers.get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
