//! Retry and delivery policy, pure: what to do after an attempt, how long to wait, what the
//! destination record says. The dispatchers carry the decisions out.

use serde_json::{Value, json};

/// How an async event is retried (from the function's `[functions.NAME.async]`, or a schedule's
/// own policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retries: u32,
    pub backoff_ms: u64,
    pub max_age_ms: u64,
}

/// How one attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Succeeded,
    /// The function failed (error, timeout, crash).
    FunctionError,
    /// The pool refused (429) or the platform failed (5xx): not counted as an attempt.
    Throttled,
    /// The function no longer exists.
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Done,
    /// Try again in `delay_ms`; `count` false for throttles (they do not use up retries).
    Retry {
        delay_ms: u64,
        count: bool,
    },
    /// No more attempts: Lambda's `condition` for the record.
    GiveUp(&'static str),
}

/// Longest wait between throttled attempts (Lambda: backoff from 1 s to 5 min).
pub const MAX_THROTTLE_DELAY_MS: u64 = 300_000;

/// Decides after attempt number `attempts` (1 = the first) of an event `age_ms` old.
/// `jitter` in [0, 1) spreads retries: the delay is scaled by 0.75..1.25.
pub fn decide(
    attempt: Attempt,
    attempts: u32,
    age_ms: u64,
    p: &RetryPolicy,
    jitter: f64,
) -> Decision {
    let spread = |d: u64| ((d as f64) * (0.75 + jitter.clamp(0.0, 1.0) * 0.5)) as u64;
    match attempt {
        Attempt::Succeeded => Decision::Done,
        Attempt::Gone => Decision::GiveUp("FunctionNotFound"),
        Attempt::FunctionError => {
            if attempts > p.retries {
                return Decision::GiveUp("RetriesExhausted");
            }
            let delay = spread(
                p.backoff_ms
                    .saturating_mul(1 << (attempts.saturating_sub(1)).min(20)),
            );
            if age_ms + delay > p.max_age_ms {
                return Decision::GiveUp("EventAgeExceeded");
            }
            Decision::Retry {
                delay_ms: delay,
                count: true,
            }
        }
        Attempt::Throttled => {
            // Doubles as the event ages: 1 s, 2 s, 4 s, … up to 5 min.
            let delay = spread(age_ms.clamp(1_000, MAX_THROTTLE_DELAY_MS));
            if age_ms + delay > p.max_age_ms {
                return Decision::GiveUp("EventAgeExceeded");
            }
            Decision::Retry {
                delay_ms: delay,
                count: false,
            }
        }
    }
}

/// What the scheduler does with a slot whose fire time (`fire_at`, the slot plus its flexible
/// window offset) has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAction {
    Fire,
    /// The server was down at the slot and the schedule says `missed = "skip"`.
    SkipMissed,
    /// The previous run is still running and the schedule says `overlap = "skip"`.
    SkipOverlap,
}

/// A slot whose fire time is before this server started was missed (the server was down):
/// `catch_up` runs it once (the scheduler then moves past every missed slot), otherwise it is
/// skipped. A slot due while the server runs fires however late its timer is. `running` is
/// whether the previous run of this schedule is still going.
pub fn slot_action(
    boot_ms: u64,
    fire_at: u64,
    catch_up: bool,
    allow_overlap: bool,
    running: bool,
) -> SlotAction {
    if fire_at < boot_ms && !catch_up {
        SlotAction::SkipMissed
    } else if running && !allow_overlap {
        SlotAction::SkipOverlap
    } else {
        SlotAction::Fire
    }
}

/// The flexible window's offset for a slot: spread over the window, but the same across
/// restarts (a hash of the schedule and the slot).
pub fn flex_offset(key: &str, slot: u64, window_min: u32) -> u64 {
    if window_min == 0 {
        return 0;
    }
    crate::fnv(key.bytes().chain(slot.to_le_bytes())) % (window_min as u64 * 60_000)
}

/// Lambda's invocation record, sent to on-success and on-failure destinations.
#[allow(clippy::too_many_arguments)]
pub fn invocation_record(
    request_id: &str,
    function_arn: &str,
    condition: &str,
    attempts: u32,
    request_payload: &[u8],
    status_code: u16,
    function_error: Option<&str>,
    response_payload: &[u8],
    now_ms: u64,
) -> Value {
    let as_json = |b: &[u8]| -> Value {
        serde_json::from_slice(b)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned()))
    };
    let mut response = json!({"statusCode": status_code, "executedVersion": gust_core::LATEST});
    if let Some(e) = function_error {
        response["functionError"] = Value::String(e.into());
    }
    json!({
        "version": "1.0",
        "timestamp": gust_core::time::iso8601_ms(now_ms),
        "requestContext": {
            "requestId": request_id,
            "functionArn": format!("{function_arn}:{}", gust_core::LATEST),
            "condition": condition,
            "approximateInvokeCount": attempts,
        },
        "requestPayload": as_json(request_payload),
        "responseContext": response,
        "responsePayload": as_json(response_payload),
    })
}

/// Which messages of a batch failed, from the function's answer (SQS partial batch response):
/// `Ok(ids)` (empty = all succeeded) or `Err(why)` = treat the whole batch as failed.
pub fn batch_failures(response: &[u8], ids: &[String]) -> Result<Vec<String>, String> {
    let trimmed = std::str::from_utf8(response).unwrap_or("").trim();
    if trimmed.is_empty() || trimmed == "null" {
        return Ok(Vec::new());
    }
    // Not JSON, or no batchItemFailures: the whole batch succeeded (a handler that does not
    // use partial batch responses).
    let Ok(v) = serde_json::from_str::<Value>(trimmed) else {
        return Ok(Vec::new());
    };
    let Some(list) = v.get("batchItemFailures") else {
        return Ok(Vec::new());
    };
    if list.is_null() {
        return Ok(Vec::new());
    }
    let list = list.as_array().ok_or("batchItemFailures is not a list")?;
    let mut out = Vec::new();
    for item in list {
        let id = item
            .get("itemIdentifier")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("an item has no itemIdentifier")?;
        if !ids.iter().any(|i| i == id) {
            return Err(format!("itemIdentifier {id} is not in the batch"));
        }
        out.push(id.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: RetryPolicy = RetryPolicy {
        retries: 2,
        backoff_ms: 1_000,
        max_age_ms: 60_000,
    };

    #[test]
    fn function_errors_retry_with_doubling_backoff_then_give_up() {
        assert_eq!(
            decide(Attempt::FunctionError, 1, 0, &P, 0.5),
            Decision::Retry {
                delay_ms: 1_000,
                count: true
            }
        );
        assert_eq!(
            decide(Attempt::FunctionError, 2, 1_000, &P, 0.5),
            Decision::Retry {
                delay_ms: 2_000,
                count: true
            }
        );
        assert_eq!(
            decide(Attempt::FunctionError, 3, 3_000, &P, 0.5),
            Decision::GiveUp("RetriesExhausted")
        );
        // Jitter keeps the delay within ±25 %.
        assert_eq!(
            decide(Attempt::FunctionError, 1, 0, &P, 0.0),
            Decision::Retry {
                delay_ms: 750,
                count: true
            }
        );
        assert_eq!(
            decide(Attempt::FunctionError, 1, 0, &P, 0.999),
            Decision::Retry {
                delay_ms: 1_249,
                count: true
            }
        );
        let none = RetryPolicy { retries: 0, ..P };
        assert_eq!(
            decide(Attempt::FunctionError, 1, 0, &none, 0.5),
            Decision::GiveUp("RetriesExhausted")
        );
    }

    #[test]
    fn age_limits_every_retry() {
        assert_eq!(
            decide(Attempt::FunctionError, 1, 59_500, &P, 0.5),
            Decision::GiveUp("EventAgeExceeded")
        );
        assert_eq!(
            decide(Attempt::Throttled, 1, 59_500, &P, 0.5),
            Decision::GiveUp("EventAgeExceeded")
        );
    }

    #[test]
    fn throttles_back_off_from_one_second_and_do_not_use_up_retries() {
        assert_eq!(
            decide(Attempt::Throttled, 3, 0, &P, 0.5),
            Decision::Retry {
                delay_ms: 1_000,
                count: false
            }
        );
        assert_eq!(
            decide(Attempt::Throttled, 3, 4_000, &P, 0.5),
            Decision::Retry {
                delay_ms: 4_000,
                count: false
            }
        );
        let long = RetryPolicy {
            max_age_ms: 21_600_000,
            ..P
        };
        assert_eq!(
            decide(Attempt::Throttled, 1, 3_600_000, &long, 0.5),
            Decision::Retry {
                delay_ms: MAX_THROTTLE_DELAY_MS,
                count: false
            }
        );
        assert_eq!(
            decide(Attempt::Gone, 1, 0, &P, 0.5),
            Decision::GiveUp("FunctionNotFound")
        );
        assert_eq!(decide(Attempt::Succeeded, 1, 0, &P, 0.5), Decision::Done);
    }

    #[test]
    fn partial_batch_responses_follow_the_sqs_contract() {
        let ids = vec!["a".to_string(), "b".to_string()];
        assert_eq!(batch_failures(b"", &ids), Ok(vec![]));
        assert_eq!(batch_failures(b"null", &ids), Ok(vec![]));
        assert_eq!(batch_failures(b"{\"ok\":1}", &ids), Ok(vec![]));
        assert_eq!(
            batch_failures(br#"{"batchItemFailures":[]}"#, &ids),
            Ok(vec![])
        );
        assert_eq!(
            batch_failures(br#"{"batchItemFailures":[{"itemIdentifier":"b"}]}"#, &ids),
            Ok(vec!["b".into()])
        );
        assert!(
            batch_failures(br#"{"batchItemFailures":[{"itemIdentifier":"zz"}]}"#, &ids).is_err()
        );
        assert!(batch_failures(br#"{"batchItemFailures":[{"itemIdentifier":""}]}"#, &ids).is_err());
        assert!(batch_failures(br#"{"batchItemFailures":[{}]}"#, &ids).is_err());
        assert_eq!(batch_failures(b"not json", &ids), Ok(vec![]));
    }

    /// The scheduler's decisions with a controlled clock.
    #[test]
    fn slots_fire_unless_missed_or_overlapping() {
        let boot = 10_000_000;
        // Due while running: fires, however late the timer.
        assert_eq!(
            slot_action(boot, boot + 10, false, true, false),
            SlotAction::Fire
        );
        // Due before the server started: skipped, or run once with catch-up.
        assert_eq!(
            slot_action(boot, boot - 1, false, true, false),
            SlotAction::SkipMissed
        );
        assert_eq!(
            slot_action(boot, boot - 3_600_000, true, true, false),
            SlotAction::Fire
        );
        // Overlap.
        assert_eq!(
            slot_action(boot, boot + 10, false, false, true),
            SlotAction::SkipOverlap
        );
        assert_eq!(
            slot_action(boot, boot + 10, false, true, true),
            SlotAction::Fire
        );
        assert_eq!(
            slot_action(boot, boot + 10, false, false, false),
            SlotAction::Fire
        );
    }

    #[test]
    fn flexible_offsets_stay_in_the_window_and_survive_restarts() {
        assert_eq!(flex_offset("s", 123, 0), 0);
        let offsets: Vec<u64> = (0..200)
            .map(|i| flex_offset("f.s", 1_000_000 + i * 60_000, 5))
            .collect();
        assert!(offsets.iter().all(|o| *o < 300_000));
        assert_eq!(
            offsets[7],
            flex_offset("f.s", 1_000_000 + 7 * 60_000, 5),
            "deterministic"
        );
        // Spread, not constant.
        let distinct: std::collections::HashSet<_> = offsets.iter().map(|o| o / 60_000).collect();
        assert!(distinct.len() >= 4, "{distinct:?}");
    }

    #[test]
    fn the_record_has_lambdas_shape() {
        let r = invocation_record(
            "id1",
            "arn:aws:lambda:us-east-1:000000000000:function:f",
            "RetriesExhausted",
            3,
            br#"{"a":1}"#,
            200,
            Some("Unhandled"),
            br#"{"errorMessage":"x"}"#,
            0,
        );
        assert_eq!(r["version"], "1.0");
        assert_eq!(r["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(r["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(
            r["requestContext"]["functionArn"],
            "arn:aws:lambda:us-east-1:000000000000:function:f:$LATEST"
        );
        assert_eq!(r["requestPayload"]["a"], 1);
        assert_eq!(r["responseContext"]["functionError"], "Unhandled");
        assert_eq!(r["responsePayload"]["errorMessage"], "x");
    }
}
