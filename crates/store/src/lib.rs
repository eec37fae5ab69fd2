//! gust-store: embedded state of a single node. SQLite (WAL) holds the registry of functions, the
//! deployment history and the log index; code bundles are stored content-addressed (sha256) on
//! disk and unpacked once per hash. The admin token lives here too.
//!
//! Layout of a data dir:
//! ```text
//! .gust-data-dir        marker: `gust deploy` never packs a directory holding it
//! gust.db               SQLite: services, functions, deployments, logs
//! admin-token           the admin API bearer token, mode 0600
//! blobs/sha256/<hex>    code bundles (tar.gz) as uploaded, mode 0600 (bundle.rs)
//! code/<hex>/           unpacked bundles, shared by every function with the same code;
//!                       readable by the sandbox's group only (bundle.rs)
//! runtimes/             the built-in bootstraps, written at start (see gust-executor)
//! ```
//! Cluster mode will put the same concerns behind NATS KV and object store; the gateway only
//! uses this crate's public methods, which are the seam.

mod bundle;
pub mod events;
mod logs;

pub use logs::{LogLimits, LogWriter};

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gust_core::{FunctionSpec, LogRecord, QueueSpec, now_ms};
use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The caller asked for something that contradicts the current state.
    #[error("{0}")]
    Conflict(String),
    /// The caller sent a bundle or hash that is not valid.
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The file that marks a directory as a gust data dir, written at every start. `gust deploy`
/// skips any directory that holds it, whatever its name.
pub const DATA_DIR_MARKER: &str = ".gust-data-dir";

/// A suffix for temp names that no other writer (thread or process) uses at the same time.
pub(crate) fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A function as the registry holds it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredFunction {
    pub spec: FunctionSpec,
    pub revision: u64,
    pub code_sha256: String,
    pub deployed_at_ms: u64,
}

/// One stored log line with its id (ids grow; `logs(after=id)` pages and follows).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredLog {
    pub id: i64,
    #[serde(flatten)]
    pub record: LogRecord,
}

pub struct Store {
    dir: PathBuf,
    db: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS services (
  name TEXT PRIMARY KEY,
  manifest TEXT NOT NULL,
  updated_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS functions (
  name TEXT PRIMARY KEY,
  service TEXT NOT NULL,
  revision INTEGER NOT NULL,
  spec TEXT NOT NULL,
  code_sha256 TEXT NOT NULL,
  deployed_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  service TEXT NOT NULL,
  created_at_ms INTEGER NOT NULL,
  manifest TEXT NOT NULL,
  functions TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS logs (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  function TEXT NOT NULL,
  ts_ms INTEGER NOT NULL,
  request_id TEXT,
  instance TEXT NOT NULL,
  stream TEXT NOT NULL,
  line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_function ON logs(function, id);
CREATE TABLE IF NOT EXISTS queues (
  name TEXT PRIMARY KEY,
  service TEXT NOT NULL,
  spec TEXT NOT NULL
);
";

pub(crate) fn open_db(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // A large transaction (a prune, a big batch of logs) must not leave a large WAL file behind.
    conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
    Ok(conn)
}

impl Store {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store> {
        let dir = dir.into();
        for sub in ["blobs/sha256", "code", "runtimes"] {
            fs::create_dir_all(dir.join(sub))
                .map_err(io(format!("create {}", dir.join(sub).display())))?;
        }
        // Absolute from here on: runtimes run with their code dir as cwd, so a relative data dir
        // (the default `.gust`) would point nowhere for them.
        let dir = dir
            .canonicalize()
            .map_err(io(format!("resolve {}", dir.display())))?;
        let marker = dir.join(DATA_DIR_MARKER);
        if !marker.exists() {
            fs::write(
                &marker,
                "This is a gust data dir (admin token, database, code bundles). `gust deploy` never packs it.\n",
            )
            .map_err(io(format!("write {}", marker.display())))?;
        }
        // The database holds every function's environment, logs and events, the bundles every
        // function's code: only gust (and, through their own mounts, the sandboxes) may read
        // them. The data dir itself first, so nothing in it is reachable by other users.
        for sub in ["", "blobs", "code"] {
            let p = dir.join(sub);
            fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(io(format!("chmod {}", p.display())))?;
        }
        let conn = open_db(&dir.join("gust.db"))?;
        // Before any other connection (the log writer, the event store) is open.
        events::enable_incremental_vacuum(&conn, &dir.join("gust.db"))?;
        conn.execute_batch(SCHEMA)?;
        for f in ["gust.db", "gust.db-wal", "gust.db-shm"] {
            let _ = fs::set_permissions(
                dir.join(f),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            );
        }
        Ok(Store {
            dir,
            db: Mutex::new(conn),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (it has its own
        // transactions), so a poisoned lock is still usable.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The admin token: read from `admin-token`, or generated and written with mode 0600.
    /// Returns the token and whether it was created now.
    pub fn admin_token(&self) -> Result<(String, bool)> {
        let path = self.dir.join("admin-token");
        if let Ok(t) = fs::read_to_string(&path) {
            let t = t.trim().to_string();
            if !t.is_empty() {
                // A token file someone loosened (or copied) is tightened again.
                let _ =
                    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
                return Ok((t, false));
            }
        }
        let mut raw = [0u8; 24];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(io("read /dev/urandom"))?;
        let token = format!("gust_{}", hex::encode(raw));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(format!("write {}", path.display())))?;
        f.write_all(token.as_bytes())
            .map_err(io("write admin token"))?;
        Ok((token, true))
    }

    fn blob_path(&self, sha: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(sha)
    }

    fn check_sha(sha: &str) -> Result<()> {
        if sha.len() == 64
            && sha
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!(
                "{sha:?} is not a lowercase sha256 hex digest"
            )))
        }
    }

    pub fn has_blob(&self, sha: &str) -> bool {
        Self::check_sha(sha).is_ok() && self.blob_path(sha).is_file()
    }

    /// Stores a code bundle (tar.gz) under its sha256, after checking the hash and that it
    /// unpacks. Returns false when it was already there.
    pub fn put_blob(&self, sha: &str, bytes: &[u8]) -> Result<bool> {
        self.put_blob_from(sha, bytes)
    }

    /// [`Store::put_blob`] from a reader: the body is streamed to a temp file in the data dir
    /// while it is hashed (memory use does not grow with its size), checked, then renamed into
    /// place. On any error, a read error of `body` included, no temp file is left.
    pub fn put_blob_from(&self, sha: &str, body: impl Read) -> Result<bool> {
        Self::check_sha(sha)?;
        let tmp = bundle::TempPath::new(self.dir.join(format!("blobs/.tmp-{sha}-{}", unique())));
        let actual = bundle::write_hashed(tmp.path(), body)?;
        if actual != sha {
            return Err(StoreError::Invalid(format!(
                "bundle hash mismatch: the URL says {sha} but the body hashes to {actual}; upload again"
            )));
        }
        if self.has_blob(sha) {
            return Ok(false);
        }
        fs::rename(tmp.path(), self.blob_path(sha)).map_err(io("store bundle"))?;
        tmp.keep();
        // Unpack now so that a broken or malicious archive is the uploader's error, not a
        // later cold start's.
        if let Err(e) = self.code_dir(sha) {
            if matches!(e, StoreError::Invalid(_)) {
                let _ = fs::remove_file(self.blob_path(sha));
            }
            return Err(e);
        }
        Ok(true)
    }

    /// The unpacked code of a bundle, unpacking it on first use (bundle.rs: nothing in it may
    /// reach outside it; readable by the sandbox and gust only).
    pub fn code_dir(&self, sha: &str) -> Result<PathBuf> {
        Self::check_sha(sha)?;
        let dest = self.dir.join("code").join(sha);
        if dest.is_dir() {
            return Ok(dest);
        }
        let blob = self.blob_path(sha);
        let file = match fs::File::open(&blob) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Invalid(format!(
                    "code bundle {sha} was not uploaded: PUT it to /_gust/v1/blobs/{sha} first (`gust deploy` does)"
                )));
            }
            Err(e) => return Err(io(format!("open bundle {sha}"))(e)),
        };
        // A private temp dir: concurrent deploys of the same bundle unpack side by side and
        // the first rename wins.
        let tmp = bundle::TempPath::new(self.dir.join(format!("code/.tmp-{sha}-{}", unique())));
        fs::create_dir(tmp.path()).map_err(io("create code dir"))?;
        fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io("create code dir"))?;
        bundle::unpack(sha, std::io::BufReader::new(file), tmp.path())?;
        bundle::restrict(tmp.path())?;
        match fs::rename(tmp.path(), &dest) {
            Ok(()) => {
                tmp.keep();
                Ok(dest)
            }
            // Another deploy unpacked the same bundle first.
            Err(_) if dest.is_dir() => Ok(dest),
            Err(e) => Err(io("install code dir")(e)),
        }
    }

    /// Records a deployment of a whole service: its functions replace the service's previous
    /// ones (functions no longer in the manifest are removed and returned). A function name
    /// owned by another service is a conflict.
    pub fn deploy_service(
        &self,
        service: &str,
        manifest: &str,
        functions: &[(FunctionSpec, String)],
    ) -> Result<(Vec<StoredFunction>, Vec<String>)> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_ms();
        for (spec, sha) in functions {
            let owner: Option<String> = tx
                .query_row(
                    "SELECT service FROM functions WHERE name = ?1",
                    [&spec.name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(owner) = owner.filter(|o| o != service) {
                return Err(StoreError::Conflict(format!(
                    "function {} belongs to service {owner}: rename it, or remove it first with `gust rm {}`",
                    spec.name, spec.name
                )));
            }
            if !self.has_blob(sha) {
                return Err(StoreError::Invalid(format!(
                    "code bundle {sha} of function {} was not uploaded: PUT it to /_gust/v1/blobs/{sha} first",
                    spec.name
                )));
            }
        }
        let old: Vec<String> = {
            let mut st = tx.prepare("SELECT name FROM functions WHERE service = ?1")?;
            st.query_map([service], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        let removed: Vec<String> = old
            .into_iter()
            .filter(|n| !functions.iter().any(|(s, _)| &s.name == n))
            .collect();
        for name in &removed {
            tx.execute("DELETE FROM functions WHERE name = ?1", [name])?;
        }
        let mut out = Vec::new();
        for (spec, sha) in functions {
            let revision: u64 = tx
                .query_row(
                    "SELECT revision FROM functions WHERE name = ?1",
                    [&spec.name],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0)
                + 1;
            let json = serde_json::to_string(spec).expect("spec serialises");
            tx.execute(
                "INSERT INTO functions (name, service, revision, spec, code_sha256, deployed_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET service = ?2, revision = ?3, spec = ?4,
                   code_sha256 = ?5, deployed_at_ms = ?6",
                params![spec.name, service, revision, json, sha, now],
            )?;
            out.push(StoredFunction {
                spec: spec.clone(),
                revision,
                code_sha256: sha.clone(),
                deployed_at_ms: now,
            });
        }
        tx.execute(
            "INSERT INTO services (name, manifest, updated_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET manifest = ?2, updated_at_ms = ?3",
            params![service, manifest, now],
        )?;
        let summary = serde_json::to_string(
            &out.iter()
                .map(|f| (&f.spec.name, f.revision, &f.code_sha256))
                .collect::<Vec<_>>(),
        )
        .expect("summary serialises");
        tx.execute(
            "INSERT INTO deployments (service, created_at_ms, manifest, functions) VALUES (?1, ?2, ?3, ?4)",
            params![service, now, manifest, summary],
        )?;
        tx.commit()?;
        Ok((out, removed))
    }

    fn row_to_function(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, u64, String, u64)> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    }

    fn decode(row: (String, u64, String, u64)) -> Result<StoredFunction> {
        let (spec, revision, code_sha256, deployed_at_ms) = row;
        let spec = serde_json::from_str(&spec)
            .map_err(|e| StoreError::Invalid(format!("stored function spec is unreadable: {e}")))?;
        Ok(StoredFunction {
            spec,
            revision,
            code_sha256,
            deployed_at_ms,
        })
    }

    pub fn functions(&self) -> Result<Vec<StoredFunction>> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT spec, revision, code_sha256, deployed_at_ms FROM functions ORDER BY service, name",
        )?;
        let rows = st
            .query_map([], Self::row_to_function)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(Self::decode).collect()
    }

    pub fn function(&self, name: &str) -> Result<Option<StoredFunction>> {
        let db = self.db();
        let row = db
            .query_row(
                "SELECT spec, revision, code_sha256, deployed_at_ms FROM functions WHERE name = ?1",
                [name],
                Self::row_to_function,
            )
            .optional()?;
        row.map(Self::decode).transpose()
    }

    /// Replaces a service's queues with `queues` (queues it no longer declares are dropped from
    /// the registry; their messages stay until purged). A queue name owned by another service
    /// is a conflict.
    pub fn set_queues(&self, service: &str, queues: &[QueueSpec]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for q in queues {
            let owner: Option<String> = tx
                .query_row(
                    "SELECT service FROM queues WHERE name = ?1",
                    [&q.name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(owner) = owner.filter(|o| o != service) {
                return Err(StoreError::Conflict(format!(
                    "queue {} belongs to service {owner}: rename it, or remove that service first",
                    q.name
                )));
            }
        }
        tx.execute("DELETE FROM queues WHERE service = ?1", [service])?;
        for q in queues {
            let spec = serde_json::to_string(q).expect("queue spec serialises");
            tx.execute(
                "INSERT INTO queues (name, service, spec) VALUES (?1, ?2, ?3)",
                params![q.name, service, spec],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn queues(&self) -> Result<Vec<QueueSpec>> {
        let db = self.db();
        let mut st = db.prepare("SELECT spec FROM queues ORDER BY name")?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.iter()
            .map(|s| {
                serde_json::from_str(s).map_err(|e| {
                    StoreError::Invalid(format!("stored queue spec is unreadable: {e}"))
                })
            })
            .collect()
    }

    pub fn queue(&self, name: &str) -> Result<Option<QueueSpec>> {
        Ok(self.queues()?.into_iter().find(|q| q.name == name))
    }

    /// Opens the durable event store (its own connections and writer thread).
    pub fn event_store(&self) -> Result<events::EventStore> {
        events::EventStore::open(&self.dir.join("gust.db"))
    }

    /// Removes one function. Returns false if there was none.
    pub fn remove_function(&self, name: &str) -> Result<bool> {
        let db = self.db();
        Ok(db.execute("DELETE FROM functions WHERE name = ?1", [name])? > 0)
    }

    /// Removes a service and its functions; returns the removed function names (None: no such service).
    pub fn remove_service(&self, service: &str) -> Result<Option<Vec<String>>> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let names: Vec<String> = {
            let mut st = tx.prepare("SELECT name FROM functions WHERE service = ?1")?;
            st.query_map([service], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        let existed = tx.execute("DELETE FROM services WHERE name = ?1", [service])? > 0;
        tx.execute("DELETE FROM functions WHERE service = ?1", [service])?;
        tx.execute("DELETE FROM queues WHERE service = ?1", [service])?;
        tx.commit()?;
        Ok((existed || !names.is_empty()).then_some(names))
    }

    /// Log lines of a function with id > `after`, oldest first; `after = None` gives the last `limit`.
    pub fn logs(&self, function: &str, after: Option<i64>, limit: usize) -> Result<Vec<StoredLog>> {
        let db = self.db();
        let map = |r: &rusqlite::Row<'_>| {
            Ok(StoredLog {
                id: r.get(0)?,
                record: LogRecord {
                    function: function.to_string(),
                    ts_ms: r.get(1)?,
                    request_id: r.get(2)?,
                    instance: r.get(3)?,
                    stream: r.get(4)?,
                    line: r.get(5)?,
                },
            })
        };
        let mut rows: Vec<StoredLog> = match after {
            Some(after) => {
                let mut st = db.prepare(
                    "SELECT id, ts_ms, request_id, instance, stream, line FROM logs
                     WHERE function = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )?;
                st.query_map(params![function, after, limit as i64], map)?
                    .collect::<rusqlite::Result<_>>()?
            }
            None => {
                let mut st = db.prepare(
                    "SELECT id, ts_ms, request_id, instance, stream, line FROM logs
                     WHERE function = ?1 ORDER BY id DESC LIMIT ?2",
                )?;
                let mut v: Vec<StoredLog> = st
                    .query_map(params![function, limit as i64], map)?
                    .collect::<rusqlite::Result<_>>()?;
                v.reverse();
                v
            }
        };
        rows.shrink_to_fit();
        Ok(rows)
    }

    /// A log sink that batches lines into SQLite on its own thread and connection, so that
    /// emitting a line on the invocation path costs a channel send; storage bounded by the
    /// default [`LogLimits`].
    pub fn log_writer(&self) -> Result<Arc<LogWriter>> {
        self.log_writer_with(LogLimits::default())
    }

    /// [`Store::log_writer`] with these bounds on stored lines.
    pub fn log_writer_with(&self, limits: LogLimits) -> Result<Arc<LogWriter>> {
        let conn = open_db(&self.dir.join("gust.db"))?;
        Ok(Arc::new(LogWriter::start(conn, limits)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gust_core::{LogSink, Runtime, Scaling};
    use sha2::{Digest, Sha256};

    fn spec(name: &str, service: &str) -> FunctionSpec {
        FunctionSpec {
            name: name.into(),
            service: service.into(),
            runtime: Runtime::Nodejs,
            handler: "index.handler".into(),
            memory_mb: 128,
            ephemeral_storage_mb: 512,
            network: Default::default(),
            allow_network: Vec::new(),
            async_config: Default::default(),
            subscriptions: Vec::new(),
            schedules: Vec::new(),
            timeout: None,
            environment: Default::default(),
            scaling: Scaling::default(),
            routes: vec![],
        }
    }

    fn bundle(files: &[(&str, &str)]) -> (String, Vec<u8>) {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, name, body.as_bytes()).unwrap();
        }
        let bytes = b.into_inner().unwrap().finish().unwrap();
        (hex::encode(Sha256::digest(&bytes)), bytes)
    }

    #[test]
    fn blobs_registry_and_logs_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("gust-store-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        // Nobody else on the host reads the database (environments, logs, events) or the code.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("gust.db")), 0o600);
        let (sha, bytes) = bundle(&[("index.js", "exports.handler = async () => 1")]);
        assert!(matches!(
            store.put_blob(&"0".repeat(64), &bytes),
            Err(StoreError::Invalid(_))
        ));
        assert!(store.put_blob(&sha, &bytes).unwrap());
        assert!(!store.put_blob(&sha, &bytes).unwrap());
        assert!(store.code_dir(&sha).unwrap().join("index.js").is_file());
        let (garbage_sha, garbage) = (hex::encode(Sha256::digest(b"nope")), b"nope".to_vec());
        assert!(matches!(
            store.put_blob(&garbage_sha, &garbage),
            Err(StoreError::Invalid(_))
        ));
        assert!(!store.has_blob(&garbage_sha));

        let (a, removed) = store
            .deploy_service(
                "s1",
                "m",
                &[
                    (spec("f", "s1"), sha.clone()),
                    (spec("g", "s1"), sha.clone()),
                ],
            )
            .unwrap();
        assert_eq!((a[0].revision, removed.len()), (1, 0));
        let (a, removed) = store
            .deploy_service("s1", "m", &[(spec("f", "s1"), sha.clone())])
            .unwrap();
        assert_eq!((a[0].revision, removed), (2, vec!["g".to_string()]));
        assert!(matches!(
            store.deploy_service("s2", "m", &[(spec("f", "s2"), sha.clone())]),
            Err(StoreError::Conflict(_))
        ));

        let w = store.log_writer().unwrap();
        for i in 0..3 {
            w.emit(LogRecord {
                function: "f".into(),
                ts_ms: i,
                request_id: None,
                instance: "i".into(),
                stream: "stdout".into(),
                line: format!("line {i}"),
            });
        }
        w.flush();
        let (token, created) = store.admin_token().unwrap();
        assert!(created);
        drop(store);

        let store = Store::open(&dir).unwrap();
        assert_eq!(store.admin_token().unwrap(), (token, false));
        let mode = fs::metadata(dir.join("admin-token")).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let fs_ = store.functions().unwrap();
        assert_eq!(fs_.len(), 1);
        assert_eq!(fs_[0].revision, 2);
        let logs = store.logs("f", None, 2).unwrap();
        assert_eq!(
            logs.iter()
                .map(|l| l.record.line.as_str())
                .collect::<Vec<_>>(),
            ["line 1", "line 2"]
        );
        let after = store.logs("f", Some(logs[0].id), 10).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(
            store.remove_service("s1").unwrap(),
            Some(vec!["f".to_string()])
        );
        assert_eq!(store.remove_service("s1").unwrap(), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_bundles_and_cut_uploads_are_the_callers_error_and_leave_nothing() {
        let dir = std::env::temp_dir().join(format!("gust-store-cut-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        assert!(dir.join(DATA_DIR_MARKER).is_file());
        let sha = "a".repeat(64);
        match store.code_dir(&sha) {
            Err(StoreError::Invalid(m)) => assert!(m.contains("was not uploaded"), "{m}"),
            other => panic!("{other:?}"),
        }
        struct Cut(usize);
        impl Read for Cut {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("client went away"));
                }
                self.0 -= 1;
                buf[0] = b'x';
                Ok(1)
            }
        }
        assert!(matches!(
            store.put_blob_from(&sha, Cut(1000)),
            Err(StoreError::Io { .. })
        ));
        assert!(matches!(
            store.put_blob_from(&sha, &b"not this"[..]),
            Err(StoreError::Invalid(_))
        ));
        let left: Vec<_> = fs::read_dir(dir.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["sha256"], "temp files left behind");
        let _ = fs::remove_dir_all(&dir);
    }
}
