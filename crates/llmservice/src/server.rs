//! Binding, `.port`, and a graceful shutdown that cannot hang forever.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{router, AppState};
use crate::settings::Settings;

/// How long in-flight requests may run on after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often counted requests are written to the analytics store.
const ANALYTICS_FLUSH: Duration = Duration::from_secs(10);

/// The file clients read to find the port (`.port` in the working directory).
const PORT_FILE: &str = ".port";

pub async fn serve(mut settings: Settings) -> Result<(), String> {
    if let Some(reference) = settings.startup_model.clone() {
        let path = crate::pull::startup_model(&settings, &reference)
            .await
            .map_err(|e| format!("MODEL_REPO_ID: {e}"))?;
        settings.default_model_file = Some(path);
    }
    let settings = Arc::new(settings);
    let listener = bind(&settings.host, settings.port, settings.next_free_port).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let port_file = PortFile::write(addr)?;
    let state = AppState::new(settings.clone());
    let models = state.registry.list();
    tracing::info!(
        %addr,
        models = models.len(),
        models_dir = %settings.models_dir.display(),
        api_key = if state.keys.api_needs_key() { "required" } else { "not required (loopback)" },
        "llmservice listening"
    );
    for entry in &models {
        tracing::info!(id = %entry.id, kind = entry.kind.as_str(), path = %entry.path.display(), "model available");
        // A managed child's checks start with the child.
        if let Some(upstream) = entry.upstream.as_ref().filter(|_| entry.managed.is_none()) {
            upstream.start_health_checks();
        }
    }
    let cache = state.cache.clone();
    let analytics = state.analytics.clone();
    let flusher = state.analytics.clone();
    // Analytics reach their SQLite file every few seconds (and at exit).
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(ANALYTICS_FLUSH).await;
            let analytics = flusher.clone();
            let _ = tokio::task::spawn_blocking(move || analytics.flush()).await;
        }
    });
    let watched = state.clone();
    let children = state.registry.clone();
    let reaper = state.registry.clone();
    // Keep-alive: unload models idle past their `{TIER}_KEEP_ALIVE`.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            reaper.unload_idle().await;
        }
    });
    let app = router(state);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let idle_limit = settings.shutdown_timeout;
    let shutdown = async move {
        tokio::select! {
            () = shutdown_signal() => {},
            () = idle(watched, idle_limit) => {},
        }
        let _ = stop_tx.send(true);
    };
    let server = accept(listener, app, &settings, shutdown);
    let mut stop_rx = stop_rx;
    let forced = async move {
        let _ = stop_rx.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        () = server => {},
        () = forced => tracing::warn!("in-flight requests still running after {SHUTDOWN_GRACE:?}; exiting anyway"),
    }
    // Servers we started (managed tiers) stop with us.
    children.stop_children().await;
    // The disk cache must hold everything answered before exit, and the
    // analytics everything counted.
    let _ = tokio::task::spawn_blocking(move || {
        cache.flush();
        analytics.flush();
    })
    .await;
    drop(port_file);
    tracing::info!("llmservice stopped");
    Ok(())
}

/// Resolves once the server has had no requests (and generated nothing) for
/// `SHUTDOWN_TIMEOUT`; never when it is unset.
async fn idle(state: AppState, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let tick = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        if state.idle_for() >= limit {
            tracing::info!(
                idle_secs = limit.as_secs_f64(),
                "no requests for SHUTDOWN_TIMEOUT: shutting down"
            );
            return;
        }
    }
}

/// Most ports after a taken one that `--next-free-port` tries.
const NEXT_PORTS: u16 = 100;

async fn bind(host: &str, port: u16, next_free: bool) -> Result<TcpListener, String> {
    let in_use = |e: &std::io::Error| e.kind() == std::io::ErrorKind::AddrInUse;
    let error = match TcpListener::bind(format!("{host}:{port}")).await {
        Ok(listener) => return Ok(listener),
        Err(e) => e,
    };
    if !in_use(&error) {
        return Err(format!("cannot listen on {host}:{port}: {error}"));
    }
    if !next_free || port == 0 {
        return Err(format!("port {port} on {host} is already in use: stop the other process, choose another with --port or PORT, take the next free one with --next-free-port (NEXT_FREE_PORT=true), or use --port 0 for any free port (written to .port)"));
    }
    for next in (port..port.saturating_add(NEXT_PORTS)).map(|p| p + 1) {
        match TcpListener::bind(format!("{host}:{next}")).await {
            Ok(listener) => {
                tracing::warn!(
                    taken = port,
                    port = next,
                    "the port is in use: listening on the next free one (written to .port)"
                );
                return Ok(listener);
            }
            Err(e) if in_use(&e) => continue,
            Err(e) => return Err(format!("cannot listen on {host}:{next}: {e}")),
        }
    }
    Err(format!(
        "port {port} on {host} and the {NEXT_PORTS} after it are in use"
    ))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received: finishing in-flight requests");
}

/// `.port` in the working directory, removed again on exit.
struct PortFile(PathBuf);

impl PortFile {
    fn write(addr: SocketAddr) -> Result<Self, String> {
        let path = PathBuf::from(PORT_FILE);
        std::fs::write(&path, format!("{}\n", addr.port()))
            .map_err(|e| format!("cannot write {PORT_FILE}: {e}"))?;
        Ok(Self(path))
    }
}

impl Drop for PortFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Descriptors kept back from connections: model files, SQLite databases
/// (each with its WAL and shared memory), upstream and Redis sockets, logs.
const FD_RESERVE: usize = 256;
/// Connections served at once when `MAX_CONNECTIONS` is not set and the
/// descriptor limit allows more.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// How many connections to serve at once: `MAX_CONNECTIONS`, or what the
/// descriptor limit leaves after [`FD_RESERVE`], at most
/// [`DEFAULT_MAX_CONNECTIONS`].
fn connection_limit(configured: Option<usize>) -> usize {
    connection_limit_within(configured).min(tokio::sync::Semaphore::MAX_PERMITS)
}

fn connection_limit_within(configured: Option<usize>) -> usize {
    let available = raise_fd_limit().map(|fds| fds.saturating_sub(FD_RESERVE).max(16));
    match (configured, available) {
        (Some(n), Some(available)) if n > available => {
            tracing::warn!(
                max_connections = n,
                available,
                "MAX_CONNECTIONS is above what the file-descriptor limit leaves; \
                 model loads and databases may fail for want of descriptors at that load"
            );
            n
        }
        (Some(n), _) => n,
        (None, available) => {
            available.map_or(DEFAULT_MAX_CONNECTIONS, |a| a.min(DEFAULT_MAX_CONNECTIONS))
        }
    }
}

/// Raises the soft limit on open files to the hard one (as Go's runtime and
/// nginx do: the customary soft 1024 dates from select(2), which nothing here
/// uses) and returns the limit in force; `None` when unlimited.
fn raise_fd_limit() -> Option<usize> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current?;
    // An unlimited hard limit is not a value setrlimit takes for open files
    // everywhere (macOS caps it): aim for a million.
    let target = limit.maximum.unwrap_or(1 << 20).min(1 << 20);
    if target > current {
        let raised = Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            tracing::debug!(from = current, to = target, "raised the open-file limit");
            return usize::try_from(target).ok();
        }
    }
    usize::try_from(current).ok()
}

/// The connections that may be served at once.
struct Slots {
    limit: usize,
    free: Arc<tokio::sync::Semaphore>,
    /// Whether the last wait found none free (warned once per episode).
    saturated: bool,
}

impl Slots {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            free: Arc::new(tokio::sync::Semaphore::new(limit)),
            saturated: false,
        }
    }

    /// A slot for the next connection, held until it closes; waits while
    /// all are taken.
    async fn next(&mut self) -> tokio::sync::OwnedSemaphorePermit {
        if let Ok(slot) = self.free.clone().try_acquire_owned() {
            self.saturated = false;
            return slot;
        }
        if !self.saturated {
            tracing::warn!(
                limit = self.limit,
                "connection limit reached (MAX_CONNECTIONS): new connections wait"
            );
            self.saturated = true;
        }
        let free = self.free.clone();
        free.acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

/// Serves connections until `shutdown`, then lets those open finish.
/// (`axum::serve` gives hyper no timer, so a client could hold a connection
/// open for ever by trickling its headers; this loop is axum's, HTTP/1 as
/// axum's default features serve, with a timer.)
async fn accept(
    listener: TcpListener,
    app: axum::Router,
    settings: &Settings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut slots = Slots::new(connection_limit(settings.max_connections));
    loop {
        // At the limit, stop accepting: new clients wait in the kernel's
        // backlog, and descriptors stay free for model files and databases.
        let slot = tokio::select! {
            slot = slots.next() => slot,
            () = &mut shutdown => break,
        };
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait for some to close.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers go out in several writes (headers, then SSE events): without
        // TCP_NODELAY, Nagle's algorithm holds each small write until the
        // client's delayed ACK, up to 40 ms a response.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set on a connection");
        }
        let service =
            app.clone()
                .map_request(|request: axum::http::Request<hyper::body::Incoming>| {
                    request.map(axum::body::Body::new)
                });
        // A client that stops reading would otherwise keep its connection,
        // and the answer buffered for it, for as long as it stays connected.
        let mut io = tokio_io_timeout::TimeoutStream::new(tcp);
        io.set_write_timeout(Some(settings.write_timeout));
        let io = TokioIo::new(Box::pin(io));
        let connection = builder.serve_connection(io, TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = connection.await {
                tracing::trace!(%error, "connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::body::Body;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::cli::ServeArgs;

    /// Serves `app` on a loopback port through [`accept`] with one setting;
    /// sending on the returned channel shuts it down.
    async fn serve(
        app: axum::Router,
        setting: (&str, &str),
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let env = [("HOME", "/nonexistent"), setting];
        let settings = Settings::resolve(&ServeArgs::default(), &env).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            accept(listener, app, &settings, async {
                let _ = stopped.await;
            })
            .await;
        });
        (addr, stop, server)
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_or_with_next_free_port_the_next_one() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = taken.local_addr().unwrap().port();
        let error = bind("127.0.0.1", port, false).await.unwrap_err();
        assert!(
            error.contains("already in use") && error.contains("--next-free-port"),
            "{error}"
        );
        let next = bind("127.0.0.1", port, true).await.unwrap();
        let got = next.local_addr().unwrap().port();
        assert!(got > port && got <= port + NEXT_PORTS, "{got} after {port}");
    }

    /// Sets its flag when dropped: the answer's body was let go.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_loses_its_connection_after_the_write_timeout() {
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = dropped.clone();
        // An endless answer, 64 KiB a chunk: the kernel's buffers fill at once.
        let app = axum::Router::new().route(
            "/endless",
            axum::routing::get(move || {
                let guard = Dropped(flag.clone());
                async move {
                    let chunks = async_stream::stream! {
                        let _guard = guard;
                        loop {
                            yield Ok::<_, std::io::Error>(vec![b'x'; 64 << 10]);
                        }
                    };
                    Body::from_stream(chunks)
                }
            }),
        );
        let (addr, stop, server) = serve(app, ("WRITE_TIMEOUT", "1")).await;
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Never read. The answer is dropped a second after writes stall.
        let started = std::time::Instant::now();
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the connection of a client that stopped reading was kept"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(900));
        drop(client);
        let _ = stop.send(());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn past_max_connections_new_clients_wait_until_one_closes() {
        use tokio::io::AsyncReadExt;

        let app = axum::Router::new().route("/ok", axum::routing::get(|| async { "ok" }));
        let (addr, stop, server) = serve(app, ("MAX_CONNECTIONS", "2")).await;
        // Two connections that say nothing hold both slots.
        let first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let waited =
            tokio::time::timeout(Duration::from_millis(700), third.read_to_end(&mut answer)).await;
        assert!(
            waited.is_err(),
            "a third connection was served past the limit"
        );
        // One closes: the waiting client is accepted and answered.
        drop(first);
        tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut answer))
            .await
            .expect("the waiting client was never served")
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        let _ = stop.send(());
        server.await.unwrap();
    }
}
