//! gust-pool: instance pools, one per deployed function version, and `Pools`, the registry of
//! live pools that implements `Invoker`. The decisions are `policy::PoolState`'s (pure); this
//! file is the thin async driver that starts, hands out, reaps and stops instances.
//!
//! Invariants kept here: an instance serves one invocation at a time; every wait is bounded
//! (queue timeout, init timeout, invocation timeout); a redeploy swaps the pool new requests see
//! while the old pool finishes what it holds.

pub mod policy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use gust_core::{
    BoxFuture, DEFAULT_TIMEOUT, Executor, FunctionVersion, INIT_TIMEOUT, InitError, Instance,
    InstanceOutcome, InstanceRequest, Invocation, InvokeError, InvokeResult, Invoker, LATEST,
    Outcome, lambda,
};
use tokio::sync::{Notify, oneshot};

use crate::policy::{Admit, Handoff, Limits, PoolState};

type Inst = Arc<dyn Instance>;

/// What a queued request receives.
enum Wake {
    Ready(Inst),
    /// The instance started for it failed its init: Lambda returns the init error.
    InitFailed(InitError),
    /// This pool is draining and will not serve it: ask the live pool.
    Retry,
}
type Waiter = oneshot::Sender<Wake>;

/// How often a draining pool may send a request on to its replacement, and how often an
/// invocation is retried after meeting an instance that died before taking it.
const MAX_RETRIES: usize = 3;
/// How often the reaper looks for idle instances that died, at most.
const LIVENESS_CHECK: Duration = Duration::from_secs(5);
/// After a failed start, background (min_instances) starts pause this long.
const START_BACKOFF: Duration = Duration::from_secs(5);

/// A snapshot of a pool, for `describe`.
#[derive(Debug, Clone, serde::Serialize, Default)]
pub struct PoolStats {
    pub revision: u64,
    pub idle: usize,
    pub busy: usize,
    pub starting: usize,
    pub waiting: usize,
    pub cold_starts: u64,
    pub invocations: u64,
    pub throttles: u64,
}

#[derive(Default)]
struct Counters {
    cold_starts: u64,
    invocations: u64,
    throttles: u64,
}

pub struct Pool {
    function: Arc<FunctionVersion>,
    executor: Arc<dyn Executor>,
    state: Mutex<PoolState<Inst, Waiter>>,
    counters: Mutex<Counters>,
    queue_timeout: Duration,
    /// Wakes the reaper when the idle set changes.
    reaper_wake: Arc<Notify>,
    /// Every instance started, for the kill at shutdown (busy ones included).
    live: Mutex<Vec<Weak<dyn Instance>>>,
    last_start_failure: Mutex<Option<Instant>>,
}

impl Pool {
    fn new(function: Arc<FunctionVersion>, executor: Arc<dyn Executor>) -> Arc<Pool> {
        let s = &function.spec.scaling;
        let limits = Limits {
            max_instances: s.max_instances as usize,
            min_instances: s.min_instances as usize,
            queue_length: s.queue_length as usize,
            idle_timeout: Duration::from_secs(s.idle_timeout),
        };
        let pool = Arc::new(Pool {
            queue_timeout: Duration::from_secs(s.queue_timeout),
            function,
            executor,
            state: Mutex::new(PoolState::new(limits)),
            counters: Mutex::new(Counters::default()),
            reaper_wake: Arc::new(Notify::new()),
            live: Mutex::new(Vec::new()),
            last_start_failure: Mutex::new(None),
        });
        tokio::spawn(reaper(Arc::downgrade(&pool), pool.reaper_wake.clone()));
        pool
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState<Inst, Waiter>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.counters.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn function(&self) -> &Arc<FunctionVersion> {
        &self.function
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.state();
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        PoolStats {
            revision: self.function.revision,
            idle: st.idle_count(),
            busy: st.busy_count(),
            starting: st.starting_count(),
            waiting: st.waiting_count(),
            cold_starts: c.cold_starts,
            invocations: c.invocations,
            throttles: c.throttles,
        }
    }

    /// Starts `n` instances in the background (they were already counted as starting).
    fn spawn_starts(self: &Arc<Self>, n: usize) {
        for _ in 0..n {
            let pool = self.clone();
            tokio::spawn(async move { pool.start_one().await });
        }
    }

    async fn start_one(self: Arc<Self>) -> bool {
        self.count(|c| c.cold_starts += 1);
        match self.executor.start(self.function.clone()).await {
            Ok(inst) => {
                {
                    let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
                    live.retain(|w| w.strong_count() > 0);
                    live.push(Arc::downgrade(&inst));
                }
                let handoff = self.state().started(inst, Instant::now());
                self.place(handoff);
                true
            }
            Err(e) => {
                tracing::warn!(function = %self.function.spec.name, "instance failed to start: {e}");
                *self
                    .last_start_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                let (waiters, draining) = {
                    let mut st = self.state();
                    (st.start_failed(), st.is_draining())
                };
                for w in waiters {
                    let _ = w.send(if draining {
                        Wake::Retry
                    } else {
                        Wake::InitFailed(e.clone())
                    });
                }
                false
            }
        }
    }

    /// Carries out a handoff decision; loops when the chosen waiter has already gone.
    fn place(self: &Arc<Self>, mut handoff: Handoff<Inst, Waiter>) {
        loop {
            match handoff {
                Handoff::Idle => {
                    self.reaper_wake.notify_one();
                    return;
                }
                Handoff::Stop(inst) => {
                    tokio::spawn(async move { inst.stop().await });
                    return;
                }
                Handoff::ToWaiter(w, inst) => match w.send(Wake::Ready(inst)) {
                    Ok(()) => return,
                    Err(Wake::Ready(inst)) => {
                        handoff = self.state().unclaimed(inst, Instant::now());
                    }
                    Err(_) => return,
                },
            }
        }
    }

    /// Starts `min_instances` and waits until they are up (or failed). Returns how many started.
    pub async fn start_min(self: &Arc<Self>) -> usize {
        let n = self.state().starts_needed();
        let mut tasks = Vec::new();
        for _ in 0..n {
            tasks.push(tokio::spawn(self.clone().start_one()));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap_or(false) {
                ok += 1;
            }
        }
        ok
    }

    async fn acquire(self: &Arc<Self>) -> Result<Inst, AcquireError> {
        let (tx, rx) = oneshot::channel();
        let (admit, init_pending) = {
            let mut st = self.state();
            let admit = st.admit(|i| i.is_alive(), || tx);
            (admit, st.starting_count() > 0)
        };
        let (ticket, started) = match admit {
            Admit::Run(inst) => return Ok(inst),
            Admit::Throttled => return Err(AcquireError::Throttled),
            Admit::Retry => return Err(AcquireError::Retry),
            Admit::Queued { ticket, start } => (ticket, start),
        };
        if started {
            self.spawn_starts(1);
        }
        // While instances are starting, a request may wait for their init as well as the queue.
        let wait = if init_pending {
            self.queue_timeout + INIT_TIMEOUT
        } else {
            self.queue_timeout
        };
        // If this future is dropped while queued (the caller went away), the guard takes the
        // ticket out of the queue or gives back an instance already handed over.
        let mut guard = QueuedGuard {
            pool: self,
            ticket,
            rx: Some(rx),
        };
        let rx = guard.rx.as_mut().expect("set above");
        let woken = match tokio::time::timeout(wait, &mut *rx).await {
            Ok(r) => r.ok(),
            Err(_) => {
                let (cancelled, draining) = {
                    let mut st = self.state();
                    (st.cancel(ticket).is_some(), st.is_draining())
                };
                if cancelled {
                    guard.rx = None;
                    return Err(if draining {
                        AcquireError::Retry
                    } else {
                        AcquireError::QueueTimeout
                    });
                }
                // Handed over while timing out: it is (or is about to be) in the channel.
                (&mut *rx).await.ok()
            }
        };
        guard.rx = None;
        match woken {
            Some(Wake::Ready(inst)) => Ok(inst),
            Some(Wake::InitFailed(e)) => Err(AcquireError::Init(e)),
            Some(Wake::Retry) => Err(AcquireError::Retry),
            None => Err(AcquireError::QueueTimeout),
        }
    }

    fn timeout(&self, inst: &Inst) -> Duration {
        match self.function.spec.timeout {
            Some(s) => Duration::from_secs(s.into()),
            None => inst.config_timeout().unwrap_or(DEFAULT_TIMEOUT),
        }
    }

    /// Runs one invocation on this pool. `Err(None)` means: this pool is draining, or the
    /// instance died before taking the invocation; retry (on the live pool).
    async fn invoke_once(
        self: &Arc<Self>,
        request_id: String,
        invocation: Invocation,
    ) -> Result<InvokeResult, Option<InvokeError>> {
        let tail = invocation.tail_log;
        let inst = match self.acquire().await {
            Ok(i) => i,
            Err(AcquireError::Retry) => return Err(None),
            Err(AcquireError::Init(e)) => {
                self.count(|c| c.invocations += 1);
                return Ok(InvokeResult {
                    request_id,
                    outcome: Outcome::FunctionError {
                        error_type: e.error_type.clone(),
                        body: e.body,
                    },
                    executed_version: LATEST.into(),
                    log_tail: tail.then(|| format!("{}: {}\n", e.error_type, e.message)),
                });
            }
            Err(e) => {
                self.count(|c| c.throttles += 1);
                let s = &self.function.spec.scaling;
                let why = match e {
                    AcquireError::QueueTimeout => {
                        format!("waited {} s in the queue", s.queue_timeout)
                    }
                    _ => format!(
                        "{} instances busy and {} requests queued",
                        s.max_instances, s.queue_length
                    ),
                };
                return Err(Some(InvokeError::Throttled {
                    message: format!(
                        "Rate Exceeded. Function {} is at its concurrency limit ({why})",
                        self.function.spec.name
                    ),
                    retry_after_secs: 1,
                }));
            }
        };
        let timeout = self.timeout(&inst);
        let req = InstanceRequest {
            request_id: request_id.clone(),
            invocation,
            timeout,
        };
        // The invocation runs in its own task so that the instance is released even if the
        // caller goes away mid-invocation (axum drops the handler future on disconnect).
        let mut lease = Lease {
            pool: self.clone(),
            inst: Some(inst),
        };
        let task = tokio::spawn(async move {
            let inst = lease.inst.clone().expect("leased");
            let outcome = inst.invoke(req).await;
            lease
                .pool
                .finish(lease.inst.take().expect("leased"), &outcome);
            outcome
        });
        let outcome = task.await.map_err(|e| {
            Some(InvokeError::Platform(format!(
                "invocation task failed: {e}"
            )))
        })?;
        let (outcome, log_tail) = match outcome {
            InstanceOutcome::Unavailable => return Err(None),
            InstanceOutcome::Done { outcome, log_tail } => (outcome, log_tail),
            InstanceOutcome::TimedOut { log_tail } => (
                Outcome::FunctionError {
                    error_type: "Sandbox.Timedout".into(),
                    body: lambda::timeout_body(&request_id, timeout.as_secs_f64()),
                },
                log_tail,
            ),
            InstanceOutcome::OutOfMemory { detail, log_tail } => (
                Outcome::FunctionError {
                    error_type: lambda::OUT_OF_MEMORY.into(),
                    body: lambda::out_of_memory_body(&request_id, &detail),
                },
                log_tail,
            ),
            InstanceOutcome::Crashed { detail, log_tail } => (
                Outcome::FunctionError {
                    error_type: "Runtime.ExitError".into(),
                    body: lambda::exit_body(&request_id, &detail),
                },
                log_tail,
            ),
        };
        self.count(|c| c.invocations += 1);
        Ok(InvokeResult {
            request_id,
            outcome,
            executed_version: LATEST.into(),
            log_tail,
        })
    }

    fn finish(self: &Arc<Self>, inst: Inst, outcome: &InstanceOutcome) {
        let healthy = matches!(outcome, InstanceOutcome::Done { .. }) && inst.is_alive();
        if healthy {
            let handoff = self.state().release(inst, Instant::now());
            self.place(handoff);
        } else {
            tracing::debug!(function = %self.function.spec.name, instance = inst.id(), "discarding a dead instance");
            inst.kill();
            let (starts, orphans) = {
                let mut st = self.state();
                let orphans = st.discarded();
                (st.starts_needed(), orphans)
            };
            for w in orphans {
                let _ = w.send(Wake::Retry);
            }
            self.spawn_starts(starts);
        }
    }

    /// Kills every instance this pool started, busy ones included (end of a shutdown).
    fn kill_all(&self) {
        let live = std::mem::take(&mut *self.live.lock().unwrap_or_else(|p| p.into_inner()));
        for inst in live.iter().filter_map(Weak::upgrade) {
            inst.kill();
        }
    }

    /// Stops taking work: idle instances stop now, busy ones after they finish.
    pub fn drain(&self) {
        let (idle, orphans) = self.state().drain();
        for w in orphans {
            let _ = w.send(Wake::Retry);
        }
        self.reaper_wake.notify_one();
        for inst in idle {
            tokio::spawn(async move { inst.stop().await });
        }
    }

    /// Stops the idle instances (they are started again on demand). Returns how many.
    pub async fn recycle(&self) -> usize {
        let idle = self.state().take_idle();
        let n = idle.len();
        for inst in idle {
            inst.stop().await;
        }
        n
    }

    /// Waits (bounded) until no instance is busy or starting.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            {
                let st = self.state();
                if st.busy_count() == 0 && st.starting_count() == 0 {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

enum AcquireError {
    Throttled,
    QueueTimeout,
    Init(InitError),
    Retry,
}

/// An instance out on an invocation. Normally `finish` takes it back; if the invocation task
/// panicked (or was dropped at runtime shutdown) the instance is discarded here, so the pool's
/// `busy` count stays true.
struct Lease {
    pool: Arc<Pool>,
    inst: Option<Inst>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(inst) = self.inst.take() {
            // No spawning here: this may run while the runtime shuts down. The reaper starts
            // replacements; waiters no instance will serve go to the live pool.
            inst.kill();
            let orphans = self.pool.state().discarded();
            for w in orphans {
                let _ = w.send(Wake::Retry);
            }
        }
    }
}

/// Cleans up a queued request whose future is dropped before it got an instance.
struct QueuedGuard<'a> {
    pool: &'a Arc<Pool>,
    ticket: u64,
    rx: Option<oneshot::Receiver<Wake>>,
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        if self.pool.state().cancel(self.ticket).is_some() {
            return;
        }
        // Already picked: close the channel so a send still to come fails (and `place` takes
        // the instance back), and return an instance that was already sent.
        rx.close();
        if let Ok(Wake::Ready(inst)) = rx.try_recv() {
            let handoff = self.pool.state().unclaimed(inst, Instant::now());
            self.pool.place(handoff);
        }
    }
}

/// Stops idle instances past their idle timeout; ends when the pool is dropped.
async fn reaper(pool: Weak<Pool>, wake: Arc<Notify>) {
    loop {
        let (sleep, expired) = {
            let Some(p) = pool.upgrade() else { return };
            if p.state().is_draining() && p.state().total() == 0 {
                return;
            }
            let now = Instant::now();
            let mut st = p.state();
            // Idle instances whose process died (say, a timer threw after the response)
            // leave the pool here, so `min_instances` is restored without waiting for a caller.
            let mut expired = st.prune(|i| i.is_alive());
            expired.extend(st.reap(now));
            let sleep = st
                .next_expiry(now)
                .unwrap_or(LIVENESS_CHECK)
                .clamp(Duration::from_millis(50), LIVENESS_CHECK);
            drop(st);
            let failed_recently = p
                .last_start_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() < START_BACKOFF);
            if !failed_recently {
                let starts = p.state().starts_needed();
                p.spawn_starts(starts);
            }
            (sleep, expired)
        };
        for inst in expired {
            inst.stop().await;
        }
        // Only the Notify is held while sleeping, not the pool: a retired pool can go away.
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = wake.notified() => {}
        }
    }
}

/// The live pools, by function name. Implements `Invoker`.
pub struct Pools {
    executor: Arc<dyn Executor>,
    pools: RwLock<HashMap<String, Arc<Pool>>>,
    /// Pools replaced or removed but maybe still finishing work (kept for shutdown).
    retired: Mutex<Vec<Weak<Pool>>>,
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Pools {
    pub fn new(executor: Arc<dyn Executor>) -> Arc<Pools> {
        Arc::new(Pools {
            executor,
            pools: RwLock::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            shutting_down: Default::default(),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Switches new requests to a new version; the old pool drains. Returns the new pool (the
    /// caller starts its minimum instances, before or after the switch).
    pub fn deploy(&self, function: Arc<FunctionVersion>) -> Arc<Pool> {
        let pool = Pool::new(function.clone(), self.executor.clone());
        let old = self
            .pools
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(function.spec.name.clone(), pool.clone());
        if let Some(old) = old {
            self.retire(old);
        }
        pool
    }

    /// Builds a pool without exposing it (so min instances can warm up before the switch).
    pub fn prepare(&self, function: Arc<FunctionVersion>) -> Arc<Pool> {
        Pool::new(function, self.executor.clone())
    }

    /// Makes a prepared pool the live one.
    pub fn activate(&self, pool: Arc<Pool>) {
        let name = pool.function.spec.name.clone();
        let old = self
            .pools
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, pool);
        if let Some(old) = old {
            self.retire(old);
        }
    }

    pub fn remove(&self, name: &str) -> bool {
        let old = self
            .pools
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        match old {
            Some(old) => {
                self.retire(old);
                true
            }
            None => false,
        }
    }

    fn retire(&self, pool: Arc<Pool>) {
        pool.drain();
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|w| w.strong_count() > 0);
        retired.push(Arc::downgrade(&pool));
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Graceful shutdown: refuse new work, let in-flight invocations finish (bounded by
    /// `grace`), then stop every instance.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let live: Vec<Arc<Pool>> = self
            .pools
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        let retired: Vec<Arc<Pool>> = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        let all: Vec<Arc<Pool>> = live.into_iter().chain(retired).collect();
        for p in &all {
            p.drain();
        }
        let deadline = Instant::now() + grace;
        for p in &all {
            p.wait_idle(deadline.saturating_duration_since(Instant::now()))
                .await;
        }
        // Idle instances stop gracefully; whatever is still busy past the grace period is
        // killed (its callers get errors).
        for p in &all {
            let idle = p.state().take_idle();
            for inst in idle {
                inst.stop().await;
            }
            p.kill_all();
        }
        self.executor.shutdown().await;
    }
}

impl Invoker for Pools {
    fn invoke<'a>(
        &'a self,
        function: &'a str,
        invocation: Invocation,
    ) -> BoxFuture<'a, Result<InvokeResult, InvokeError>> {
        Box::pin(async move {
            // One request id for the invocation, whichever pool or instance ends up running it.
            let request_id = invocation
                .request_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            for _ in 0..=MAX_RETRIES {
                if self
                    .shutting_down
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    return Err(InvokeError::ShuttingDown);
                }
                let pool = self
                    .get(function)
                    .ok_or_else(|| InvokeError::NotFound(function.to_string()))?;
                // Cheap: the payload is reference-counted bytes.
                match pool
                    .invoke_once(request_id.clone(), invocation.clone())
                    .await
                {
                    Ok(r) => return Ok(r),
                    Err(Some(e)) => return Err(e),
                    Err(None) => tokio::task::yield_now().await,
                }
            }
            Err(InvokeError::Platform(format!(
                "function {function}: no instance could take the invocation after {MAX_RETRIES} retries"
            )))
        })
    }
}
