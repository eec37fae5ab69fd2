//! The durable event store: async invocations, queue messages and scheduled runs, in their own
//! tables of the same SQLite database.
//!
//! One writer thread owns every write (appends, claims, completions), so writers never contend
//! for SQLite's lock and concurrent appends share one commit: an append is acknowledged only
//! after the transaction holding it committed (WAL; it survives the server being killed), and
//! under load hundreds of appends ride one commit. Reads use their own connection (WAL readers
//! do not block the writer).
//!
//! Event states: `queued` (waiting, possibly until `visible_ms`), `inflight` (claimed by a
//! dispatcher until `visible_ms`), `succeeded`, `failed` (out of retries), `dead` (moved to a
//! dead-letter queue; the copy there is a new `queued` event). On open, `inflight` events of a
//! previous run are made `queued` and visible at once: whatever was running when the server
//! died is delivered again (at least once).

use std::path::Path;
use std::sync::{Mutex, mpsc};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::{Result, StoreError, open_db};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  kind TEXT NOT NULL,
  target TEXT NOT NULL,
  payload BLOB NOT NULL,
  attributes TEXT NOT NULL DEFAULT '{}',
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  created_ms INTEGER NOT NULL,
  visible_ms INTEGER NOT NULL,
  first_receive_ms INTEGER,
  updated_ms INTEGER NOT NULL,
  last_error TEXT,
  source TEXT
);
CREATE INDEX IF NOT EXISTS events_due ON events(kind, target, state, visible_ms, seq);
CREATE INDEX IF NOT EXISTS events_fifo ON events(kind, target, state, seq);
CREATE INDEX IF NOT EXISTS events_finished ON events(state, updated_ms);
-- What each target holds in queued and in-flight events (its backlog), kept by triggers in the
-- same transaction as every change: the backlog limit is checked against it, race-free, in the
-- writer's transaction.
CREATE TABLE IF NOT EXISTS backlog (
  kind TEXT NOT NULL,
  target TEXT NOT NULL,
  count INTEGER NOT NULL DEFAULT 0,
  bytes INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (kind, target)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS backlog_insert AFTER INSERT ON events
  WHEN NEW.state IN ('queued', 'inflight')
BEGIN
  INSERT INTO backlog (kind, target, count, bytes) VALUES (NEW.kind, NEW.target, 1, length(NEW.payload))
    ON CONFLICT (kind, target) DO UPDATE SET count = count + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS backlog_delete AFTER DELETE ON events
  WHEN OLD.state IN ('queued', 'inflight')
BEGIN
  UPDATE backlog SET count = count - 1, bytes = bytes - length(OLD.payload)
    WHERE kind = OLD.kind AND target = OLD.target;
END;
CREATE TRIGGER IF NOT EXISTS backlog_update AFTER UPDATE OF state, target, kind ON events
  WHEN (OLD.state IN ('queued', 'inflight')) != (NEW.state IN ('queued', 'inflight'))
    OR OLD.target != NEW.target OR OLD.kind != NEW.kind
BEGIN
  UPDATE backlog SET count = count - 1, bytes = bytes - length(OLD.payload)
    WHERE OLD.state IN ('queued', 'inflight') AND kind = OLD.kind AND target = OLD.target;
  INSERT INTO backlog (kind, target, count, bytes)
    SELECT NEW.kind, NEW.target, 1, length(NEW.payload) WHERE NEW.state IN ('queued', 'inflight')
    ON CONFLICT (kind, target) DO UPDATE SET count = count + 1, bytes = bytes + excluded.bytes;
END;
CREATE TABLE IF NOT EXISTS schedules (
  name TEXT PRIMARY KEY,
  next_ms INTEGER,
  last_ms INTEGER,
  last_outcome TEXT,
  running INTEGER NOT NULL DEFAULT 0
);
";

/// What an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An asynchronous invocation of the function `target`.
    Async,
    /// A message in the queue `target`.
    Queue,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Async => "async",
            Kind::Queue => "queue",
        }
    }
    fn parse(s: &str) -> Kind {
        if s == "queue" {
            Kind::Queue
        } else {
            Kind::Async
        }
    }
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: String,
    pub kind: Kind,
    pub target: String,
    pub payload: Vec<u8>,
    /// JSON object: message attributes, callback URL, retry policy, origin.
    pub attributes: String,
    /// Not delivered before this time (ms since the epoch).
    pub visible_ms: u64,
    /// For a dead-lettered copy: the queue or function it came from (redrive sends it back).
    pub source: Option<String>,
}

/// A stored event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: String,
    pub kind: Kind,
    pub target: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub attributes: serde_json::Value,
    pub state: String,
    pub attempts: u32,
    pub created_ms: u64,
    pub visible_ms: u64,
    pub first_receive_ms: Option<u64>,
    pub updated_ms: u64,
    pub last_error: Option<String>,
    pub source: Option<String>,
}

/// How an attempt ended, as the dispatcher decided.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Done: `succeeded` or `failed` (kept for visibility until pruned).
    Final {
        state: &'static str,
        error: Option<String>,
    },
    /// Try again after `visible_ms`; `count` false gives back the attempt (a throttle).
    Retry {
        visible_ms: u64,
        error: Option<String>,
        count: bool,
    },
    /// Delete (a queue message that was processed).
    Delete,
    /// A queue message out of receives: moved, with its id, to the dead-letter queue `to`
    /// (`source` remembers where it came from, for redrive).
    MoveTo { to: String, error: Option<String> },
    /// Another settle, and events appended in the same transaction (destination records: an
    /// outbox, so that a crash cannot record the outcome and lose the record).
    With(Box<Settle>, Vec<NewEvent>),
    /// Out of attempts: mark `dead` and append `copy` (to a dead-letter queue) in the same
    /// transaction.
    DeadLetter {
        error: Option<String>,
        copy: Option<NewEvent>,
    },
    /// No change of state: records `text` under `key` in the event's attributes (why a
    /// callback or URL destination was not delivered).
    Note { key: &'static str, text: String },
}

/// A bound on a target's backlog (its queued and in-flight events): an append that would take
/// it past either number is refused whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub bytes: u64,
}

/// A target's backlog: how many queued and in-flight events, and their payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    pub count: u64,
    pub bytes: u64,
}

/// What one prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Finished events (succeeded, failed, dead) older than the retention.
    pub finished: u64,
    /// Queue messages older than their queue's retention.
    pub expired: u64,
}

/// Per-state counts.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub queued: u64,
    pub inflight: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub dead: u64,
}

type Reply<T> = Box<dyn FnOnce(Result<T>) + Send>;
/// A reply deferred until the batch's commit: given the commit's error, if any.
type Deferred = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// A schedule's stored state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleState {
    pub next_ms: Option<u64>,
    pub last_ms: Option<u64>,
    pub last_outcome: Option<String>,
    pub running: bool,
}

enum Op {
    Append(Vec<NewEvent>, Reply<()>),
    /// Append unless the target's backlog would pass `limit`: Some(backlog) when refused.
    AppendLimited {
        events: Vec<NewEvent>,
        limit: Limit,
        reply: Reply<Option<Backlog>>,
    },
    /// Delete finished events updated before `finished_before_ms`, and the waiting messages of
    /// each queue created before its cutoff; then give the freed pages back to the file system.
    Prune {
        finished_before_ms: u64,
        queues: Vec<(String, u64)>,
        reply: Reply<Pruned>,
    },
    Claim {
        kind: Kind,
        target: String,
        now_ms: u64,
        limit: usize,
        lease_ms: u64,
        reply: Reply<Vec<Event>>,
    },
    Settle(Vec<(String, Settle)>, Reply<()>),
    /// Purge a queue (queued messages only); replies with the count.
    Purge(String, Reply<u64>),
    /// Move a dead-letter queue's messages back to where they came from (or `to`).
    Redrive {
        dlq: String,
        to: Option<String>,
        reply: Reply<u64>,
    },
    Schedule {
        name: String,
        next_ms: Option<u64>,
        last: Option<(u64, String)>,
        running: Option<bool>,
        reply: Reply<()>,
    },
}

pub struct EventStore {
    tx: Mutex<mpsc::Sender<Op>>,
    read: Mutex<Connection>,
}

fn now_ms() -> u64 {
    gust_core::now_ms()
}

fn row_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let attrs: String = r.get("attributes")?;
    Ok(Event {
        id: r.get("id")?,
        kind: Kind::parse(&r.get::<_, String>("kind")?),
        target: r.get("target")?,
        payload: r.get("payload")?,
        attributes: serde_json::from_str(&attrs).unwrap_or(serde_json::Value::Null),
        state: r.get("state")?,
        attempts: r.get("attempts")?,
        created_ms: r.get::<_, i64>("created_ms")? as u64,
        visible_ms: r.get::<_, i64>("visible_ms")? as u64,
        first_receive_ms: r
            .get::<_, Option<i64>>("first_receive_ms")?
            .map(|v| v as u64),
        updated_ms: r.get::<_, i64>("updated_ms")? as u64,
        last_error: r.get("last_error")?,
        source: r.get("source")?,
    })
}

/// Puts the database in incremental auto-vacuum mode, so that pruned pages can go back to the
/// file system (`vacuum_step`). On a database that already has tables the mode only takes
/// effect through a VACUUM, which rewrites the whole file: done once, at start, before any other
/// connection is open (`Store::open`), and only when the file system has twice the database's
/// size free. Skipped for space, it is tried again at the next start; failed, it is recorded and
/// not tried again (the file then does not shrink after pruning; the log says so).
pub(crate) fn enable_incremental_vacuum(conn: &Connection, path: &Path) -> Result<()> {
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == 2 {
        return Ok(());
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS store_flags (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )?;
    let failed: Option<String> = conn
        .query_row(
            "SELECT value FROM store_flags WHERE name = 'incremental_vacuum_failed'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if failed.is_some() {
        return Ok(());
    }
    let size: i64 = conn.query_row(
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        [],
        |r| r.get(0),
    )?;
    let size = size.max(0) as u64;
    let dir = path.parent().unwrap_or(Path::new("."));
    match free_bytes(dir) {
        Some(free) if free >= size.saturating_mul(2) => {}
        free => {
            tracing::warn!(
                "event store: not converting {} to incremental vacuum now (it is rewritten whole): that needs twice its size ({} MiB) free on its file system, {} are; until a start with enough room, pruning does not shrink the file",
                path.display(),
                size.saturating_mul(2) >> 20,
                free.map_or("an unknown amount".into(), |f| format!("{} MiB", f >> 20)),
            );
            return Ok(());
        }
    }
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
    if let Err(e) = conn.execute_batch("VACUUM") {
        tracing::warn!(
            "event store: VACUUM to enable incremental vacuum of {} failed, and will not be tried again (pruning will not shrink the file): {e}",
            path.display()
        );
        conn.execute(
            "INSERT OR REPLACE INTO store_flags (name, value) VALUES ('incremental_vacuum_failed', ?1)",
            [e.to_string()],
        )?;
    }
    Ok(())
}

/// Free bytes for an unprivileged user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a statvfs that the call fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Pages freed per step of `vacuum_step`: a bounded piece of work (8 MiB with 4 KiB pages).
pub(crate) const VACUUM_STEP_PAGES: u32 = 2048;

/// Gives up to `pages` free pages back to the file system; Ok(true) when free pages remain.
/// (The pragma frees one page per step of its statement, so it is stepped to its end: run
/// through `execute_batch` it would free one.)
pub(crate) fn vacuum_step(conn: &Connection, pages: u32) -> rusqlite::Result<bool> {
    {
        let mut st = conn.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
        let mut rows = st.query([])?;
        while rows.next()?.is_some() {}
    }
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok(free > 0)
}

const COLUMNS: &str = "id, kind, target, payload, attributes, state, attempts, created_ms, visible_ms, first_receive_ms, updated_ms, last_error, source";

impl EventStore {
    /// Opens the event tables of the database at `path` and starts the writer thread.
    pub fn open(path: &Path) -> Result<EventStore> {
        let conn = open_db(path)?;
        // Normally done already by `Store::open`, before any other connection.
        enable_incremental_vacuum(&conn, path)?;
        conn.execute_batch(SCHEMA)?;
        // The backlog counts from the events themselves (a database from an older build has
        // none; a recount also repairs any drift).
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             DELETE FROM backlog;
             INSERT INTO backlog (kind, target, count, bytes)
               SELECT kind, target, COUNT(*), COALESCE(SUM(length(payload)), 0) FROM events
               WHERE state IN ('queued', 'inflight') GROUP BY kind, target;
             COMMIT;",
        )?;
        // Whatever ran when the server stopped runs again (at least once).
        let now = now_ms() as i64;
        conn.execute(
            "UPDATE events SET state = 'queued', visible_ms = ?1, updated_ms = ?1 WHERE state = 'inflight'",
            [now],
        )?;
        conn.execute("UPDATE schedules SET running = 0", [])?;
        let read = open_db(path)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("gust-event-writer".into())
            .spawn(move || writer(conn, rx))
            .map_err(crate::io("spawn the event writer"))?;
        Ok(EventStore {
            tx: Mutex::new(tx),
            read: Mutex::new(read),
        })
    }

    fn send(&self, op: Op) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // The writer lives as long as the process; a failed send drops the reply, which the
        // caller sees as an error.
        let _ = tx.send(op);
    }

    /// Appends events; `done` runs once they are committed (or failed).
    pub fn append(&self, events: Vec<NewEvent>, done: impl FnOnce(Result<()>) + Send + 'static) {
        self.send(Op::Append(events, Box::new(done)));
    }

    /// Appends events to one target unless its backlog would pass `limit`; `done` gets
    /// Ok(None) once they are committed, Ok(Some(backlog)) when they were refused (nothing
    /// stored). The check runs in the writer's transaction, so concurrent appends cannot pass
    /// the limit together.
    pub fn append_limited(
        &self,
        events: Vec<NewEvent>,
        limit: Limit,
        done: impl FnOnce(Result<Option<Backlog>>) + Send + 'static,
    ) {
        self.send(Op::AppendLimited {
            events,
            limit,
            reply: Box::new(done),
        });
    }

    /// Removes finished events last updated before `finished_before_ms` and, per queue, the
    /// waiting messages sent before its cutoff (retention); the file shrinks by what they
    /// freed.
    pub fn prune(
        &self,
        finished_before_ms: u64,
        queues: Vec<(String, u64)>,
        done: impl FnOnce(Result<Pruned>) + Send + 'static,
    ) {
        self.send(Op::Prune {
            finished_before_ms,
            queues,
            reply: Box::new(done),
        });
    }

    /// A target's backlog (queued and in-flight events).
    pub fn backlog(&self, kind: Kind, target: &str) -> Result<Backlog> {
        backlog(&self.read(), kind, target)
    }

    /// Claims up to `limit` due events of a target: `inflight` until now + `lease_ms`, one more
    /// attempt counted.
    pub fn claim(
        &self,
        kind: Kind,
        target: &str,
        limit: usize,
        lease_ms: u64,
        done: impl FnOnce(Result<Vec<Event>>) + Send + 'static,
    ) {
        self.send(Op::Claim {
            kind,
            target: target.to_string(),
            now_ms: now_ms(),
            limit,
            lease_ms,
            reply: Box::new(done),
        });
    }

    pub fn settle(
        &self,
        outcomes: Vec<(String, Settle)>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        self.send(Op::Settle(outcomes, Box::new(done)));
    }

    pub fn purge(&self, queue: &str, done: impl FnOnce(Result<u64>) + Send + 'static) {
        self.send(Op::Purge(queue.to_string(), Box::new(done)));
    }

    pub fn redrive(
        &self,
        dlq: &str,
        to: Option<String>,
        done: impl FnOnce(Result<u64>) + Send + 'static,
    ) {
        self.send(Op::Redrive {
            dlq: dlq.to_string(),
            to,
            reply: Box::new(done),
        });
    }

    /// Records a schedule's next fire time, last run and outcome, or running flag.
    pub fn set_schedule(
        &self,
        name: &str,
        next_ms: Option<u64>,
        last: Option<(u64, String)>,
        running: Option<bool>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        self.send(Op::Schedule {
            name: name.to_string(),
            next_ms,
            last,
            running,
            reply: Box::new(done),
        });
    }

    fn read(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.read.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Option<Event>> {
        Ok(self
            .read()
            .query_row(
                &format!("SELECT {COLUMNS} FROM events WHERE id = ?1"),
                [id],
                row_event,
            )
            .optional()?)
    }

    /// Per-state counts of a target's events.
    pub fn counts(&self, kind: Kind, target: &str) -> Result<Counts> {
        let db = self.read();
        let mut st = db.prepare_cached(
            "SELECT state, COUNT(*) FROM events WHERE kind = ?1 AND target = ?2 GROUP BY state",
        )?;
        let mut c = Counts::default();
        for row in st.query_map(params![kind.as_str(), target], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })? {
            let (state, n) = row?;
            match state.as_str() {
                "queued" => c.queued = n,
                "inflight" => c.inflight = n,
                "succeeded" => c.succeeded = n,
                "failed" => c.failed = n,
                "dead" => c.dead = n,
                _ => {}
            }
        }
        Ok(c)
    }

    /// The oldest queued event's creation time of a target.
    pub fn oldest_queued_ms(&self, kind: Kind, target: &str) -> Result<Option<u64>> {
        Ok(self
            .read()
            .query_row(
                "SELECT MIN(created_ms) FROM events WHERE kind = ?1 AND target = ?2 AND state IN ('queued', 'inflight')",
                params![kind.as_str(), target],
                |r| r.get::<_, Option<i64>>(0),
            )?
            .map(|v| v as u64))
    }

    /// When the next queued event of a target becomes due (None: nothing queued). In-flight
    /// events are not counted: their delivery settles them and wakes the dispatcher.
    pub fn next_due_ms(&self, kind: Kind, target: &str) -> Result<Option<u64>> {
        Ok(self
            .read()
            .query_row(
                "SELECT MIN(visible_ms) FROM events WHERE kind = ?1 AND target = ?2 AND state = 'queued'",
                params![kind.as_str(), target],
                |r| r.get::<_, Option<i64>>(0),
            )?
            .map(|v| v as u64))
    }

    /// Due (visible, queued) events of a target: how many (up to `cap`), and since when the
    /// oldest has been due.
    pub fn due(
        &self,
        kind: Kind,
        target: &str,
        now_ms: u64,
        cap: u64,
    ) -> Result<(u64, Option<u64>)> {
        let db = self.read();
        let mut st = db.prepare_cached(
            "SELECT COUNT(*), MIN(due) FROM (SELECT MAX(visible_ms, created_ms) AS due FROM events
               WHERE kind = ?1 AND target = ?2 AND state = 'queued' AND visible_ms <= ?3 LIMIT ?4)",
        )?;
        Ok(st.query_row(
            params![kind.as_str(), target, now_ms as i64, cap as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                ))
            },
        )?)
    }

    pub fn schedule(&self, name: &str) -> Result<Option<ScheduleState>> {
        Ok(self
            .read()
            .query_row(
                "SELECT next_ms, last_ms, last_outcome, running FROM schedules WHERE name = ?1",
                [name],
                |r| {
                    Ok(ScheduleState {
                        next_ms: r.get::<_, Option<i64>>(0)?.map(|v| v as u64),
                        last_ms: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                        last_outcome: r.get::<_, Option<String>>(2)?,
                        running: r.get::<_, i64>(3)? != 0,
                    })
                },
            )
            .optional()?)
    }
}

fn backlog(db: &Connection, kind: Kind, target: &str) -> Result<Backlog> {
    Ok(db
        .prepare_cached("SELECT count, bytes FROM backlog WHERE kind = ?1 AND target = ?2")?
        .query_row(params![kind.as_str(), target], |r| {
            Ok(Backlog {
                count: r.get::<_, i64>(0)?.max(0) as u64,
                bytes: r.get::<_, i64>(1)?.max(0) as u64,
            })
        })
        .optional()?
        .unwrap_or_default())
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>) {
    // An op that arrived while the vacuum was stepping: the next batch starts with it.
    let mut next: Option<Op> = None;
    // Free pages not yet given back, and a WAL checkpoint not yet done.
    let mut vacuum_due = false;
    let mut checkpoint_due = false;
    // The last checkpoint was busy: wait for a prune's tick before the next.
    let mut checkpoint_busy = false;
    loop {
        let first = match next.take() {
            Some(op) => op,
            None => match rx.recv() {
                Ok(op) => op,
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut replies: Vec<Deferred> = Vec::new();
        let mut pruned = false;
        let tick = batch.iter().any(|op| matches!(op, Op::Prune { .. }));
        let result = (|| -> Result<()> {
            let mut tx =
                conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for op in batch {
                // Each op in a savepoint: one that fails is rolled back alone (its caller sees
                // the error when its reply is dropped); the rest of the batch commits.
                let sp = tx.savepoint()?;
                match apply(&sp, op, &mut replies, &mut pruned) {
                    Ok(()) => sp.commit()?,
                    Err(e) => tracing::warn!("event store: an operation failed: {e}"),
                }
            }
            tx.commit()?;
            Ok(())
        })();
        let err = result.err();
        // Replies first: nobody waits for the housekeeping below.
        for r in replies {
            r(err.as_ref());
        }
        if pruned && err.is_none() {
            vacuum_due = true;
            checkpoint_due = true;
        }
        // Free pages go back to the file system in bounded steps, only while no op waits.
        while vacuum_due && next.is_none() {
            match vacuum_step(&conn, VACUUM_STEP_PAGES) {
                Ok(more) => vacuum_due = more,
                Err(e) => {
                    tracing::warn!("event store: incremental vacuum failed: {e}");
                    vacuum_due = false;
                }
            }
            if vacuum_due {
                match rx.try_recv() {
                    Ok(op) => next = Some(op),
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
        }
        // Then the WAL, which now holds the freed pages, is checkpointed and truncated.
        // TRUNCATE waits for other writers (the log writer) briefly, since appends wait behind
        // it; when it cannot finish (busy), the next prune's tick tries again.
        if checkpoint_due && !vacuum_due && next.is_none() && (tick || !checkpoint_busy) {
            let _ = conn.busy_timeout(std::time::Duration::from_millis(100));
            match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
                Ok(0) => {
                    checkpoint_due = false;
                    checkpoint_busy = false;
                }
                Ok(_) => {
                    checkpoint_busy = true;
                    tracing::debug!(
                        "event store: WAL checkpoint busy (another writer); retried at the next prune"
                    );
                }
                Err(e) => {
                    checkpoint_busy = true;
                    tracing::warn!(
                        "event store: WAL checkpoint failed (retried at the next prune): {e}"
                    );
                }
            }
            let _ = conn.busy_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// Runs one op inside the batch's transaction; its reply is deferred until the commit.
fn apply(tx: &Connection, op: Op, replies: &mut Vec<Deferred>, pruned: &mut bool) -> Result<()> {
    let now = now_ms() as i64;
    let fail = |e: Option<&StoreError>| e.map(|e| StoreError::Invalid(format!("event store: {e}")));
    match op {
        Op::Append(events, reply) => {
            for e in &events {
                insert(tx, e, now)?;
            }
            replies.push(Box::new(move |e| reply(fail(e).map_or(Ok(()), Err))));
        }
        Op::AppendLimited {
            events,
            limit,
            reply,
        } => {
            let refused = match events.first() {
                None => None,
                Some(first) => {
                    let now_b = backlog(tx, first.kind, &first.target)?;
                    let bytes: u64 = events.iter().map(|e| e.payload.len() as u64).sum();
                    let over = now_b.count.saturating_add(events.len() as u64) > limit.count
                        || now_b.bytes.saturating_add(bytes) > limit.bytes;
                    over.then_some(now_b)
                }
            };
            if refused.is_none() {
                for e in &events {
                    insert(tx, e, now)?;
                }
            }
            replies.push(Box::new(move |e| reply(fail(e).map_or(Ok(refused), Err))));
        }
        Op::Prune {
            finished_before_ms,
            queues,
            reply,
        } => {
            let finished = tx.execute(
                "DELETE FROM events WHERE state IN ('succeeded', 'failed', 'dead') AND updated_ms < ?1",
                [finished_before_ms as i64],
            )? as u64;
            let mut expired = 0;
            for (queue, before_ms) in &queues {
                // Waiting messages only: a batch that is running settles its own.
                expired += tx
                    .prepare_cached(
                        "DELETE FROM events WHERE kind = 'queue' AND target = ?1 AND state = 'queued' AND created_ms < ?2",
                    )?
                    .execute(params![queue, *before_ms as i64])? as u64;
            }
            if finished + expired > 0 {
                *pruned = true;
            }
            let pruned = Pruned { finished, expired };
            replies.push(Box::new(move |e| reply(fail(e).map_or(Ok(pruned), Err))));
        }
        Op::Claim {
            kind,
            target,
            now_ms,
            limit,
            lease_ms,
            reply,
        } => {
            let mut st = tx.prepare_cached(&format!(
                "UPDATE events SET state = 'inflight', attempts = attempts + 1, visible_ms = ?3,
                   first_receive_ms = COALESCE(first_receive_ms, ?4), updated_ms = ?4
                 WHERE seq IN (SELECT seq FROM events INDEXED BY events_fifo
                               WHERE kind = ?1 AND target = ?2 AND state = 'queued'
                               AND visible_ms <= ?4 ORDER BY seq LIMIT ?5)
                 RETURNING {COLUMNS}, seq"
            ))?;
            let mut rows: Vec<(i64, Event)> = st
                .query_map(
                    params![
                        kind.as_str(),
                        target,
                        (now_ms + lease_ms) as i64,
                        now_ms as i64,
                        limit as i64
                    ],
                    |r| Ok((r.get::<_, i64>("seq")?, row_event(r)?)),
                )?
                .collect::<rusqlite::Result<_>>()?;
            rows.sort_by_key(|(s, _)| *s);
            let events: Vec<Event> = rows.into_iter().map(|(_, e)| e).collect();
            replies.push(Box::new(move |e| reply(fail(e).map_or(Ok(events), Err))));
        }
        Op::Settle(outcomes, reply) => {
            for (id, s) in outcomes {
                settle_one(tx, &id, s, now)?;
            }
            replies.push(Box::new(move |e| reply(fail(e).map_or(Ok(()), Err))));
        }
        Op::Purge(queue, reply) => {
            let n = tx.execute(
                "DELETE FROM events WHERE kind = 'queue' AND target = ?1 AND state = 'queued'",
                [&queue],
            )? as u64;
            replies.push(Box::new(move |e| reply(fail(e).map_or(Ok(n), Err))));
        }
        Op::Redrive { dlq, to, reply } => {
            let n = tx.execute(
                // A redriven message is a new message (as in SQS): its retention counts from now,
                // not from its first send, or an old one would expire at once.
                "UPDATE events SET target = COALESCE(?2, source, target), source = NULL, state = 'queued',
                   attempts = 0, first_receive_ms = NULL, created_ms = ?3, visible_ms = ?3, updated_ms = ?3
                 WHERE kind = 'queue' AND target = ?1 AND state = 'queued'
                   AND (?2 IS NOT NULL OR source IS NOT NULL)",
                params![dlq, to, now],
            )? as u64;
            replies.push(Box::new(move |e| reply(fail(e).map_or(Ok(n), Err))));
        }
        Op::Schedule {
            name,
            next_ms,
            last,
            running,
            reply,
        } => {
            tx.execute(
                "INSERT OR IGNORE INTO schedules (name) VALUES (?1)",
                [&name],
            )?;
            if let Some(n) = next_ms {
                tx.execute(
                    "UPDATE schedules SET next_ms = ?2 WHERE name = ?1",
                    params![name, n as i64],
                )?;
            }
            if let Some((at, outcome)) = last {
                tx.execute(
                    "UPDATE schedules SET last_ms = ?2, last_outcome = ?3 WHERE name = ?1",
                    params![name, at as i64, outcome],
                )?;
            }
            if let Some(r) = running {
                tx.execute(
                    "UPDATE schedules SET running = ?2 WHERE name = ?1",
                    params![name, r as i64],
                )?;
            }
            replies.push(Box::new(move |e| reply(fail(e).map_or(Ok(()), Err))));
        }
    }
    Ok(())
}
/// Records one outcome inside the batch's transaction.
fn settle_one(tx: &Connection, id: &str, s: Settle, now: i64) -> Result<()> {
    match s {
        Settle::Final { state, error } => {
            tx.execute(
                "UPDATE events SET state = ?2, last_error = COALESCE(?3, last_error), updated_ms = ?4 WHERE id = ?1",
                params![id, state, error, now],
            )?;
        }
        Settle::Retry {
            visible_ms,
            error,
            count,
        } => {
            tx.execute(
                "UPDATE events SET state = 'queued', visible_ms = ?2, last_error = COALESCE(?3, last_error),
                   attempts = attempts - ?4, updated_ms = ?5 WHERE id = ?1",
                params![id, visible_ms as i64, error, if count { 0 } else { 1 }, now],
            )?;
        }
        Settle::MoveTo { to, error } => {
            tx.execute(
                "UPDATE events SET source = target, target = ?2, state = 'queued', attempts = 0,
                   first_receive_ms = NULL, visible_ms = ?4, last_error = COALESCE(?3, last_error),
                   updated_ms = ?4 WHERE id = ?1",
                params![id, to, error, now],
            )?;
        }
        Settle::Delete => {
            tx.execute("DELETE FROM events WHERE id = ?1", [id])?;
        }
        Settle::DeadLetter { error, copy } => {
            tx.execute(
                "UPDATE events SET state = 'dead', last_error = COALESCE(?2, last_error), updated_ms = ?3 WHERE id = ?1",
                params![id, error, now],
            )?;
            if let Some(c) = copy {
                insert(tx, &c, now)?;
            }
        }
        Settle::Note { key, text } => {
            tx.execute(
                "UPDATE events SET attributes = json_set(attributes, ?2, ?3) WHERE id = ?1",
                params![id, format!("$.{key}"), text],
            )?;
        }
        Settle::With(inner, extra) => {
            settle_one(tx, id, *inner, now)?;
            for e in &extra {
                insert(tx, e, now)?;
            }
        }
    }
    Ok(())
}

fn insert(tx: &Connection, e: &NewEvent, now: i64) -> Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO events (id, kind, target, payload, attributes, state, created_ms, visible_ms, updated_ms, source)
         VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?6, ?8)",
    )?
    .execute(params![e.id, e.kind.as_str(), e.target, e.payload, e.attributes, now, e.visible_ms as i64, e.source])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (EventStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "gust-events-test-{}-{}",
            std::process::id(),
            crate::unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (EventStore::open(&dir.join("gust.db")).unwrap(), dir)
    }

    fn wait<T: Send + 'static>(f: impl FnOnce(Box<dyn FnOnce(Result<T>) + Send>)) -> T {
        let (tx, rx) = mpsc::channel();
        f(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().unwrap().unwrap()
    }

    fn ev(id: &str, visible_ms: u64) -> NewEvent {
        NewEvent {
            id: id.into(),
            kind: Kind::Async,
            target: "f".into(),
            payload: b"{}".to_vec(),
            attributes: "{}".into(),
            visible_ms,
            source: None,
        }
    }

    #[test]
    fn claims_in_order_retries_later_and_reports_what_is_due() {
        let (s, dir) = store();
        let later = now_ms() + 60_000;
        wait(|r| s.append(vec![ev("a", 0), ev("b", 0), ev("c", later)], r));
        // Appending the same id again is a no-op (schedule slots rely on it).
        wait(|r| s.append(vec![ev("a", 0)], r));
        assert_eq!(s.counts(Kind::Async, "f").unwrap().queued, 3);
        assert_eq!(s.next_due_ms(Kind::Async, "f").unwrap(), Some(0));
        let got = wait(|r| s.claim(Kind::Async, "f", 10, 30_000, r));
        assert_eq!(
            got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(got[0].attempts, 1);
        // Only the future event is queued now: it is what is due next (inflight ones by lease).
        let next = s.next_due_ms(Kind::Async, "f").unwrap().unwrap();
        assert!(next <= later, "{next}");
        wait(|r| {
            s.settle(
                vec![
                    (
                        "a".into(),
                        Settle::Final {
                            state: "succeeded",
                            error: None,
                        },
                    ),
                    (
                        "b".into(),
                        Settle::Retry {
                            visible_ms: 0,
                            error: Some("boom".into()),
                            count: false,
                        },
                    ),
                ],
                r,
            )
        });
        let b = s.get("b").unwrap().unwrap();
        assert_eq!(
            (b.state.as_str(), b.attempts, b.last_error.as_deref()),
            ("queued", 0, Some("boom"))
        );
        let c = s.counts(Kind::Async, "f").unwrap();
        assert_eq!((c.queued, c.inflight, c.succeeded), (2, 0, 1));
        assert_eq!(s.next_due_ms(Kind::Async, "f").unwrap(), Some(0));
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn backlog_limits_count_and_bytes_and_follow_every_change() {
        let (s, dir) = store();
        let limit = Limit {
            count: 3,
            bytes: 10,
        };
        let sized = |id: &str, n: usize| NewEvent {
            payload: vec![b'x'; n],
            ..ev(id, 0)
        };
        assert_eq!(
            wait(|r| s.append_limited(vec![sized("a", 2)], limit, r)),
            None
        );
        assert_eq!(
            wait(|r| s.append_limited(vec![sized("b", 2), sized("c", 2)], limit, r)),
            None
        );
        // The count is reached: refused whole, with what is stored.
        let full = Backlog { count: 3, bytes: 6 };
        assert_eq!(
            wait(|r| s.append_limited(vec![sized("d", 1)], limit, r)),
            Some(full)
        );
        assert!(s.get("d").unwrap().is_none());
        // Claimed events still count; finished ones do not.
        let got = wait(|r| s.claim(Kind::Async, "f", 1, 60_000, r));
        assert_eq!(s.backlog(Kind::Async, "f").unwrap(), full);
        let done = Settle::Final {
            state: "succeeded",
            error: None,
        };
        wait(|r| s.settle(vec![(got[0].id.clone(), done)], r));
        assert_eq!(
            s.backlog(Kind::Async, "f").unwrap(),
            Backlog { count: 2, bytes: 4 }
        );
        // Bytes: 4 + 7 > 10.
        assert!(wait(|r| s.append_limited(vec![sized("e", 7)], limit, r)).is_some());
        assert_eq!(
            wait(|r| s.append_limited(vec![sized("e", 6)], limit, r)),
            None
        );
        // A recount at open agrees with the triggers.
        drop(s);
        let s = EventStore::open(&dir.join("gust.db")).unwrap();
        assert_eq!(
            s.backlog(Kind::Async, "f").unwrap(),
            Backlog {
                count: 3,
                bytes: 10
            }
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn pruning_removes_finished_and_expired_events_and_shrinks_the_file() {
        let (s, dir) = store();
        let big = |id: &str, kind: Kind, target: &str| NewEvent {
            kind,
            target: target.into(),
            payload: vec![7u8; 256 * 1024],
            ..ev(id, 0)
        };
        let ids: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
        wait(|r| s.append(ids.iter().map(|id| big(id, Kind::Async, "f")).collect(), r));
        wait(|r| {
            s.append(
                vec![big("m1", Kind::Queue, "q"), big("m2", Kind::Queue, "q2")],
                r,
            )
        });
        let got = wait(|r| s.claim(Kind::Async, "f", 40, 60_000, r));
        let done = got
            .iter()
            .map(|e| {
                (
                    e.id.clone(),
                    Settle::Final {
                        state: "succeeded",
                        error: None,
                    },
                )
            })
            .collect();
        wait(|r| s.settle(done, r));
        let size = || {
            let f = |n: &str| std::fs::metadata(dir.join(n)).map_or(0, |m| m.len());
            f("gust.db") + f("gust.db-wal")
        };
        let before = size();
        assert!(before > 10 << 20, "{before}");
        // q's messages are past its retention, q2's are not.
        let p = wait(|r| s.prune(now_ms() + 1, vec![("q".into(), now_ms() + 1)], r));
        assert_eq!(
            p,
            Pruned {
                finished: 40,
                expired: 1
            }
        );
        assert!(s.get("m1").unwrap().is_none());
        assert!(s.get("m2").unwrap().is_some());
        assert_eq!(s.backlog(Kind::Queue, "q").unwrap(), Backlog::default());
        let pages = |p: &str| -> i64 {
            s.read()
                .query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
                .unwrap()
        };
        // The file shrinks after the reply (the vacuum runs once the batch's replies are out).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut after = size();
        while after >= 2 << 20 && std::time::Instant::now() < deadline {
            // A read-only round trip through the writer, so the poll waits on it, not a sleep.
            wait(|r| s.purge("none", r));
            after = size();
        }
        assert!(
            after < 2 << 20,
            "{before} → {after}; pages {}, free {}, auto_vacuum {}",
            pages("page_count"),
            pages("freelist_count"),
            pages("auto_vacuum")
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn in_flight_events_are_redelivered_after_a_restart() {
        let (s, dir) = store();
        wait(|r| s.append(vec![ev("x", 0)], r));
        let got = wait(|r| s.claim(Kind::Async, "f", 10, 600_000, r));
        assert_eq!(got.len(), 1);
        drop(s);
        let s = EventStore::open(&dir.join("gust.db")).unwrap();
        let x = s.get("x").unwrap().unwrap();
        assert_eq!(x.state, "queued");
        assert!(x.visible_ms <= now_ms());
        let again = wait(|r| s.claim(Kind::Async, "f", 10, 600_000, r));
        assert_eq!((again.len(), again[0].attempts), (1, 2));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// One step gives back at most its pages (the pragma run whole would free them all, run
    /// through `execute_batch` only one).
    #[test]
    fn vacuum_steps_are_bounded_and_reach_the_end() {
        let (s, dir) = store();
        let ids: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
        let big = |id: &str| NewEvent {
            payload: vec![1u8; 64 * 1024],
            ..ev(id, 0)
        };
        wait(|r| s.append(ids.iter().map(|id| big(id)).collect(), r));
        drop(s);
        let conn = open_db(&dir.join("gust.db")).unwrap();
        conn.execute("DELETE FROM events", []).unwrap();
        let free = || -> i64 {
            conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap()
        };
        let before = free();
        assert!(before > 100, "{before}");
        assert!(vacuum_step(&conn, 10).unwrap());
        assert_eq!(free(), before - 10);
        while vacuum_step(&conn, VACUUM_STEP_PAGES).unwrap() {}
        assert_eq!(free(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A redriven message is new: its retention counts from the redrive.
    #[test]
    fn redriven_messages_are_new_for_retention() {
        let (s, dir) = store();
        let m = NewEvent {
            kind: Kind::Queue,
            target: "dlq".into(),
            source: Some("q".into()),
            ..ev("m", 0)
        };
        wait(|r| s.append(vec![m], r));
        open_db(&dir.join("gust.db"))
            .unwrap()
            .execute("UPDATE events SET created_ms = 1 WHERE id = 'm'", [])
            .unwrap();
        let t0 = now_ms();
        assert_eq!(wait(|r| s.redrive("dlq", None, r)), 1);
        let e = s.get("m").unwrap().unwrap();
        assert_eq!(e.target, "q");
        assert!(e.created_ms >= t0, "{}", e.created_ms);
        // The target queue's retention (say an hour) does not expire it at once.
        let p = wait(|r| s.prune(0, vec![("q".into(), t0 - 3_600_000)], r));
        assert_eq!(p.expired, 0);
        assert!(s.get("m").unwrap().is_some());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An older database is put in incremental mode once, at open; a VACUUM that failed is
    /// recorded and not tried again.
    #[test]
    fn incremental_vacuum_is_enabled_once_and_a_failure_is_not_retried() {
        let dir = std::env::temp_dir().join(format!(
            "gust-events-vacuum-{}-{}",
            std::process::id(),
            crate::unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gust.db");
        let mode = |c: &Connection| -> i64 {
            c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap()
        };
        {
            let c = open_db(&path).unwrap();
            c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
                .unwrap();
            assert_eq!(mode(&c), 0);
            enable_incremental_vacuum(&c, &path).unwrap();
            assert_eq!(mode(&c), 2);
        }
        let failed = dir.join("failed.db");
        let c = open_db(&failed).unwrap();
        c.execute_batch(
            "CREATE TABLE t (x);
             CREATE TABLE store_flags (name TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO store_flags VALUES ('incremental_vacuum_failed', 'disk full');",
        )
        .unwrap();
        enable_incremental_vacuum(&c, &failed).unwrap();
        assert_eq!(mode(&c), 0, "not tried again");
        let _ = std::fs::remove_dir_all(dir);
    }
}
