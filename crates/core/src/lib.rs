//! gust-core: the domain types every gust crate shares — function specs, invocations and their
//! outcomes, the error classes, and the traits at the seams (`Invoker`, `Executor`, `Instance`,
//! `LogSink`). It does no I/O and depends on no networking, database or engine crate, so that the
//! gateway, the pools, the executors and the triggers can be tested and swapped independently.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub mod lambda;
pub mod lograte;
pub mod schedule;
pub mod time;

/// A boxed future, the return type of the seam traits (they are used as `Arc<dyn Trait>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The buffered request and response limit of the Runtime API and the Invoke API:
/// 6 MiB + 100 bytes, as the Lambda Runtime Interface Emulator enforces it.
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024 + 100;
/// Lambda's on-demand init phase limit.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout used when neither the manifest nor the function's own config sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// The version every invocation reports until versions and aliases exist.
pub const LATEST: &str = "$LATEST";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Nodejs,
    Python,
    Provided,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Nodejs => "nodejs",
            Runtime::Python => "python",
            Runtime::Provided => "provided",
        }
    }
    /// The value of `AWS_EXECUTION_ENV` (not set for `provided`, as on Lambda).
    pub fn execution_env(self) -> Option<&'static str> {
        match self {
            Runtime::Nodejs => Some("AWS_Lambda_nodejs20.x"),
            Runtime::Python => Some("AWS_Lambda_python3.11"),
            Runtime::Provided => None,
        }
    }
}

/// Scaling settings of one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scaling {
    pub max_instances: u32,
    pub min_instances: u32,
    /// Seconds an instance may stay idle before it is stopped.
    pub idle_timeout: u64,
    /// Requests that may wait when every instance is busy and no more may start.
    pub queue_length: u32,
    /// Seconds a request may wait in that queue.
    pub queue_timeout: u64,
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            max_instances: 10,
            min_instances: 0,
            idle_timeout: 600,
            queue_length: 100,
            queue_timeout: 10,
        }
    }
}

/// An HTTP route of a function: `GET /users/{id}`, `ANY /files/{proxy+}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub method: String,
    pub path: String,
}

/// Everything a deployed function is, except its code bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSpec {
    pub name: String,
    pub service: String,
    pub runtime: Runtime,
    pub handler: String,
    pub memory_mb: u32,
    /// Seconds; `None` when the manifest is silent (then the function's own config, else 3 s).
    pub timeout: Option<u32>,
    pub environment: BTreeMap<String, String>,
    pub scaling: Scaling,
    pub routes: Vec<Route>,
    /// Size of the instance's private `/tmp` in MB.
    #[serde(default = "default_ephemeral_storage")]
    pub ephemeral_storage_mb: u32,
    #[serde(default)]
    pub network: Network,
    /// Private destinations this function's instances may reach besides the internet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_network: Vec<NetAllow>,
    /// How asynchronous invocations of this function are delivered and retried.
    #[serde(default)]
    pub async_config: AsyncConfig,
    /// Queues this function consumes (event source mappings).
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
    /// Schedules that invoke this function.
    #[serde(default)]
    pub schedules: Vec<ScheduleSpec>,
}

/// Where an invocation record goes after an async invocation: another function (invoked
/// asynchronously), a queue, or an HTTP(S) URL (POSTed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Destination {
    Function(String),
    Queue(String),
    Url(String),
}

impl Destination {
    /// `function:NAME`, `queue:NAME`, or an `http://` URL.
    pub fn parse(s: &str) -> Option<Destination> {
        if let Some(n) = s.strip_prefix("function:") {
            return (!n.is_empty()).then(|| Destination::Function(n.into()));
        }
        if let Some(n) = s.strip_prefix("queue:") {
            return (!n.is_empty()).then(|| Destination::Queue(n.into()));
        }
        // https needs TLS in gust's HTTP client: not yet.
        s.starts_with("http://").then(|| Destination::Url(s.into()))
    }
}

/// Lambda's `FunctionEventInvokeConfig`, with the backoff base configurable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AsyncConfig {
    /// Retries after a function error: 0..=2 (Lambda's default 2).
    pub retries: u32,
    /// Wait before the first retry; doubles for each next one, with jitter (Lambda: ~1 min, 2 min).
    pub retry_backoff_ms: u64,
    /// Events older than this are not tried again (60 s ..= 6 h).
    pub max_event_age_s: u64,
    /// How many instances async deliveries may use at once; None = half of max_instances
    /// (the rest stays for synchronous callers).
    pub max_concurrency: Option<u32>,
    pub on_success: Option<Destination>,
    pub on_failure: Option<Destination>,
    /// A queue that receives the event itself when every attempt failed.
    pub dead_letter_queue: Option<String>,
    /// Most events waiting or running at once (the backlog); more are refused with 429.
    pub max_backlog: u64,
    /// Most payload bytes in the backlog; more are refused with 429.
    pub max_backlog_bytes: u64,
}

/// Default backlog bound of a function's async events or of a queue, in events.
pub const DEFAULT_MAX_BACKLOG: u64 = 10_000;
/// Default backlog bound of a function's async events or of a queue, in payload bytes (256 MiB).
pub const DEFAULT_MAX_BACKLOG_BYTES: u64 = 256 * 1024 * 1024;
/// Default queue message retention (SQS's default `MessageRetentionPeriod`, 4 days), ms.
pub const DEFAULT_RETENTION_MS: u64 = 4 * 24 * 3600 * 1000;

fn default_max_backlog() -> u64 {
    DEFAULT_MAX_BACKLOG
}

fn default_max_backlog_bytes() -> u64 {
    DEFAULT_MAX_BACKLOG_BYTES
}

fn default_retention_ms() -> u64 {
    DEFAULT_RETENTION_MS
}

impl Default for AsyncConfig {
    fn default() -> Self {
        AsyncConfig {
            retries: 2,
            retry_backoff_ms: 60_000,
            max_event_age_s: 21_600,
            max_concurrency: None,
            on_success: None,
            on_failure: None,
            dead_letter_queue: None,
            max_backlog: DEFAULT_MAX_BACKLOG,
            max_backlog_bytes: DEFAULT_MAX_BACKLOG_BYTES,
        }
    }
}

/// A function consuming a queue in batches (an SQS event source mapping).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub queue: String,
    /// 1..=10,000 (default 10).
    pub batch_size: u32,
    /// How long to gather a batch, ms (0..=300 s).
    pub batch_window_ms: u64,
    /// Batches in flight at once (default: half of max_instances, at least 1).
    pub max_concurrency: Option<u32>,
    /// Receives before a message goes to the queue's dead-letter queue.
    pub max_receives: u32,
}

/// A queue declared in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSpec {
    pub name: String,
    pub service: String,
    /// How long a received message stays invisible, ms (default 30 s).
    pub visibility_timeout_ms: u64,
    pub dead_letter_queue: Option<String>,
    /// Most messages waiting or in flight; more are refused with 429.
    #[serde(default = "default_max_backlog")]
    pub max_backlog: u64,
    /// Most message bytes waiting or in flight; more are refused with 429.
    #[serde(default = "default_max_backlog_bytes")]
    pub max_backlog_bytes: u64,
    /// A waiting message older than this (since it was sent) is deleted, ms (SQS's
    /// `MessageRetentionPeriod`).
    #[serde(default = "default_retention_ms")]
    pub retention_ms: u64,
}

/// A schedule that invokes its function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// Unique across the platform: `FUNCTION.NAME` (NAME defaults to the index).
    pub name: String,
    /// `rate(5 minutes)`, `cron(0 12 * * ? *)`, `0 12 * * *`, `at(2026-12-01T09:00:00)`.
    pub expression: String,
    /// IANA time zone for cron and at (default UTC).
    pub timezone: Option<String>,
    /// The payload (JSON text); None = the EventBridge scheduled-event shape.
    pub input: Option<String>,
    /// Fire at a random point up to this many minutes after the slot (0 = exactly).
    pub flexible_window_min: u32,
    /// false: a slot is skipped while the previous run is still running.
    pub allow_overlap: bool,
    /// After downtime: false skips missed slots, true runs once for them.
    pub catch_up: bool,
    pub retries: u32,
    pub max_event_age_s: u64,
    pub dead_letter_queue: Option<String>,
}

/// Default `ephemeral_storage` (Lambda's default, 512 MB).
pub const DEFAULT_EPHEMERAL_STORAGE_MB: u32 = 512;

fn default_ephemeral_storage() -> u32 {
    DEFAULT_EPHEMERAL_STORAGE_MB
}

/// An instance's network: the host's (outbound access), or none but its own loopback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    Default,
    None,
}

/// A destination a function may reach although it is private (`allow_network`): a host name
/// or IPv4 address, and one port or every port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAllow {
    pub host: String,
    pub port: Option<u16>,
}

impl NetAllow {
    /// `HOST`, `HOST:PORT`, `IPV4`, `IPV4:PORT`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<NetAllow, String> {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{s:?}: the port must be 1-65535"))?;
                (h, Some(port))
            }
            None => (s, None),
        };
        if host.contains(':') || host.starts_with('[') {
            return Err(format!(
                "{s:?}: IPv6 destinations are not supported (instances have IPv4 only)"
            ));
        }
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid_name {
            return Err(format!(
                "{s:?}: expected a host name or IPv4 address, optionally with :PORT (\"10.0.0.5:5432\", \"db.internal\")"
            ));
        }
        Ok(NetAllow {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// One deployed version of a function: its spec, where its unpacked code lives, its code hash.
#[derive(Debug, Clone)]
pub struct FunctionVersion {
    pub spec: FunctionSpec,
    /// Monotonic deployment counter of this function (1, 2, …).
    pub revision: u64,
    pub code_sha256: String,
    pub code_dir: PathBuf,
}

impl FunctionVersion {
    pub fn arn(&self) -> String {
        lambda::function_arn(&self.spec.name)
    }
}

/// What a caller asks of a function.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub payload: Bytes,
    pub content_type: Option<String>,
    /// Decoded client context JSON (the Invoke API's `X-Amz-Client-Context`, base64-decoded).
    pub client_context: Option<String>,
    pub trace_id: Option<String>,
    /// Return the tail of this invocation's log (`X-Amz-Log-Type: Tail`).
    pub tail_log: bool,
    /// The request id the function sees; None = a new one. Async events keep theirs across
    /// attempts, so handlers can be idempotent.
    pub request_id: Option<String>,
}

/// The result of an invocation that reached a function.
#[derive(Debug, Clone)]
pub struct InvokeResult {
    pub request_id: String,
    pub outcome: Outcome,
    pub executed_version: String,
    /// The last 4 KB of the invocation's log, when asked for.
    pub log_tail: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The function returned: its response bytes.
    Response {
        body: Bytes,
        content_type: Option<String>,
    },
    /// The function failed (error, timeout, crash, init failure): the Lambda error JSON.
    FunctionError { error_type: String, body: Bytes },
}

impl Outcome {
    pub fn function_error(error_type: &str, message: &str) -> Outcome {
        Outcome::FunctionError {
            error_type: error_type.to_string(),
            body: lambda::error_body(error_type, message),
        }
    }
    pub fn is_error(&self) -> bool {
        matches!(self, Outcome::FunctionError { .. })
    }
}

/// Why an invocation did not reach a function. Function errors are not here: they are an
/// `Outcome`. Each variant has one owner (see `ErrorClass`).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum InvokeError {
    #[error("Function not found: {0}")]
    NotFound(String),
    #[error("{message}")]
    Throttled {
        message: String,
        retry_after_secs: u64,
    },
    #[error("request payload of {0} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    PayloadTooLarge(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("platform error: {0}")]
    Platform(String),
}

/// Who is at fault for an error: decides between 4xx, the function-error contract, and 5xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Caller,
    Function,
    Platform,
}

impl InvokeError {
    pub fn class(&self) -> ErrorClass {
        match self {
            InvokeError::NotFound(_)
            | InvokeError::Throttled { .. }
            | InvokeError::PayloadTooLarge(_) => ErrorClass::Caller,
            InvokeError::ShuttingDown | InvokeError::Platform(_) => ErrorClass::Platform,
        }
    }
}

/// What the gateway and every trigger call to run a function. The pools implement it; later a
/// cluster-aware invoker routes to the node that holds warm instances.
pub trait Invoker: Send + Sync {
    fn invoke<'a>(
        &'a self,
        function: &'a str,
        invocation: Invocation,
    ) -> BoxFuture<'a, Result<InvokeResult, InvokeError>>;
}

/// One invocation handed to one instance.
#[derive(Debug, Clone)]
pub struct InstanceRequest {
    pub request_id: String,
    pub invocation: Invocation,
    pub timeout: Duration,
}

/// How an instance ended an invocation. Anything but `Done` leaves the instance dead.
#[derive(Debug)]
pub enum InstanceOutcome {
    Done {
        outcome: Outcome,
        log_tail: Option<String>,
    },
    /// The function did not answer in time; the instance was killed.
    TimedOut { log_tail: Option<String> },
    /// The runtime process exited during the invocation.
    Crashed {
        detail: String,
        log_tail: Option<String>,
    },
    /// The instance went over its memory limit and was killed (the detail names the function
    /// and its limit).
    OutOfMemory {
        detail: String,
        log_tail: Option<String>,
    },
    /// The runtime process had exited before it took the invocation: nothing ran, so the
    /// invocation may be retried on another instance.
    Unavailable,
}

/// A running instance: serves one invocation at a time (the pool guarantees it).
pub trait Instance: Send + Sync {
    fn id(&self) -> &str;
    fn invoke(&self, request: InstanceRequest) -> BoxFuture<'_, InstanceOutcome>;
    /// Whether the instance can take another invocation (its process is alive).
    fn is_alive(&self) -> bool;
    /// The timeout the function's own code asked for (the plain-module `config.timeout`).
    fn config_timeout(&self) -> Option<Duration>;
    /// Stop: SIGTERM, a bounded grace period, then SIGKILL of the whole process tree.
    fn stop(&self) -> BoxFuture<'_, ()>;
    /// Kill immediately.
    fn kill(&self);
}

/// Why an instance could not start.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct InitError {
    pub error_type: String,
    pub message: String,
    /// The Lambda error JSON to return to the invoker.
    pub body: Bytes,
}

impl InitError {
    pub fn new(error_type: &str, message: impl Into<String>) -> InitError {
        let message = message.into();
        InitError {
            body: lambda::error_body(error_type, &message),
            error_type: error_type.to_string(),
            message,
        }
    }
}

/// Creates instances of a function: the process executor today, a wasm executor later.
pub trait Executor: Send + Sync {
    /// Start an instance and resolve when its runtime is ready for the first invocation.
    fn start(
        &self,
        function: Arc<FunctionVersion>,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, InitError>>;

    /// Releases what the executor holds beyond instances (pre-warmed sandboxes, cgroups),
    /// after every instance was stopped.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// One line of a function's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    pub function: String,
    pub ts_ms: u64,
    pub request_id: Option<String>,
    pub instance: String,
    /// `stdout`, `stderr` or `platform` (START, END, REPORT and platform notices).
    pub stream: String,
    pub line: String,
}

/// The longest log line kept (bytes): a longer one keeps its start and a marker, within it.
pub const MAX_LOG_LINE: usize = 64 * 1024;

/// Room kept for the marker of a truncated line (the longest is 59 bytes).
const MARKER_ROOM: usize = 64;

/// If `line` is longer than [`MAX_LOG_LINE`] or lost `dropped` bytes already, cuts it (at a
/// character boundary) and ends it with ` [gust: line truncated, N bytes dropped]`, all within
/// [`MAX_LOG_LINE`] bytes.
pub fn truncate_log_line(line: &mut String, dropped: u64) {
    if line.len() <= MAX_LOG_LINE && dropped == 0 {
        return;
    }
    let mut cut = line.len().min(MAX_LOG_LINE - MARKER_ROOM);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = dropped + (line.len() - cut) as u64;
    if dropped > 0 {
        line.truncate(cut);
        line.push_str(&format!(" [gust: line truncated, {dropped} bytes dropped]"));
    }
}

/// Where log lines go (the store's batching writer). Must not block.
pub trait LogSink: Send + Sync {
    fn emit(&self, record: LogRecord);
    /// True while the sink is behind: producers that can wait (an instance's output capture)
    /// stop reading until it catches up, so the function's writes block instead of lines
    /// being dropped.
    fn congested(&self) -> bool {
        false
    }
}

/// A sink that drops everything (for tests and tools that don't keep logs).
pub struct NullLogSink;
impl LogSink for NullLogSink {
    fn emit(&self, _record: LogRecord) {}
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Validates a function or service name: 1–64 of `[A-Za-z0-9_-]` (Lambda's function-name rule,
/// minus the dot, which URLs and handler strings make ambiguous).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
