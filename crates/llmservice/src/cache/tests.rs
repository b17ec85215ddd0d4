use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::sleep;
use std::time::Duration;

use serde_json::json;

use super::*;

pub(super) fn settings(dir: &Path) -> CacheSettings {
    CacheSettings {
        enabled: true,
        max_entries: 100,
        max_bytes: 1 << 20,
        ttl: Duration::from_secs(3600),
        persist_to_disk: true,
        dir: dir.to_path_buf(),
        cache_all: false,
        url: None,
    }
}

pub(super) fn key(n: u32) -> CacheKey {
    CacheKey::new(&json!({"model": "light.gguf", "messages": [{"role": "user", "content": n}]}))
}

pub(super) fn resp(n: u32) -> CachedResponse {
    CachedResponse {
        body: json!({"id": format!("chatcmpl-{n}"), "object": "chat.completion",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {n}")}}]}),
        created: 1_700_000_000 + i64::from(n),
    }
}

pub(super) fn db_rows(dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(disk::DB_FILE)).unwrap();
    conn.query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))
        .unwrap()
}

// ---- keys -------------------------------------------------------------------

#[test]
fn canonical_json_sorts_keys_at_every_depth() {
    let a = json!({"b": 1, "a": {"y": [{"q": 1, "p": 2}], "x": null}, "c": "s"});
    let b = json!({"c": "s", "a": {"x": null, "y": [{"p": 2, "q": 1}]}, "b": 1});
    assert_eq!(
        canonical_json(&a),
        r#"{"a":{"x":null,"y":[{"p":2,"q":1}]},"b":1,"c":"s"}"#
    );
    assert_eq!(canonical_json(&a), canonical_json(&b));
    assert_eq!(CacheKey::new(&a), CacheKey::new(&b));
}

#[test]
fn canonical_json_escapes_and_normalises_numbers() {
    assert_eq!(
        canonical_json(&json!({"k\"\n": "v\u{1}é"})),
        r#"{"k\"\n":"v\u0001é"}"#
    );
    assert_eq!(canonical_json(&json!(1.0)), "1");
    assert_eq!(canonical_json(&json!(-2.0)), "-2");
    assert_eq!(canonical_json(&json!(0.5)), "0.5");
    assert_eq!(canonical_json(&json!(u64::MAX)), u64::MAX.to_string());
    assert_eq!(
        CacheKey::new(&json!({"temperature": 1})),
        CacheKey::new(&json!({"temperature": 1.0}))
    );
}

#[test]
fn different_inputs_give_different_keys() {
    let base = json!({"model": "m", "prompt": "hi", "temperature": 0.0, "seed": 1});
    let variants = [
        json!({"model": "m2", "prompt": "hi", "temperature": 0.0, "seed": 1}),
        json!({"model": "m", "prompt": "hi!", "temperature": 0.0, "seed": 1}),
        json!({"model": "m", "prompt": "hi", "temperature": 0.1, "seed": 1}),
        json!({"model": "m", "prompt": "hi", "temperature": 0.0, "seed": 2}),
        json!({"model": "m", "prompt": "hi", "temperature": 0.0, "seed": "1"}),
        json!({"model": "m", "prompt": "hi", "temperature": 0.0, "seed": null}),
        json!({"model": "m", "prompt": "hi", "temperature": 0.0}),
        json!({"model": "m", "prompt": ["hi"], "temperature": 0.0, "seed": 1}),
    ];
    let base_key = CacheKey::new(&base);
    let mut seen = std::collections::HashSet::from([base_key.clone()]);
    for v in &variants {
        assert!(seen.insert(CacheKey::new(v)), "collision for {v}");
    }
    assert_ne!(
        CacheKey::new(&json!(["a", "b"])),
        CacheKey::new(&json!(["b", "a"]))
    );
    let hex = base_key.as_str();
    assert_eq!(hex.len(), 64);
    assert!(hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(base_key.to_string(), hex);
    assert_eq!(CacheKey::new(&base), base_key);
}

// ---- settings and policy ------------------------------------------------------

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

#[test]
fn settings_defaults() {
    let s = CacheSettings::from_env(env(&[]), Path::new("/data")).unwrap();
    assert_eq!(
        s,
        CacheSettings {
            enabled: true,
            max_entries: 1000,
            max_bytes: 128 << 20,
            ttl: Duration::from_secs(3600),
            persist_to_disk: false,
            dir: PathBuf::from("/data/cache"),
            cache_all: false,
            url: None,
        }
    );
    // Empty values are treated as unset.
    let s = CacheSettings::from_env(
        env(&[("CACHE_DIR", ""), ("ENABLE_CACHE", " ")]),
        Path::new("/d"),
    );
    assert_eq!(s.unwrap().dir, PathBuf::from("/d/cache"));
}

#[test]
fn settings_overrides() {
    let s = CacheSettings::from_env(
        env(&[
            ("ENABLE_CACHE", "false"),
            ("CACHE_MAX_SIZE", " 50 "),
            ("CACHE_MAX_BYTES", "1048576"),
            ("CACHE_TTL_SECONDS", "60"),
            ("CACHE_PERSIST_TO_DISK", "1"),
            ("CACHE_DIR", "/var/cache/llm"),
            ("CACHE_ALL", "YES"),
        ]),
        Path::new("/data"),
    )
    .unwrap();
    assert!(!s.enabled && s.persist_to_disk && s.cache_all);
    assert_eq!((s.max_entries, s.max_bytes), (50, 1 << 20));
    assert_eq!(s.ttl, Duration::from_secs(60));
    assert_eq!(s.dir, PathBuf::from("/var/cache/llm"));
}

#[test]
fn settings_errors_name_the_variable() {
    for (name, value) in [
        ("ENABLE_CACHE", "maybe"),
        ("CACHE_PERSIST_TO_DISK", "2"),
        ("CACHE_ALL", "nope"),
        ("CACHE_MAX_SIZE", "lots"),
        ("CACHE_MAX_SIZE", "-1"),
        ("CACHE_MAX_SIZE", "0"),
        ("CACHE_TTL_SECONDS", "1.5"),
        ("CACHE_TTL_SECONDS", "0"),
    ] {
        let err = CacheSettings::from_env(env(&[(name, value)]), Path::new("/d"))
            .unwrap_err()
            .message;
        assert!(err.starts_with(name), "{name}={value}: {err}");
        assert!(err.contains(value), "{name}={value}: {err}");
    }
}

#[test]
fn only_deterministic_requests_are_cacheable() {
    assert!(is_cacheable(0.0, None, false));
    assert!(is_cacheable(-1.0, None, false));
    assert!(is_cacheable(0.8, Some(42), false));
    assert!(!is_cacheable(0.8, None, false));
    assert!(!is_cacheable(f32::NAN, None, false));
    assert!(is_cacheable(0.8, None, true));
}

// ---- memory tier ----------------------------------------------------------------

#[test]
fn counts_hits_and_misses() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ResponseCache::new(CacheSettings {
        persist_to_disk: false,
        ..settings(dir.path())
    });
    assert_eq!(cache.get(&key(1)), None);
    cache.put(&key(1), resp(1));
    assert_eq!(cache.get(&key(1)), Some(resp(1)));
    assert_eq!(cache.get(&key(1)), Some(resp(1)));
    assert_eq!(cache.get(&key(2)), None);
    let stats = cache.stats();
    assert!(stats.enabled);
    assert_eq!((stats.hits, stats.misses, stats.entries), (2, 2, 1));
    assert_eq!(
        stats.bytes,
        serde_json::to_vec(&resp(1)).unwrap().len() as u64
    );
    assert!(!stats.disk.enabled);
    assert_eq!(stats.disk.path, None);
    // Nothing touched the directory.
    assert!(!dir.path().join(disk::DB_FILE).exists());
}

#[test]
fn replacing_an_entry_keeps_byte_count_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ResponseCache::new(settings(dir.path()));
    cache.put(&key(1), resp(1));
    let bigger = CachedResponse {
        body: json!({"content": "x".repeat(1000)}),
        created: 5,
    };
    cache.put(&key(1), bigger.clone());
    assert_eq!(cache.get(&key(1)), Some(bigger.clone()));
    let stats = cache.stats();
    assert_eq!(stats.entries, 1);
    assert_eq!(
        stats.bytes,
        serde_json::to_vec(&bigger).unwrap().len() as u64
    );
    assert_eq!(stats.disk.entries, 1);
}

#[test]
fn disabled_cache_is_inert() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ResponseCache::new(CacheSettings {
        enabled: false,
        ..settings(dir.path())
    });
    cache.put(&key(1), resp(1));
    assert_eq!(cache.get(&key(1)), None);
    let stats = cache.stats();
    assert!(!stats.enabled && !stats.disk.enabled);
    assert_eq!((stats.hits, stats.misses, stats.entries), (0, 0, 0));
    assert!(!dir.path().join(disk::DB_FILE).exists());
    cache.flush();
    cache.clear();
}

#[test]
fn ttl_expires_both_tiers() {
    let dir = tempfile::tempdir().unwrap();
    // Wide enough that a loaded CI machine still reads before expiry.
    let cache = ResponseCache::new(CacheSettings {
        ttl: Duration::from_millis(400),
        ..settings(dir.path())
    });
    cache.put(&key(1), resp(1));
    assert_eq!(cache.get(&key(1)), Some(resp(1)));
    sleep(Duration::from_millis(600));
    // Memory has expired the entry, and the disk row is seen as stale too
    // (otherwise it would be promoted and counted as a disk hit).
    assert_eq!(cache.get(&key(1)), None);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.disk.hits), (1, 1, 0));
    // moka's timer wheel collects expired entries in ~1 s buckets, so the
    // memory counts catch up a little after `get` already refuses the entry.
    let mut stats = stats;
    for _ in 0..40 {
        if stats.entries == 0 {
            break;
        }
        sleep(Duration::from_millis(100));
        stats = cache.stats();
    }
    assert_eq!((stats.entries, stats.bytes), (0, 0));
    // The stale row was deleted, not just skipped.
    assert_eq!(db_rows(dir.path()), 0);
}

#[test]
fn ttl_applies_to_rows_left_by_an_earlier_process() {
    let dir = tempfile::tempdir().unwrap();
    let s = CacheSettings {
        ttl: Duration::from_millis(200),
        ..settings(dir.path())
    };
    ResponseCache::new(s.clone()).put(&key(1), resp(1));
    sleep(Duration::from_millis(300));
    let cache = ResponseCache::new(s);
    assert_eq!(cache.get(&key(1)), None);
    assert_eq!(cache.stats().disk.hits, 0);
}

#[test]
fn promoted_rows_keep_their_original_age() {
    let dir = tempfile::tempdir().unwrap();
    let s = CacheSettings {
        ttl: Duration::from_millis(1500),
        ..settings(dir.path())
    };
    ResponseCache::new(s.clone()).put(&key(1), resp(1));
    sleep(Duration::from_millis(800));
    let cache = ResponseCache::new(s);
    assert_eq!(cache.get(&key(1)), Some(resp(1)));
    assert_eq!(cache.stats().disk.hits, 1);
    // 1.7 s after the store, 0.9 s after promotion: a TTL restarted at
    // promotion would still answer.
    sleep(Duration::from_millis(900));
    assert_eq!(cache.get(&key(1)), None);
}

#[test]
fn evicts_beyond_max_entries_in_both_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let s = CacheSettings {
        max_entries: 3,
        ..settings(dir.path())
    };
    let cache = ResponseCache::new(s.clone());
    for n in 0..10 {
        cache.put(&key(n), resp(n));
    }
    let stats = cache.stats();
    assert_eq!(stats.entries, 3);
    assert_eq!(stats.evictions, 7);
    let one = serde_json::to_vec(&resp(0)).unwrap().len() as u64;
    assert_eq!(stats.bytes, 3 * one);
    assert_eq!((stats.disk.entries, stats.disk.evictions), (3, 7));
    assert_eq!(db_rows(dir.path()), 3);
    drop(cache);

    // The disk keeps the newest rows.
    let cache = ResponseCache::new(s);
    for n in 0..7 {
        assert_eq!(cache.get(&key(n)), None, "key {n}");
    }
    for n in 7..10 {
        assert_eq!(cache.get(&key(n)), Some(resp(n)), "key {n}");
    }
}

#[test]
fn the_memory_tier_is_bounded_by_bytes_as_well_as_entries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ResponseCache::new(CacheSettings {
        max_entries: 100,
        max_bytes: 64 << 10,
        persist_to_disk: false,
        ..settings(dir.path())
    });
    // An embeddings answer for many inputs: about 10 KiB each.
    let big = |n: u32| CachedResponse {
        body: json!({"object": "list", "data": [{"embedding": vec![0.123_456_f32 + n as f32; 1000]}]}),
        created: 1_700_000_000,
    };
    for n in 0..40 {
        cache.put(&key(n), big(n));
    }
    let stats = cache.stats();
    let one = serde_json::to_vec(&big(0)).unwrap().len() as u64;
    assert!(one > 8 << 10, "{one}");
    assert!(stats.bytes <= 64 << 10, "{} bytes held", stats.bytes);
    assert!(
        (1..=(64 << 10) / (one - 64)).contains(&stats.entries),
        "{stats:?}"
    );
    // What is held is served whole.
    let held: Vec<u32> = (0..40).filter(|&n| cache.get(&key(n)).is_some()).collect();
    assert_eq!(held.len() as u64, stats.entries);
    assert_eq!(cache.get(&key(held[0])), Some(big(held[0])));
}

// ---- disk tier ------------------------------------------------------------------

#[test]
fn answers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = ResponseCache::new(settings(dir.path()));
    first.put(&key(1), resp(1));
    first.flush();
    let stats = first.stats();
    assert!(stats.disk.enabled, "{:?}", stats.disk.error);
    let path = dir.path().join(disk::DB_FILE);
    assert_eq!(stats.disk.path.as_deref(), Some(path.to_str().unwrap()));
    drop(first);

    let second = ResponseCache::new(settings(dir.path()));
    assert_eq!(second.get(&key(1)), Some(resp(1)));
    // Promoted: the second read comes from memory.
    assert_eq!(second.get(&key(1)), Some(resp(1)));
    let stats = second.stats();
    assert_eq!((stats.hits, stats.misses, stats.disk.hits), (2, 0, 1));
    assert_eq!((stats.entries, stats.disk.entries), (1, 1));
    assert!(stats.bytes > 0);
}

#[test]
fn clear_empties_both_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ResponseCache::new(settings(dir.path()));
    for n in 0..3 {
        cache.put(&key(n), resp(n));
    }
    cache.clear();
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.bytes, stats.disk.entries), (0, 0, 0));
    assert_eq!(stats.evictions, 0);
    for n in 0..3 {
        assert_eq!(cache.get(&key(n)), None);
    }
}

#[test]
fn flush_checkpoints_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ResponseCache::new(settings(dir.path()));
    cache.put(&key(1), resp(1));
    cache.flush();
    let wal = dir.path().join(format!("{}-wal", disk::DB_FILE));
    assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
    // A copy of the main file alone holds the row.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join(disk::DB_FILE),
        copy.path().join(disk::DB_FILE),
    )
    .unwrap();
    assert_eq!(db_rows(copy.path()), 1);
}

#[test]
fn concurrent_use_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ResponseCache::new(CacheSettings {
        max_entries: 50,
        ..settings(dir.path())
    }));
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    let n = (t * 31 + i) % 80;
                    if cache.get(&key(n)).is_none() {
                        cache.put(&key(n), resp(n));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.misses, 800);
    assert!(stats.entries <= 50 && stats.disk.entries <= 50);
    assert!(stats.disk.enabled, "{:?}", stats.disk.error);
}

#[test]
fn stats_serialize_for_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ResponseCache::new(settings(dir.path()));
    let v = serde_json::to_value(cache.stats()).unwrap();
    for field in ["enabled", "hits", "misses", "entries", "evictions", "bytes"] {
        assert!(v.get(field).is_some(), "{field}");
    }
    for field in ["enabled", "path", "error", "entries", "hits", "evictions"] {
        assert!(v["disk"].get(field).is_some(), "disk.{field}");
    }
    assert_eq!(v["disk"]["error"], Value::Null);
    assert_eq!(
        serde_json::to_value(key(1)).unwrap(),
        json!(key(1).as_str())
    );
}
