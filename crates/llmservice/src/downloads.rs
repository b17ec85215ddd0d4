//! Downloads the operator starts from the dashboard (or `/admin/api/downloads`):
//! each runs in a task of its own, reports its progress to any number of
//! watchers, and can be cancelled. The files land in the models directory,
//! so the model is servable the moment its download completes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::hub::{Hub, HubError, Listing, ModelRef, Progress, RepoFile};

/// How many finished downloads are remembered for the listing.
const KEEP_FINISHED: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DownloadStatus {
    Running,
    Done,
    Failed,
    Cancelled,
}

/// One download as the dashboard shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DownloadState {
    pub id: String,
    pub repo: String,
    /// The files, by their path in the repository.
    pub files: Vec<String>,
    pub status: DownloadStatus,
    /// The file being fetched now.
    pub current: Option<String>,
    pub done_bytes: u64,
    pub total_bytes: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The model name to send once it is done.
    pub model: Option<String>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

struct Job {
    state: watch::Sender<DownloadState>,
    cancel: CancellationToken,
}

pub struct Downloads {
    hub: Result<Hub, String>,
    models_dir: PathBuf,
    jobs: Mutex<Vec<Arc<Job>>>,
}

impl Downloads {
    pub fn new(hub: Result<Hub, HubError>, models_dir: PathBuf) -> Self {
        Self {
            hub: hub.map_err(|e| e.to_string()),
            models_dir,
            jobs: Mutex::new(Vec::new()),
        }
    }

    pub fn hub(&self) -> Result<&Hub, HubError> {
        self.hub.as_ref().map_err(|e| HubError::Io(e.clone()))
    }

    /// Lists the repository and chooses the files (so a wrong name, a gated
    /// repository or an ambiguous choice is answered at once), then starts
    /// the download in the background.
    pub async fn start(self: &Arc<Self>, reference: ModelRef) -> Result<DownloadState, HubError> {
        let hub = self.hub()?.clone();
        let (listing, files) = hub.plan(&reference).await?;
        if let Some(running) = self.running_for(&listing.repo, &files) {
            return Ok(running);
        }
        let initial = DownloadState {
            id: format!("dl-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            repo: listing.repo.clone(),
            files: files.iter().map(|f| f.path.clone()).collect(),
            status: DownloadStatus::Running,
            current: files.first().map(|f| f.path.clone()),
            done_bytes: 0,
            total_bytes: Some(files.iter().filter_map(|f| f.size).sum()),
            error: None,
            model: None,
            started_at: chrono::Utc::now().timestamp(),
            finished_at: None,
        };
        let job = Arc::new(Job {
            state: watch::Sender::new(initial.clone()),
            cancel: CancellationToken::new(),
        });
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.push(job.clone());
            let finished = jobs
                .iter()
                .filter(|j| j.state.borrow().status != DownloadStatus::Running)
                .count();
            if finished > KEEP_FINISHED {
                let mut drop_n = finished - KEEP_FINISHED;
                jobs.retain(|j| {
                    let old = drop_n > 0 && j.state.borrow().status != DownloadStatus::Running;
                    drop_n -= usize::from(old);
                    !old
                });
            }
        }
        let dir = self.models_dir.clone();
        tokio::spawn(run(hub, listing, files, dir, job));
        Ok(initial)
    }

    /// A download of the same files already under way.
    fn running_for(&self, repo: &str, files: &[RepoFile]) -> Option<DownloadState> {
        let jobs = self.jobs.lock().ok()?;
        jobs.iter().find_map(|j| {
            let state = j.state.borrow();
            let same = state.status == DownloadStatus::Running
                && state.repo == repo
                && state.files.iter().eq(files.iter().map(|f| &f.path));
            same.then(|| state.clone())
        })
    }

    /// Every download remembered, newest first.
    pub fn list(&self) -> Vec<DownloadState> {
        let jobs = self.jobs.lock().map(|j| j.clone()).unwrap_or_default();
        jobs.iter()
            .rev()
            .map(|j| j.state.borrow().clone())
            .collect()
    }

    /// A watcher of one download's state.
    pub fn watch(&self, id: &str) -> Option<watch::Receiver<DownloadState>> {
        self.find(id).map(|j| j.state.subscribe())
    }

    pub fn get(&self, id: &str) -> Option<DownloadState> {
        let job = self.find(id)?;
        let state = job.state.borrow().clone();
        Some(state)
    }

    /// Cancels a running download (its partial files are removed); answers
    /// its state, or `None` for an unknown id.
    pub fn cancel(&self, id: &str) -> Option<DownloadState> {
        let job = self.find(id)?;
        job.cancel.cancel();
        let state = job.state.borrow().clone();
        Some(state)
    }

    fn find(&self, id: &str) -> Option<Arc<Job>> {
        let jobs = self.jobs.lock().ok()?;
        jobs.iter().find(|j| j.state.borrow().id == id).cloned()
    }
}

/// Progress updates sent to watchers at most this often (the last one always).
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

async fn run(hub: Hub, listing: Listing, files: Vec<RepoFile>, dir: PathBuf, job: Arc<Job>) {
    let mut last_report = std::time::Instant::now() - REPORT_EVERY;
    let state = &job.state;
    let mut report = |p: Progress| {
        if last_report.elapsed() < REPORT_EVERY && p.total != Some(p.done) {
            return;
        }
        last_report = std::time::Instant::now();
        state.send_modify(|s| {
            s.current = Some(p.file);
            s.done_bytes = p.done;
            if p.total.is_some() {
                s.total_bytes = p.total;
            }
        });
    };
    let outcome = hub
        .pull(&listing, &files, &dir, &mut report, &job.cancel)
        .await;
    let now = chrono::Utc::now().timestamp();
    job.state.send_modify(|s| {
        s.finished_at = Some(now);
        s.current = None;
        match outcome {
            Ok(pulled) => {
                s.status = DownloadStatus::Done;
                s.model = Some(pulled.model_name());
                if let Some(total) = s.total_bytes {
                    s.done_bytes = total;
                }
            }
            Err(HubError::Cancelled) => s.status = DownloadStatus::Cancelled,
            Err(error) => {
                tracing::warn!(repo = %s.repo, %error, "download failed");
                s.status = DownloadStatus::Failed;
                s.error = Some(error.to_string());
            }
        }
    });
}
