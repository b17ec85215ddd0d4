//! Request analytics for the dashboard: requests, errors, tokens, time to
//! first token and latency, per minute, per model and per key, kept in
//! `<data dir>/analytics.sqlite` so the charts survive a restart.
//!
//! Each API request adds to the row of its (minute, model, key) in memory;
//! a flush every few seconds (and at shutdown) merges those rows into
//! SQLite. Latencies are kept as log-scale histograms (four buckets per
//! doubling, ±9%), so percentiles over any range and any filter come from
//! merging rows. The size is bounded by time (`ANALYTICS_RETENTION_DAYS`,
//! default 7) and by a row cap.
//!
//! What a request contributes is gathered while it runs in its [`Ledger`]:
//! the middleware opens one per request, the handlers note the model and
//! the tokens, the first generated text notes the time to first token, and
//! the response body's end closes it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use utoipa::ToSchema;

pub const DB_FILE: &str = "analytics.sqlite";

/// Rows kept at most, whatever the retention (each is one minute of one
/// model and one key).
const MAX_ROWS: i64 = 500_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS minutes (
    minute            INTEGER NOT NULL,  -- Unix time / 60
    model             TEXT NOT NULL,
    key               TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    errors            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    decode_ms         INTEGER NOT NULL,  -- generation time after the first token
    ttft              BLOB NOT NULL,     -- histogram, see Histogram::encode
    latency           BLOB NOT NULL,
    PRIMARY KEY (minute, model, key)
) WITHOUT ROWID;
";

/// A log-scale histogram of milliseconds: bucket `i` holds values in
/// `[2^(i/4) - 1, 2^((i+1)/4) - 1)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    counts: Vec<u32>,
}

const BUCKETS: usize = 4 * 24 + 1;

impl Histogram {
    fn bucket(ms: f64) -> usize {
        ((4.0 * (ms.max(0.0) + 1.0).log2()) as usize).min(BUCKETS - 1)
    }

    pub fn add(&mut self, ms: f64) {
        let i = Self::bucket(ms);
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    pub fn merge(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// The value below which a fraction `q` of the samples lie (the middle
    /// of its bucket, on the log scale).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Some(2f64.powf((i as f64 + 0.5) / 4.0) - 1.0);
            }
        }
        None
    }

    /// Nonzero buckets as (index u8, count u32 little-endian) pairs.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &c) in self.counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            out.push(i as u8);
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Self {
        let mut h = Histogram::default();
        for pair in bytes.chunks_exact(5) {
            let i = usize::from(pair[0]).min(BUCKETS - 1);
            let c = u32::from_le_bytes([pair[1], pair[2], pair[3], pair[4]]);
            if h.counts.len() <= i {
                h.counts.resize(i + 1, 0);
            }
            h.counts[i] = h.counts[i].saturating_add(c);
        }
        h
    }
}

/// One (minute, model, key)'s totals.
#[derive(Debug, Clone, Default, PartialEq)]
struct Row {
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    decode_ms: u64,
    ttft: Histogram,
    latency: Histogram,
}

impl Row {
    fn merge(&mut self, other: &Row) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.decode_ms += other.decode_ms;
        self.ttft.merge(&other.ttft);
        self.latency.merge(&other.latency);
    }
}

/// What one finished request contributes.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Unix seconds at its end.
    pub at: i64,
    /// The model that served it; empty when none was resolved.
    pub model: String,
    /// `operator`, `anonymous`, or a named key's id.
    pub key: String,
    pub status: u16,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub ttft: Option<Duration>,
    pub latency: Duration,
}

type RowKey = (i64, String, String);

pub struct Analytics {
    db: Mutex<Result<Connection, String>>,
    pending: Mutex<HashMap<RowKey, Row>>,
    retention: Duration,
}

impl Analytics {
    /// The store under `data_dir`; one that cannot be opened is logged and
    /// the dashboard shows only what happened since start (kept in memory).
    pub fn open(data_dir: &Path, retention: Duration) -> Self {
        let db = open_db(data_dir).map_err(|error| {
            tracing::error!(%error, "analytics store unavailable; charts show only this run");
            error
        });
        Self {
            db: Mutex::new(db),
            pending: Mutex::new(HashMap::new()),
            retention,
        }
    }

    /// Adds one finished request (cheap: a lock and a map update).
    pub fn record(&self, outcome: &Outcome) {
        let key = (
            outcome.at.div_euclid(60),
            outcome.model.clone(),
            outcome.key.clone(),
        );
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let row = pending.entry(key).or_default();
        row.requests += 1;
        row.errors += u64::from(outcome.status >= 400);
        row.prompt_tokens += u64::from(outcome.prompt_tokens);
        row.completion_tokens += u64::from(outcome.completion_tokens);
        row.latency.add(outcome.latency.as_secs_f64() * 1e3);
        if let Some(ttft) = outcome.ttft {
            row.ttft.add(ttft.as_secs_f64() * 1e3);
            if outcome.completion_tokens > 1 {
                row.decode_ms += outcome.latency.saturating_sub(ttft).as_millis() as u64;
            }
        }
    }

    /// Merges what was recorded since the last flush into the store and
    /// drops rows past the retention. Blocking: call it off the async threads.
    pub fn flush(&self) {
        let rows: Vec<(RowKey, Row)> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => return,
        };
        let Ok(mut db) = self.db.lock() else {
            return;
        };
        let Ok(conn) = db.as_mut() else {
            // No store: keep the rows in memory so the charts still show them.
            if let Ok(mut p) = self.pending.lock() {
                for (key, row) in rows {
                    p.entry(key).or_default().merge(&row);
                }
            }
            return;
        };
        if let Err(error) = write_rows(conn, &rows, self.retention) {
            tracing::warn!(%error, "analytics flush failed; keeping the rows for the next one");
            drop(db);
            if let Ok(mut p) = self.pending.lock() {
                for (key, row) in rows {
                    p.entry(key).or_default().merge(&row);
                }
            }
        }
    }

    /// Totals per time step over the last `range`, and per model and per
    /// key, optionally for one model or key. Flushes first.
    pub fn report(&self, query: &Query) -> Result<Report, String> {
        self.flush();
        let now = query.now.div_euclid(60);
        let first = now - (query.range.as_secs() as i64 / 60) + 1;
        let step = (query.step.as_secs() as i64 / 60).max(1);
        let mut rows = self.rows_since(first)?;
        rows.retain(|((_, model, key), _)| {
            query.model.as_deref().is_none_or(|m| m == model)
                && query.key.as_deref().is_none_or(|k| k == key)
        });
        let n_points = ((now - first) / step + 1) as usize;
        let mut points = vec![Row::default(); n_points];
        let mut by_model: HashMap<String, Row> = HashMap::new();
        let mut by_key: HashMap<String, Row> = HashMap::new();
        let mut total = Row::default();
        for ((minute, model, key), row) in &rows {
            let i = ((minute - first) / step) as usize;
            if let Some(point) = points.get_mut(i) {
                point.merge(row);
            }
            by_model.entry(model.clone()).or_default().merge(row);
            by_key.entry(key.clone()).or_default().merge(row);
            total.merge(row);
        }
        let step_secs = (step * 60) as f64;
        let series = points
            .iter()
            .enumerate()
            .map(|(i, row)| Point::from_row((first + i as i64 * step) * 60, row, step_secs))
            .collect();
        let span = (query.range.as_secs_f64()).max(60.0);
        let breakdown = |map: HashMap<String, Row>| {
            let mut out: Vec<Breakdown> = map
                .into_iter()
                .map(|(name, row)| Breakdown {
                    name,
                    totals: Totals::from_row(&row, span),
                })
                .collect();
            out.sort_by(|a, b| {
                b.totals
                    .requests
                    .cmp(&a.totals.requests)
                    .then(a.name.cmp(&b.name))
            });
            out
        };
        Ok(Report {
            step_seconds: step as u64 * 60,
            series,
            totals: Totals::from_row(&total, span),
            by_model: breakdown(by_model),
            by_key: breakdown(by_key),
        })
    }

    fn rows_since(&self, first_minute: i64) -> Result<Vec<(RowKey, Row)>, String> {
        let mut merged: HashMap<RowKey, Row> = HashMap::new();
        if let Ok(pending) = self.pending.lock() {
            for (key, row) in pending.iter().filter(|((m, _, _), _)| *m >= first_minute) {
                merged.insert(key.clone(), row.clone());
            }
        }
        let db = self
            .db
            .lock()
            .map_err(|_| "analytics store poisoned".to_owned())?;
        if let Ok(conn) = db.as_ref() {
            for (key, row) in read_rows(conn, first_minute).map_err(|e| e.to_string())? {
                merged.entry(key).or_default().merge(&row);
            }
        }
        Ok(merged.into_iter().collect())
    }
}

fn open_db(dir: &Path) -> Result<Connection, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let conn = Connection::open(dir.join(DB_FILE)).map_err(|e| e.to_string())?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
        .and_then(|()| conn.execute_batch(SCHEMA))
        .map_err(|e| e.to_string())?;
    Ok(conn)
}

fn write_rows(
    conn: &mut Connection,
    rows: &[(RowKey, Row)],
    retention: Duration,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut read = tx.prepare_cached(
            "SELECT requests, errors, prompt_tokens, completion_tokens, decode_ms, ttft, latency
             FROM minutes WHERE minute = ?1 AND model = ?2 AND key = ?3",
        )?;
        let mut write = tx.prepare_cached(
            "INSERT OR REPLACE INTO minutes VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for ((minute, model, key), row) in rows {
            let mut merged = read
                .query_row(params![minute, model, key], row_from_sql)
                .optional()?
                .unwrap_or_default();
            merged.merge(row);
            write.execute(params![
                minute,
                model,
                key,
                merged.requests as i64,
                merged.errors as i64,
                merged.prompt_tokens as i64,
                merged.completion_tokens as i64,
                merged.decode_ms as i64,
                merged.ttft.encode(),
                merged.latency.encode(),
            ])?;
        }
    }
    let oldest = chrono::Utc::now().timestamp().div_euclid(60) - (retention.as_secs() / 60) as i64;
    tx.execute("DELETE FROM minutes WHERE minute < ?1", params![oldest])?;
    tx.execute(
        "DELETE FROM minutes WHERE minute < (SELECT minute FROM minutes ORDER BY minute DESC LIMIT 1 OFFSET ?1)",
        params![MAX_ROWS],
    )?;
    tx.commit()
}

fn row_from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
    Ok(Row {
        requests: n(0)?,
        errors: n(1)?,
        prompt_tokens: n(2)?,
        completion_tokens: n(3)?,
        decode_ms: n(4)?,
        ttft: Histogram::decode(&r.get::<_, Vec<u8>>(5)?),
        latency: Histogram::decode(&r.get::<_, Vec<u8>>(6)?),
    })
}

fn read_rows(conn: &Connection, first_minute: i64) -> rusqlite::Result<Vec<(RowKey, Row)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT minute, model, key, requests, errors, prompt_tokens, completion_tokens, decode_ms, ttft, latency
         FROM minutes WHERE minute >= ?1",
    )?;
    let rows = stmt.query_map(params![first_minute], |r| {
        let key = (r.get(0)?, r.get(1)?, r.get(2)?);
        let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
        Ok((
            key,
            Row {
                requests: n(3)?,
                errors: n(4)?,
                prompt_tokens: n(5)?,
                completion_tokens: n(6)?,
                decode_ms: n(7)?,
                ttft: Histogram::decode(&r.get::<_, Vec<u8>>(8)?),
                latency: Histogram::decode(&r.get::<_, Vec<u8>>(9)?),
            },
        ))
    })?;
    rows.collect()
}

/// What the dashboard asks for.
#[derive(Debug, Clone)]
pub struct Query {
    pub now: i64,
    pub range: Duration,
    pub step: Duration,
    pub model: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Report {
    pub step_seconds: u64,
    /// One point per step, oldest first.
    pub series: Vec<Point>,
    pub totals: Totals,
    pub by_model: Vec<Breakdown>,
    pub by_key: Vec<Breakdown>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Point {
    /// Unix seconds at the start of the step.
    pub t: i64,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_s: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Generated tokens per second over the step, all requests together.
    pub tokens_per_s: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
}

impl Point {
    fn from_row(t: i64, row: &Row, seconds: f64) -> Self {
        Self {
            t,
            requests: row.requests,
            errors: row.errors,
            requests_per_s: row.requests as f64 / seconds,
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            tokens_per_s: row.completion_tokens as f64 / seconds,
            ttft_p50_ms: row.ttft.quantile(0.5),
            ttft_p95_ms: row.ttft.quantile(0.95),
            latency_p50_ms: row.latency.quantile(0.5),
            latency_p95_ms: row.latency.quantile(0.95),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub requests_per_s: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens_per_s: f64,
    /// Per-stream decode speed: generated tokens over time spent generating.
    pub decode_tokens_per_s: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
}

impl Totals {
    fn from_row(row: &Row, seconds: f64) -> Self {
        Self {
            requests: row.requests,
            errors: row.errors,
            requests_per_s: row.requests as f64 / seconds,
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            tokens_per_s: row.completion_tokens as f64 / seconds,
            decode_tokens_per_s: (row.decode_ms > 0)
                .then(|| row.completion_tokens as f64 / (row.decode_ms as f64 / 1e3)),
            ttft_p50_ms: row.ttft.quantile(0.5),
            ttft_p95_ms: row.ttft.quantile(0.95),
            latency_p50_ms: row.latency.quantile(0.5),
            latency_p95_ms: row.latency.quantile(0.95),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Breakdown {
    /// A model id, or a key (`operator`, `anonymous`, a named key's id).
    pub name: String,
    pub totals: Totals,
}

/// What a request has done so far, gathered while it runs (see the module
/// docs). Shared between the middleware, the handler and the response body.
#[derive(Debug, Default)]
pub struct Ledger {
    facts: Mutex<Facts>,
}

#[derive(Debug, Default, Clone)]
struct Facts {
    model: Option<String>,
    key: Option<String>,
    prompt_tokens: u32,
    completion_tokens: u32,
    ttft: Option<Duration>,
}

tokio::task_local! {
    static LEDGER: Arc<Ledger>;
}

impl Ledger {
    /// Runs `future` (a request's handling) with this ledger as the current one.
    pub async fn scope<F: std::future::Future>(self: Arc<Self>, future: F) -> F::Output {
        LEDGER.scope(self, future).await
    }

    /// The ledger of the request being handled, if any.
    pub fn current() -> Option<Arc<Ledger>> {
        LEDGER.try_with(Arc::clone).ok()
    }

    fn with(&self, f: impl FnOnce(&mut Facts)) {
        if let Ok(mut facts) = self.facts.lock() {
            f(&mut facts);
        }
    }

    pub fn note_model(&self, model: &str) {
        self.with(|f| f.model = Some(model.to_owned()));
    }

    pub fn note_key(&self, key: &str) {
        self.with(|f| f.key = Some(key.to_owned()));
    }

    pub fn note_tokens(&self, prompt: u32, completion: u32) {
        self.with(|f| {
            f.prompt_tokens = f.prompt_tokens.saturating_add(prompt);
            f.completion_tokens = f.completion_tokens.saturating_add(completion);
        });
    }

    /// The request's first generated text, `elapsed` after it started (only
    /// the first call counts).
    pub fn note_first_token(&self, elapsed: Duration) {
        self.with(|f| {
            f.ttft.get_or_insert(elapsed);
        });
    }

    /// The outcome of a request that started at `started` and ended now.
    pub fn outcome(&self, status: u16, started: Instant) -> Outcome {
        let facts = self.facts.lock().map(|f| f.clone()).unwrap_or_default();
        Outcome {
            at: chrono::Utc::now().timestamp(),
            model: facts.model.unwrap_or_default(),
            key: facts.key.unwrap_or_else(|| "anonymous".to_owned()),
            status,
            prompt_tokens: facts.prompt_tokens,
            completion_tokens: facts.completion_tokens,
            ttft: facts.ttft,
            latency: started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(at: i64, model: &str, status: u16, ms: u64) -> Outcome {
        Outcome {
            at,
            model: model.to_owned(),
            key: "operator".to_owned(),
            status,
            prompt_tokens: 10,
            completion_tokens: 20,
            ttft: Some(Duration::from_millis(ms / 4)),
            latency: Duration::from_millis(ms),
        }
    }

    #[test]
    fn histogram_quantiles_are_within_a_bucket() {
        let mut h = Histogram::default();
        for ms in 1..=1000 {
            h.add(f64::from(ms));
        }
        let p50 = h.quantile(0.5).unwrap();
        let p95 = h.quantile(0.95).unwrap();
        assert!((p50 / 500.0 - 1.0).abs() < 0.1, "{p50}");
        assert!((p95 / 950.0 - 1.0).abs() < 0.1, "{p95}");
        assert_eq!(Histogram::decode(&h.encode()), h);
        assert_eq!(Histogram::default().quantile(0.5), None);
        let mut huge = Histogram::default();
        huge.add(1e12);
        assert_eq!(huge.count(), 1);
    }

    #[test]
    fn rows_survive_a_restart_and_merge_across_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::Utc::now().timestamp();
        let week = Duration::from_secs(7 * 86400);
        {
            let a = Analytics::open(dir.path(), week);
            a.record(&outcome(now, "light", 200, 100));
            a.flush();
            a.record(&outcome(now, "light", 500, 300));
            a.record(&outcome(now - 120, "medium", 200, 50));
            a.flush();
        }
        let a = Analytics::open(dir.path(), week);
        a.record(&outcome(now, "light", 200, 200));
        let query = Query {
            now,
            range: Duration::from_secs(3600),
            step: Duration::from_secs(60),
            model: None,
            key: None,
        };
        let report = a.report(&query).unwrap();
        assert_eq!(report.series.len(), 60);
        assert_eq!(report.totals.requests, 4);
        assert_eq!(report.totals.errors, 1);
        assert_eq!(report.totals.completion_tokens, 80);
        let last = report.series.last().unwrap();
        assert_eq!(last.requests, 3);
        assert!(last.latency_p50_ms.unwrap() > 150.0 && last.latency_p50_ms.unwrap() < 250.0);
        assert_eq!(report.by_model[0].name, "light");
        assert_eq!(report.by_model[0].totals.requests, 3);
        let light_only = a
            .report(&Query {
                model: Some("medium".into()),
                ..query
            })
            .unwrap();
        assert_eq!(light_only.totals.requests, 1);
    }

    #[test]
    fn old_rows_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::Utc::now().timestamp();
        let a = Analytics::open(dir.path(), Duration::from_secs(3600));
        a.record(&outcome(now - 7200, "light", 200, 10));
        a.record(&outcome(now, "light", 200, 10));
        a.flush();
        let report = a
            .report(&Query {
                now,
                range: Duration::from_secs(86400),
                step: Duration::from_secs(900),
                model: None,
                key: None,
            })
            .unwrap();
        assert_eq!(report.totals.requests, 1);
        assert_eq!(report.series.len(), 96);
    }

    #[tokio::test]
    async fn the_ledger_is_the_current_requests() {
        assert!(Ledger::current().is_none());
        let ledger = Arc::new(Ledger::default());
        ledger
            .clone()
            .scope(async {
                let current = Ledger::current().unwrap();
                current.note_model("light/x");
                current.note_tokens(3, 4);
                current.note_first_token(Duration::from_millis(5));
                current.note_first_token(Duration::from_millis(50));
            })
            .await;
        let outcome = ledger.outcome(200, Instant::now());
        assert_eq!(outcome.model, "light/x");
        assert_eq!((outcome.prompt_tokens, outcome.completion_tokens), (3, 4));
        assert_eq!(outcome.ttft, Some(Duration::from_millis(5)));
        assert_eq!(outcome.key, "anonymous");
    }
}
