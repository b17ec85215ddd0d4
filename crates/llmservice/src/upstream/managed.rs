//! Upstreams we start ourselves (`{TIER}_BACKEND=vllm` or `mlx`, or any
//! `{TIER}_COMMAND`): the child is started when the tier is first loaded,
//! on a port of its own on loopback, and serves the tier once it answers
//! `GET /v1/models`. Its output goes to our log; if it dies it is started
//! again with a growing pause; unloading the tier (or its keep-alive, or
//! `MAX_LOADED_MODELS`) stops it, and so does our own exit. The child runs
//! in a process group of its own so that its workers (vLLM starts several)
//! stop with it.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::Upstream;

/// The longest pause between restarts of a child that keeps dying.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(30);
/// How long a stopped child has to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildState {
    Stopped,
    Starting,
    Running {
        pid: u32,
    },
    /// Exited or never answered; it is being started again.
    Failed(String),
}

#[derive(Debug)]
pub struct Supervisor {
    name: String,
    /// The shell command, `{port}` and `{model}` already filled in.
    command: String,
    start_timeout: Duration,
    upstream: Arc<Upstream>,
    state: watch::Sender<ChildState>,
    /// Set while the child should run; the monitor task stops when it clears.
    run: Mutex<Option<watch::Sender<bool>>>,
}

impl Supervisor {
    /// A supervisor for `command` (its `{port}` filled with a free port on
    /// loopback, served by `upstream`'s base URL on that port).
    pub fn new(
        name: &str,
        command: String,
        start_timeout: Duration,
        upstream: Arc<Upstream>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            command,
            start_timeout,
            upstream,
            state: watch::Sender::new(ChildState::Stopped),
            run: Mutex::new(None),
        })
    }

    pub fn state(&self) -> ChildState {
        self.state.borrow().clone()
    }

    /// Starts the child unless it runs, and waits until it answers (or has
    /// failed to within the start timeout). A child being started again
    /// after a crash is waited for.
    pub async fn ensure_running(self: &Arc<Self>) -> Result<(), String> {
        let mut states = self.state.subscribe();
        self.start_monitor();
        let settled = tokio::time::timeout(self.start_timeout, async {
            loop {
                let state = states.borrow_and_update().clone();
                match state {
                    ChildState::Running { .. } => return Ok(()),
                    ChildState::Failed(why) if !self.monitoring() => return Err(why),
                    ChildState::Stopped if !self.monitoring() => {
                        return Err("the model was unloaded while its server started".to_owned());
                    }
                    _ => {}
                }
                if states.changed().await.is_err() {
                    return Err("the supervisor stopped".to_owned());
                }
            }
        })
        .await;
        settled.unwrap_or_else(|_| {
            Err(format!(
                "{} did not answer within {:?} of starting",
                self.name, self.start_timeout
            ))
        })
    }

    /// Whether a monitor task is (or is about to be) running the child.
    fn monitoring(&self) -> bool {
        self.run.lock().is_ok_and(|r| r.is_some())
    }

    /// Stops the child (and its process group). Answers whether one ran.
    pub async fn stop(&self) -> bool {
        let Some(run) = self.run.lock().ok().and_then(|mut r| r.take()) else {
            return false;
        };
        let _ = run.send(false);
        let mut states = self.state.subscribe();
        let _ = tokio::time::timeout(
            STOP_GRACE + Duration::from_secs(5),
            states.wait_for(|s| *s == ChildState::Stopped),
        )
        .await;
        true
    }

    fn start_monitor(self: &Arc<Self>) {
        let Ok(mut run) = self.run.lock() else {
            return;
        };
        if run.is_some() {
            return;
        }
        let (tx, rx) = watch::channel(true);
        *run = Some(tx);
        // Said before the task runs, so no waiter reads an earlier failure.
        self.state.send_replace(ChildState::Starting);
        let supervisor = self.clone();
        tokio::spawn(async move { supervisor.monitor(rx).await });
    }

    /// Starts the child, waits for it to answer, and starts it again when it
    /// exits after serving, until told to stop. A child that never answers
    /// is not retried here: the failure is the load's, and the next request
    /// tries again.
    async fn monitor(self: Arc<Self>, mut run: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        while *run.borrow() {
            self.state.send_replace(ChildState::Starting);
            let outcome = match self.spawn() {
                Ok(child) => self.serve(child, &mut run).await,
                Err(error) => Outcome::NeverServed(error),
            };
            match outcome {
                Outcome::Stopped => break,
                Outcome::NeverServed(error) => {
                    tracing::error!(model = %self.name, %error, "upstream child did not start");
                    if let Ok(mut r) = self.run.lock() {
                        r.take();
                    }
                    self.state.send_replace(ChildState::Failed(error));
                    return;
                }
                Outcome::Exited(error) => {
                    failures += 1;
                    tracing::error!(model = %self.name, %error, failures, "upstream child exited; starting it again");
                    self.state.send_replace(ChildState::Failed(error));
                    let pause = Duration::from_secs(1u64 << failures.min(5)).min(MAX_RESTART_PAUSE);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = stopped(&mut run) => break,
                    }
                }
            }
        }
        self.state.send_replace(ChildState::Stopped);
    }

    fn spawn(&self) -> Result<Child, String> {
        tracing::info!(model = %self.name, command = %self.command, "starting upstream child");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("exec {}", self.command))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        command.process_group(0);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", self.command))?;
        for output in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let name = self.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(output).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(target: "upstream", model = %name, "{line}");
                }
            });
        }
        Ok(child)
    }

    /// Waits for the child to answer, then for it to exit or to be stopped.
    async fn serve(&self, mut child: Child, run: &mut watch::Receiver<bool>) -> Outcome {
        let pid = child.id().unwrap_or(0);
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        loop {
            self.upstream.check_all().await;
            if self.upstream.any_healthy() {
                break;
            }
            tokio::select! {
                exit = child.wait() => {
                    return Outcome::NeverServed(format!("`{}` exited while starting ({})", self.command, describe(exit)));
                }
                () = stopped(run) => {
                    stop_group(&mut child, pid).await;
                    return Outcome::Stopped;
                }
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            if tokio::time::Instant::now() > deadline {
                stop_group(&mut child, pid).await;
                return Outcome::NeverServed(format!(
                    "`{}` did not answer within {:?}",
                    self.command, self.start_timeout
                ));
            }
        }
        tracing::info!(model = %self.name, pid, "upstream child is serving");
        self.state.send_replace(ChildState::Running { pid });
        self.upstream.start_health_checks();
        tokio::select! {
            exit = child.wait() => Outcome::Exited(format!("`{}` exited ({})", self.command, describe(exit))),
            () = stopped(run) => {
                stop_group(&mut child, pid).await;
                tracing::info!(model = %self.name, pid, "upstream child stopped");
                Outcome::Stopped
            }
        }
    }
}

/// How one run of the child ended.
enum Outcome {
    /// Stopped on purpose.
    Stopped,
    /// It exited, or never answered, before serving.
    NeverServed(String),
    /// It exited after serving.
    Exited(String),
}

/// Resolves once the child is to stop.
async fn stopped(run: &mut watch::Receiver<bool>) {
    let _ = run.wait_for(|r| !*r).await;
}

fn describe(exit: std::io::Result<std::process::ExitStatus>) -> String {
    match exit {
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    }
}

/// SIGTERM to the child's process group, SIGKILL after the grace period.
async fn stop_group(child: &mut Child, pid: u32) {
    // The `kill` command reaches a whole process group without unsafe code.
    let signal = |sig: &str| {
        let _ = std::process::Command::new("kill")
            .args([sig, "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    };
    if pid > 0 {
        signal("-TERM");
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
        signal("-KILL");
    }
    let _ = child.kill().await;
}
