//! gust-manifest: the `gust.toml` schema. Parses a manifest into `FunctionSpec`s and rejects
//! unknown fields and invalid values with the file, the line and a fix:
//! `timeout = 0 at gust.toml:7: must be 1..=900 seconds`.
//!
//! Used by the CLI (to fail before uploading anything) and by the server (which never trusts
//! what it is sent). See docs/manifest.md for every field and its default.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use gust_core::{
    AsyncConfig, Destination, FunctionSpec, QueueSpec, Route, Runtime, Scaling, ScheduleSpec,
    Subscription, valid_name,
};
use serde::Deserialize;
use toml::Spanned;

/// A parsed, validated manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub service: String,
    pub functions: Vec<ManifestFunction>,
    /// Queues the service declares (`[queues.NAME]`).
    pub queues: Vec<QueueSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManifestFunction {
    pub spec: FunctionSpec,
    /// The code directory, relative to the manifest's directory.
    pub code: String,
}

/// A manifest error: where and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Messages that start with the offending `key = value` read best with the location after it.
        match self.message.split_once(": ") {
            Some((what, fix)) if what.contains(" = ") => {
                write!(f, "{what} at {}:{}: {fix}", self.file, self.line)
            }
            _ => write!(f, "{}:{}: {}", self.file, self.line, self.message),
        }
    }
}

impl std::error::Error for ManifestError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    service: Spanned<RawService>,
    #[serde(default)]
    functions: BTreeMap<String, Spanned<RawFunction>>,
    #[serde(default)]
    queues: BTreeMap<String, Spanned<RawQueue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    visibility_timeout: Option<Spanned<i64>>,
    dead_letter_queue: Option<Spanned<String>>,
    max_backlog: Option<Spanned<i64>>,
    max_backlog_mb: Option<Spanned<i64>>,
    retention: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAsync {
    retries: Option<Spanned<i64>>,
    retry_backoff_ms: Option<Spanned<i64>>,
    max_event_age: Option<Spanned<i64>>,
    max_concurrency: Option<Spanned<i64>>,
    on_success: Option<Spanned<String>>,
    on_failure: Option<Spanned<String>>,
    dead_letter_queue: Option<Spanned<String>>,
    max_backlog: Option<Spanned<i64>>,
    max_backlog_mb: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscription {
    queue: Spanned<String>,
    batch_size: Option<Spanned<i64>>,
    batch_window: Option<Spanned<i64>>,
    max_concurrency: Option<Spanned<i64>>,
    max_receives: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    name: Option<Spanned<String>>,
    expression: Spanned<String>,
    timezone: Option<Spanned<String>>,
    input: Option<Spanned<toml::Value>>,
    flexible_window: Option<Spanned<i64>>,
    overlap: Option<Spanned<String>>,
    missed: Option<Spanned<String>>,
    retries: Option<Spanned<i64>>,
    max_event_age: Option<Spanned<i64>>,
    dead_letter_queue: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    runtime: Spanned<String>,
    handler: Option<Spanned<String>>,
    code: Option<Spanned<String>>,
    memory: Option<Spanned<i64>>,
    timeout: Option<Spanned<i64>>,
    #[serde(default)]
    environment: BTreeMap<String, Spanned<String>>,
    scaling: Option<RawScaling>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    ephemeral_storage: Option<Spanned<i64>>,
    network: Option<Spanned<String>>,
    #[serde(default)]
    allow_network: Vec<Spanned<String>>,
    #[serde(rename = "async")]
    async_config: Option<Spanned<RawAsync>>,
    #[serde(default)]
    subscriptions: Vec<Spanned<RawSubscription>>,
    #[serde(default)]
    schedules: Vec<Spanned<RawSchedule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScaling {
    max_instances: Option<Spanned<i64>>,
    min_instances: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<i64>>,
    queue_length: Option<Spanned<i64>>,
    queue_timeout: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: Option<Spanned<String>>,
    path: Spanned<String>,
}

const METHODS: &[&str] = &[
    "ANY", "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS",
];
/// Path prefixes gust itself serves; a route may not shadow them.
pub const RESERVED_PREFIXES: &[&str] = &[
    "/_gust",
    "/fn/",
    "/async/",
    "/q/",
    "/2015-03-31/",
    "/2018-06-01/",
];
/// Environment variables the platform sets; a function may not override them (Lambda's list).
const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

/// Why a handler string cannot be used, if it cannot. Lambda's rule (1-128 characters, no
/// whitespace) for every runtime; for the built-in runtimes, a path inside the code directory.
fn handler_problem(h: &str, runtime: Runtime) -> Option<&'static str> {
    if h.is_empty() || h.len() > 128 {
        return Some("must be 1-128 characters");
    }
    if h.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(
            "must not contain whitespace or control characters (a newline, a tab): remove them",
        );
    }
    if runtime != Runtime::Provided {
        if h.starts_with('/') || h.starts_with('\\') {
            return Some(
                "must be relative to the code directory, not an absolute path: e.g. \"src/index.handler\"",
            );
        }
        if h.split(['/', '\\'])
            .any(|seg| seg == ".." || seg.starts_with(".."))
        {
            return Some(
                "must not leave the code directory ('..'): move the file into the code directory",
            );
        }
    }
    None
}

/// Upper bounds of the backlog limits (events, MiB) a manifest may set.
const MAX_BACKLOG: i64 = 10_000_000;
const MAX_BACKLOG_MB: i64 = 1024 * 1024;

struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ManifestError {
        let line = self.src[..span.start.min(self.src.len())]
            .matches('\n')
            .count()
            + 1;
        ManifestError {
            file: self.file.to_string(),
            line,
            message: message.into(),
        }
    }

    fn int<T: TryFrom<i64>>(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        unit: &str,
        default: T,
    ) -> Result<T, ManifestError> {
        let Some(v) = v else { return Ok(default) };
        let n = *v.get_ref();
        if !range.contains(&n) {
            return Err(self.err(
                v.span(),
                format!(
                    "{key} = {n}: must be {}..={}{unit}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        T::try_from(n).map_err(|_| self.err(v.span(), format!("{key} = {n}: out of range")))
    }
}

/// `function:NAME`, `queue:NAME` or an http(s) URL.
fn destination(
    cx: &Ctx<'_>,
    v: &Option<Spanned<String>>,
    key: &str,
) -> Result<Option<Destination>, ManifestError> {
    let Some(v) = v else { return Ok(None) };
    match Destination::parse(v.get_ref()) {
        Some(d) => Ok(Some(d)),
        None => Err(cx.err(
            v.span(),
            format!(
                "{key} = {:?}: must be \"function:NAME\", \"queue:NAME\" or an http:// URL (https is not supported yet)",
                v.get_ref()
            ),
        )),
    }
}

fn queue_ref(
    cx: &Ctx<'_>,
    v: &Option<Spanned<String>>,
    key: &str,
) -> Result<Option<String>, ManifestError> {
    let Some(v) = v else { return Ok(None) };
    if !valid_name(v.get_ref()) {
        return Err(cx.err(
            v.span(),
            format!(
                "{key} = {:?}: a queue name must be 1-64 letters, digits, '-' or '_'",
                v.get_ref()
            ),
        ));
    }
    Ok(Some(v.get_ref().clone()))
}

/// Parses and validates a manifest. `file` names it in errors (e.g. `gust.toml`).
pub fn parse(file: &str, src: &str) -> Result<Manifest, ManifestError> {
    let cx = Ctx { file, src };
    let raw: RawManifest = toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim().to_string();
        let msg = if msg.starts_with("unknown field") {
            format!("{msg} (see docs/manifest.md for the fields gust knows)")
        } else {
            msg
        };
        cx.err(span, msg)
    })?;

    let service = raw.service.get_ref().name.get_ref().clone();
    if !valid_name(&service) {
        return Err(cx.err(
            raw.service.get_ref().name.span(),
            format!("name = {service:?}: a service name must be 1-64 letters, digits, '-' or '_'"),
        ));
    }
    if raw.functions.is_empty() {
        return Err(cx.err(
            raw.service.span(),
            "the manifest declares no function: add a [functions.NAME] table with runtime and handler",
        ));
    }

    let mut functions = Vec::new();
    let mut seen_routes: BTreeMap<(String, String), String> = BTreeMap::new();
    for (name, f) in &raw.functions {
        let fspan = f.span();
        let f = f.get_ref();
        if !valid_name(name) {
            return Err(cx.err(
                fspan,
                format!(
                    "[functions.{name}]: a function name must be 1-64 letters, digits, '-' or '_'"
                ),
            ));
        }
        let runtime = match f.runtime.get_ref().as_str() {
            "nodejs" => Runtime::Nodejs,
            "python" => Runtime::Python,
            "provided" => Runtime::Provided,
            other => {
                return Err(cx.err(
                    f.runtime.span(),
                    format!(
                        "runtime = {other:?}: must be one of \"nodejs\", \"python\", \"provided\""
                    ),
                ));
            }
        };
        let handler = match (&f.handler, runtime) {
            (Some(h), _) => {
                let hv = h.get_ref();
                if let Some(why) = handler_problem(hv, runtime) {
                    return Err(cx.err(h.span(), format!("handler = {hv:?}: {why}")));
                }
                if runtime != Runtime::Provided
                    && (!hv.contains('.') || hv.starts_with('.') || hv.ends_with('.'))
                {
                    return Err(cx.err(
                        h.span(),
                        format!(
                            "handler = {hv:?}: must be FILE.EXPORT, e.g. \"index.handler\" (file index.js, export handler)"
                        ),
                    ));
                }
                hv.clone()
            }
            (None, Runtime::Provided) => String::new(),
            (None, _) => {
                return Err(cx.err(
                    fspan,
                    format!(
                        "[functions.{name}] has no handler: add handler = \"index.handler\" (FILE.EXPORT)"
                    ),
                ));
            }
        };
        let memory_mb = cx.int(&f.memory, "memory", 128..=10240, " MB", 128u32)?;
        let ephemeral_storage_mb = cx.int(
            &f.ephemeral_storage,
            "ephemeral_storage",
            512..=10240,
            " MB",
            gust_core::DEFAULT_EPHEMERAL_STORAGE_MB,
        )?;
        let network = match &f.network {
            None => gust_core::Network::Default,
            Some(n) => match n.get_ref().as_str() {
                "default" => gust_core::Network::Default,
                "none" => gust_core::Network::None,
                other => {
                    return Err(cx.err(
                        n.span(),
                        format!(
                            "network = {other:?}: must be \"default\" (outbound access) or \"none\" (loopback only)"
                        ),
                    ));
                }
            },
        };
        let mut allow_network = Vec::new();
        for a in &f.allow_network {
            if network == gust_core::Network::None {
                return Err(cx.err(
                    a.span(),
                    "allow_network with network = \"none\": a function without a network reaches nothing; remove one of them",
                ));
            }
            allow_network.push(
                gust_core::NetAllow::parse(a.get_ref())
                    .map_err(|m| cx.err(a.span(), format!("allow_network: {m}")))?,
            );
        }
        let timeout = match &f.timeout {
            None => None,
            some => Some(cx.int(some, "timeout", 1..=900, " seconds", 3u32)?),
        };
        let mut environment = BTreeMap::new();
        let mut env_size = 0;
        for (k, v) in &f.environment {
            let ok = k.len() >= 2
                && k.as_bytes()[0].is_ascii_alphabetic()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(cx.err(
                    v.span(),
                    format!("environment key {k:?}: must match [a-zA-Z][a-zA-Z0-9_]+"),
                ));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(cx.err(
                    v.span(),
                    format!("environment key {k:?}: reserved by the platform; choose another name"),
                ));
            }
            if k.starts_with("GUST_") {
                return Err(cx.err(
                    v.span(),
                    format!(
                        "environment key {k:?}: names starting with GUST_ are gust's own (the built-in runtimes read them to reach the Runtime API and to start); choose another name"
                    ),
                ));
            }
            if v.get_ref().contains('\0') {
                return Err(cx.err(
                    v.span(),
                    format!("environment value of {k:?} contains a NUL byte: remove it"),
                ));
            }
            env_size += k.len() + v.get_ref().len();
            environment.insert(k.clone(), v.get_ref().clone());
        }
        if env_size > 4096 {
            return Err(cx.err(
                fspan,
                format!(
                    "[functions.{name}].environment is {env_size} bytes: the limit is 4 KB in all"
                ),
            ));
        }
        let d = Scaling::default();
        let scaling = match &f.scaling {
            None => d,
            Some(s) => {
                let max_instances = cx.int(
                    &s.max_instances,
                    "max_instances",
                    1..=1000,
                    "",
                    d.max_instances,
                )?;
                let min_instances = cx.int(
                    &s.min_instances,
                    "min_instances",
                    0..=1000,
                    "",
                    d.min_instances,
                )?;
                if min_instances > max_instances {
                    let span = s
                        .min_instances
                        .as_ref()
                        .map(|v| v.span())
                        .unwrap_or(fspan.clone());
                    return Err(cx.err(
                        span,
                        format!("min_instances = {min_instances}: must not exceed max_instances ({max_instances})"),
                    ));
                }
                Scaling {
                    max_instances,
                    min_instances,
                    idle_timeout: cx.int(
                        &s.idle_timeout,
                        "idle_timeout",
                        1..=86_400,
                        " seconds",
                        d.idle_timeout,
                    )?,
                    queue_length: cx.int(
                        &s.queue_length,
                        "queue_length",
                        0..=100_000,
                        "",
                        d.queue_length,
                    )?,
                    queue_timeout: cx.int(
                        &s.queue_timeout,
                        "queue_timeout",
                        0..=900,
                        " seconds",
                        d.queue_timeout,
                    )?,
                }
            }
        };
        let mut routes = Vec::new();
        for r in &f.routes {
            let rr = r.get_ref();
            let method = match &rr.method {
                None => "ANY".to_string(),
                Some(m) => {
                    let up = m.get_ref().to_ascii_uppercase();
                    if !METHODS.contains(&up.as_str()) {
                        return Err(cx.err(
                            m.span(),
                            format!(
                                "method = {:?}: must be one of {}",
                                m.get_ref(),
                                METHODS.join(", ")
                            ),
                        ));
                    }
                    up
                }
            };
            let path = rr.path.get_ref();
            if let Err(why) = check_route_path(path) {
                return Err(cx.err(rr.path.span(), format!("path = {path:?}: {why}")));
            }
            if let Some(other) =
                seen_routes.insert((method.clone(), route_shape(path)), name.clone())
            {
                return Err(cx.err(
                    r.span(),
                    format!("route {method} {path} is declared twice (also by function {other}): keep one"),
                ));
            }
            routes.push(Route {
                method,
                path: path.clone(),
            });
        }
        let max_instances = scaling.max_instances;
        let async_config = match &f.async_config {
            None => AsyncConfig::default(),
            Some(a) => {
                let a = a.get_ref();
                let d = AsyncConfig::default();
                AsyncConfig {
                    retries: cx.int(&a.retries, "retries", 0..=2, "", d.retries)?,
                    retry_backoff_ms: cx.int(
                        &a.retry_backoff_ms,
                        "retry_backoff_ms",
                        0..=3_600_000,
                        " ms",
                        d.retry_backoff_ms,
                    )?,
                    max_event_age_s: cx.int(
                        &a.max_event_age,
                        "max_event_age",
                        60..=21_600,
                        " seconds",
                        d.max_event_age_s,
                    )?,
                    max_concurrency: a
                        .max_concurrency
                        .as_ref()
                        .map(|_| {
                            cx.int(
                                &a.max_concurrency,
                                "max_concurrency",
                                1..=max_instances as i64,
                                " (at most max_instances)",
                                1u32,
                            )
                        })
                        .transpose()?,
                    on_success: destination(&cx, &a.on_success, "on_success")?,
                    on_failure: destination(&cx, &a.on_failure, "on_failure")?,
                    dead_letter_queue: queue_ref(&cx, &a.dead_letter_queue, "dead_letter_queue")?,
                    max_backlog: cx.int(
                        &a.max_backlog,
                        "max_backlog",
                        1..=MAX_BACKLOG,
                        " events",
                        d.max_backlog,
                    )?,
                    max_backlog_bytes: cx.int(
                        &a.max_backlog_mb,
                        "max_backlog_mb",
                        1..=MAX_BACKLOG_MB,
                        " MiB",
                        d.max_backlog_bytes >> 20,
                    )? << 20,
                }
            }
        };
        let mut subscriptions = Vec::new();
        for sub in &f.subscriptions {
            let s = sub.get_ref();
            let queue = queue_ref(&cx, &Some(s.queue.clone()), "queue")?.unwrap_or_default();
            let batch_size = cx.int(&s.batch_size, "batch_size", 1..=10_000, "", 10u32)?;
            let batch_window_s =
                cx.int(&s.batch_window, "batch_window", 0..=300, " seconds", 0u64)?;
            if batch_size > 10 && batch_window_s == 0 {
                return Err(cx.err(
                    sub.span(),
                    format!("batch_size = {batch_size}: a batch larger than 10 needs batch_window >= 1 second (as on Lambda)"),
                ));
            }
            subscriptions.push(Subscription {
                queue,
                batch_size,
                batch_window_ms: batch_window_s * 1000,
                max_concurrency: s
                    .max_concurrency
                    .as_ref()
                    .map(|_| cx.int(&s.max_concurrency, "max_concurrency", 1..=1000, "", 1u32))
                    .transpose()?,
                max_receives: cx.int(&s.max_receives, "max_receives", 1..=1000, "", 5u32)?,
            });
        }
        let mut schedules = Vec::new();
        for (i, sch) in f.schedules.iter().enumerate() {
            let s = sch.get_ref();
            let local = match &s.name {
                Some(n) if valid_name(n.get_ref()) => n.get_ref().clone(),
                Some(n) => {
                    return Err(cx.err(
                        n.span(),
                        format!(
                            "name = {:?}: a schedule name must be 1-64 letters, digits, '-' or '_'",
                            n.get_ref()
                        ),
                    ));
                }
                None => i.to_string(),
            };
            let expression = s.expression.get_ref().trim().to_string();
            let timezone = s.timezone.as_ref().map(|t| t.get_ref().clone());
            if let Err(e) = gust_core::schedule::Schedule::parse(&expression, timezone.as_deref()) {
                let span = match (&s.timezone, e.contains("time zone")) {
                    (Some(t), true) => t.span(),
                    _ => s.expression.span(),
                };
                return Err(cx.err(span, e));
            }
            let choice = |v: &Option<Spanned<String>>,
                          key: &str,
                          a: &str,
                          b: &str|
             -> Result<bool, ManifestError> {
                match v {
                    None => Ok(true),
                    Some(x) if x.get_ref() == a => Ok(true),
                    Some(x) if x.get_ref() == b => Ok(false),
                    Some(x) => Err(cx.err(
                        x.span(),
                        format!("{key} = {:?}: must be \"{a}\" or \"{b}\"", x.get_ref()),
                    )),
                }
            };
            let input = match &s.input {
                None => None,
                Some(v) => Some(
                    serde_json::to_string(v.get_ref())
                        .map_err(|e| cx.err(v.span(), format!("input: {e}")))?,
                ),
            };
            schedules.push(ScheduleSpec {
                name: format!("{name}.{local}"),
                expression,
                timezone,
                input,
                flexible_window_min: cx.int(
                    &s.flexible_window,
                    "flexible_window",
                    0..=1440,
                    " minutes",
                    0u32,
                )?,
                allow_overlap: choice(&s.overlap, "overlap", "allow", "skip")?,
                catch_up: !choice(&s.missed, "missed", "skip", "run_once")?,
                retries: cx.int(&s.retries, "retries", 0..=185, "", 185u32)?,
                max_event_age_s: cx.int(
                    &s.max_event_age,
                    "max_event_age",
                    60..=86_400,
                    " seconds",
                    86_400u64,
                )?,
                dead_letter_queue: queue_ref(&cx, &s.dead_letter_queue, "dead_letter_queue")?,
            });
        }
        let code = f
            .code
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_else(|| ".".into());
        functions.push(ManifestFunction {
            spec: FunctionSpec {
                name: name.clone(),
                service: service.clone(),
                runtime,
                handler,
                memory_mb,
                timeout,
                environment,
                scaling,
                routes,
                ephemeral_storage_mb,
                network,
                allow_network,
                async_config,
                subscriptions,
                schedules,
            },
            code,
        });
    }
    let mut queues = Vec::new();
    for (name, q) in &raw.queues {
        if !valid_name(name) {
            return Err(cx.err(
                q.span(),
                format!("[queues.{name}]: a queue name must be 1-64 letters, digits, '-' or '_'"),
            ));
        }
        let r = q.get_ref();
        queues.push(QueueSpec {
            name: name.clone(),
            service: service.clone(),
            visibility_timeout_ms: cx.int(
                &r.visibility_timeout,
                "visibility_timeout",
                1..=43_200,
                " seconds",
                30u64,
            )? * 1000,
            dead_letter_queue: queue_ref(&cx, &r.dead_letter_queue, "dead_letter_queue")?,
            max_backlog: cx.int(
                &r.max_backlog,
                "max_backlog",
                1..=MAX_BACKLOG,
                " messages",
                gust_core::DEFAULT_MAX_BACKLOG,
            )?,
            max_backlog_bytes: cx.int(
                &r.max_backlog_mb,
                "max_backlog_mb",
                1..=MAX_BACKLOG_MB,
                " MiB",
                gust_core::DEFAULT_MAX_BACKLOG_BYTES >> 20,
            )? << 20,
            retention_ms: cx.int(
                &r.retention,
                "retention",
                1..=1_209_600,
                " seconds (14 days)",
                gust_core::DEFAULT_RETENTION_MS / 1000,
            )? * 1000,
        });
    }
    Ok(Manifest {
        service,
        functions,
        queues,
    })
}

/// A route's shape: parameter names replaced, so `/users/{id}` and `/users/{uid}` compare equal.
pub fn route_shape(path: &str) -> String {
    path.split('/')
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(p) if p.ends_with('+') => "{+}",
                Some(_) => "{}",
                None => seg,
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

/// A route path: starts with `/`, segments are literals, `{name}`, or a final `{name+}`; it must
/// not shadow a path gust serves itself.
pub fn check_route_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if let Some(p) = RESERVED_PREFIXES
        .iter()
        .find(|p| path.starts_with(*p) || path == p.trim_end_matches('/'))
    {
        return Err(format!(
            "paths under {p} are reserved by gust; choose another prefix"
        ));
    }
    if path == "/" {
        return Ok(());
    }
    let segs: Vec<&str> = path[1..].split('/').collect();
    let mut names = Vec::new();
    for (i, seg) in segs.iter().enumerate() {
        if seg.is_empty() {
            return Err("empty segment ('//' or a trailing '/'): remove it".into());
        }
        if let Some(inner) = seg.strip_prefix('{') {
            let Some(inner) = inner.strip_suffix('}') else {
                return Err(format!("segment {seg:?} opens '{{' without closing it"));
            };
            let (pname, greedy) = match inner.strip_suffix('+') {
                Some(n) => (n, true),
                None => (inner, false),
            };
            if pname.is_empty()
                || !pname
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!(
                    "parameter {seg:?} must be {{name}} or {{name+}} with a name of letters, digits or '_'"
                ));
            }
            if greedy && i + 1 != segs.len() {
                return Err(format!("greedy parameter {seg:?} must be the last segment"));
            }
            if names.contains(&pname) {
                return Err(format!(
                    "parameter {pname:?} appears twice: give each a distinct name"
                ));
            }
            names.push(pname);
        } else if seg.contains('{') || seg.contains('}') {
            return Err(format!(
                "segment {seg:?}: a parameter must be a whole segment, like /users/{{id}}"
            ));
        } else if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b))
        {
            return Err(format!(
                "segment {seg:?} has characters a request path cannot match literally (use letters, digits and -._~)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[service]
name = "demo"

[functions.hello]
runtime = "nodejs"
handler = "index.handler"
code = "hello"
memory = 256
timeout = 10
environment = { GREETING = "hi" }
routes = [{ method = "get", path = "/hello/{name}" }, { path = "/files/{proxy+}" }]

[functions.hello.scaling]
max_instances = 4
min_instances = 1

[functions.bin]
runtime = "provided"
"#;

    #[test]
    fn parses_a_full_manifest_with_defaults() {
        let m = parse("gust.toml", GOOD).unwrap();
        assert_eq!(m.service, "demo");
        let bin = &m.functions[0];
        assert_eq!(bin.spec.name, "bin");
        assert_eq!(bin.spec.memory_mb, 128);
        assert_eq!(bin.spec.timeout, None);
        assert_eq!(bin.code, ".");
        assert_eq!(bin.spec.scaling, Scaling::default());
        let h = &m.functions[1].spec;
        assert_eq!((h.memory_mb, h.timeout), (256, Some(10)));
        assert_eq!(h.scaling.max_instances, 4);
        assert_eq!(h.scaling.min_instances, 1);
        assert_eq!(h.scaling.queue_length, 100);
        assert_eq!(
            h.routes[0],
            Route {
                method: "GET".into(),
                path: "/hello/{name}".into()
            }
        );
        assert_eq!(h.routes[1].method, "ANY");
        assert_eq!(h.environment["GREETING"], "hi");
    }

    fn err(src: &str) -> String {
        parse("gust.toml", src).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_fix() {
        let src = "[service]\nname = \"s\"\n\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\ntimeout = 0\n";
        assert_eq!(
            err(src),
            "timeout = 0 at gust.toml:7: must be 1..=900 seconds"
        );

        let src = "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"index.handler\"\nmemory = 64\n";
        assert_eq!(
            err(src),
            "memory = 64 at gust.toml:6: must be 128..=10240 MB"
        );

        let src = "[service]\nname = \"s\"\n[functions.f]\nruntime = \"ruby\"\nhandler = \"a.b\"\n";
        assert_eq!(
            err(src),
            "runtime = \"ruby\" at gust.toml:4: must be one of \"nodejs\", \"python\", \"provided\""
        );

        let src = "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\ntimout = 3\n";
        let e = err(src);
        assert!(e.starts_with("gust.toml:6: unknown field `timout`"), "{e}");

        let src =
            "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"index\"\n";
        assert!(err(src).starts_with("handler = \"index\" at gust.toml:5: must be FILE.EXPORT"));

        let src = "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\nroutes = [{ path = \"/a/{rest+}/b\" }]\n";
        assert!(err(src).contains("gust.toml:6"), "{}", err(src));

        let src = "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\n[functions.f.scaling]\nmax_instances = 2\nmin_instances = 3\n";
        assert_eq!(
            err(src),
            "min_instances = 3 at gust.toml:8: must not exceed max_instances (2)"
        );

        let src = "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\nenvironment = { AWS_REGION = \"x\" }\n";
        assert!(err(src).contains("reserved by the platform"));

        assert!(err("[service]\nname = \"s\"\n").contains("declares no function"));

        let with_handler = |rt: &str, h: &str| {
            format!("[service]\nname = \"s\"\n[functions.f]\nruntime = \"{rt}\"\nhandler = {h}\n")
        };
        assert_eq!(
            err(&with_handler("nodejs", "\"/etc/passwd.handler\"")),
            "handler = \"/etc/passwd.handler\" at gust.toml:5: must be relative to the code directory, not an absolute path: e.g. \"src/index.handler\""
        );
        assert_eq!(
            err(&with_handler("python", "\"../other/app.handler\"")),
            "handler = \"../other/app.handler\" at gust.toml:5: must not leave the code directory ('..'): move the file into the code directory"
        );
        assert_eq!(
            err(&with_handler("nodejs", "\"index.handler\\nrm -rf /\"")),
            "handler = \"index.handler\\nrm -rf /\" at gust.toml:5: must not contain whitespace or control characters (a newline, a tab): remove them"
        );
        assert_eq!(
            err(&with_handler("provided", "\"\"\"\nfoo\nbar\"\"\"")),
            "handler = \"foo\\nbar\" at gust.toml:5: must not contain whitespace or control characters (a newline, a tab): remove them"
        );
        assert!(
            err(&with_handler(
                "nodejs",
                &format!("\"{}.handler\"", "a".repeat(130))
            ))
            .ends_with("must be 1-128 characters")
        );
        // provided: the handler is the bootstrap's business (_HANDLER); a path is fine.
        assert!(parse("gust.toml", &with_handler("provided", "\"/opt/thing\"")).is_ok());
        assert!(
            parse(
                "gust.toml",
                &with_handler("nodejs", "\"src/index.handler\"")
            )
            .is_ok()
        );

        let src = "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\n[functions.f.environment]\nOK = \"1\"\nGUST_PREWARM = \"1\"\n";
        assert_eq!(
            err(src),
            "gust.toml:8: environment key \"GUST_PREWARM\": names starting with GUST_ are gust's own (the built-in runtimes read them to reach the Runtime API and to start); choose another name"
        );
        for k in [
            "AWS_LAMBDA_RUNTIME_API",
            "LAMBDA_TASK_ROOT",
            "AWS_SESSION_TOKEN",
        ] {
            let src = format!(
                "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\n[functions.f.environment]\n{k} = \"x\"\n"
            );
            assert_eq!(
                err(&src),
                format!(
                    "gust.toml:7: environment key {k:?}: reserved by the platform; choose another name"
                )
            );
        }
        // Lambda lets functions set these (they change only the function's own process); so
        // does gust (they make cold starts skip the pre-warmed pool).
        let src = "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\n[functions.f.environment]\nNODE_OPTIONS = \"--enable-source-maps\"\nPATH = \"/var/task/bin:/usr/bin:/bin\"\nLD_LIBRARY_PATH = \"/var/task/lib\"\nPYTHONPATH = \"/var/task/lib\"\n";
        assert!(parse("gust.toml", src).is_ok());
        assert!(err("[service\n").starts_with("gust.toml:1:"));
    }

    #[test]
    fn out_of_range_schedules_are_refused_with_the_line() {
        let with = |expr: &str| {
            format!(
                "[service]\nname = \"s\"\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\n\n[[functions.f.schedules]]\nexpression = \"{expr}\"\n"
            )
        };
        assert_eq!(
            err(&with("rate(18446744073709551615 days)")),
            "gust.toml:8: \"rate(18446744073709551615 days)\": the longest rate is 3650 days (10 years): use at most rate(3650 days), or at(...) for a one-time run"
        );
        assert_eq!(
            err(&with("rate(9223372036854775807 minutes)")),
            "gust.toml:8: \"rate(9223372036854775807 minutes)\": the longest rate is 3650 days (10 years): use at most rate(5256000 minutes), or at(...) for a one-time run"
        );
        assert!(err(&with("rate(4294967296 days)")).starts_with("gust.toml:8: "));
        assert_eq!(
            err(&with("at(2200-01-01T00:00:00)")),
            "gust.toml:8: \"at(2200-01-01T00:00:00)\": the year must be 1970..=2199 (UTC)"
        );
        assert!(parse("gust.toml", &with("rate(3650 days)")).is_ok());
    }

    #[test]
    fn route_paths() {
        assert!(check_route_path("/a/{b}/{c+}").is_ok());
        assert!(check_route_path("/").is_ok());
        assert!(check_route_path("a").is_err());
        assert!(check_route_path("/_gust/x").is_err());
        assert!(check_route_path("/fn/x").is_err());
        assert!(check_route_path("/a/x{b}").is_err());
        assert!(check_route_path("/a/{b+}/c").is_err());
        assert!(check_route_path("/a//b").is_err());
        assert!(check_route_path("/a/").is_err());
        assert!(check_route_path("/{id}/{id}").is_err());
        assert!(check_route_path("/a b").is_err());
        assert!(check_route_path("/a%20b").is_err());
        assert_eq!(route_shape("/u/{id}/{rest+}"), route_shape("/u/{x}/{y+}"));
    }

    #[test]
    fn backlog_limits_and_retention_have_defaults_and_ranges() {
        let src = |q: &str, a: &str| {
            format!(
                "[service]\nname = \"s\"\n[queues.q]\n{q}\n[functions.f]\nruntime = \"nodejs\"\nhandler = \"a.b\"\n[functions.f.async]\n{a}\n"
            )
        };
        let m = parse("gust.toml", &src("", "")).unwrap();
        let (q, a) = (&m.queues[0], &m.functions[0].spec.async_config);
        assert_eq!(
            (q.max_backlog, q.max_backlog_bytes, q.retention_ms),
            (10_000, 256 << 20, 4 * 24 * 3600 * 1000)
        );
        assert_eq!((a.max_backlog, a.max_backlog_bytes), (10_000, 256 << 20));
        let m = parse(
            "gust.toml",
            &src(
                "max_backlog = 5\nmax_backlog_mb = 1\nretention = 60",
                "max_backlog = 7\nmax_backlog_mb = 2",
            ),
        )
        .unwrap();
        let (q, a) = (&m.queues[0], &m.functions[0].spec.async_config);
        assert_eq!(
            (q.max_backlog, q.max_backlog_bytes, q.retention_ms),
            (5, 1 << 20, 60_000)
        );
        assert_eq!((a.max_backlog, a.max_backlog_bytes), (7, 2 << 20));
        assert_eq!(
            err(&src("retention = 0", "")),
            "retention = 0 at gust.toml:4: must be 1..=1209600 seconds (14 days)"
        );
        assert!(err(&src("", "max_backlog = 0")).ends_with("must be 1..=10000000 events"));
        assert!(err(&src("max_backlog_mb = -1", "")).contains("max_backlog_mb = -1"));
    }
}
