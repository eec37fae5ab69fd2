//! Rate limiting for the server's own log lines, pure: the caller passes the time. A failure
//! that repeats on every request (a full disk, a refused connection storm) must not write one
//! line per occurrence: per key, the first `burst` occurrences of each interval are logged, the
//! rest are counted, and the next line logged for that key says how many were left out
//! (`… (repeated 52107 times in the last 10 s)`).
//!
//! ```
//! use gust_core::lograte::LogLimiter;
//! static LIMIT: LogLimiter = LogLimiter::new(10_000, 3);
//! let now = 1_000;
//! if let Some(r) = LIMIT.check("db-write", now) {
//!     // tracing::error!("writing logs failed: disk full{r}");
//!     let _ = format!("writing logs failed: disk full{r}");
//! }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

/// Keys remembered at most; beyond it, keys whose interval has ended are forgotten (their
/// pending count is then lost, never the next line).
const MAX_KEYS: usize = 1024;

pub struct LogLimiter {
    interval_ms: u64,
    burst: u32,
    keys: Mutex<BTreeMap<String, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start_ms: u64,
    logged: u32,
    suppressed: u64,
}

/// Permission to log one line; its `Display` is the summary of what was left out before it
/// (empty when nothing was), to append to the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    /// Occurrences not logged since this key's last logged line.
    pub suppressed: u64,
    /// Over how long (ms): from the start of the interval they fell in until now.
    pub over_ms: u64,
}

impl fmt::Display for Logged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.suppressed == 0 {
            return Ok(());
        }
        write!(
            f,
            " (repeated {} times in the last {} s)",
            self.suppressed,
            self.over_ms.div_ceil(1000).max(1)
        )
    }
}

impl LogLimiter {
    /// Logs at most `burst` lines per key per `interval_ms`.
    pub const fn new(interval_ms: u64, burst: u32) -> LogLimiter {
        LogLimiter {
            interval_ms,
            burst,
            keys: Mutex::new(BTreeMap::new()),
        }
    }

    /// One occurrence of `key` at `now_ms`: `Some` to log it (with the count left out before
    /// it), `None` to stay quiet.
    pub fn check(&self, key: &str, now_ms: u64) -> Option<Logged> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= MAX_KEYS && !keys.contains_key(key) {
            let interval = self.interval_ms;
            keys.retain(|_, w| now_ms.saturating_sub(w.start_ms) < interval);
            if keys.len() >= MAX_KEYS {
                // Still full of live keys: log (unsummarised) rather than track a new one.
                return Some(Logged {
                    suppressed: 0,
                    over_ms: 0,
                });
            }
        }
        let w = keys.entry(key.to_string()).or_insert(Window {
            start_ms: now_ms,
            logged: 0,
            suppressed: 0,
        });
        // A clock set back starts a new interval too.
        if now_ms.saturating_sub(w.start_ms) >= self.interval_ms || now_ms < w.start_ms {
            let summary = Logged {
                suppressed: w.suppressed,
                over_ms: now_ms.saturating_sub(w.start_ms),
            };
            *w = Window {
                start_ms: now_ms,
                logged: 1,
                suppressed: 0,
            };
            return Some(summary);
        }
        if w.logged < self.burst {
            w.logged += 1;
            return Some(Logged {
                suppressed: 0,
                over_ms: 0,
            });
        }
        w.suppressed += 1;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake clock: the limiter only sees the times it is given.
    #[test]
    fn first_lines_pass_then_a_summary_per_interval() {
        let l = LogLimiter::new(10_000, 2);
        let mut t = 1_000_000;
        assert_eq!(
            l.check("disk", t).map(|r| r.to_string()),
            Some(String::new())
        );
        assert!(l.check("disk", t + 1).is_some());
        // The burst is spent: the rest of the interval is counted, not logged.
        for i in 0..52_105 {
            assert_eq!(l.check("disk", t + 2 + i % 9_000), None);
        }
        // Another key is not affected.
        assert!(l.check("refused", t + 5).is_some());
        t += 10_000;
        let r = l.check("disk", t).expect("a new interval logs");
        assert_eq!(r.suppressed, 52_105);
        assert_eq!(r.to_string(), " (repeated 52105 times in the last 10 s)");
        // The count starts again.
        assert_eq!(l.check("disk", t + 1).map(|r| r.suppressed), Some(0));
        assert_eq!(l.check("disk", t + 2), None);
        // A long quiet spell: the next line says how long the count covers.
        let r = l.check("disk", t + 65_000).unwrap();
        assert_eq!(r.to_string(), " (repeated 1 times in the last 65 s)");
    }

    #[test]
    fn a_clock_set_back_and_many_keys_never_silence_a_new_line() {
        let l = LogLimiter::new(10_000, 1);
        assert!(l.check("k", 50_000).is_some());
        assert!(l.check("k", 50_001).is_none());
        assert_eq!(l.check("k", 40_000).map(|r| r.suppressed), Some(1));
        for i in 0..(MAX_KEYS as u64 + 10) {
            assert!(l.check(&format!("key-{i}"), 40_000).is_some(), "{i}");
        }
        // Old keys are forgotten once their interval is over; new ones are tracked again.
        assert!(l.check("late", 60_000).is_some());
        assert!(l.check("late", 60_001).is_none());
    }
}
