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
    let listener = bind(&settings.host, settings.port).await?;
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

async fn bind(host: &str, port: u16) -> Result<TcpListener, String> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("port {port} on {host} is already in use: stop the other process, choose another with --port or PORT, or use --port 0 for any free port (written to .port)")
        } else {
            format!("cannot listen on {addr}: {e}")
        }
    })
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
    loop {
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
        let env = [("HOME", "/nonexistent"), ("WRITE_TIMEOUT", "1")];
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
}
