//! Stored Responses API answers (`store: true`, the default): one SQLite file
//! under the data directory, `responses.sqlite`, bounded in rows and with a
//! time to live. A row keeps the `response` object that `GET
//! /v1/responses/{id}` returns and the conversation it ended as chat
//! messages, which `previous_response_id` continues.
//!
//! Unlike the response cache, this is data a client relies on: a store that
//! cannot open is reported on every request that needs it, not bypassed. A
//! kept response is readable at once (a client may continue it the moment
//! its answer arrives) while its row is written on the blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

/// File name inside the data directory.
pub const DB_FILE: &str = "responses.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS responses (
    id         TEXT PRIMARY KEY NOT NULL,
    created_at INTEGER NOT NULL, -- unix milliseconds
    body       TEXT NOT NULL,    -- the response object
    history    TEXT NOT NULL     -- the conversation as chat messages, output included
);
CREATE INDEX IF NOT EXISTS responses_created_at ON responses (created_at);
";

#[derive(Debug, Clone, PartialEq)]
pub struct StoreSettings {
    pub dir: PathBuf,
    /// Most responses kept; storing one more drops the oldest (`RESPONSES_MAX_STORED`).
    pub max_entries: u64,
    /// Responses older than this are gone (`RESPONSES_TTL_SECONDS`, default 30 days
    /// as OpenAI keeps them).
    pub ttl: Duration,
}

/// A stored response.
#[derive(Debug, Clone)]
pub struct Stored {
    pub body: Value,
    pub history: Vec<Value>,
}

pub struct ResponseStore {
    path: PathBuf,
    settings: StoreSettings,
    conn: Mutex<Result<Connection, String>>,
    /// Kept responses whose rows are still being written.
    pending: Mutex<HashMap<String, Stored>>,
}

impl ResponseStore {
    /// Opens (creating if needed) the store. Never fails: a store that cannot
    /// open answers every call with the reason.
    pub fn open(settings: StoreSettings) -> Self {
        let path = settings.dir.join(DB_FILE);
        let conn = open_conn(&settings.dir, &path);
        if let Err(error) = &conn {
            tracing::warn!(path = %path.display(), %error, "response store unavailable; previous_response_id and GET /v1/responses will fail");
        }
        Self {
            path,
            settings,
            conn: Mutex::new(conn),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps a response: readable now, written to disk on the blocking pool
    /// (the caller, an async task, does not wait). A failed write is logged;
    /// the client already has its answer.
    pub fn keep(self: &Arc<Self>, id: String, stored: Stored) {
        lock(&self.pending).insert(id.clone(), stored);
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let now = now_ms();
            let result = store.run("write", |conn| {
                // Deleted before its write: nothing to write.
                let Some(stored) = lock(&store.pending).get(&id).cloned() else {
                    return Ok(());
                };
                store.write(conn, &id, &stored, now)
            });
            lock(&store.pending).remove(&id);
            if let Err(error) = result {
                tracing::warn!(id, %error, "response not stored");
            }
        });
    }

    /// Keeps `body` and `history` under `id`, then drops expired rows and the
    /// oldest beyond the bound.
    pub fn put(&self, id: &str, stored: &Stored, now_ms: i64) -> Result<(), String> {
        self.run("write", |conn| self.write(conn, id, stored, now_ms))
    }

    fn write(
        &self,
        conn: &mut Connection,
        id: &str,
        stored: &Stored,
        now_ms: i64,
    ) -> rusqlite::Result<()> {
        let keep = i64::try_from(self.settings.max_entries).unwrap_or(i64::MAX);
        let body = stored.body.to_string();
        let history = Value::from(stored.history.as_slice()).to_string();
        let tx = conn.transaction()?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO responses (id, created_at, body, history) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![id, now_ms, body, history])?;
        tx.prepare_cached("DELETE FROM responses WHERE created_at <= ?1")?
            .execute(params![self.cutoff(now_ms)])?;
        tx.prepare_cached(
            "DELETE FROM responses WHERE id IN
             (SELECT id FROM responses ORDER BY created_at DESC LIMIT -1 OFFSET ?1)",
        )?
        .execute(params![keep])?;
        tx.commit()
    }

    /// The live response under `id`, if any.
    pub fn get(&self, id: &str, now_ms: i64) -> Result<Option<Stored>, String> {
        if let Some(stored) = lock(&self.pending).get(id) {
            return Ok(Some(stored.clone()));
        }
        let cutoff = self.cutoff(now_ms);
        let row: Option<(String, String)> = self.run("read", |conn| {
            conn.prepare_cached(
                "SELECT body, history FROM responses WHERE id = ?1 AND created_at > ?2",
            )?
            .query_row(params![id, cutoff], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })?;
        let Some((body, history)) = row else {
            return Ok(None);
        };
        let damaged = |e: serde_json::Error| format!("stored response {id} is damaged: {e}");
        Ok(Some(Stored {
            body: serde_json::from_str(&body).map_err(damaged)?,
            history: serde_json::from_str(&history).map_err(damaged)?,
        }))
    }

    /// Removes the response under `id`; whether there was one.
    pub fn delete(&self, id: &str, now_ms: i64) -> Result<bool, String> {
        let cutoff = self.cutoff(now_ms);
        let pending = lock(&self.pending).remove(id).is_some();
        self.run("delete", |conn| {
            let n = conn
                .prepare_cached("DELETE FROM responses WHERE id = ?1 AND created_at > ?2")?
                .execute(params![id, cutoff])?;
            Ok(pending || n > 0)
        })
    }

    fn cutoff(&self, now_ms: i64) -> i64 {
        let ttl = i64::try_from(self.settings.ttl.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_sub(ttl)
    }

    fn run<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, String> {
        let mut conn = lock(&self.conn);
        let conn = conn
            .as_mut()
            .map_err(|e| format!("response store unavailable: {e}"))?;
        f(conn).map_err(|e| {
            let message = format!("response store {what} failed: {e}");
            tracing::warn!(path = %self.path.display(), error = %message);
            message
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // SQLite rolls back whatever a panicking holder left half done, and the
    // pending map holds whole entries only.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn open_conn(dir: &Path, path: &Path) -> Result<Connection, String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    let conn =
        Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // Stored conversations are the users' data.
    crate::keys::make_private(path)?;
    conn.busy_timeout(Duration::from_secs(5))
        .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|()| conn.pragma_update(None, "synchronous", "NORMAL"))
        .and_then(|()| conn.execute_batch(SCHEMA))
        .map_err(|e| format!("cannot use {}: {e}", path.display()))?;
    if conn.is_readonly("main").unwrap_or(true) {
        return Err(format!("{} is read-only", path.display()));
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(dir: &Path, max_entries: u64) -> ResponseStore {
        ResponseStore::open(StoreSettings {
            dir: dir.to_owned(),
            max_entries,
            ttl: Duration::from_secs(60),
        })
    }

    #[test]
    fn keeps_reads_bounds_expires_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 2);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            store.put(id, &stored(id), 1_000 + i as i64).unwrap();
        }
        assert!(store.get("a", 2_000).unwrap().is_none(), "oldest dropped");
        let c = store.get("c", 2_000).unwrap().unwrap();
        assert_eq!(c.body["id"], "c");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(DB_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(c.history[0]["content"], "hi");
        // Past the TTL a response is gone, and a new write purges it.
        assert!(store.get("b", 1_001 + 60_000).unwrap().is_none());
        assert!(store.delete("c", 2_000).unwrap());
        assert!(!store.delete("c", 2_000).unwrap());
        // Reopening finds what was written.
        store.put("d", &stored("d"), 3_000).unwrap();
        drop(store);
        let again = super::tests::store(dir.path(), 2);
        assert!(again.get("d", 3_000).unwrap().is_some());
    }

    #[test]
    fn a_store_that_cannot_open_says_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), vec![7u8; 4096]).unwrap();
        let store = store(dir.path(), 2);
        let error = store.get("a", 0).err().unwrap();
        assert!(error.contains("response store unavailable"), "{error}");
        assert!(store.put("a", &stored("a"), 0).is_err());
    }

    fn stored(id: &str) -> Stored {
        Stored {
            body: json!({"id": id}),
            history: vec![json!({"role": "user", "content": "hi"})],
        }
    }

    #[tokio::test]
    async fn a_kept_response_reads_at_once_and_lands_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store(dir.path(), 10));
        store.keep("r".into(), stored("r"));
        assert_eq!(store.get("r", now_ms()).unwrap().unwrap().body["id"], "r");
        // Deleted while its write may still be in flight: it stays deleted.
        store.keep("gone".into(), stored("gone"));
        assert!(store.delete("gone", now_ms()).unwrap());
        for _ in 0..100 {
            if lock(&store.pending).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(store);
        let again = super::tests::store(dir.path(), 10);
        assert!(again.get("r", now_ms()).unwrap().is_some());
        assert!(again.get("gone", now_ms()).unwrap().is_none());
    }
}
