//! The disk tier: one SQLite file in WAL mode, holding the same JSON bytes the
//! memory tier measures.
//!
//! Every failure here is survivable: the response cache is an optimisation, so
//! a broken file or a full disk must cost speed, never a request or the process.
//! Opening problems and runtime errors are logged once, recorded for
//! `/internal/cache/stats`, and the tier switches itself off.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

/// File name inside `CACHE_DIR`.
pub const DB_FILE: &str = "cache.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS responses (
    key        TEXT PRIMARY KEY NOT NULL,
    value      BLOB NOT NULL,
    created_at INTEGER NOT NULL, -- unix milliseconds: a 1 s grain is too coarse for short TTLs
    size       INTEGER NOT NULL
);
-- Expiry purges and oldest-first pruning both walk rows by age.
CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);
";

/// A row read back from disk.
pub struct DiskRow {
    pub value: Vec<u8>,
    pub created_at_ms: i64,
}

pub struct DiskTier {
    path: PathBuf,
    ttl_ms: i64,
    max_entries: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    /// `None` once the tier is disabled; it never comes back within a process,
    /// since a file that failed once is likely to fail again on every request.
    conn: Option<Connection>,
    error: Option<String>,
    evictions: u64,
}

impl DiskTier {
    /// Opens (creating if needed) `<dir>/cache.sqlite`. Never fails: on error the
    /// returned tier is disabled and reports why.
    pub fn open(dir: &Path, ttl: Duration, max_entries: u64, now_ms: i64) -> DiskTier {
        let path = dir.join(DB_FILE);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let (conn, error) = match open_conn(dir, &path, ttl_ms, now_ms) {
            Ok(conn) => (Some(conn), None),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "response cache: disk tier disabled; continuing with memory only");
                (None, Some(e))
            }
        };
        DiskTier {
            path,
            ttl_ms,
            max_entries,
            inner: Mutex::new(Inner {
                conn,
                error,
                evictions: 0,
            }),
        }
    }

    /// The fresh row under `key`, if any. An expired row is deleted on the way:
    /// reads are where stale rows are found, and leaving them would let the
    /// file grow with garbage between inserts.
    pub fn get(&self, key: &str, now_ms: i64) -> Option<DiskRow> {
        let cutoff = self.cutoff(now_ms);
        self.lock().run(&self.path, "read", |conn| {
            let row = conn
                .prepare_cached("SELECT value, created_at FROM responses WHERE key = ?1")?
                .query_row(params![key], |r| {
                    Ok(DiskRow {
                        value: r.get(0)?,
                        created_at_ms: r.get(1)?,
                    })
                })
                .optional()?;
            match row {
                Some(row) if row.created_at_ms <= cutoff => {
                    conn.prepare_cached("DELETE FROM responses WHERE key = ?1")?
                        .execute(params![key])?;
                    Ok(None)
                }
                other => Ok(other),
            }
        })?
    }

    /// Stores `value` under `key` (replacing any older row), then trims expired
    /// rows and the oldest rows beyond `max_entries`.
    pub fn put(&self, key: &str, value: &[u8], now_ms: i64) {
        let cutoff = self.cutoff(now_ms);
        // The bound is in rows, the same unit as the memory tier's.
        let keep = i64::try_from(self.max_entries).unwrap_or(i64::MAX);
        let size = i64::try_from(value.len()).unwrap_or(i64::MAX);
        let mut inner = self.lock();
        let pruned = inner.run(&self.path, "write", |conn| {
            let tx = conn.transaction()?;
            tx.prepare_cached(
                "INSERT INTO responses (key, value, created_at, size) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value,
                     created_at = excluded.created_at, size = excluded.size",
            )?
            .execute(params![key, value, now_ms, size])?;
            tx.prepare_cached("DELETE FROM responses WHERE created_at <= ?1")?
                .execute(params![cutoff])?;
            // Walks at most `max_entries` index entries from the newest end;
            // cheap next to the generation that produced the value.
            let pruned = tx
                .prepare_cached(
                    "DELETE FROM responses WHERE key IN (
                         SELECT key FROM responses
                         ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?1)",
                )?
                .execute(params![keep])?;
            tx.commit()?;
            Ok(pruned)
        });
        if let Some(n) = pruned {
            inner.evictions += n as u64;
        }
    }

    /// Drops one row, used when its bytes no longer decode.
    pub fn remove(&self, key: &str) {
        let mut inner = self.lock();
        inner.run(&self.path, "delete", |conn| {
            conn.prepare_cached("DELETE FROM responses WHERE key = ?1")?
                .execute(params![key])
        });
    }

    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.run(&self.path, "clear", |conn| {
            conn.execute("DELETE FROM responses", [])
        });
    }

    /// Folds the WAL back into the main file so a copy of `cache.sqlite` alone
    /// is complete after shutdown.
    pub fn flush(&self) {
        let mut inner = self.lock();
        inner.run(&self.path, "checkpoint", |conn| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        });
    }

    pub fn state(&self, now_ms: i64) -> super::DiskState {
        let cutoff = self.cutoff(now_ms);
        let mut inner = self.lock();
        let entries = inner
            .run(&self.path, "count", |conn| {
                conn.query_row(
                    "SELECT COUNT(*) FROM responses WHERE created_at > ?1",
                    params![cutoff],
                    |r| r.get::<_, i64>(0),
                )
            })
            .map_or(0, |n| n.max(0) as u64);
        super::DiskState {
            enabled: inner.conn.is_some(),
            path: Some(self.path.to_string_lossy().into_owned()),
            error: inner.error.clone(),
            entries,
            // Filled in by the caller, which alone knows whether the bytes decoded.
            hits: 0,
            evictions: inner.evictions,
        }
    }

    fn cutoff(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.ttl_ms)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves nothing half-written
        // that SQLite itself does not roll back, so the state is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Runs `f` on the open connection. Contention from another process is
    /// transient and only skips this operation; any other error disables the
    /// tier, because it means the file or the disk under it is unusable.
    fn run<T>(
        &mut self,
        path: &Path,
        what: &str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Option<T> {
        let conn = self.conn.as_mut()?;
        match f(conn) {
            Ok(v) => Some(v),
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) =>
            {
                tracing::warn!(path = %path.display(), error = %e, "response cache: disk {what} skipped, database busy");
                None
            }
            Err(e) => {
                let msg = format!("{what} failed: {e}");
                tracing::warn!(path = %path.display(), error = %msg, "response cache: disk tier disabled; continuing with memory only");
                self.conn = None;
                self.error = Some(msg);
                None
            }
        }
    }
}

fn open_conn(dir: &Path, path: &Path, ttl_ms: i64, now_ms: i64) -> Result<Connection, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    let conn = Connection::open(path).map_err(|e| format!("cannot open: {e}"))?;
    // Garbage bytes are only noticed on the first statement, so each step of
    // the set-up doubles as a probe of the file.
    conn.busy_timeout(Duration::from_secs(2))
        .map_err(|e| format!("cannot configure: {e}"))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| format!("cannot enable WAL: {e}"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Some filesystems cannot host a WAL; the cache still works, only with
        // readers waiting on writers.
        tracing::warn!(path = %path.display(), mode, "response cache: SQLite refused WAL mode");
    }
    // In WAL mode NORMAL is still crash-safe for the database; a power cut may
    // only lose the latest cached answers, which can be recomputed.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| format!("cannot configure: {e}"))?;
    // A file damaged past its header only shows it on pages a query touches;
    // finding out now beats finding out on the request that reads them.
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| format!("integrity check failed: {e}"))?;
    if check != "ok" {
        return Err(format!("integrity check failed: {check}"));
    }
    conn.execute_batch(SCHEMA)
        .map_err(|e| format!("cannot create schema: {e}"))?;
    // SQLite silently falls back to read-only for a file it may not write;
    // writes would then fail on every request instead of once here.
    if conn.is_readonly("main").unwrap_or(true) {
        return Err("database is read-only".to_owned());
    }
    conn.execute(
        "DELETE FROM responses WHERE created_at <= ?1",
        params![now_ms.saturating_sub(ttl_ms)],
    )
    .map_err(|e| format!("cannot purge expired rows: {e}"))?;
    Ok(conn)
}

// Failure handling lives here, next to the code that must survive it; the
// shared fixtures are in `cache/tests.rs`.
#[cfg(test)]
mod tests {
    use super::DB_FILE;
    use crate::cache::tests::{key, resp, settings};
    use crate::cache::{now_ms, ResponseCache};

    #[test]
    fn corrupted_file_disables_disk_but_not_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();

        let cache = ResponseCache::new(settings(dir.path()));
        let stats = cache.stats();
        assert!(!stats.disk.enabled);
        let error = stats.disk.error.expect("error reported");
        assert!(error.contains("not a database"), "{error}");

        cache.put(&key(1), resp(1));
        assert_eq!(cache.get(&key(1)), Some(resp(1)));
        assert_eq!(cache.stats().hits, 1);
        cache.flush();
        cache.clear();
        // The user's file is left alone for inspection.
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }

    #[test]
    fn directory_that_cannot_exist_disables_disk() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let cache = ResponseCache::new(settings(&file.join("cache")));
        let stats = cache.stats();
        assert!(!stats.disk.enabled);
        assert!(stats
            .disk
            .error
            .unwrap()
            .contains("cannot create directory"));
        cache.put(&key(1), resp(1));
        assert_eq!(cache.get(&key(1)), Some(resp(1)));
    }

    #[cfg(unix)]
    #[test]
    fn read_only_directory_disables_disk_unless_privileged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        // Root (as in CI containers) ignores the mode bits; probe what really holds.
        let probe = locked.join("probe");
        let writable = std::fs::write(&probe, b"x").is_ok();
        let _ = std::fs::remove_file(&probe);

        let cache = ResponseCache::new(settings(&locked.join("cache")));
        let stats = cache.stats();
        assert_eq!(stats.disk.enabled, writable, "{:?}", stats.disk.error);
        assert_eq!(stats.disk.error.is_some(), !writable);
        cache.put(&key(1), resp(1));
        assert_eq!(cache.get(&key(1)), Some(resp(1)));
        drop(cache);
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn runtime_write_failure_disables_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ResponseCache::new(settings(dir.path()));
        cache.put(&key(1), resp(1));
        // Another party breaks the file under us.
        rusqlite::Connection::open(dir.path().join(DB_FILE))
            .unwrap()
            .execute_batch("DROP TABLE responses")
            .unwrap();
        cache.put(&key(2), resp(2));
        let stats = cache.stats();
        assert!(!stats.disk.enabled);
        assert!(stats.disk.error.unwrap().contains("write failed"));
        // Memory still serves both, and later calls skip the disk quietly.
        assert_eq!(cache.get(&key(2)), Some(resp(2)));
        assert_eq!(cache.get(&key(1)), Some(resp(1)));
        assert_eq!(cache.get(&key(3)), None);
        cache.put(&key(3), resp(3));
        cache.flush();
        cache.clear();
    }

    #[test]
    fn undecodable_row_is_dropped_as_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ResponseCache::new(settings(dir.path()));
        rusqlite::Connection::open(dir.path().join(DB_FILE))
            .unwrap()
            .execute(
                "INSERT INTO responses (key, value, created_at, size) VALUES (?1, x'00ff', ?2, 2)",
                rusqlite::params![key(1).as_str(), now_ms()],
            )
            .unwrap();
        assert_eq!(cache.get(&key(1)), None);
        let stats = cache.stats();
        assert!(stats.disk.enabled);
        assert_eq!(
            (stats.misses, stats.disk.hits, stats.disk.entries),
            (1, 0, 0)
        );
    }
}
