//! The shared tier (`CACHE_URL=redis://...`): several llmservice replicas
//! behind a load balancer answer each other's repeated requests. Values are
//! the same JSON bytes the other tiers hold, under `llmservice:cache:<key>`,
//! with the TTL as Redis's own expiry (`SET ... PX`), so Redis's memory policy
//! bounds the tier rather than `CACHE_MAX_SIZE`.
//!
//! Redis is an optimisation, never a dependency: every call is bounded by a
//! short timeout, and a failure marks the tier down for a growing pause
//! (the request carries on with the local tiers), then it is tried again.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::{Client, Connection, RedisResult};

use crate::backoff::Backoff;
use serde::Serialize;

/// What a cache lookup may cost at most before it counts as a miss: far below
/// what generating the answer again takes.
const TIMEOUT: Duration = Duration::from_millis(250);
/// Idle connections kept for reuse (one per concurrent cache call).
const MAX_IDLE: usize = 16;
const PREFIX: &str = "llmservice:cache:";

/// For `GET /internal/cache/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedisState {
    /// Configured (the tier may still be down: see `error`).
    pub enabled: bool,
    /// `CACHE_URL` without its password.
    pub url: Option<String>,
    /// Why the last call failed, while the tier is down.
    pub error: Option<String>,
    /// Hits answered by Redis (and kept in memory); part of `hits`.
    pub hits: u64,
    /// Calls that failed or timed out since start.
    pub errors: u64,
}

pub struct RedisTier {
    client: Client,
    url: String,
    ttl_ms: u64,
    /// A small pool by hand: the `r2d2` integration connects without a
    /// timeout and PINGs on every checkout, both wrong for a cache that must
    /// never hold a request up.
    idle: Mutex<Vec<Connection>>,
    health: Mutex<Backoff>,
    pub(super) hits: AtomicU64,
    errors: AtomicU64,
}

impl RedisTier {
    /// The tier for `url` (`redis://[user:password@]host[:port][/db]`); fails
    /// only on a URL Redis's client cannot read. Nothing is connected yet.
    pub fn open(url: &str, ttl: Duration) -> Result<Self, String> {
        let client = Client::open(url).map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            url: redacted(url),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            idle: Mutex::new(Vec::new()),
            health: Mutex::new(Backoff::default()),
            hits: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// The value under `key` and the milliseconds it has left, if Redis has it
    /// (and answers in time).
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u64)> {
        let (value, pttl): (Option<Vec<u8>>, i64) = self.call(|c| {
            redis::pipe()
                .get(format!("{PREFIX}{key}"))
                .pttl(format!("{PREFIX}{key}"))
                .query(c)
        })?;
        Some((value?, u64::try_from(pttl).unwrap_or(self.ttl_ms)))
    }

    pub fn put(&self, key: &str, value: &[u8]) {
        let _: Option<()> = self.call(|c| {
            redis::cmd("SET")
                .arg(format!("{PREFIX}{key}"))
                .arg(value)
                .arg("PX")
                .arg(self.ttl_ms)
                .query(c)
        });
    }

    /// Drops every cached answer (this server's prefix only: the Redis may
    /// hold other data).
    pub fn clear(&self) {
        let _: Option<()> = self.call(|c| {
            let keys: Vec<String> = redis::cmd("SCAN")
                .cursor_arg(0)
                .arg("MATCH")
                .arg(format!("{PREFIX}*"))
                .arg("COUNT")
                .arg(1000)
                .clone()
                .iter(c)?
                .collect::<RedisResult<_>>()?;
            for batch in keys.chunks(500) {
                redis::cmd("UNLINK").arg(batch).query::<()>(c)?;
            }
            Ok(())
        });
    }

    pub fn state(&self) -> RedisState {
        let error = self
            .health
            .lock()
            .ok()
            .and_then(|h| h.last_error().map(str::to_owned));
        RedisState {
            enabled: true,
            url: Some(self.url.clone()),
            error,
            hits: self.hits.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }

    /// Runs `f` on a pooled connection unless the tier is down; `None` when
    /// it is, or when the call fails (the tier is then down for a while). A
    /// pooled connection that Redis closed meanwhile (a restart) is replaced
    /// once before that counts as a failure.
    fn call<T>(&self, f: impl Fn(&mut Connection) -> RedisResult<T>) -> Option<T> {
        let now = Instant::now();
        if self.health.lock().is_ok_and(|h| !h.due(now)) {
            return None;
        }
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let reused = pooled.is_some();
        let attempt = |conn: Option<Connection>| {
            let mut conn = conn.map_or_else(|| self.connect(), Ok)?;
            f(&mut conn).map(|value| (value, conn))
        };
        let outcome = match attempt(pooled) {
            Err(error) if reused && (error.is_io_error() || error.is_connection_dropped()) => {
                if let Ok(mut idle) = self.idle.lock() {
                    idle.clear();
                }
                attempt(None)
            }
            outcome => outcome,
        };
        match outcome {
            Ok((value, conn)) => {
                self.succeeded();
                if let Ok(mut idle) = self.idle.lock() {
                    if idle.len() < MAX_IDLE {
                        idle.push(conn);
                    }
                }
                Some(value)
            }
            Err(error) => {
                self.failed(&error.to_string());
                None
            }
        }
    }

    fn connect(&self) -> RedisResult<Connection> {
        let conn = self.client.get_connection_with_timeout(TIMEOUT)?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        conn.set_write_timeout(Some(TIMEOUT))?;
        Ok(conn)
    }

    fn succeeded(&self) {
        if self.health.lock().is_ok_and(|mut h| h.succeeded()) {
            tracing::info!(url = %self.url, "response cache: Redis is back");
        }
    }

    fn failed(&self, error: &str) {
        self.errors.fetch_add(1, Relaxed);
        // Connections made before the failure may be half-broken: start afresh.
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        if self.health.lock().is_ok_and(|mut h| h.failed(error)) {
            tracing::warn!(url = %self.url, %error, "response cache: Redis failed; serving from the local tiers");
        }
    }
}

/// `url` with any password replaced, for logs and stats.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_stats() {
        assert_eq!(
            redacted("redis://user:secret@cache:6379/2"),
            "redis://***@cache:6379/2"
        );
        assert_eq!(redacted("redis://cache:6379"), "redis://cache:6379");
    }

    #[test]
    fn an_unreachable_redis_is_a_miss_and_then_skipped() {
        // Nothing listens on port 1.
        let tier = RedisTier::open("redis://127.0.0.1:1/", Duration::from_secs(60)).unwrap();
        assert!(tier.get("k").is_none());
        tier.put("k", b"v");
        let state = tier.state();
        assert!(state.error.is_some());
        // The second call was skipped: the tier is paused, not retried each time.
        assert_eq!(state.errors, 1);
    }
}
