//! Model downloads from the Hugging Face Hub, or any server in its URL
//! layout (`HF_ENDPOINT`): `llmservice pull`, the dashboard's downloads and
//! seed 003's `MODEL_REPO_ID` all come through here.
//!
//! Written on `reqwest` rather than the `hf-hub` crate, because what a
//! model server needs is what that crate leaves out: files land directly in
//! the models directory under their own names (hf-hub writes its cache
//! layout of blobs and snapshot links), every download is checked against
//! the Hub's LFS SHA-256 (hf-hub checks nothing), an interrupted download
//! resumes with `Range` and a cancelled one stops at once (hf-hub 0.4's
//! chunk tasks keep running after their future is dropped, and hold each
//! 10 MB chunk in memory; hf-hub 1.0 has no resume into a chosen directory
//! and brings hf-xet and a second reqwest major version to compile).
//!
//! The protocol used: `GET /api/models/{repo}/revision/{rev}?blobs=true` lists
//! the files with their sizes and LFS hashes; `HEAD /{repo}/resolve/{rev}/{file}`
//! (redirects not followed) gives `X-Linked-Etag` / `X-Linked-Size` for LFS
//! files; `GET` on the same URL follows the redirect to the storage host,
//! where `Range` resumes. The token goes only to the Hub's own host: reqwest
//! drops `Authorization` on a redirect to another host.

mod download;
mod reference;

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION};
use reqwest::StatusCode;
use serde::Deserialize;

pub use download::{Progress, MAX_ATTEMPTS};
pub use reference::{choose, ModelRef, RepoFile};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the Hub is and who we are to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    /// `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`, or the token file that
    /// `huggingface-cli login` writes).
    pub token: Option<String>,
}

impl HubSettings {
    /// From the environment, as `huggingface_hub` reads it.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        let endpoint = get("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_owned())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let file = get("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
                    get("HF_HOME")
                        .map(PathBuf::from)
                        .or_else(|| get("HOME").map(|h| Path::new(&h).join(".cache/huggingface")))
                        .map(|home| home.join("token"))
                })?;
                std::fs::read_to_string(file).ok()
            })
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        Self { endpoint, token }
    }
}

/// Why a download could not be done, said so the user can act on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    #[error("'{reference}' is not a model reference: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("{repo}: {message}")]
    AccessDenied { repo: String, message: String },
    #[error("{repo}: repository not found on the Hub (or private: set HF_TOKEN)")]
    RepoNotFound { repo: String },
    #[error("{repo} has no file '{file}'{}", list_hint(choices))]
    FileNotFound {
        repo: String,
        file: String,
        choices: Vec<String>,
    },
    #[error("{repo} has no GGUF model file (it holds {}); llmservice serves GGUF models: look for a GGUF conversion of this model", files.join(", "))]
    NoGguf { repo: String, files: Vec<String> },
    #[error("{repo} holds several GGUF models{}; name one as {repo}:QUANT or {repo}/FILE: {}", quant.as_ref().map(|q| format!(" and none or several match '{q}'")).unwrap_or_default(), describe_choices(choices))]
    Ambiguous {
        repo: String,
        quant: Option<String>,
        choices: Vec<(String, u64)>,
    },
    #[error("{file}: the download's SHA-256 is {actual}, the Hub says {expected}; the corrupt file was removed")]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file}: {message}")]
    Transfer { file: String, message: String },
    #[error("the Hub answered {status} for {url}: {message}")]
    Http {
        status: u16,
        url: String,
        message: String,
    },
    #[error("cannot reach the Hub at {endpoint}: {message}")]
    Network { endpoint: String, message: String },
    #[error("{0}")]
    Io(String),
    #[error("{file} already exists in the models directory and is not the Hub's file; move it away first")]
    Exists { file: String },
    #[error("the download was cancelled")]
    Cancelled,
}

fn list_hint(choices: &[String]) -> String {
    if choices.is_empty() {
        String::new()
    } else {
        format!("; its GGUF files: {}", choices.join(", "))
    }
}

fn describe_choices(choices: &[(String, u64)]) -> String {
    choices
        .iter()
        .map(|(name, size)| format!("{name} ({:.2} GB)", *size as f64 / 1e9))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The listing `GET /api/models/{repo}/revision/{rev}?blobs=true` answers.
#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: Option<u64>,
}

/// A repository's files at one revision.
#[derive(Debug, Clone)]
pub struct Listing {
    pub repo: String,
    pub revision: String,
    /// The commit the revision pointed at.
    pub commit: Option<String>,
    pub files: Vec<RepoFile>,
}

/// How long to wait for a connection, and for the next bytes of a transfer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Hub {
    settings: HubSettings,
    /// Follows redirects (to the storage host, without the token).
    http: reqwest::Client,
    /// Does not: file metadata is read from the Hub's own redirect answer.
    head: reqwest::Client,
}

impl Hub {
    pub fn new(settings: HubSettings) -> Result<Self, HubError> {
        let user_agent = concat!("llmservice/", env!("CARGO_PKG_VERSION"));
        let build = |redirects: reqwest::redirect::Policy| {
            reqwest::Client::builder()
                .user_agent(user_agent)
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(READ_TIMEOUT)
                .redirect(redirects)
                .build()
                .map_err(|e| HubError::Io(format!("cannot start an HTTP client: {e}")))
        };
        Ok(Self {
            http: build(reqwest::redirect::Policy::limited(10))?,
            head: build(reqwest::redirect::Policy::none())?,
            settings,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.settings.endpoint
    }

    fn auth(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(token) = &self.settings.token {
            if let Ok(value) = format!("Bearer {token}").parse() {
                headers.insert(AUTHORIZATION, value);
            }
        }
        headers
    }

    fn network(&self, error: reqwest::Error) -> HubError {
        HubError::Network {
            endpoint: self.settings.endpoint.clone(),
            message: error.without_url().to_string(),
        }
    }

    /// The files of `repo` at `revision`, with sizes and LFS hashes.
    pub async fn list(&self, repo: &str, revision: &str) -> Result<Listing, HubError> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}?blobs=true",
            self.settings.endpoint,
            encode_segment(revision)
        );
        let response = self
            .http
            .get(&url)
            .headers(self.auth())
            .send()
            .await
            .map_err(|e| self.network(e))?;
        let response = self.check(response, repo, &url).await?;
        let info: RepoInfo = response.json().await.map_err(|e| HubError::Http {
            status: 200,
            url: url.clone(),
            message: format!("not a repository listing: {}", e.without_url()),
        })?;
        Ok(Listing {
            repo: repo.to_owned(),
            revision: revision.to_owned(),
            commit: info.sha,
            files: info
                .siblings
                .into_iter()
                .map(|s| RepoFile {
                    size: s.lfs.as_ref().and_then(|l| l.size).or(s.size),
                    sha256: s.lfs.map(|l| l.sha256.to_ascii_lowercase()),
                    path: s.rfilename,
                })
                .collect(),
        })
    }

    /// `response` if it is a success; otherwise the error the Hub meant,
    /// with its own message (`X-Error-Message`) when it gave one.
    async fn check(
        &self,
        response: reqwest::Response,
        repo: &str,
        url: &str,
    ) -> Result<reqwest::Response, HubError> {
        let status = response.status();
        if status.is_success() || status.is_redirection() {
            return Ok(response);
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let code = header("x-error-code").unwrap_or_default();
        let hub_message = header("x-error-message");
        let body = response.text().await.unwrap_or_default();
        let message = hub_message.unwrap_or_else(|| {
            serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| body.chars().take(200).collect())
        });
        let has_token = self.settings.token.is_some();
        Err(match status {
            StatusCode::NOT_FOUND => HubError::RepoNotFound {
                repo: repo.to_owned(),
            },
            StatusCode::UNAUTHORIZED if code == "RepoNotFound" => HubError::RepoNotFound {
                repo: repo.to_owned(),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => HubError::AccessDenied {
                repo: repo.to_owned(),
                message: match (status, has_token) {
                    (StatusCode::UNAUTHORIZED, false) => format!(
                        "the Hub needs a token for this repository ({}); set HF_TOKEN to a token that has access",
                        if message.is_empty() { "gated or private" } else { message.as_str() }
                    ),
                    _ => format!(
                        "the Hub refused HF_TOKEN for this repository ({}); accept the model's terms on its page or use a token with access",
                        if message.is_empty() { "access denied" } else { message.as_str() }
                    ),
                },
            },
            _ => HubError::Http {
                status: status.as_u16(),
                url: url.to_owned(),
                message,
            },
        })
    }

    /// The URL a file is fetched from.
    fn resolve_url(&self, repo: &str, revision: &str, path: &str) -> String {
        let path: Vec<String> = path.split('/').map(encode_segment).collect();
        format!(
            "{}/{repo}/resolve/{}/{}",
            self.settings.endpoint,
            encode_segment(revision),
            path.join("/")
        )
    }
}

/// One path segment, percent-encoded (a revision like `refs/pr/1` too).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Where a download's files went.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub repo: String,
    pub commit: Option<String>,
    pub paths: Vec<PathBuf>,
    /// Bytes fetched now (0 when every file was already there).
    pub downloaded: u64,
}

impl Pulled {
    /// The name a request uses for the model: the first file's stem.
    pub fn model_name(&self) -> String {
        self.paths
            .first()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Hub {
    /// Lists the repository, picks the files `reference` means, and checks
    /// that they may be fetched (a gated repository lists its files to
    /// anyone but refuses them without a token that has access), so every
    /// refusal comes before the download starts.
    pub async fn plan(&self, reference: &ModelRef) -> Result<(Listing, Vec<RepoFile>), HubError> {
        let revision = reference.revision.as_deref().unwrap_or("main");
        let listing = self.list(&reference.repo, revision).await?;
        let files = choose(reference, &listing.files)?;
        if let Some(first) = files.first() {
            let url = self.resolve_url(
                &listing.repo,
                listing.commit.as_deref().unwrap_or(revision),
                &first.path,
            );
            let response = self
                .head
                .head(&url)
                .headers(self.auth())
                .send()
                .await
                .map_err(|e| self.network(e))?;
            self.check(response, &listing.repo, &url).await?;
        }
        Ok((listing, files))
    }

    /// Downloads `files` of `listing` into `dir`, one after another.
    pub async fn pull(
        &self,
        listing: &Listing,
        files: &[RepoFile],
        dir: &Path,
        progress: &mut (dyn FnMut(Progress) + Send),
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Pulled, HubError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| HubError::Io(format!("cannot create the models directory: {e}")))?;
        let total: u64 = files.iter().filter_map(|f| f.size).sum();
        let mut pulled = Pulled {
            repo: listing.repo.clone(),
            commit: listing.commit.clone(),
            paths: Vec::new(),
            downloaded: 0,
        };
        let mut before = 0;
        for file in files {
            let revision = listing.commit.as_deref().unwrap_or(&listing.revision);
            let url = self.resolve_url(&listing.repo, revision, &file.path);
            let job = download::FileJob {
                hub: self,
                repo: &listing.repo,
                url: &url,
                file,
                dir,
            };
            let (path, fetched) = job
                .run(
                    &mut |p: Progress| {
                        progress(Progress {
                            done: before + p.done,
                            total: Some(total.max(before + p.done)),
                            ..p
                        });
                    },
                    cancel,
                )
                .await?;
            before += file.size.unwrap_or(fetched);
            pulled.downloaded += fetched;
            pulled.paths.push(path);
        }
        Ok(pulled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_the_names_huggingface_hub_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        let home = dir.path().to_string_lossy().into_owned();
        let env = |pairs: Vec<(&'static str, String)>| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone())
            }
        };
        let s = HubSettings::from_env(env(vec![]));
        assert_eq!((s.endpoint.as_str(), s.token), (DEFAULT_ENDPOINT, None));
        let s = HubSettings::from_env(env(vec![
            ("HF_ENDPOINT", "http://127.0.0.1:9/".into()),
            ("HF_HOME", home.clone()),
        ]));
        assert_eq!(s.endpoint, "http://127.0.0.1:9");
        assert_eq!(s.token.as_deref(), Some("hf_file"));
        let s = HubSettings::from_env(env(vec![("HF_TOKEN", "hf_env".into()), ("HF_HOME", home)]));
        assert_eq!(s.token.as_deref(), Some("hf_env"));
    }

    #[test]
    fn urls_encode_each_segment() {
        let hub = Hub::new(HubSettings {
            endpoint: "http://hub".into(),
            token: None,
        })
        .unwrap();
        assert_eq!(
            hub.resolve_url("o/n", "refs/pr/1", "dir/a b+c.gguf"),
            "http://hub/o/n/resolve/refs%2Fpr%2F1/dir/a%20b%2Bc.gguf"
        );
    }
}
