//! The pool's decisions as a pure state machine: which instance serves a request, when to start
//! one, when to queue, when to refuse, when to reap. No I/O, no clock of its own (time is passed
//! in), generic over the instance handle `I` and the waiter `W`, so it is tested without
//! processes. The driver in `lib.rs` carries the decisions out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_instances: usize,
    pub min_instances: usize,
    /// Waiters allowed beyond those that instances already starting will serve.
    pub queue_length: usize,
    pub idle_timeout: Duration,
}

/// What to do with a new request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<I> {
    /// Serve it now on this warm instance.
    Run(I),
    /// It waits in the queue with this ticket; if `start` the driver starts one instance for it.
    Queued { ticket: u64, start: bool },
    /// Every instance is busy, none may start, the queue is full.
    Throttled,
    /// This pool is draining and has nothing to serve with: use the live pool.
    Retry,
}

/// Where a freed (or newly started) instance goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Handoff<I, W> {
    /// To the longest-waiting request.
    ToWaiter(W, I),
    /// Back to the idle stack.
    Idle,
    /// The pool is draining and nobody waits: stop it.
    Stop(I),
}

#[derive(Debug)]
pub struct PoolState<I, W> {
    limits: Limits,
    /// Idle instances, most recently used last: taken from the end, so the same few stay hot
    /// and the rest idle out.
    idle: Vec<(I, Instant)>,
    busy: usize,
    starting: usize,
    waiters: VecDeque<(u64, W)>,
    next_ticket: u64,
    draining: bool,
}

impl<I, W> PoolState<I, W> {
    pub fn new(limits: Limits) -> Self {
        PoolState {
            limits,
            idle: Vec::new(),
            busy: 0,
            starting: 0,
            waiters: VecDeque::new(),
            next_ticket: 0,
            draining: false,
        }
    }

    pub fn total(&self) -> usize {
        self.idle.len() + self.busy + self.starting
    }
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }
    pub fn busy_count(&self) -> usize {
        self.busy
    }
    pub fn starting_count(&self) -> usize {
        self.starting
    }
    pub fn waiting_count(&self) -> usize {
        self.waiters.len()
    }
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// A new request: the MRU idle instance, else a queue slot (starting an instance when below
    /// the limit), else throttled. Idle instances for which `alive` is false (their process
    /// died while idle) are dropped on the way. A draining pool that has no instance to offer
    /// answers `Retry`: the caller should ask the pool that replaced it. `waiter` is only
    /// consumed when the request is queued.
    pub fn admit(&mut self, alive: impl Fn(&I) -> bool, waiter: impl FnOnce() -> W) -> Admit<I> {
        while let Some((inst, _)) = self.idle.pop() {
            if alive(&inst) {
                self.busy += 1;
                return Admit::Run(inst);
            }
        }
        // A waiter is covered when an instance already starting will be free for it (released
        // instances go to waiters first, so starts can outnumber waiters during a ramp-up);
        // only an uncovered waiter starts another instance or takes a queue slot.
        let covered = self.waiters.len() < self.starting;
        if self.draining && !covered {
            return Admit::Retry;
        }
        let start = !covered && !self.draining && self.total() < self.limits.max_instances;
        if !covered && !start && self.waiters.len() - self.starting >= self.limits.queue_length {
            return Admit::Throttled;
        }
        if start {
            self.starting += 1;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiters.push_back((ticket, waiter()));
        Admit::Queued { ticket, start }
    }

    /// A waiter gave up (its wait timed out). Returns it if it was still queued; `None` means an
    /// instance was already handed to it.
    pub fn cancel(&mut self, ticket: u64) -> Option<W> {
        let pos = self.waiters.iter().position(|(t, _)| *t == ticket)?;
        self.waiters.remove(pos).map(|(_, w)| w)
    }

    /// An instance finished an invocation and is healthy.
    pub fn release(&mut self, inst: I, now: Instant) -> Handoff<I, W> {
        self.busy -= 1;
        self.place(inst, now)
    }

    /// An instance finished starting.
    pub fn started(&mut self, inst: I, now: Instant) -> Handoff<I, W> {
        self.starting -= 1;
        self.place(inst, now)
    }

    fn place(&mut self, inst: I, now: Instant) -> Handoff<I, W> {
        if let Some((_, w)) = self.waiters.pop_front() {
            self.busy += 1;
            return Handoff::ToWaiter(w, inst);
        }
        if self.draining {
            return Handoff::Stop(inst);
        }
        self.idle.push((inst, now));
        Handoff::Idle
    }

    /// A waiter's receiver was gone when an instance was handed to it: take the instance back
    /// as if released.
    pub fn unclaimed(&mut self, inst: I, now: Instant) -> Handoff<I, W> {
        self.release(inst, now)
    }

    /// An instance failed to start. Returns the waiters no other instance (starting or busy)
    /// covers: each gets the init error (Lambda returns it to every invocation that met it) —
    /// or, in a draining pool, is sent to the live pool, whose code may well start.
    pub fn start_failed(&mut self) -> Vec<W> {
        self.starting -= 1;
        let mut out = Vec::new();
        // Waiters that busy instances will serve did not meet the failure.
        while self.waiters.len() > self.starting + self.busy {
            match self.waiters.pop_front() {
                Some((_, w)) => out.push(w),
                None => break,
            }
        }
        out
    }

    /// A busy instance died (timeout, crash) and was discarded. In a draining pool, which
    /// starts nothing, waiters left without an instance are returned: they must retry on the
    /// live pool.
    pub fn discarded(&mut self) -> Vec<W> {
        self.busy -= 1;
        let mut orphans = Vec::new();
        if self.draining {
            while self.waiters.len() > self.starting + self.busy {
                match self.waiters.pop_back() {
                    Some((_, w)) => orphans.push(w),
                    None => break,
                }
            }
        }
        orphans
    }

    /// How many instances to start now: for waiters no starting instance covers (after a
    /// discard), and to keep `min_instances`. Marks them as starting.
    pub fn starts_needed(&mut self) -> usize {
        if self.draining {
            return 0;
        }
        let room = self.limits.max_instances.saturating_sub(self.total());
        let for_waiters = self.waiters.len().saturating_sub(self.starting);
        let for_min = self.limits.min_instances.saturating_sub(self.total());
        let n = for_waiters.max(for_min).min(room);
        self.starting += n;
        n
    }

    /// Idle instances past `idle_timeout`, oldest first, keeping `min_instances` in all.
    pub fn reap(&mut self, now: Instant) -> Vec<I> {
        let mut out = Vec::new();
        // The idle stack is ordered by last use: the front is the least recently used.
        while let Some((_, since)) = self.idle.first() {
            let expired = now.saturating_duration_since(*since) >= self.limits.idle_timeout;
            if !expired || self.total() <= self.limits.min_instances {
                break;
            }
            out.push(self.idle.remove(0).0);
        }
        out
    }

    /// Takes every idle instance (recycle, removal).
    pub fn take_idle(&mut self) -> Vec<I> {
        self.idle.drain(..).map(|(i, _)| i).collect()
    }

    /// Stops taking new work for good (a redeploy replaced this pool, or the function was
    /// removed): returns the idle instances to stop, and the waiters no starting instance
    /// covers, to be sent to the live pool rather than wait for this one's busy instances.
    pub fn drain(&mut self) -> (Vec<I>, Vec<W>) {
        self.draining = true;
        let mut orphans = Vec::new();
        while self.waiters.len() > self.starting {
            match self.waiters.pop_back() {
                Some((_, w)) => orphans.push(w),
                None => break,
            }
        }
        orphans.reverse();
        (self.take_idle(), orphans)
    }

    /// Drops idle instances whose process died while idle (so `min_instances` can be
    /// replaced); returns them.
    pub fn prune(&mut self, alive: impl Fn(&I) -> bool) -> Vec<I> {
        let mut dead = Vec::new();
        let mut i = 0;
        while i < self.idle.len() {
            if alive(&self.idle[i].0) {
                i += 1;
            } else {
                dead.push(self.idle.remove(i).0);
            }
        }
        dead
    }

    /// The time until the next idle instance expires, for the reaper's sleep; `None` when
    /// nothing can expire (no idle instance, or only the `min_instances` are left).
    pub fn next_expiry(&self, now: Instant) -> Option<Duration> {
        if self.total() <= self.limits.min_instances {
            return None;
        }
        self.idle
            .first()
            .map(|(_, since)| (*since + self.limits.idle_timeout).saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, min: usize, queue: usize) -> Limits {
        Limits {
            max_instances: max,
            min_instances: min,
            queue_length: queue,
            idle_timeout: Duration::from_secs(10),
        }
    }

    /// Admits waiter `w` (every instance alive) and returns `Some(start)` if it was queued.
    fn queued<I, W>(p: &mut PoolState<I, W>, w: W) -> Option<bool> {
        match p.admit(|_| true, || w) {
            Admit::Queued { start, .. } => Some(start),
            _ => None,
        }
    }

    #[test]
    fn cold_start_then_warm_reuse_mru_first() {
        let t0 = Instant::now();
        let mut p: PoolState<&str, u32> = PoolState::new(limits(2, 0, 0));
        assert_eq!(
            p.admit(|_| true, || 1),
            Admit::Queued {
                ticket: 0,
                start: true
            }
        );
        assert_eq!(
            p.admit(|_| true, || 2),
            Admit::Queued {
                ticket: 1,
                start: true
            }
        );
        assert_eq!(p.started("a", t0), Handoff::ToWaiter(1, "a"));
        assert_eq!(p.started("b", t0), Handoff::ToWaiter(2, "b"));
        assert_eq!(p.release("a", t0), Handoff::Idle);
        assert_eq!(p.release("b", t0 + Duration::from_secs(1)), Handoff::Idle);
        // Most recently used first.
        assert_eq!(p.admit(|_| true, || 3), Admit::Run("b"));
        assert_eq!(p.admit(|_| true, || 4), Admit::Run("a"));
        assert_eq!(p.busy_count(), 2);
    }

    #[test]
    fn concurrent_requests_never_share_and_queue_is_bounded() {
        let t0 = Instant::now();
        let mut p: PoolState<u32, u32> = PoolState::new(limits(2, 0, 1));
        assert_eq!(queued(&mut p, 1), Some(true));
        assert_eq!(queued(&mut p, 2), Some(true));
        // At the limit: one may queue, the next is throttled.
        assert_eq!(queued(&mut p, 3), Some(false));
        assert_eq!(p.admit(|_| true, || 4), Admit::Throttled);
        assert_eq!(p.started(10, t0), Handoff::ToWaiter(1, 10));
        assert_eq!(p.started(11, t0), Handoff::ToWaiter(2, 11));
        assert_eq!(p.admit(|_| true, || 5), Admit::Throttled);
        // FIFO: the freed instance goes to the oldest waiter.
        assert_eq!(p.release(10, t0), Handoff::ToWaiter(3, 10));
        assert_eq!(p.total(), 2);
    }

    #[test]
    fn ramp_up_does_not_start_more_than_it_needs() {
        let t0 = Instant::now();
        let mut p: PoolState<u32, u32> = PoolState::new(limits(8, 0, 0));
        assert_eq!(queued(&mut p, 1), Some(true));
        assert_eq!(queued(&mut p, 2), Some(true));
        assert_eq!(p.started(10, t0), Handoff::ToWaiter(1, 10));
        // The first caller is done before the second instance is up: the freed instance goes
        // to the second caller, and a new request is covered by the instance still starting.
        assert_eq!(p.release(10, t0), Handoff::ToWaiter(2, 10));
        assert_eq!(
            p.admit(|_| true, || 3),
            Admit::Queued {
                ticket: 2,
                start: false
            }
        );
        assert_eq!(p.started(11, t0), Handoff::ToWaiter(3, 11));
        assert_eq!(p.total(), 2);
        // Once no start covers it, a request starts one again (queue length 0 is no obstacle).
        assert_eq!(queued(&mut p, 4), Some(true));
    }

    #[test]
    fn cancel_and_init_failure() {
        let mut p: PoolState<u32, u32> = PoolState::new(limits(1, 0, 5));
        let Admit::Queued {
            ticket,
            start: true,
        } = p.admit(|_| true, || 1)
        else {
            panic!()
        };
        let Admit::Queued {
            ticket: t2,
            start: false,
        } = p.admit(|_| true, || 2)
        else {
            panic!()
        };
        assert_eq!(p.cancel(t2), Some(2));
        assert_eq!(p.cancel(t2), None);
        // The failed start's error goes to the waiter that caused it; nothing is left starting.
        assert_eq!(p.start_failed(), vec![1]);
        assert_eq!(p.cancel(ticket), None);
        assert_eq!(p.total(), 0);
        assert_eq!(p.starts_needed(), 0);
    }

    #[test]
    fn discard_restarts_for_waiters_and_min() {
        let t0 = Instant::now();
        let mut p: PoolState<u32, u32> = PoolState::new(limits(1, 1, 5));
        assert_eq!(p.starts_needed(), 1);
        assert_eq!(p.started(1, t0), Handoff::Idle);
        assert_eq!(p.admit(|_| true, || 0), Admit::Run(1));
        assert_eq!(queued(&mut p, 7), Some(false));
        assert!(p.discarded().is_empty());
        // A waiter is left with nothing to serve it: start one.
        assert_eq!(p.starts_needed(), 1);
        assert_eq!(p.starts_needed(), 0);
        assert_eq!(p.started(2, t0), Handoff::ToWaiter(7, 2));
    }

    #[test]
    fn reaping_keeps_min_and_takes_lru_first() {
        let t0 = Instant::now();
        let mut p: PoolState<u32, u32> = PoolState::new(limits(3, 1, 0));
        for i in 0..3 {
            p.admit(|_| true, || i);
        }
        for i in 0..3u32 {
            let _ = p.started(i, t0);
        }
        p.release(0, t0);
        p.release(1, t0 + Duration::from_secs(5));
        p.release(2, t0 + Duration::from_secs(6));
        assert_eq!(p.next_expiry(t0), Some(Duration::from_secs(10)));
        assert!(p.reap(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(p.reap(t0 + Duration::from_secs(15)), vec![0, 1]);
        // One expired instance is left, but it is the minimum: nothing to wake up for.
        assert!(p.reap(t0 + Duration::from_secs(100)).is_empty());
        assert_eq!(p.total(), 1);
        assert_eq!(p.next_expiry(t0 + Duration::from_secs(100)), None);
    }

    #[test]
    fn init_failure_reaches_every_uncovered_waiter_and_dead_idle_is_skipped() {
        let t0 = Instant::now();
        let mut p: PoolState<u32, u32> = PoolState::new(limits(1, 0, 5));
        p.admit(|_| true, || 1);
        p.admit(|_| true, || 2);
        p.admit(|_| true, || 3);
        assert_eq!(p.start_failed(), vec![1, 2, 3]);
        assert_eq!((p.total(), p.waiting_count()), (0, 0));
        // An instance that died while idle is not handed out.
        p.admit(|_| true, || 4);
        assert_eq!(p.started(7, t0), Handoff::ToWaiter(4, 7));
        assert_eq!(p.release(7, t0), Handoff::Idle);
        assert!(matches!(
            p.admit(|i| *i != 7, || 5),
            Admit::Queued { start: true, .. }
        ));
        assert_eq!(p.total(), 1, "the dead instance left the pool");
    }

    #[test]
    fn draining_pool_sends_callers_to_the_live_one() {
        let t0 = Instant::now();
        let mut p: PoolState<u32, u32> = PoolState::new(limits(2, 0, 5));
        assert!(p.drain().0.is_empty());
        assert_eq!(p.admit(|_| true, || 1), Admit::Retry);
        // A caller covered by an instance still starting waits for it.
        let mut p: PoolState<u32, u32> = PoolState::new(limits(1, 0, 5));
        p.admit(|_| true, || 1);
        let (_, orphans) = p.drain();
        assert!(orphans.is_empty());
        assert_eq!(p.started(9, t0), Handoff::ToWaiter(1, 9));
        assert!(p.discarded().is_empty());
        assert_eq!(p.total(), 0);
        // Dead idle instances are pruned.
        let mut p: PoolState<u32, u32> = PoolState::new(limits(2, 1, 5));
        p.starts_needed();
        p.started(3, t0);
        assert_eq!(p.prune(|i| *i != 3), vec![3]);
        assert_eq!(p.starts_needed(), 1, "the minimum is restored");
    }

    #[test]
    fn draining_serves_waiters_then_stops() {
        let t0 = Instant::now();
        let mut p: PoolState<u32, u32> = PoolState::new(limits(1, 0, 5));
        p.admit(|_| true, || 1);
        p.admit(|_| true, || 2);
        assert_eq!(p.started(9, t0), Handoff::ToWaiter(1, 9));
        // The queued caller is not kept waiting behind the old version's busy instance.
        let (idle, orphans) = p.drain();
        assert!(idle.is_empty());
        assert_eq!(orphans, vec![2]);
        assert_eq!(p.release(9, t0), Handoff::Stop(9));
        assert_eq!(p.starts_needed(), 0);
    }
}
