//! The batching log writer: the `LogSink` every instance's output goes to. Lines wait in a
//! channel and one thread inserts them in batches on its own connection.
//!
//! Storage is bounded, in lines and in bytes (of line text), per function and in all
//! ([`LogLimits`]): after each batch the oldest lines of a function over its bound (then the
//! oldest of all, if the total is over) are deleted down to 90 % of the bound, and the freed
//! pages go back to the file system (`PRAGMA incremental_vacuum`; the database is put in
//! incremental auto-vacuum mode when it is opened, see `EventStore::open`). A line is at most
//! 64 KiB (`gust_core::MAX_LOG_LINE`, with a truncation marker).
//!
//! Nothing is lost without a word: the channel is bounded in bytes, and while it is more than
//! a quarter full the sink says it is congested (instances' output captures stop reading, so
//! the functions' own writes block). What still does not fit, and a batch the database refused,
//! is counted per function, and the function's logs get a platform line
//! `[gust] N log lines dropped: …` as soon as a batch can be written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use gust_core::lograte::LogLimiter;
use gust_core::{LogRecord, LogSink, now_ms};
use rusqlite::{Connection, params};

/// How long the writer lets lines gather before a batch insert.
const BATCH_WAIT_MS: u64 = 20;
/// A batch: at most this many lines, or this many bytes (one transaction, one WAL append).
const BATCH_LINES: usize = 8192;
const BATCH_BYTES: usize = 8 << 20;
/// Bytes waiting in the channel at most; past a quarter of it the sink is congested.
const QUEUE_BYTES: usize = 64 << 20;
/// A record's cost beyond its line (the other columns, the allocation).
const RECORD_OVERHEAD: usize = 128;

/// Bounds on stored log lines. Bytes count the lines' text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    pub function_lines: u64,
    pub function_bytes: u64,
    pub total_lines: u64,
    pub total_bytes: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            function_lines: 100_000,
            function_bytes: 64 << 20,
            total_lines: 200_000,
            total_bytes: 256 << 20,
        }
    }
}

enum LogMsg {
    Line(LogRecord, usize),
    Flush(mpsc::Sender<()>),
}

struct Shared {
    queued: AtomicUsize,
    /// Lines dropped per function, by reason, not yet reported in its logs.
    dropped: Mutex<HashMap<(String, &'static str), u64>>,
}

impl Shared {
    fn drop_lines(&self, function: &str, why: &'static str, n: u64) {
        let mut d = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        *d.entry((function.to_string(), why)).or_default() += n;
    }
}

pub struct LogWriter {
    tx: mpsc::Sender<LogMsg>,
    shared: Arc<Shared>,
}

impl LogWriter {
    /// Starts the writer thread on `conn` (a connection of its own).
    pub(crate) fn start(conn: Connection, limits: LogLimits) -> crate::Result<LogWriter> {
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            dropped: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel::<LogMsg>();
        let mut writer = Writer::new(conn, limits, shared.clone())?;
        std::thread::Builder::new()
            .name("gust-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(crate::io("spawn log writer"))?;
        Ok(LogWriter { tx, shared })
    }

    /// Waits until every line emitted before this call is committed.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        let sent = self.tx.send(LogMsg::Flush(tx));
        if sent.is_ok() {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

impl LogSink for LogWriter {
    fn emit(&self, mut record: LogRecord) {
        if record.line.len() > gust_core::MAX_LOG_LINE {
            gust_core::truncate_log_line(&mut record.line, 0);
        }
        let cost = record.line.len() + RECORD_OVERHEAD;
        let before = self.shared.queued.fetch_add(cost, Ordering::AcqRel);
        if before + cost > QUEUE_BYTES {
            self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
            self.shared.drop_lines(
                &record.function,
                "the log writer fell behind (its queue is full)",
                1,
            );
            return;
        }
        if let Err(mpsc::SendError(LogMsg::Line(r, cost))) =
            self.tx.send(LogMsg::Line(record, cost))
        {
            self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
            self.shared
                .drop_lines(&r.function, "the log writer has stopped", 1);
        }
    }

    fn congested(&self) -> bool {
        self.shared.queued.load(Ordering::Acquire) > QUEUE_BYTES / 4
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    lines: u64,
    bytes: u64,
}

impl Usage {
    fn over(&self, lines: u64, bytes: u64) -> bool {
        self.lines > lines || self.bytes > bytes
    }
}

struct Writer {
    conn: Connection,
    limits: LogLimits,
    shared: Arc<Shared>,
    functions: HashMap<String, Usage>,
    total: Usage,
}

/// Write failures repeat on every batch while the disk is full: logged a few times per 10 s.
static WRITE_FAILED: LogLimiter = LogLimiter::new(10_000, 3);

impl Writer {
    fn new(conn: Connection, limits: LogLimits, shared: Arc<Shared>) -> crate::Result<Writer> {
        let mut functions = HashMap::new();
        let mut total = Usage::default();
        {
            // octet_length reads the size from the record header, not the text.
            let mut st = conn.prepare(
                "SELECT function, COUNT(*), COALESCE(SUM(octet_length(line)), 0) FROM logs GROUP BY function",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            for row in rows {
                let (f, lines, bytes) = row?;
                let u = Usage {
                    lines: lines as u64,
                    bytes: bytes as u64,
                };
                total.lines += u.lines;
                total.bytes += u.bytes;
                functions.insert(f, u);
            }
        }
        Ok(Writer {
            conn,
            limits,
            shared,
            functions,
            total,
        })
    }

    fn run(&mut self, rx: mpsc::Receiver<LogMsg>) {
        while let Ok(first) = rx.recv() {
            // Let a batch gather: while this thread sleeps, senders find no waiting receiver
            // and skip the futex wake, so the invocation path pays a queue push, not a context
            // switch.
            if !matches!(first, LogMsg::Flush(_)) {
                std::thread::sleep(std::time::Duration::from_millis(BATCH_WAIT_MS));
            }
            let mut lines = Vec::new();
            let mut acks = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    LogMsg::Line(r, cost) => {
                        self.shared.queued.fetch_sub(cost, Ordering::AcqRel);
                        bytes += cost;
                        lines.push(r);
                    }
                    LogMsg::Flush(ack) => acks.push(ack),
                }
                if lines.len() < BATCH_LINES && bytes < BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            self.write(lines);
            for a in acks {
                let _ = a.send(());
            }
        }
    }

    /// Inserts a batch (with the pending "dropped" notices) and prunes, in one transaction.
    fn write(&mut self, mut lines: Vec<LogRecord>) {
        let dropped = std::mem::take(
            &mut *self
                .shared
                .dropped
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for ((function, why), n) in &dropped {
            lines.push(LogRecord {
                function: function.clone(),
                ts_ms: now_ms(),
                request_id: None,
                instance: String::new(),
                stream: "platform".into(),
                line: format!("[gust] {n} log lines dropped: {why}"),
            });
        }
        if lines.is_empty() {
            return;
        }
        let mut functions = self.functions.clone();
        let mut total = self.total;
        let result = (|| -> rusqlite::Result<bool> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO logs (function, ts_ms, request_id, instance, stream, line)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for r in &lines {
                    st.execute(params![
                        r.function,
                        r.ts_ms,
                        r.request_id,
                        r.instance,
                        r.stream,
                        r.line
                    ])?;
                    let u = functions.entry(r.function.clone()).or_default();
                    u.lines += 1;
                    u.bytes += r.line.len() as u64;
                    total.lines += 1;
                    total.bytes += r.line.len() as u64;
                }
            }
            let pruned = prune(&tx, &self.limits, &mut functions, &mut total)?;
            tx.commit()?;
            Ok(pruned)
        })();
        match result {
            Ok(pruned) => {
                self.functions = functions;
                self.total = total;
                if pruned {
                    // Freed pages back to the file system (a no-op unless the database is in
                    // incremental auto-vacuum mode).
                    if let Err(e) = vacuum(&self.conn)
                        && let Some(r) = WRITE_FAILED.check("vacuum", now_ms())
                    {
                        tracing::warn!("log storage: incremental vacuum failed: {e}{r}");
                    }
                }
            }
            Err(e) => {
                if let Some(r) = WRITE_FAILED.check("write", now_ms()) {
                    tracing::warn!("writing logs failed: {e}{r}");
                }
                // Counted, and reported in the function's logs once a batch goes through.
                let mut counts: HashMap<&str, u64> = HashMap::new();
                for l in &lines {
                    if !(l.stream == "platform" && l.line.starts_with("[gust] ")) {
                        *counts.entry(&l.function).or_default() += 1;
                    }
                }
                for (f, n) in counts {
                    self.shared
                        .drop_lines(f, "writing them to the database failed", n);
                }
                let mut d = self
                    .shared
                    .dropped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                for (k, n) in dropped {
                    *d.entry(k).or_default() += n;
                }
            }
        }
    }
}

/// Deletes the oldest lines of each function over its bounds, then the oldest of all while the
/// total is over, each down to 90 % of the bound (so a busy function is not pruned on every
/// batch). Returns whether anything was deleted.
/// Gives every free page back to the file system, in bounded steps.
fn vacuum(conn: &Connection) -> rusqlite::Result<()> {
    while crate::events::vacuum_step(conn, crate::events::VACUUM_STEP_PAGES)? {}
    Ok(())
}

fn prune(
    tx: &Connection,
    limits: &LogLimits,
    functions: &mut HashMap<String, Usage>,
    total: &mut Usage,
) -> rusqlite::Result<bool> {
    let low = |n: u64| n / 10 * 9;
    let mut removed = Vec::new();
    let over: Vec<(String, Usage)> = functions
        .iter()
        .filter(|(_, u)| u.over(limits.function_lines, limits.function_bytes))
        .map(|(f, u)| (f.clone(), *u))
        .collect();
    for (f, u) in over {
        let lines = u.lines.saturating_sub(low(limits.function_lines));
        let bytes = u.bytes.saturating_sub(low(limits.function_bytes));
        removed.extend(delete_oldest(tx, Some(&f), lines, bytes)?);
    }
    fn account(
        removed: Vec<(String, u64)>,
        functions: &mut HashMap<String, Usage>,
        total: &mut Usage,
    ) {
        for (f, b) in removed {
            let u = functions.entry(f).or_default();
            u.lines = u.lines.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(b);
            total.lines = total.lines.saturating_sub(1);
            total.bytes = total.bytes.saturating_sub(b);
        }
    }
    let mut pruned = !removed.is_empty();
    account(removed, functions, total);
    if total.over(limits.total_lines, limits.total_bytes) {
        let lines = total.lines.saturating_sub(low(limits.total_lines));
        let bytes = total.bytes.saturating_sub(low(limits.total_bytes));
        let removed = delete_oldest(tx, None, lines, bytes)?;
        pruned |= !removed.is_empty();
        account(removed, functions, total);
    }
    functions.retain(|_, u| u.lines > 0);
    Ok(pruned)
}

/// Deletes the oldest lines (of `function`, or of all) until at least `lines` lines and
/// `bytes` bytes are gone; returns each deleted line's function and size.
fn delete_oldest(
    tx: &Connection,
    function: Option<&str>,
    lines: u64,
    bytes: u64,
) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let (mut n, mut b, mut cutoff) = (0u64, 0u64, None);
    {
        // octet_length reads the size from the record header, not the text.
        // Two statements, so that a function's lines are found through its index.
        let mut st = match function {
            Some(_) => tx.prepare_cached(
                "SELECT id, function, octet_length(line) FROM logs WHERE function = ?1 ORDER BY id",
            )?,
            None => tx.prepare_cached(
                "SELECT id, function, octet_length(line) FROM logs WHERE ?1 IS NULL ORDER BY id",
            )?,
        };
        let mut rows = st.query([function])?;
        while n < lines || b < bytes {
            let Some(r) = rows.next()? else { break };
            let size = r.get::<_, i64>(2)? as u64;
            cutoff = Some(r.get::<_, i64>(0)?);
            out.push((r.get::<_, String>(1)?, size));
            n += 1;
            b += size;
        }
    }
    if let Some(id) = cutoff {
        tx.prepare_cached("DELETE FROM logs WHERE id <= ?1 AND (?2 IS NULL OR function = ?2)")?
            .execute(params![id, function])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(function: &str, line: String) -> LogRecord {
        LogRecord {
            function: function.into(),
            ts_ms: 1,
            request_id: None,
            instance: "i".into(),
            stream: "stdout".into(),
            line,
        }
    }

    fn usage(conn: &Connection, f: &str) -> (u64, u64) {
        conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(octet_length(line)), 0) FROM logs WHERE function = ?1",
            [f],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )
        .unwrap()
    }

    #[test]
    fn storage_stays_within_its_bounds_per_function_and_in_all() {
        let dir = std::env::temp_dir().join(format!("gust-logs-{}", crate::unique()));
        let store = crate::Store::open(&dir).unwrap();
        let limits = LogLimits {
            function_lines: 1_000,
            function_bytes: 100_000,
            total_lines: 1_500,
            total_bytes: 150_000,
        };
        let w = store.log_writer_with(limits).unwrap();
        // Long lines: the bytes bound is the one that bites; short lines: the lines bound.
        for i in 0..400 {
            w.emit(rec("big", format!("{i:04}{}", "b".repeat(996))));
        }
        for i in 0..3_000 {
            w.emit(rec("chatty", format!("{i}")));
        }
        w.emit(rec("huge", "h".repeat(1 << 20)));
        w.flush();
        let conn = crate::open_db(&dir.join("gust.db")).unwrap();
        let (big, big_bytes) = usage(&conn, "big");
        assert!(big_bytes <= 100_000 && big > 50, "{big} {big_bytes}");
        let (chatty, _) = usage(&conn, "chatty");
        assert!(chatty <= 1_000 && chatty > 500, "{chatty}");
        // The newest lines are the ones kept.
        let last: String = conn
            .query_row(
                "SELECT line FROM logs WHERE function = 'chatty' ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(last, "2999");
        let (huge, huge_bytes) = usage(&conn, "huge");
        assert_eq!(huge, 1);
        assert!(huge_bytes < 70_000, "{huge_bytes}");
        let line: String = conn
            .query_row("SELECT line FROM logs WHERE function = 'huge'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(
            line.ends_with(&format!(
                " [gust: line truncated, {} bytes dropped]",
                (1 << 20) - (gust_core::MAX_LOG_LINE - 64)
            )),
            "{}",
            &line[line.len() - 60..]
        );
        let (all, all_bytes): (u64, u64) = conn
            .query_row(
                "SELECT COUNT(*), SUM(octet_length(line)) FROM logs",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .unwrap();
        assert!(all <= 1_500 && all_bytes <= 150_000, "{all} {all_bytes}");
        drop(w);
        // A restart counts what is stored and keeps bounding it.
        let w = store.log_writer_with(limits).unwrap();
        for i in 0..2_000 {
            w.emit(rec("chatty", format!("again {i}")));
        }
        w.flush();
        assert!(usage(&conn, "chatty").0 <= 1_000);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dropped_lines_are_counted_in_the_functions_logs() {
        let dir = std::env::temp_dir().join(format!("gust-logs-{}", crate::unique()));
        let store = crate::Store::open(&dir).unwrap();
        let w = store.log_writer_with(LogLimits::default()).unwrap();
        w.shared
            .drop_lines("f", "the log writer fell behind (its queue is full)", 41);
        w.shared
            .drop_lines("f", "the log writer fell behind (its queue is full)", 1);
        w.emit(rec("f", "after".into()));
        w.flush();
        let lines: Vec<String> = store
            .logs("f", None, 10)
            .unwrap()
            .into_iter()
            .map(|l| l.record.line)
            .collect();
        assert!(
            lines.contains(
                &"[gust] 42 log lines dropped: the log writer fell behind (its queue is full)"
                    .to_string()
            ),
            "{lines:?}"
        );
        assert!(lines.contains(&"after".to_string()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
