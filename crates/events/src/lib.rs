//! gust-events: everything that invokes functions without a caller waiting — asynchronous
//! invocations, queues consumed in batches (event source mappings) and schedules — on top of
//! the durable event store (`gust_store::events`) and the same `Invoker` the gateway uses.
//!
//! - An accepted event is on disk before the caller hears 202 (group commit in the store's
//!   writer thread); it runs at least once, with its id as the request id the function sees.
//! - Async delivery per function uses at most `async.max_concurrency` instances (default half
//!   of `max_instances`): the other half stays for synchronous callers (a reserved lane).
//! - Policy (retries, backoff, partial batches) is pure (`policy.rs`); the loops here carry it
//!   out. Schedules' next fire times are persisted, and each slot's event has a deterministic id,
//!   so a slot fires once even across restarts.

mod http;
pub mod outbound;
pub mod policy;

pub use outbound::Outbound;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gust_core::schedule::Schedule;
use gust_core::{
    Destination, FunctionSpec, FunctionVersion, Invocation, InvokeError, Invoker, Outcome,
    QueueSpec, ScheduleSpec, now_ms,
};
use gust_store::Store;
use gust_store::events::{Backlog, Counts, Event, EventStore, Kind, Limit, NewEvent, Settle};
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};

use crate::policy::{Attempt, Decision, RetryPolicy, decide};

/// Largest async payload or queue message accepted (Lambda async: 1 MB).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Finds a deployed function by name (the live pools: no database read per event).
pub type Lookup = Arc<dyn Fn(&str) -> Option<Arc<FunctionVersion>> + Send + Sync>;

#[derive(Debug)]
pub enum EnqueueError {
    NotFound(String),
    Invalid(String),
    TooLarge(usize),
    /// The target's backlog is at its limit (429): the message names the limit.
    Full(String),
    /// gust cannot take the request now, through no fault of the caller's (503; retry).
    Busy(String),
    Store(String),
}

impl std::fmt::Display for EnqueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnqueueError::NotFound(m)
            | EnqueueError::Invalid(m)
            | EnqueueError::Full(m)
            | EnqueueError::Busy(m)
            | EnqueueError::Store(m) => f.write_str(m),
            EnqueueError::TooLarge(n) => {
                write!(f, "the event is {n} bytes; the limit is {MAX_EVENT_BYTES}")
            }
        }
    }
}

impl std::error::Error for EnqueueError {}

/// A message to send to a queue.
#[derive(Debug, Clone, Default)]
pub struct Message {
    pub body: Bytes,
    /// SQS-style message attributes: `{"name": {"stringValue": "...", "dataType": "String"}}`.
    pub attributes: Value,
}

/// How the event system runs beyond what manifests say.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where callbacks and URL destinations may go.
    pub outbound: Arc<Outbound>,
    /// Finished events (succeeded, failed, dead) are kept this long for `gust events show`.
    pub finished_retention: Duration,
    /// How often finished events and expired queue messages are pruned.
    pub prune_every: Duration,
}

/// Default `finished_retention`: a day.
pub const FINISHED_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl Default for Options {
    fn default() -> Self {
        Options {
            outbound: Arc::new(Outbound::default()),
            finished_retention: FINISHED_RETENTION,
            prune_every: Duration::from_secs(60),
        }
    }
}

pub struct Events {
    store: EventStore,
    options: Options,
    registry: Arc<Store>,
    invoker: Arc<dyn Invoker>,
    lookup: Lookup,
    http: http::Client,
    /// Running loops by key (`async:F`, `sub:F:Q`), each with its wake-up.
    workers: Mutex<HashMap<String, Arc<Notify>>>,
    scheduler: Arc<Notify>,
    /// Schedules with a run in flight (for `overlap = "skip"`).
    running: Mutex<HashSet<String>>,
    /// Per function: instances in use by async deliveries and queue batches together (the
    /// async lane).
    lanes: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// When this server started: slots before it were missed (the server was down).
    boot_ms: u64,
    /// Declared queues, reloaded by `refresh` (a send must not read the registry).
    queues: std::sync::RwLock<HashMap<String, QueueSpec>>,
    stopping: AtomicBool,
}

fn store_err(e: impl std::fmt::Display) -> EnqueueError {
    EnqueueError::Store(format!("event store: {e}"))
}

impl Events {
    pub fn new(
        registry: Arc<Store>,
        invoker: Arc<dyn Invoker>,
        lookup: Lookup,
    ) -> gust_store::Result<Arc<Events>> {
        Events::with_options(registry, invoker, lookup, Options::default())
    }

    pub fn with_options(
        registry: Arc<Store>,
        invoker: Arc<dyn Invoker>,
        lookup: Lookup,
        options: Options,
    ) -> gust_store::Result<Arc<Events>> {
        Ok(Arc::new(Events {
            store: registry.event_store()?,
            registry,
            invoker,
            lookup,
            http: http::Client::new(options.outbound.clone()),
            options,
            workers: Mutex::new(HashMap::new()),
            scheduler: Arc::new(Notify::new()),
            running: Mutex::new(HashSet::new()),
            queues: std::sync::RwLock::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
            boot_ms: now_ms(),
            stopping: AtomicBool::new(false),
        }))
    }

    /// Starts delivery for everything already stored, the subscriptions and the scheduler.
    pub fn start(self: &Arc<Self>) {
        self.refresh();
        let me = self.clone();
        tokio::spawn(async move { me.run_scheduler().await });
        let me = self.clone();
        tokio::spawn(async move { me.run_pruner().await });
    }

    /// Prunes on a schedule: finished events past their retention, queue messages past their
    /// queue's, then the freed pages go back to the file system.
    async fn run_pruner(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.options.prune_every).await;
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let now = now_ms();
            let finished_before =
                now.saturating_sub(self.options.finished_retention.as_millis() as u64);
            let queues: Vec<(String, u64)> = self
                .queues
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|q| (q.name.clone(), now.saturating_sub(q.retention_ms)))
                .collect();
            match self
                .call(move |s, r| s.prune(finished_before, queues, r))
                .await
            {
                Ok(p) if p.finished + p.expired > 0 => tracing::info!(
                    "event store: pruned {} finished event(s) and {} expired queue message(s)",
                    p.finished,
                    p.expired
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("event store: pruning failed: {e}"),
            }
        }
    }

    /// After a deploy or removal: start loops for new async backlogs and subscriptions, and
    /// let the scheduler reload.
    pub fn refresh(self: &Arc<Self>) {
        if let Ok(qs) = self.registry.queues() {
            *self.queues.write().unwrap_or_else(|p| p.into_inner()) =
                qs.into_iter().map(|q| (q.name.clone(), q)).collect();
        }
        if let Ok(functions) = self.registry.functions() {
            for f in functions {
                self.wake_async(&f.spec.name);
                for s in &f.spec.subscriptions {
                    self.ensure_subscription(&f.spec.name, &s.queue);
                }
            }
        }
        self.scheduler.notify_one();
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.notify_where(|_| true);
        self.scheduler.notify_one();
    }

    /// Wakes the loops whose key (`async:F`, `sub:F:Q`) matches.
    fn notify_where(&self, matches: impl Fn(&str) -> bool) {
        for (k, n) in self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if matches(k) {
                n.notify_one();
            }
        }
    }

    async fn append(&self, events: Vec<NewEvent>) -> Result<(), EnqueueError> {
        let (tx, rx) = oneshot::channel();
        self.store.append(events, move |r| {
            let _ = tx.send(r);
        });
        rx.await
            .map_err(|_| store_err("the writer is gone"))?
            .map_err(store_err)
    }

    /// Appends events to one target within its backlog limit; `what` names it in the refusal.
    async fn append_limited(
        &self,
        events: Vec<NewEvent>,
        limit: Limit,
        what: &str,
        key: &str,
    ) -> Result<(), EnqueueError> {
        let n = events.len() as u64;
        let bytes: u64 = events.iter().map(|e| e.payload.len() as u64).sum();
        match self
            .call(move |s, r| s.append_limited(events, limit, r))
            .await?
        {
            None => Ok(()),
            Some(b) => Err(EnqueueError::Full(full_message(
                what, key, limit, b, n, bytes,
            ))),
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EventStore, Box<dyn FnOnce(gust_store::Result<T>) + Send>),
    ) -> Result<T, EnqueueError> {
        let (tx, rx) = oneshot::channel();
        f(
            &self.store,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await
            .map_err(|_| store_err("the writer is gone"))?
            .map_err(store_err)
    }

    // ---- async invocations ----

    /// Stores an asynchronous invocation and returns its id (the function's request id).
    /// `callback`: a URL that receives the result; `http`: the payload is an HTTP event whose
    /// response the callback maps (status, body).
    pub async fn invoke_async(
        self: &Arc<Self>,
        function: &str,
        payload: Bytes,
        callback: Option<String>,
        http: bool,
    ) -> Result<String, EnqueueError> {
        let Some(f) = (self.lookup)(function) else {
            return Err(EnqueueError::NotFound(format!(
                "Function not found: {function}"
            )));
        };
        if payload.len() > MAX_EVENT_BYTES {
            return Err(EnqueueError::TooLarge(payload.len()));
        }
        if let Some(u) = &callback {
            if !u.starts_with("http://") {
                return Err(EnqueueError::Invalid(format!(
                    "X-Callback-Url {u:?}: must be an http:// URL (https is not supported yet)"
                )));
            }
            // Checked now, so the caller hears it, and again at delivery (addresses change).
            // A request does not wait for a resolution slot: 503 when none is free.
            match self.options.outbound.check_now(u).await {
                Ok(_) => {}
                Err(why @ outbound::Refusal::Forbidden(_)) => {
                    // Where the name points is the operator's business, not the caller's.
                    tracing::debug!("X-Callback-Url {u:?} refused: {why}");
                    return Err(EnqueueError::Invalid(outbound::NOT_ALLOWED.into()));
                }
                Err(outbound::Refusal::Busy) => {
                    return Err(EnqueueError::Busy(
                        "too many callback host lookups in progress; retry".into(),
                    ));
                }
                Err(why @ outbound::Refusal::Platform(_)) => {
                    return Err(EnqueueError::Store(format!("X-Callback-Url {u:?}: {why}")));
                }
                Err(why) => {
                    return Err(EnqueueError::Invalid(format!(
                        "X-Callback-Url {u:?}: {why}"
                    )));
                }
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let mut attrs = json!({});
        if let Some(u) = callback {
            attrs["callback"] = Value::String(u);
        }
        if http {
            attrs["http"] = Value::Bool(true);
        }
        let a = &f.spec.async_config;
        let limit = Limit {
            count: a.max_backlog,
            bytes: a.max_backlog_bytes,
        };
        let event = NewEvent {
            id: id.clone(),
            kind: Kind::Async,
            target: function.to_string(),
            payload: payload.to_vec(),
            attributes: attrs.to_string(),
            visible_ms: 0,
            source: None,
        };
        self.append_limited(vec![event], limit, "function", function)
            .await?;
        self.wake_async(function);
        Ok(id)
    }

    fn worker(self: &Arc<Self>, key: String) -> (Arc<Notify>, bool) {
        let mut w = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get(&key) {
            return (n.clone(), false);
        }
        let n = Arc::new(Notify::new());
        w.insert(key, n.clone());
        (n, true)
    }

    fn forget(&self, key: &str) {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn lane(&self, function: &str) -> Arc<AtomicUsize> {
        self.lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(function.to_string())
            .or_default()
            .clone()
    }

    /// Wakes every loop of a function (a lane slot came free).
    fn wake_function(&self, function: &str) {
        let a = format!("async:{function}");
        let sub = format!("sub:{function}:");
        self.notify_where(|k| k == a || k.starts_with(&sub));
    }

    /// Records outcomes, retrying while the store refuses (a settle is idempotent): an
    /// unrecorded outcome would leave events in flight until a restart.
    async fn settle(&self, outcomes: Vec<(String, Settle)>) {
        let mut delay = Duration::from_millis(50);
        for attempt in 0.. {
            let o = outcomes.clone();
            match self.call(move |s, r| s.settle(o, r)).await {
                Ok(()) => return,
                Err(e) => {
                    if attempt % 10 == 0 {
                        tracing::error!(
                            "event store: recording {} outcome(s) failed, retrying: {e}",
                            outcomes.len()
                        );
                    }
                    if self.stopping.load(Ordering::SeqCst) {
                        return; // in flight: delivered again after the restart
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn wake_async(self: &Arc<Self>, function: &str) {
        let (notify, new) = self.worker(format!("async:{function}"));
        if new {
            let me = self.clone();
            let f = function.to_string();
            tokio::spawn(async move { me.run_async(f, notify).await });
        } else {
            notify.notify_one();
        }
    }

    async fn run_async(self: Arc<Self>, function: String, notify: Arc<Notify>) {
        let key = format!("async:{function}");
        let inflight = self.lane(&function);
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return self.forget(&key);
            }
            let Some(f) = (self.lookup)(&function) else {
                // Removed: nothing left to run it. Its stored events stay (visible with
                // `gust events show`) and run if it is deployed again.
                return self.forget(&key);
            };
            let spec = &f.spec;
            let cap = async_cap(spec);
            let free = cap.saturating_sub(inflight.load(Ordering::SeqCst));
            let mut claimed = Vec::new();
            if free > 0 {
                let lease = timeout_ms(spec) + 60_000;
                let target = function.clone();
                match self
                    .call(move |s, r| s.claim(Kind::Async, &target, free, lease, r))
                    .await
                {
                    Ok(c) => {
                        claimed = c;
                        backoff = Duration::from_millis(100);
                    }
                    Err(e) => {
                        tracing::warn!("async {function}: claiming events failed: {e}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            if claimed.is_empty() {
                let wait = if free == 0 {
                    Duration::from_secs(60)
                } else {
                    self.until_due(Kind::Async, &function)
                };
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            for e in claimed {
                inflight.fetch_add(1, Ordering::SeqCst);
                let me = self.clone();
                let f = f.clone();
                let inflight = inflight.clone();
                tokio::spawn(async move {
                    me.deliver(&f, e).await;
                    inflight.fetch_sub(1, Ordering::SeqCst);
                    me.wake_function(&f.spec.name);
                });
            }
        }
    }

    /// How long until the next stored event of a target is due (at most a minute).
    fn until_due(&self, kind: Kind, target: &str) -> Duration {
        match self.store.next_due_ms(kind, target) {
            Ok(Some(t)) => Duration::from_millis(t.saturating_sub(now_ms()).clamp(1, 60_000)),
            _ => Duration::from_secs(60),
        }
    }

    async fn deliver(self: &Arc<Self>, f: &FunctionVersion, e: Event) {
        let spec = &f.spec;
        let policy = e
            .attributes
            .get("policy")
            .and_then(|p| {
                Some(RetryPolicy {
                    retries: p.get("retries")?.as_u64()? as u32,
                    backoff_ms: p.get("backoff_ms")?.as_u64()?,
                    max_age_ms: p.get("max_age_ms")?.as_u64()?,
                })
            })
            .unwrap_or(RetryPolicy {
                retries: spec.async_config.retries,
                backoff_ms: spec.async_config.retry_backoff_ms,
                max_age_ms: spec.async_config.max_event_age_s * 1000,
            });
        let started = Instant::now();
        let too_old = now_ms().saturating_sub(e.created_ms) > policy.max_age_ms;
        let result = if too_old {
            // Expired while it waited (a long backlog, or downtime): not run at all.
            Err(InvokeError::Throttled {
                message: "the event is older than its maximum age".into(),
                retry_after_secs: 0,
            })
        } else {
            self.invoker
                .invoke(
                    &e.target,
                    Invocation {
                        payload: Bytes::from(e.payload.clone()),
                        content_type: Some("application/json".into()),
                        request_id: Some(e.id.clone()),
                        ..Invocation::default()
                    },
                )
                .await
        };
        let duration = started.elapsed();
        let (attempt, error, response, function_error) = match &result {
            Ok(r) => match &r.outcome {
                Outcome::Response { body, .. } => (Attempt::Succeeded, None, body.clone(), None),
                Outcome::FunctionError { error_type, body } => (
                    Attempt::FunctionError,
                    Some(format!("{error_type}: {}", error_message(body))),
                    body.clone(),
                    Some("Unhandled"),
                ),
            },
            // Stopping: leave it in flight; it runs again after the restart.
            Err(InvokeError::ShuttingDown) => return,
            Err(InvokeError::NotFound(m)) => (Attempt::Gone, Some(m.clone()), Bytes::new(), None),
            Err(InvokeError::PayloadTooLarge(n)) => (
                Attempt::Gone,
                Some(format!("payload of {n} bytes is too large")),
                Bytes::new(),
                None,
            ),
            Err(err) => (
                Attempt::Throttled,
                Some(err.to_string()),
                Bytes::new(),
                None,
            ),
        };
        if self.stopping.load(Ordering::SeqCst) && attempt != Attempt::Succeeded {
            // Stopping killed it: leave it in flight; it runs again after the restart.
            return;
        }
        let age = now_ms().saturating_sub(e.created_ms);
        let decision = decide(attempt, e.attempts, age, &policy, fastrand::f64());
        let dlq = e
            .attributes
            .get("dlq")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| spec.async_config.dead_letter_queue.clone());
        let settle = match decision {
            Decision::Done => Settle::Final {
                state: "succeeded",
                error: None,
            },
            Decision::Retry { delay_ms, count } => Settle::Retry {
                visible_ms: now_ms() + delay_ms,
                error: error.clone(),
                count,
            },
            Decision::GiveUp(_) => match &dlq {
                Some(q) => Settle::DeadLetter {
                    error: error.clone(),
                    copy: Some(dead_letter(q, &e, error.as_deref().unwrap_or(""))),
                },
                None => Settle::Final {
                    state: "failed",
                    error: error.clone(),
                },
            },
        };
        let condition = match decision {
            Decision::Done => Some("Success"),
            Decision::GiveUp(c) => Some(c),
            Decision::Retry { .. } => None,
        };
        let Some(condition) = condition else {
            // Tried again later: nothing else happens now.
            self.settle(vec![(e.id.clone(), settle)]).await;
            return;
        };
        let destination = if condition == "Success" {
            spec.async_config.on_success.clone()
        } else {
            spec.async_config.on_failure.clone()
        };
        let record = destination.as_ref().map(|_| {
            policy::invocation_record(
                &e.id,
                &f.arn(),
                condition,
                e.attempts,
                &e.payload,
                200,
                function_error,
                &response,
                now_ms(),
            )
        });
        // A function or queue destination's record is stored with the outcome (an outbox); a
        // URL gets it afterwards.
        let (outbox, url_record) = match (destination, record) {
            (Some(Destination::Url(u)), Some(r)) => (None, Some((u, r))),
            (Some(d), Some(r)) => (self.destination_event(&d, r).map(|ev| (d, ev)), None),
            _ => (None, None),
        };
        let dead_copy = matches!(&settle, Settle::DeadLetter { .. });
        let settle = match &outbox {
            Some((_, ev)) => Settle::With(Box::new(settle), vec![ev.clone()]),
            None => settle,
        };
        self.settle(vec![(e.id.clone(), settle)]).await;
        match &outbox {
            Some((Destination::Function(name), _)) => self.wake_async(name),
            Some((Destination::Queue(q), _)) => self.wake_queue(q),
            _ => {}
        }
        if dead_copy && let Some(q) = &dlq {
            self.wake_queue(q);
        }
        // Schedule bookkeeping, the URL destination and the callback run on their own: a slow
        // receiver must not hold a lane slot.
        let me = self.clone();
        tokio::spawn(async move {
            me.after(&e, condition, error, response, url_record, duration)
                .await
        });
    }

    /// What follows a final outcome, off the lane: the schedule's record, the URL
    /// destination, the callback.
    async fn after(
        self: &Arc<Self>,
        e: &Event,
        condition: &'static str,
        error: Option<String>,
        response: Bytes,
        url_record: Option<(String, Value)>,
        duration: Duration,
    ) {
        if let Some(name) = e.attributes.get("schedule").and_then(Value::as_str) {
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            let outcome = if condition == "Success" {
                "succeeded".to_string()
            } else {
                format!(
                    "failed ({condition}): {}",
                    error.clone().unwrap_or_default()
                )
            };
            let slot = e
                .attributes
                .get("slot_ms")
                .and_then(Value::as_u64)
                .unwrap_or(e.created_ms);
            let name = name.to_string();
            let _ = self
                .call(move |s, r| {
                    s.set_schedule(&name, None, Some((slot, outcome)), Some(false), r)
                })
                .await;
            self.scheduler.notify_one();
        }
        if let Some((url, record)) = url_record {
            self.post_record(&e.id, &url, record).await;
        }
        if let Some(url) = e.attributes.get("callback").and_then(Value::as_str) {
            let http_event = e
                .attributes
                .get("http")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let (status, body) = callback_body(
                condition == "Success",
                http_event,
                &response,
                error.as_deref(),
            );
            let headers = vec![
                ("X-Call-Id", e.id.clone()),
                ("X-Function-Name", e.target.clone()),
                ("X-Function-Status", status.to_string()),
                (
                    "X-Duration-Seconds",
                    format!("{:.6}", duration.as_secs_f64()),
                ),
                ("X-Attempts", e.attempts.to_string()),
            ];
            if let Err(err) = self.http.post(url, headers, body).await {
                tracing::warn!("event {}: callback to {url} failed: {err}", e.id);
                self.note(&e.id, "callback_error", err.to_string()).await;
            }
        }
    }

    /// The stored event that carries an invocation record to a function or queue destination
    /// (None, with a warning, when the destination no longer exists).
    fn destination_event(&self, d: &Destination, record: Value) -> Option<NewEvent> {
        let (kind, target, attributes) = match d {
            Destination::Function(name) => {
                if (self.lookup)(name).is_none() {
                    tracing::warn!("destination function {name} is not deployed: record dropped");
                    return None;
                }
                (Kind::Async, name.clone(), json!({}))
            }
            Destination::Queue(q) => {
                if !self
                    .queues
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(q)
                {
                    tracing::warn!("destination queue {q} is not declared: record dropped");
                    return None;
                }
                (
                    Kind::Queue,
                    q.clone(),
                    json!({"messageAttributes": {}, "sentTimestamp": now_ms()}),
                )
            }
            Destination::Url(_) => return None,
        };
        Some(NewEvent {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            target,
            payload: record.to_string().into_bytes(),
            attributes: attributes.to_string(),
            visible_ms: 0,
            source: None,
        })
    }

    /// POSTs an invocation record to a URL destination (best effort: 3 tries).
    async fn post_record(&self, id: &str, url: &str, record: Value) {
        let body = Bytes::from(record.to_string());
        let headers = vec![("Content-Type", "application/json".to_string())];
        if let Err(e) = self.http.post(url, headers, body).await {
            tracing::warn!("event {id}: destination {url}: {e}");
            self.note(id, "destination_error", e.to_string()).await;
        }
    }

    /// Records why a callback or URL destination was not delivered, in the event's attributes
    /// (`gust events show`).
    async fn note(&self, id: &str, key: &'static str, text: String) {
        let id = id.to_string();
        let settle = Settle::Note { key, text };
        if let Err(e) = self.call(move |s, r| s.settle(vec![(id, settle)], r)).await {
            tracing::warn!("event store: recording a delivery failure failed: {e}");
        }
    }

    // ---- queues ----

    /// Sends messages to a declared queue; returns their ids once they are on disk.
    pub async fn send(
        self: &Arc<Self>,
        queue: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<String>, EnqueueError> {
        let Some(spec) = self
            .queues
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(queue)
            .cloned()
        else {
            return Err(EnqueueError::NotFound(format!(
                "queue {queue} is not declared: add [queues.{queue}] to a service's gust.toml and deploy it"
            )));
        };
        let now = now_ms();
        let mut ids = Vec::new();
        let mut events = Vec::new();
        for m in messages {
            if m.body.len() > MAX_EVENT_BYTES {
                return Err(EnqueueError::TooLarge(m.body.len()));
            }
            if !(m.attributes.is_null() || m.attributes.is_object()) {
                return Err(EnqueueError::Invalid(
                    "message attributes must be a JSON object".into(),
                ));
            }
            let id = uuid::Uuid::new_v4().to_string();
            ids.push(id.clone());
            events.push(NewEvent {
                id,
                kind: Kind::Queue,
                target: queue.to_string(),
                payload: m.body.to_vec(),
                attributes: json!({"messageAttributes": if m.attributes.is_null() { json!({}) } else { m.attributes }, "sentTimestamp": now}).to_string(),
                visible_ms: 0,
                source: None,
            });
        }
        let limit = Limit {
            count: spec.max_backlog,
            bytes: spec.max_backlog_bytes,
        };
        self.append_limited(events, limit, "queue", queue).await?;
        self.wake_queue(queue);
        Ok(ids)
    }

    fn wake_queue(&self, queue: &str) {
        let suffix = format!(":{queue}");
        self.notify_where(|k| k.starts_with("sub:") && k.ends_with(&suffix));
    }

    fn ensure_subscription(self: &Arc<Self>, function: &str, queue: &str) {
        let (notify, new) = self.worker(format!("sub:{function}:{queue}"));
        if new {
            let me = self.clone();
            let (f, q) = (function.to_string(), queue.to_string());
            tokio::spawn(async move { me.run_subscription(f, q, notify).await });
        } else {
            notify.notify_one();
        }
    }

    async fn run_subscription(
        self: Arc<Self>,
        function: String,
        queue: String,
        notify: Arc<Notify>,
    ) {
        let key = format!("sub:{function}:{queue}");
        let inflight = Arc::new(AtomicUsize::new(0));
        // Shared with async deliveries: together they stay within the function's async lane.
        let lane = self.lane(&function);
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return self.forget(&key);
            }
            let Some(f) = (self.lookup)(&function) else {
                return self.forget(&key);
            };
            let Some(sub) = f
                .spec
                .subscriptions
                .iter()
                .find(|s| s.queue == queue)
                .cloned()
            else {
                return self.forget(&key);
            };
            let Ok(Some(q)) = self.registry.queue(&queue) else {
                tracing::warn!(
                    "function {function} subscribes to queue {queue}, which is not declared"
                );
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            };
            let cap = sub
                .max_concurrency
                .map(|c| c as usize)
                .unwrap_or_else(|| (f.spec.scaling.max_instances as usize / 2).max(1));
            let free = cap
                .saturating_sub(inflight.load(Ordering::SeqCst))
                .min(async_cap(&f.spec).saturating_sub(lane.load(Ordering::SeqCst)));
            let now = now_ms();
            let (due, oldest) = if free > 0 {
                self.store
                    .due(Kind::Queue, &queue, now, sub.batch_size as u64)
                    .unwrap_or((0, None))
            } else {
                (0, None)
            };
            let wait = if free == 0 {
                Some(Duration::from_secs(60))
            } else if due == 0 {
                Some(self.until_due(Kind::Queue, &queue))
            } else if due < sub.batch_size as u64 && sub.batch_window_ms > 0 {
                // Gather a fuller batch until the oldest due message has waited the window.
                let ready = oldest.unwrap_or(now) + sub.batch_window_ms;
                (ready > now).then(|| Duration::from_millis(ready - now))
            } else {
                None
            };
            if let Some(wait) = wait {
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let lease = q.visibility_timeout_ms.max(timeout_ms(&f.spec) + 30_000);
            let claimed_at = now_ms();
            let target = queue.clone();
            let batch_size = sub.batch_size as usize;
            let batch = self
                .call(move |s, r| s.claim(Kind::Queue, &target, batch_size, lease, r))
                .await
                .unwrap_or_default();
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            inflight.fetch_add(1, Ordering::SeqCst);
            lane.fetch_add(1, Ordering::SeqCst);
            let me = self.clone();
            let inflight = inflight.clone();
            let lane = lane.clone();
            tokio::spawn(async move {
                me.process_batch(&f, &sub, &q, batch, claimed_at).await;
                inflight.fetch_sub(1, Ordering::SeqCst);
                lane.fetch_sub(1, Ordering::SeqCst);
                me.wake_function(&f.spec.name);
            });
        }
    }

    async fn process_batch(
        self: &Arc<Self>,
        f: &FunctionVersion,
        sub: &gust_core::Subscription,
        q: &QueueSpec,
        batch: Vec<Event>,
        claimed_at: u64,
    ) {
        let records: Vec<Value> = batch.iter().map(|m| sqs_record(&q.name, m)).collect();
        let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
        let payload = json!({ "Records": records }).to_string();
        let result = self
            .invoker
            .invoke(
                &f.spec.name,
                Invocation {
                    payload: Bytes::from(payload),
                    content_type: Some("application/json".into()),
                    ..Invocation::default()
                },
            )
            .await;
        let failed: Result<Vec<String>, String> = match &result {
            Ok(r) => match &r.outcome {
                Outcome::Response { body, .. } => policy::batch_failures(body, &ids),
                Outcome::FunctionError { error_type, body } => {
                    Err(format!("{error_type}: {}", error_message(body)))
                }
            },
            Err(InvokeError::ShuttingDown) => return,
            Err(e) => Err(e.to_string()),
        };
        if self.stopping.load(Ordering::SeqCst) && !failed.as_ref().is_ok_and(|f| f.is_empty()) {
            // Stopping killed the batch: leave it in flight; it is received again after the
            // restart.
            return;
        }
        let (failed, error): (HashSet<String>, Option<String>) = match failed {
            Ok(list) => {
                let n = list.len();
                (
                    list.into_iter().collect(),
                    (n > 0).then(|| "reported in batchItemFailures".to_string()),
                )
            }
            Err(why) => (ids.iter().cloned().collect(), Some(why)),
        };
        let mut settles = Vec::new();
        let mut dead_lettered = None;
        for m in &batch {
            if !failed.contains(&m.id) {
                settles.push((m.id.clone(), Settle::Delete));
            } else if m.attempts >= sub.max_receives
                && let Some(dlq) = q.dead_letter_queue.clone()
            {
                settles.push((
                    m.id.clone(),
                    Settle::MoveTo {
                        to: dlq.clone(),
                        error: error.clone(),
                    },
                ));
                dead_lettered = Some(dlq);
            } else {
                // Visible again when its visibility timeout ends, as on SQS.
                settles.push((
                    m.id.clone(),
                    Settle::Retry {
                        visible_ms: (claimed_at + q.visibility_timeout_ms).max(now_ms()),
                        error: error.clone(),
                        count: true,
                    },
                ));
            }
        }
        self.settle(settles).await;
        if let Some(d) = dead_lettered {
            self.wake_queue(&d);
        }
        self.wake_queue(&q.name);
    }

    pub async fn purge(&self, queue: &str) -> Result<u64, EnqueueError> {
        let q = queue.to_string();
        self.call(move |s, r| s.purge(&q, r)).await
    }

    /// Moves a dead-letter queue's messages back to the queues they came from (or `to`).
    pub async fn redrive(&self, dlq: &str, to: Option<String>) -> Result<u64, EnqueueError> {
        let d = dlq.to_string();
        let n = self.call(move |s, r| s.redrive(&d, to, r)).await?;
        self.notify_where(|k| k.starts_with("sub:"));
        Ok(n)
    }

    // ---- visibility ----

    pub fn event(&self, id: &str) -> Result<Option<Event>, EnqueueError> {
        self.store.get(id).map_err(store_err)
    }

    /// Async invocation counts of a function.
    pub fn counts(&self, function: &str) -> Result<Counts, EnqueueError> {
        self.store.counts(Kind::Async, function).map_err(store_err)
    }

    /// Every declared queue with depth, in flight, oldest age and its DLQ's size.
    pub fn queue_stats(&self) -> Result<Vec<Value>, EnqueueError> {
        let now = now_ms();
        let mut out = Vec::new();
        for q in self.registry.queues().map_err(store_err)? {
            let c = self.store.counts(Kind::Queue, &q.name).map_err(store_err)?;
            let oldest = self
                .store
                .oldest_queued_ms(Kind::Queue, &q.name)
                .map_err(store_err)?;
            let dlq_size = match &q.dead_letter_queue {
                Some(d) => Some(self.store.counts(Kind::Queue, d).map_err(store_err)?.queued),
                None => None,
            };
            out.push(json!({
                "name": q.name,
                "service": q.service,
                "depth": c.queued,
                "in_flight": c.inflight,
                "oldest_age_ms": oldest.map(|o| now.saturating_sub(o)),
                "visibility_timeout_s": q.visibility_timeout_ms / 1000,
                "dead_letter_queue": q.dead_letter_queue,
                "dlq_size": dlq_size,
            }));
        }
        Ok(out)
    }

    /// Every schedule with its next and last run and last outcome.
    pub fn schedules(&self) -> Result<Vec<Value>, EnqueueError> {
        let mut out = Vec::new();
        for (function, s) in self.all_schedules() {
            let state = self.store.schedule(&schedule_key(&s)).map_err(store_err)?;
            let st = state.unwrap_or_default();
            let (next, last, outcome, running) =
                (st.next_ms, st.last_ms, st.last_outcome, st.running);
            out.push(json!({
                "name": s.name,
                "function": function,
                "expression": s.expression,
                "timezone": s.timezone.clone().unwrap_or_else(|| "UTC".into()),
                "next": next.filter(|n| *n < i64::MAX as u64).map(gust_core::schedule::iso8601_s),
                "last": last.map(gust_core::schedule::iso8601_s),
                "last_outcome": outcome,
                "running": running,
            }));
        }
        Ok(out)
    }

    // ---- schedules ----

    fn all_schedules(&self) -> Vec<(String, ScheduleSpec)> {
        self.registry
            .functions()
            .unwrap_or_default()
            .into_iter()
            .flat_map(|f| {
                let name = f.spec.name.clone();
                f.spec.schedules.into_iter().map(move |s| (name.clone(), s))
            })
            .collect()
    }

    async fn run_scheduler(self: Arc<Self>) {
        // Stored schedules this build refuses (accepted by an older one, e.g. an out-of-range
        // rate): reported once each and left alone, since retrying cannot help.
        let mut refused = HashSet::new();
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let now = now_ms();
            let mut wake = now.saturating_add(60_000);
            for (function, s) in self.all_schedules() {
                if let Err(e) = Schedule::parse(&s.expression, s.timezone.as_deref()) {
                    if refused.insert(schedule_key(&s)) {
                        tracing::error!(
                            "schedule {} is not run: {e}; deploy the service again with a valid expression",
                            s.name
                        );
                    }
                    continue;
                }
                match self.tick(&function, &s, now).await {
                    Ok(Some(at)) => wake = wake.min(at),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!("schedule {}: {e}", s.name);
                        wake = wake.min(now + 1_000);
                    }
                }
            }
            let wait = Duration::from_millis(wake.saturating_sub(now_ms()));
            tokio::select! {
                _ = self.scheduler.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Fires a schedule if its slot has come; returns when it next needs attention.
    async fn tick(
        self: &Arc<Self>,
        function: &str,
        s: &ScheduleSpec,
        now: u64,
    ) -> Result<Option<u64>, String> {
        let key = schedule_key(s);
        let sched = Schedule::parse(&s.expression, s.timezone.as_deref())?;
        let state = self.store.schedule(&key).map_err(|e| e.to_string())?;
        // Every next fire time the scheduler stores is at most the first slot after the time it
        // was computed, so it is never later than `earliest`. One that is (a value written by an
        // older build, or a clock set back) would park the schedule: it starts again from now.
        let earliest = sched.next_after(now, now);
        let next = match (state.and_then(|st| st.next_ms), earliest) {
            (Some(n), Some(e)) if n > e => {
                tracing::warn!(
                    "schedule {}: stored next fire time {n} is out of range; next fire at {}",
                    s.name,
                    gust_core::schedule::iso8601_s(e)
                );
                self.store_next(&key, e).await?;
                e
            }
            (Some(n), _) => n,
            (None, Some(e)) => {
                self.store_next(&key, e).await?;
                e
            }
            (None, None) => return Ok(None),
        };
        if next == u64::MAX {
            return Ok(None);
        }
        let fire_at = next.saturating_add(policy::flex_offset(&key, next, s.flexible_window_min));
        if fire_at > now {
            return Ok(Some(fire_at));
        }
        let following = sched.next_after(now.max(next), next).unwrap_or(u64::MAX);
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key);
        let action =
            policy::slot_action(self.boot_ms, fire_at, s.catch_up, s.allow_overlap, running);
        let fire = action == policy::SlotAction::Fire;
        let outcome = match action {
            policy::SlotAction::Fire => "fired",
            policy::SlotAction::SkipMissed => {
                "skipped: missed while gust was down (missed = \"skip\")"
            }
            policy::SlotAction::SkipOverlap => {
                "skipped: the previous run is still running (overlap = \"skip\")"
            }
        }
        .to_string();
        if fire {
            let event = self.schedule_event(function, s, &key, next);
            // Marked before the append: the run may finish (and unmark) before it returns.
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone());
            if let Err(e) = self.append(vec![event]).await {
                self.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                return Err(e.to_string());
            }
            self.wake_async(function);
        }
        let k = key.clone();
        let running = fire.then_some(true);
        self.call(move |st, r| {
            st.set_schedule(&k, Some(following), Some((next, outcome)), running, r)
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok((following != u64::MAX).then_some(following))
    }

    async fn store_next(&self, key: &str, next: u64) -> Result<(), String> {
        let k = key.to_string();
        self.call(move |st, r| st.set_schedule(&k, Some(next), None, None, r))
            .await
            .map_err(|e| e.to_string())
    }

    fn schedule_event(&self, function: &str, s: &ScheduleSpec, key: &str, slot: u64) -> NewEvent {
        // Deterministic: a slot stored twice (a restart between firing and recording it) is
        // one event.
        let id = format!("sched-{:016x}-{slot}", fnv(key.bytes()));
        let payload = s.input.clone().unwrap_or_else(|| {
            json!({
                "version": "0",
                "id": id,
                "detail-type": "Scheduled Event",
                "source": "aws.events",
                "account": gust_core::lambda::ACCOUNT_ID,
                "time": gust_core::schedule::iso8601_s(slot),
                "region": gust_core::lambda::REGION,
                "resources": [format!("arn:aws:events:{}:{}:rule/{}", gust_core::lambda::REGION, gust_core::lambda::ACCOUNT_ID, s.name)],
                "detail": {},
            })
            .to_string()
        });
        NewEvent {
            id,
            kind: Kind::Async,
            target: function.to_string(),
            payload: payload.into_bytes(),
            attributes: json!({
                "schedule": key,
                "slot_ms": slot,
                "dlq": s.dead_letter_queue,
                "policy": {
                    "retries": s.retries,
                    "backoff_ms": 1_000,
                    "max_age_ms": s.max_event_age_s * 1000,
                },
            })
            .to_string(),
            visible_ms: 0,
            source: None,
        }
    }
}

/// A schedule's identity in the store: its name with its expression and zone, so a changed
/// expression starts afresh.
fn schedule_key(s: &ScheduleSpec) -> String {
    format!(
        "{}|{}|{}",
        s.name,
        s.expression,
        s.timezone.as_deref().unwrap_or("UTC")
    )
}

/// The refusal of an append past a backlog limit: which limit, what is stored, what came.
fn full_message(what: &str, name: &str, limit: Limit, now: Backlog, n: u64, bytes: u64) -> String {
    let table = if what == "queue" {
        format!("[queues.{name}]")
    } else {
        format!("[functions.{name}.async]")
    };
    if now.count.saturating_add(n) > limit.count {
        format!(
            "{what} {name} has {} events waiting or running, its backlog limit (max_backlog = {} in {table}); retry later",
            now.count, limit.count
        )
    } else {
        format!(
            "{what} {name} holds {} bytes of events waiting or running; {bytes} more would pass its backlog limit of {} bytes (max_backlog_mb = {} in {table}); retry later",
            now.bytes,
            limit.bytes,
            limit.bytes >> 20
        )
    }
}

/// FNV-1a, 64 bits.
pub(crate) fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn async_cap(spec: &FunctionSpec) -> usize {
    spec.async_config
        .max_concurrency
        .map(|c| c as usize)
        .unwrap_or_else(|| (spec.scaling.max_instances as usize / 2).max(1))
}

fn timeout_ms(spec: &FunctionSpec) -> u64 {
    spec.timeout
        .unwrap_or(gust_core::DEFAULT_TIMEOUT.as_secs() as u32) as u64
        * 1000
}

fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("errorMessage")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(1024).collect())
}

/// A copy of an event for a dead-letter queue: the raw event with Lambda's DLQ attributes.
fn dead_letter(queue: &str, e: &Event, error: &str) -> NewEvent {
    let attr = |v: &str, t: &str| json!({"stringValue": v, "dataType": t});
    let message: String = error.chars().take(1024).collect();
    NewEvent {
        id: uuid::Uuid::new_v4().to_string(),
        kind: Kind::Queue,
        target: queue.to_string(),
        payload: e.payload.clone(),
        attributes: json!({
            "messageAttributes": {
                "RequestID": attr(&e.id, "String"),
                "ErrorCode": attr("200", "Number"),
                "ErrorMessage": attr(&message, "String"),
            },
            "sentTimestamp": now_ms(),
        })
        .to_string(),
        visible_ms: 0,
        source: None,
    }
}

/// One SQS record of a batch (lambda-contracts §3.4).
fn sqs_record(queue: &str, m: &Event) -> Value {
    use base64::Engine;
    let body = String::from_utf8_lossy(&m.payload).into_owned();
    let sent = m
        .attributes
        .get("sentTimestamp")
        .and_then(Value::as_u64)
        .unwrap_or(m.created_ms);
    json!({
        "messageId": m.id,
        "receiptHandle": base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", m.id, m.attempts)),
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": m.attempts.to_string(),
            "SentTimestamp": sent.to_string(),
            "SenderId": "gust",
            "ApproximateFirstReceiveTimestamp": m.first_receive_ms.unwrap_or(sent).to_string(),
        },
        "messageAttributes": m.attributes.get("messageAttributes").cloned().unwrap_or(json!({})),
        "md5OfBody": http::md5_hex(body.as_bytes()),
        "eventSource": "aws:sqs",
        "eventSourceARN": format!("arn:aws:sqs:{}:{}:{queue}", gust_core::lambda::REGION, gust_core::lambda::ACCOUNT_ID),
        "awsRegion": gust_core::lambda::REGION,
    })
}

/// What an OpenFaaS-style callback receives: (status, body).
fn callback_body(
    ok: bool,
    http_event: bool,
    response: &Bytes,
    error: Option<&str>,
) -> (u16, Bytes) {
    if !ok {
        let body = if response.is_empty() {
            Bytes::from(
                gust_core::lambda::error_body("Gust.DeliveryFailed", error.unwrap_or("failed"))
                    .to_vec(),
            )
        } else {
            response.clone()
        };
        return (500, body);
    }
    if http_event
        && let Ok(v) = serde_json::from_slice::<Value>(response)
        && let Some(code) = v.get("statusCode").and_then(Value::as_u64)
    {
        let body = v.get("body").and_then(Value::as_str).unwrap_or("");
        let bytes = if v
            .get("isBase64Encoded")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .unwrap_or_default()
        } else {
            body.as_bytes().to_vec()
        };
        return (code as u16, Bytes::from(bytes));
    }
    (200, response.clone())
}
