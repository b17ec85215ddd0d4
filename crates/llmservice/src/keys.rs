//! API keys: who may call the server.
//!
//! The operator's keys come from `API_KEY` / `LLM_SERVICE_API_KEY`
//! (comma-separated for several) or, when neither is set, from one key
//! generated on first start and kept in `<data dir>/api_key` (mode 0600).
//! Named keys are created and revoked through `/admin/api/keys` and kept in
//! `<data dir>/keys.sqlite` as SHA-256 digests only, each with its request
//! and token counts. A presented key is hashed and compared with every
//! known digest in constant time (`subtle`), so neither the match nor its
//! position shows in the timing.
//!
//! Whatever fails here fails closed: without a usable operator key the
//! routes that need one answer 401.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::Duration;

use rusqlite::{params, Connection};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

/// File under the data dir holding the generated operator key.
pub const KEY_FILE: &str = "api_key";
/// File under the data dir holding the named keys.
pub const DB_FILE: &str = "keys.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    digest       BLOB NOT NULL,   -- SHA-256 of the key; the key itself is never stored
    prefix       TEXT NOT NULL,   -- its first characters, to recognise it by
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER,
    requests     INTEGER NOT NULL DEFAULT 0,
    tokens       INTEGER NOT NULL DEFAULT 0,
    last_used_at INTEGER
);
";

type Digest = [u8; 32];

#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeySettings {
    /// The operator's keys (`API_KEY`, `LLM_SERVICE_API_KEY`).
    pub keys: Vec<String>,
    /// `REQUIRE_API_KEY`: `Some(true)` keys the API routes on loopback too.
    pub require: Option<bool>,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No key, on a route that needs none.
    Anonymous,
    /// One of the operator's keys.
    Operator,
    /// A named key, by id.
    Named(String),
}

/// A named key as listed (never the key itself).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NamedKey {
    pub id: String,
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub requests: u64,
    pub tokens: u64,
    pub last_used_at: Option<i64>,
}

/// A key just created: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedKey {
    pub id: String,
    pub name: String,
    pub key: String,
    pub prefix: String,
    pub created_at: i64,
}

pub struct Keys {
    operator: Vec<Digest>,
    /// Whether the API routes need a key (beyond loopback, or asked to).
    api_needs_key: bool,
    /// Digests of the live named keys, by id.
    named: RwLock<Vec<(String, Digest)>>,
    db: Mutex<Result<Connection, String>>,
}

impl Keys {
    /// The keys for a server listening on `host`: the configured operator
    /// keys or the generated one, and the named keys under `data_dir`.
    pub fn open(settings: &KeySettings, host: &str, data_dir: &Path) -> Self {
        let operator = if settings.keys.is_empty() {
            match generated_key(data_dir) {
                Ok(key) => vec![digest(&key)],
                Err(error) => {
                    tracing::error!(%error, "no API key: set API_KEY; routes that need a key answer 401");
                    Vec::new()
                }
            }
        } else {
            settings.keys.iter().map(|k| digest(k)).collect()
        };
        let db = open_db(data_dir);
        let named = match &db {
            Ok(conn) => live_keys(conn).unwrap_or_else(|error| {
                tracing::error!(%error, "named API keys unreadable; only the operator's keys work");
                Vec::new()
            }),
            Err(error) => {
                tracing::error!(%error, "named API keys unavailable; only the operator's keys work");
                Vec::new()
            }
        };
        Self {
            operator,
            api_needs_key: settings.require.unwrap_or(!is_loopback(host)),
            named: RwLock::new(named),
            db: Mutex::new(db),
        }
    }

    /// Whether the API routes (`/v1`, Ollama's `/api`, ...) need a key.
    pub fn api_needs_key(&self) -> bool {
        self.api_needs_key
    }

    /// Who holds `key`, if anyone: every known digest is compared, without
    /// stopping at a match.
    pub fn check(&self, key: &str) -> Option<Caller> {
        let presented = digest(key);
        let mut found = None;
        for known in &self.operator {
            if bool::from(known.ct_eq(&presented)) {
                found = Some(Caller::Operator);
            }
        }
        for (id, known) in self.named.read().unwrap_or_else(|e| e.into_inner()).iter() {
            if bool::from(known.ct_eq(&presented)) && found.is_none() {
                found = Some(Caller::Named(id.clone()));
            }
        }
        found
    }

    /// Creates a named key and returns it, shown this once.
    pub fn create(&self, name: &str, now: i64) -> Result<CreatedKey, String> {
        let key = new_secret();
        let id = format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let prefix = key[..12].to_owned();
        let secret = digest(&key);
        self.run(|conn| {
            conn.execute(
                "INSERT INTO keys (id, name, digest, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, name, secret.as_slice(), prefix, now],
            )
        })?;
        self.named_mut().push((id.clone(), secret));
        Ok(CreatedKey {
            id,
            name: name.to_owned(),
            key,
            prefix,
            created_at: now,
        })
    }

    /// Revokes a named key; whether it was live.
    pub fn revoke(&self, id: &str, now: i64) -> Result<bool, String> {
        let changed = self.run(|conn| {
            conn.execute(
                "UPDATE keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now],
            )
        })?;
        self.named_mut().retain(|(key_id, _)| key_id != id);
        Ok(changed > 0)
    }

    /// Every named key, newest first, revoked ones included.
    pub fn list(&self) -> Result<Vec<NamedKey>, String> {
        self.run(|conn| {
            let mut statement = conn.prepare(
                "SELECT id, name, prefix, created_at, revoked_at, requests, tokens, last_used_at
                 FROM keys ORDER BY created_at DESC, rowid DESC",
            )?;
            let rows = statement.query_map([], |r| {
                Ok(NamedKey {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    prefix: r.get(2)?,
                    created_at: r.get(3)?,
                    revoked_at: r.get(4)?,
                    requests: r.get(5)?,
                    tokens: r.get(6)?,
                    last_used_at: r.get(7)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Counts a request, and the tokens it used, against a named key.
    pub fn record(&self, caller: &Caller, requests: u64, tokens: u64, now: i64) {
        let Caller::Named(id) = caller else {
            return;
        };
        let result = self.run(|conn| {
            conn.prepare_cached(
                "UPDATE keys SET requests = requests + ?2, tokens = tokens + ?3, last_used_at = ?4
                 WHERE id = ?1",
            )?
            .execute(params![id, requests, tokens, now])
        });
        if let Err(error) = result {
            tracing::warn!(key = id, %error, "key usage not recorded");
        }
    }

    fn run<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, String> {
        let conn = lock(&self.db);
        let conn = conn
            .as_ref()
            .map_err(|e| format!("key store unavailable: {e}"))?;
        f(conn).map_err(|e| format!("key store failed: {e}"))
    }

    fn named_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<(String, Digest)>> {
        self.named.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether `host` only accepts connections from this machine.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn digest(key: &str) -> Digest {
    Sha256::digest(key.as_bytes()).into()
}

/// A new key: 256 random bits (two v4 UUIDs' worth, from the OS's RNG).
fn new_secret() -> String {
    format!(
        "llms-{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The generated operator key: read from its file, or made and written
/// (readable by this user only) on first start, when it is also logged once.
fn generated_key(data_dir: &Path) -> Result<String, String> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(key) if !key.trim().is_empty() => return Ok(key.trim().to_owned()),
        Ok(_) => return Err(format!("{} is empty", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let key = new_secret();
    write_private(&path, &key).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::warn!(
        key,
        path = %path.display(),
        "generated an API key (set API_KEY to choose your own); it is shown only this once"
    );
    Ok(key)
}

fn write_private(path: &PathBuf, key: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "{key}")?;
    file.sync_all()
}

/// Makes a file readable and writable by this user only (SQLite gives its
/// `-wal` and `-shm` files the database file's mode).
pub(crate) fn make_private(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    }
    Ok(())
}

fn open_db(data_dir: &Path) -> Result<Connection, String> {
    let path = data_dir.join(DB_FILE);
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let conn =
        Connection::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    make_private(&path)?;
    conn.busy_timeout(Duration::from_secs(5))
        .and_then(|()| conn.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|()| conn.execute_batch(SCHEMA))
        .map_err(|e| format!("cannot use {}: {e}", path.display()))?;
    Ok(conn)
}

fn live_keys(conn: &Connection) -> rusqlite::Result<Vec<(String, Digest)>> {
    let mut statement = conn.prepare("SELECT id, digest FROM keys WHERE revoked_at IS NULL")?;
    let rows = statement.query_map([], |r| {
        let digest: Vec<u8> = r.get(1)?;
        Ok((r.get::<_, String>(0)?, digest))
    })?;
    let mut keys = Vec::new();
    for row in rows {
        let (id, bytes) = row?;
        if let Ok(digest) = Digest::try_from(bytes.as_slice()) {
            keys.push((id, digest));
        }
    }
    Ok(keys)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::OptionalExtension;

    fn row_exists(conn: &Connection, id: &str) -> bool {
        conn.query_row("SELECT 1 FROM keys WHERE id = ?1", params![id], |_| Ok(()))
            .optional()
            .unwrap()
            .is_some()
    }

    #[test]
    fn loopback_hosts() {
        for host in ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["0.0.0.0", "::", "192.168.1.2", "example.com"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn the_generated_key_is_private_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::open(&KeySettings::default(), "127.0.0.1", dir.path());
        assert!(!keys.api_needs_key());
        let key = std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        let key = key.trim();
        assert!(key.starts_with("llms-") && key.len() == 69, "{key}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(keys.check(key), Some(Caller::Operator));
        assert_eq!(keys.check("not-needed"), None);
        #[cfg(unix)]
        for file in [DB_FILE, "keys.sqlite-wal"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let again = Keys::open(&KeySettings::default(), "0.0.0.0", dir.path());
        assert!(again.api_needs_key());
        assert_eq!(again.check(key), Some(Caller::Operator));
    }

    #[test]
    fn configured_and_named_keys() {
        let dir = tempfile::tempdir().unwrap();
        let settings = KeySettings {
            keys: vec!["one".into(), "two".into()],
            require: Some(true),
        };
        let keys = Keys::open(&settings, "127.0.0.1", dir.path());
        assert!(keys.api_needs_key(), "REQUIRE_API_KEY keys loopback too");
        assert!(!dir.path().join(KEY_FILE).exists(), "no key generated");
        assert_eq!(keys.check("two"), Some(Caller::Operator));
        let created = keys.create("ci", 100).unwrap();
        assert_eq!(
            keys.check(&created.key),
            Some(Caller::Named(created.id.clone()))
        );
        keys.record(&Caller::Named(created.id.clone()), 1, 42, 101);
        let listed = keys.list().unwrap();
        assert_eq!((listed[0].requests, listed[0].tokens), (1, 42));
        assert_eq!(listed[0].prefix, created.key[..12]);
        // Only the digest is kept.
        let stored = std::fs::read(dir.path().join(DB_FILE)).unwrap();
        assert!(!stored
            .windows(20)
            .any(|w| w == &created.key.as_bytes()[20..40]));
        // Named keys survive a restart; revoked ones stop working at once.
        let again = Keys::open(&settings, "127.0.0.1", dir.path());
        assert_eq!(
            again.check(&created.key),
            Some(Caller::Named(created.id.clone()))
        );
        assert!(again.revoke(&created.id, 102).unwrap());
        assert!(!again.revoke(&created.id, 103).unwrap());
        assert_eq!(again.check(&created.key), None);
        assert!(row_exists(lock(&again.db).as_ref().unwrap(), &created.id));
        assert_eq!(again.list().unwrap()[0].revoked_at, Some(102));
    }
}
