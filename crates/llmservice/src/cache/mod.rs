//! Response cache: identical deterministic requests get the stored answer instead
//! of another generation.
//!
//! Two tiers share one key space. The memory tier (`moka`) answers repeat
//! requests without touching the disk; the optional disk tier (SQLite, see
//! `disk.rs`) lets answers survive a restart and backs the memory tier on a miss,
//! promoting what it finds. Writes go to both tiers. Both are bounded by
//! `max_entries` entries (what `CACHE_MAX_SIZE` has always meant), the memory
//! tier also by `max_bytes` (`CACHE_MAX_BYTES`): a chat answer is a few KiB,
//! but an embeddings answer for many inputs runs to megabytes, so a count
//! alone does not bound memory (a 10-minute soak grew the server by 95 MiB
//! holding 1,000 entries as JSON trees). Entries are held as their serialized
//! bytes and parsed on a hit. Both tiers expire entries `ttl` after they were
//! first stored.
//!
//! The API is synchronous. Memory-only operations are fast, but with the disk
//! tier enabled `get`, `put`, `stats`, `flush` and `clear` may do file I/O
//! (`new` always may), so async callers should run them inside
//! `tokio::task::spawn_blocking` (hold the cache in an `Arc`).

mod disk;
mod redis;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use disk::DiskTier;
pub use redis::RedisState;
use redis::RedisTier;

/// Cache configuration, from the environment names the earlier services used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// `ENABLE_CACHE` (default true).
    pub enabled: bool,
    /// `CACHE_MAX_SIZE`: entries per tier (default 1000).
    pub max_entries: u64,
    /// `CACHE_MAX_BYTES`: serialized bytes the memory tier holds (default 128 MiB).
    pub max_bytes: u64,
    /// `CACHE_TTL_SECONDS` (default 3600), counted from when an answer was stored.
    pub ttl: Duration,
    /// `CACHE_PERSIST_TO_DISK` (default false).
    pub persist_to_disk: bool,
    /// `CACHE_DIR` (default `<data_dir>/cache`); holds `cache.sqlite`.
    pub dir: PathBuf,
    /// `CACHE_ALL` (default false): also cache sampled (non-deterministic) requests.
    pub cache_all: bool,
    /// `CACHE_URL` (`redis://...`): a cache shared by several replicas,
    /// behind the memory tier.
    pub url: Option<String>,
}

/// Whether a request may be served from (and stored in) the cache: only when
/// its answer is reproducible — greedy decoding or a fixed seed — unless
/// `CACHE_ALL` asks to cache sampled answers too.
pub fn is_cacheable(temperature: f32, seed: Option<i64>, cache_all: bool) -> bool {
    // llama.cpp samples greedily for any temperature <= 0; NaN is not <= 0.
    cache_all || seed.is_some() || temperature <= 0.0
}

/// Hex SHA-256 of the canonical form of everything that shapes an answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CacheKey(String);

/// Bumped whenever the stored format or the meaning of the key parts changes,
/// so rows written by an older build on disk are never mistaken for hits.
const KEY_DOMAIN: &[u8] = b"llmservice-response-cache-v2\n";

impl CacheKey {
    /// `parts` must hold every input that changes the answer: the model file's
    /// identity, the prompt or messages, tools, response_format and every
    /// sampling field. Object key order does not matter.
    pub fn new(parts: &Value) -> CacheKey {
        let mut hasher = Sha256::new();
        hasher.update(KEY_DOMAIN);
        hasher.update(canonical_json(parts).as_bytes());
        let digest = hasher.finalize();
        let mut hex = String::with_capacity(64);
        for byte in digest {
            hex.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(byte & 15)]));
        }
        CacheKey(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Compact JSON with object keys sorted (by UTF-8 bytes) at every depth, so two
/// values that differ only in key order serialize identically. serde_json's
/// `preserve_order` keeps insertion order, which is why this is needed at all.
/// Floats with no fractional part are written as integers, so `"temperature": 1`
/// and `1.0` (the same request) share a key.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        Value::Number(n) => match n.as_f64() {
            // Below 2^53 every integral f64 converts to i64 exactly.
            Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                out.push_str(&(f as i64).to_string());
            }
            _ => out.push_str(&n.to_string()),
        },
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A stored answer: the full OpenAI response JSON (streaming replays are built
/// from it by the caller) and its `created` timestamp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedResponse {
    pub body: Value,
    pub created: i64,
}

/// For `GET /internal/cache/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub enabled: bool,
    /// Answers served, from either tier.
    pub hits: u64,
    pub misses: u64,
    /// Entries in the memory tier. Expired entries are collected in moka's ~1 s
    /// timer buckets, so this (and `bytes`) may briefly include a few that
    /// `get` already refuses.
    pub entries: u64,
    /// `entries` under the name seed 001's stats used.
    pub size: u64,
    /// Memory-tier entries dropped (or refused) to stay within `max_entries`.
    pub evictions: u64,
    /// Serialized JSON bytes held by the memory tier.
    pub bytes: u64,
    pub disk: DiskState,
    /// The shared tier (`CACHE_URL`).
    pub redis: RedisState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskState {
    /// False when persistence is off or the tier was disabled by an error.
    pub enabled: bool,
    /// The SQLite file, when persistence is configured.
    pub path: Option<String>,
    /// Why the tier was disabled, if it was.
    pub error: Option<String>,
    /// Unexpired rows.
    pub entries: u64,
    /// Hits answered by the disk tier (and promoted to memory); part of `hits`.
    pub hits: u64,
    /// Oldest rows deleted to stay within `max_entries`.
    pub evictions: u64,
}

struct MemEntry {
    /// The serialized [`CachedResponse`]; a third of the parsed tree's memory.
    bytes: Arc<[u8]>,
    size: u64,
    /// When the answer was first stored (unix ms), kept so a row promoted from
    /// disk expires on the disk row's schedule, not a fresh one.
    stored_ms: i64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    bytes: AtomicU64,
    disk_hits: AtomicU64,
}

/// Per-entry expiry instead of a flat `time_to_live`: a flat TTL would restart
/// the clock whenever a disk row is promoted, letting it live almost twice `ttl`.
struct AgeExpiry {
    ttl: Duration,
}

impl AgeExpiry {
    fn remaining(&self, stored_ms: i64) -> Duration {
        let age = now_ms().saturating_sub(stored_ms).max(0);
        self.ttl.saturating_sub(Duration::from_millis(age as u64))
    }
}

impl Expiry<String, Arc<MemEntry>> for AgeExpiry {
    fn expire_after_create(&self, _: &String, v: &Arc<MemEntry>, _: Instant) -> Option<Duration> {
        Some(self.remaining(v.stored_ms))
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &Arc<MemEntry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.remaining(v.stored_ms))
    }
}

pub struct ResponseCache {
    settings: CacheSettings,
    /// `None` when the cache is disabled.
    memory: Option<Cache<String, Arc<MemEntry>>>,
    /// `None` when persistence is off; present but disabled after an error.
    disk: Option<DiskTier>,
    /// `None` without `CACHE_URL`.
    shared: Option<RedisTier>,
    counters: Arc<Counters>,
}

impl ResponseCache {
    /// Builds the tiers. Never fails: a disk tier that cannot be opened is
    /// logged, reported in [`stats`](Self::stats), and bypassed.
    pub fn new(settings: CacheSettings) -> Self {
        let counters = Arc::new(Counters::default());
        let (memory, disk) = if settings.enabled {
            let listener_counters = Arc::clone(&counters);
            // One capacity bounds both: each entry weighs its size, but at
            // least an even share of the bytes (rounded up), so no more than
            // `max_entries` fit and their sizes add up to at most `max_bytes`
            // (give or take the rounding: a byte per entry).
            let entries = settings.max_entries.max(1);
            let share = settings.max_bytes.div_ceil(entries).max(1);
            let memory = Cache::builder()
                .max_capacity(share.saturating_mul(entries))
                .weigher(move |_key, entry: &Arc<MemEntry>| {
                    u32::try_from(entry.size.max(share)).unwrap_or(u32::MAX)
                })
                .expire_after(AgeExpiry { ttl: settings.ttl })
                .eviction_listener(move |_key, entry: Arc<MemEntry>, cause| {
                    listener_counters.bytes.fetch_sub(entry.size, Relaxed);
                    if matches!(cause, RemovalCause::Size) {
                        listener_counters.evictions.fetch_add(1, Relaxed);
                    }
                })
                .build();
            let disk = settings.persist_to_disk.then(|| {
                DiskTier::open(&settings.dir, settings.ttl, settings.max_entries, now_ms())
            });
            (Some(memory), disk)
        } else {
            (None, None)
        };
        let shared = settings
            .url
            .as_deref()
            .filter(|_| settings.enabled)
            .and_then(|url| match RedisTier::open(url, settings.ttl) {
                Ok(tier) => Some(tier),
                Err(error) => {
                    tracing::error!(%error, "response cache: CACHE_URL unusable; no shared tier");
                    None
                }
            });
        ResponseCache {
            settings,
            memory,
            disk,
            shared,
            counters,
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn is_enabled(&self) -> bool {
        self.memory.is_some()
    }

    /// The stored answer for `key`, from memory, else Redis, else disk.
    pub fn get(&self, key: &CacheKey) -> Option<CachedResponse> {
        let memory = self.memory.as_ref()?;
        if let Some(entry) = memory.get(key.as_str()) {
            match serde_json::from_slice(&entry.bytes) {
                Ok(response) => {
                    self.counters.hits.fetch_add(1, Relaxed);
                    return Some(response);
                }
                // Written by `put` from a value that serialized: unreachable,
                // but a miss is the answer if it ever happens.
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "response cache: undecodable entry dropped");
                    memory.invalidate(key.as_str());
                }
            }
        }
        if let Some(found) = self
            .shared
            .as_ref()
            .and_then(|r| self.get_from_redis(memory, r, key))
        {
            return Some(found);
        }
        if let Some(found) = self
            .disk
            .as_ref()
            .and_then(|d| self.get_from_disk(memory, d, key))
        {
            return Some(found);
        }
        self.counters.misses.fetch_add(1, Relaxed);
        None
    }

    fn get_from_disk(
        &self,
        memory: &Cache<String, Arc<MemEntry>>,
        disk: &DiskTier,
        key: &CacheKey,
    ) -> Option<CachedResponse> {
        let row = disk.get(key.as_str(), now_ms())?;
        let response = match serde_json::from_slice::<CachedResponse>(&row.value) {
            Ok(r) => r,
            Err(e) => {
                // One bad row is not a broken file: drop it and carry on.
                tracing::warn!(key = %key, error = %e, "response cache: undecodable disk row removed");
                disk.remove(key.as_str());
                return None;
            }
        };
        let size = row.value.len() as u64;
        self.counters.bytes.fetch_add(size, Relaxed);
        memory.insert(
            key.as_str().to_owned(),
            Arc::new(MemEntry {
                bytes: row.value.into(),
                size,
                stored_ms: row.created_at_ms,
            }),
        );
        self.counters.hits.fetch_add(1, Relaxed);
        self.counters.disk_hits.fetch_add(1, Relaxed);
        Some(response)
    }

    fn get_from_redis(
        &self,
        memory: &Cache<String, Arc<MemEntry>>,
        shared: &RedisTier,
        key: &CacheKey,
    ) -> Option<CachedResponse> {
        let (value, left_ms) = shared.get(key.as_str())?;
        let Ok(response) = serde_json::from_slice::<CachedResponse>(&value) else {
            // Another build's format, or not ours: a miss.
            tracing::warn!(key = %key, "response cache: undecodable Redis value ignored");
            return None;
        };
        let size = value.len() as u64;
        self.counters.bytes.fetch_add(size, Relaxed);
        // Kept in memory for what it has left in Redis, not a fresh TTL.
        let ttl_ms = i64::try_from(self.settings.ttl.as_millis()).unwrap_or(i64::MAX);
        let left_ms = i64::try_from(left_ms).unwrap_or(ttl_ms).min(ttl_ms);
        memory.insert(
            key.as_str().to_owned(),
            Arc::new(MemEntry {
                bytes: value.into(),
                size,
                stored_ms: now_ms() - (ttl_ms - left_ms),
            }),
        );
        self.counters.hits.fetch_add(1, Relaxed);
        shared.hits.fetch_add(1, Relaxed);
        Some(response)
    }

    /// Stores `value` under `key` in every tier (a no-op when disabled).
    pub fn put(&self, key: &CacheKey, value: CachedResponse) {
        let Some(memory) = &self.memory else { return };
        let bytes = match serde_json::to_vec(&value) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "response cache: answer not serializable, not cached");
                return;
            }
        };
        // Shared first: once the memory tier shows the entry, the other
        // replicas can read it too.
        if let Some(shared) = &self.shared {
            shared.put(key.as_str(), &bytes);
        }
        let now = now_ms();
        let size = bytes.len() as u64;
        // Counted before the insert: moka may evict the new entry inside
        // `insert`, and its listener subtracts this size.
        self.counters.bytes.fetch_add(size, Relaxed);
        let bytes: Arc<[u8]> = bytes.into();
        memory.insert(
            key.as_str().to_owned(),
            Arc::new(MemEntry {
                bytes: Arc::clone(&bytes),
                size,
                stored_ms: now,
            }),
        );
        if let Some(disk) = &self.disk {
            disk.put(key.as_str(), &bytes, now);
        }
    }

    /// The shared tier's URL (password hidden), without touching any tier.
    pub fn shared_url(&self) -> Option<String> {
        self.shared.as_ref().and_then(|r| r.state().url)
    }

    pub fn stats(&self) -> CacheStats {
        let entries = match &self.memory {
            Some(memory) => {
                // moka applies evictions and counts lazily; settle them so the
                // numbers describe the cache as it is now.
                memory.run_pending_tasks();
                memory.entry_count()
            }
            None => 0,
        };
        let disk = match &self.disk {
            Some(d) => DiskState {
                hits: self.counters.disk_hits.load(Relaxed),
                ..d.state(now_ms())
            },
            None => DiskState {
                enabled: false,
                path: None,
                error: None,
                entries: 0,
                hits: 0,
                evictions: 0,
            },
        };
        CacheStats {
            enabled: self.is_enabled(),
            hits: self.counters.hits.load(Relaxed),
            misses: self.counters.misses.load(Relaxed),
            entries,
            size: entries,
            evictions: self.counters.evictions.load(Relaxed),
            bytes: self.counters.bytes.load(Relaxed),
            disk,
            redis: self
                .shared
                .as_ref()
                .map(RedisTier::state)
                .unwrap_or_default(),
        }
    }

    /// For graceful shutdown: settles moka's pending work and checkpoints the
    /// SQLite WAL into the main file.
    pub fn flush(&self) {
        if let Some(memory) = &self.memory {
            memory.run_pending_tasks();
        }
        if let Some(disk) = &self.disk {
            disk.flush();
        }
    }

    /// Drops every entry from every tier (Redis's too: the replicas share it). Counters are kept: they describe the
    /// process, not the current contents.
    pub fn clear(&self) {
        if let Some(memory) = &self.memory {
            memory.invalidate_all();
            memory.run_pending_tasks();
        }
        if let Some(disk) = &self.disk {
            disk.clear();
        }
        if let Some(shared) = &self.shared {
            shared.clear();
        }
    }
}

impl fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseCache")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Wall-clock milliseconds: disk rows outlive the process, so ages must be on a
/// clock that survives restarts. A clock before 1970 reads as 0.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
