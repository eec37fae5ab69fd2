//! Schedule expressions, pure: `rate(5 minutes)`, EventBridge `cron(min hour dom month dow year)`,
//! standard 5-field cron, and one-time `at(yyyy-mm-ddThh:mm:ss)`, in an IANA time zone (default
//! UTC). Cron matching is croner's (L, W, #, ranges, steps, names); EventBridge's day-of-week
//! numbering (1 = Sunday) is croner's "alternative weekdays"; its year field is checked here.
//!
//! Daylight saving time: a wall-clock slot that does not exist (spring forward) fires at the
//! first instant after the gap; a slot that exists twice (fall back) fires once, at its first
//! occurrence.

use std::ops::RangeInclusive;

use chrono::{DateTime, Datelike, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The longest rate period: 10 years. Longer ones are refused at deploy, so a period never
/// overflows (EventBridge documents no maximum).
pub const MAX_RATE_MS: u64 = 3650 * 86_400_000;
/// The years a cron year field or an `at()` may name.
pub const YEARS: RangeInclusive<i32> = 1970..=2199;

#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every `every_ms`, from the schedule's anchor (when it was first deployed).
    Rate {
        every_ms: u64,
    },
    Cron {
        cron: Box<croner::Cron>,
        /// EventBridge's year field (None: every year).
        years: Option<Vec<RangeInclusive<i32>>>,
        tz: Tz,
    },
    At {
        at_ms: u64,
    },
}

fn tz(name: Option<&str>) -> Result<Tz, String> {
    match name {
        None => Ok(Tz::UTC),
        Some(n) => n.parse::<Tz>().map_err(|_| {
            format!(
                "time zone {n:?} is not an IANA time zone name (e.g. \"Europe/Paris\", \"UTC\")"
            )
        }),
    }
}

fn years(field: &str) -> Result<Option<Vec<RangeInclusive<i32>>>, String> {
    if field == "*" || field == "?" {
        return Ok(None);
    }
    let bad =
        || format!("year field {field:?}: use *, a year, a range (2026-2030) or a list of them");
    let mut out = Vec::new();
    for part in field.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: i32 = a.parse().map_err(|_| bad())?;
        let b: i32 = b.parse().map_err(|_| bad())?;
        if !YEARS.contains(&a) || b < a || !YEARS.contains(&b) {
            return Err(bad());
        }
        out.push(a..=b);
    }
    Ok(Some(out))
}

impl Schedule {
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<Schedule, String> {
        let expr = expr.trim();
        let zone = tz(timezone)?;
        if let Some(body) = expr.strip_prefix("rate(").and_then(|r| r.strip_suffix(')')) {
            let hint = "rate(VALUE UNIT): e.g. rate(5 minutes), rate(1 hour), rate(2 days)";
            let (n, unit) = body
                .trim()
                .split_once(' ')
                .ok_or_else(|| format!("{expr:?}: {hint}"))?;
            let too_long = |max: u64, unit: &str| {
                format!(
                    "{expr:?}: the longest rate is {} days (10 years): use at most rate({max} {unit}), or at(...) for a one-time run",
                    MAX_RATE_MS / 86_400_000
                )
            };
            let n: u64 = match n.parse() {
                Ok(n) => n,
                Err(_) if n.bytes().all(|b| b.is_ascii_digit()) => {
                    return Err(too_long(MAX_RATE_MS / 86_400_000, "days"));
                }
                Err(_) => return Err(format!("{expr:?}: {hint}")),
            };
            if n == 0 {
                return Err(format!("{expr:?}: the value must be at least 1"));
            }
            let unit = unit.trim();
            let unit_ms = match (unit, n) {
                ("minute", 1) | ("minutes", 2..) => 60_000,
                ("hour", 1) | ("hours", 2..) => 3_600_000,
                ("day", 1) | ("days", 2..) => 86_400_000,
                // Sub-minute rates are a gust extension (Lambda's minimum is one minute).
                ("second", 1) | ("seconds", 2..) => 1_000,
                _ => {
                    return Err(format!(
                        "{expr:?}: {hint} (singular unit for 1, plural otherwise)"
                    ));
                }
            };
            // Checked before multiplying: a huge value must not wrap to a short (or zero) period.
            let max = MAX_RATE_MS / unit_ms;
            if n > max {
                return Err(too_long(max, unit));
            }
            return Ok(Schedule::Rate {
                every_ms: n * unit_ms,
            });
        }
        if let Some(body) = expr.strip_prefix("at(").and_then(|r| r.strip_suffix(')')) {
            let naive =
                NaiveDateTime::parse_from_str(body.trim(), "%Y-%m-%dT%H:%M:%S").map_err(|_| {
                    format!("{expr:?}: at(yyyy-mm-ddThh:mm:ss), e.g. at(2026-12-01T09:00:00)")
                })?;
            let at = zone
                .from_local_datetime(&naive)
                .earliest()
                .or_else(|| {
                    zone.from_local_datetime(&(naive + chrono::Duration::hours(1)))
                        .earliest()
                })
                .ok_or_else(|| format!("{expr:?}: not a time that exists in {zone}"))?;
            if !YEARS.contains(&at.with_timezone(&Utc).year()) {
                return Err(format!(
                    "{expr:?}: the year must be {}..={} (UTC)",
                    YEARS.start(),
                    YEARS.end()
                ));
            }
            return Ok(Schedule::At {
                at_ms: at.timestamp_millis().max(0) as u64,
            });
        }
        let (fields, eventbridge) =
            match expr.strip_prefix("cron(").and_then(|r| r.strip_suffix(')')) {
                Some(body) => (body.trim().to_string(), true),
                None => (expr.to_string(), false),
            };
        let parts: Vec<&str> = fields.split_whitespace().collect();
        let mut cron = if eventbridge {
            if parts.len() != 6 {
                return Err(format!(
                    "{expr:?}: cron() takes 6 fields: minutes hours day-of-month month day-of-week year, e.g. cron(0 12 * * ? *)"
                ));
            }
            if parts[2] != "?" && parts[4] != "?" {
                return Err(format!(
                    "{expr:?}: one of day-of-month and day-of-week must be ? (as in EventBridge), e.g. cron(0 12 * * ? *)"
                ));
            }
            let mut c = croner::Cron::new(&parts[..5].join(" "));
            c.with_alternative_weekdays();
            c
        } else {
            if parts.len() != 5 {
                return Err(format!(
                    "{expr:?}: not a schedule: use rate(5 minutes), cron(0 12 * * ? *), a 5-field cron (0 12 * * *) or at(2026-12-01T09:00:00)"
                ));
            }
            croner::Cron::new(&fields)
        };
        let parsed = cron.parse().map_err(|e| format!("{expr:?}: {e}"))?;
        let years = if eventbridge { years(parts[5])? } else { None };
        Ok(Schedule::Cron {
            cron: Box::new(parsed),
            years,
            tz: zone,
        })
    }

    /// The first slot strictly after `after_ms`, or None when there is none that a u64 (or a
    /// date) can hold. `anchor_ms` is where a rate's slots start. Total for any inputs: the
    /// scheduler relies on an answer that is always later than `after_ms`, whatever is stored.
    pub fn next_after(&self, after_ms: u64, anchor_ms: u64) -> Option<u64> {
        self.next_unchecked(after_ms, anchor_ms)
            .filter(|n| *n > after_ms)
    }

    fn next_unchecked(&self, after_ms: u64, anchor_ms: u64) -> Option<u64> {
        match self {
            Schedule::Rate { every_ms } => {
                if after_ms < anchor_ms {
                    return Some(anchor_ms);
                }
                let k = ((after_ms - anchor_ms) / (*every_ms).max(1)).checked_add(1)?;
                anchor_ms.checked_add(k.checked_mul(*every_ms)?)
            }
            Schedule::At { at_ms } => Some(*at_ms),
            Schedule::Cron { cron, years, tz } => {
                let mut from = Utc
                    .timestamp_millis_opt(i64::try_from(after_ms).ok()?)
                    .single()?
                    .with_timezone(tz);
                for _ in 0..64 {
                    let next = cron.find_next_occurrence(&from, false).ok()?;
                    match years {
                        Some(ys) if !ys.iter().any(|r| r.contains(&next.year())) => {
                            // Jump to the next allowed year.
                            let y = ys
                                .iter()
                                .map(|r| *r.start())
                                .filter(|s| *s > next.year())
                                .min()?;
                            from = tz.with_ymd_and_hms(y, 1, 1, 0, 0, 0).earliest()?
                                - chrono::Duration::seconds(1);
                        }
                        _ => return u64::try_from(next.timestamp_millis()).ok(),
                    }
                }
                None
            }
        }
    }
}

/// ISO 8601 UTC with seconds (`2026-12-01T09:00:00Z`), the scheduled-event `time`.
pub fn iso8601_s(ms: u64) -> String {
    let t: DateTime<Utc> = i64::try_from(ms)
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .unwrap_or_default();
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis() as u64
    }
    fn next(expr: &str, tz: Option<&str>, after: &str) -> String {
        let s = Schedule::parse(expr, tz).unwrap();
        let n = s.next_after(ms(after), 0).unwrap();
        Utc.timestamp_millis_opt(n as i64).unwrap().to_rfc3339()
    }

    /// Hand-checked cases (UTC instants; comments give the local wall time).
    #[test]
    fn hand_checked_next_fire_times() {
        let cases: &[(&str, Option<&str>, &str, &str)] = &[
            (
                "cron(0 12 * * ? *)",
                None,
                "2026-11-22T18:00:00Z",
                "2026-11-23T12:00:00+00:00",
            ),
            (
                "cron(0 12 * * ? *)",
                None,
                "2026-11-22T11:59:59Z",
                "2026-11-22T12:00:00+00:00",
            ),
            // EventBridge day-of-week 2 = Monday; 2026-11-23 is a Monday.
            (
                "cron(30 9 ? * 2 *)",
                None,
                "2026-11-22T00:00:00Z",
                "2026-11-23T09:30:00+00:00",
            ),
            (
                "cron(0/15 8-17 ? * MON-FRI *)",
                None,
                "2026-11-21T12:00:00Z",
                "2026-11-23T08:00:00+00:00",
            ),
            // First Monday of the month.
            (
                "cron(0 9 ? * 2#1 *)",
                None,
                "2026-11-22T00:00:00Z",
                "2026-12-07T09:00:00+00:00",
            ),
            // Last day of the month.
            (
                "cron(0 0 L * ? *)",
                None,
                "2026-02-10T00:00:00Z",
                "2026-02-28T00:00:00+00:00",
            ),
            // Year field.
            (
                "cron(0 0 1 1 ? 2028)",
                None,
                "2026-11-22T00:00:00Z",
                "2028-01-01T00:00:00+00:00",
            ),
            // Standard 5-field cron: 0 = Sunday; 2026-11-29 is a Sunday.
            (
                "0 6 * * 0",
                None,
                "2026-11-23T00:00:00Z",
                "2026-11-29T06:00:00+00:00",
            ),
            (
                "*/5 * * * *",
                None,
                "2026-11-22T18:02:30Z",
                "2026-11-22T18:05:00+00:00",
            ),
            // Time zones: 09:00 in Paris is 08:00 UTC in winter, 07:00 in summer.
            (
                "cron(0 9 * * ? *)",
                Some("Europe/Paris"),
                "2026-11-22T12:00:00Z",
                "2026-11-23T08:00:00+00:00",
            ),
            (
                "cron(0 9 * * ? *)",
                Some("Europe/Paris"),
                "2026-07-01T12:00:00Z",
                "2026-07-02T07:00:00+00:00",
            ),
            // DST spring forward (Paris, 2026-03-29 02:00 → 03:00): 02:30 does not exist that day.
            (
                "cron(30 2 * * ? *)",
                Some("Europe/Paris"),
                "2026-03-28T12:00:00Z",
                "2026-03-29T01:00:00+00:00",
            ),
            // DST fall back (New York, 2026-11-01 02:00 → 01:00): 01:30 happens twice, fires once.
            (
                "cron(30 1 * * ? *)",
                Some("America/New_York"),
                "2026-11-01T00:00:00Z",
                "2026-11-01T05:30:00+00:00",
            ),
            (
                "cron(30 1 * * ? *)",
                Some("America/New_York"),
                "2026-11-01T05:30:00Z",
                "2026-11-02T06:30:00+00:00",
            ),
            (
                "at(2026-12-01T09:00:00)",
                None,
                "2026-11-22T00:00:00Z",
                "2026-12-01T09:00:00+00:00",
            ),
            (
                "at(2026-12-01T09:00:00)",
                Some("Asia/Tokyo"),
                "2026-11-22T00:00:00Z",
                "2026-12-01T00:00:00+00:00",
            ),
        ];
        for (expr, tz, after, want) in cases {
            assert_eq!(
                &next(expr, *tz, after),
                want,
                "{expr} in {tz:?} after {after}"
            );
        }
    }

    #[test]
    fn rates_count_from_their_anchor_and_at_fires_once() {
        let s = Schedule::parse("rate(5 minutes)", None).unwrap();
        assert_eq!(s.next_after(1_000, 1_000), Some(301_000));
        assert_eq!(s.next_after(301_000, 1_000), Some(601_000));
        assert_eq!(s.next_after(300_999, 1_000), Some(301_000));
        assert_eq!(s.next_after(0, 1_000), Some(1_000));
        let one = Schedule::parse("rate(1 hour)", None).unwrap();
        assert!(matches!(
            one,
            Schedule::Rate {
                every_ms: 3_600_000
            }
        ));
        let at = Schedule::parse("at(2026-12-01T09:00:00)", None).unwrap();
        let t = ms("2026-12-01T09:00:00Z");
        assert_eq!(at.next_after(t - 1, 0), Some(t));
        assert_eq!(at.next_after(t, 0), None);
    }

    #[test]
    fn bad_expressions_say_what_to_write() {
        for (expr, tz, needle) in [
            ("rate(5 minute)", None, "plural"),
            ("rate(1 minutes)", None, "singular"),
            ("rate(0 minutes)", None, "at least 1"),
            ("cron(0 12 * * *)", None, "6 fields"),
            ("cron(0 12 1 * MON *)", None, "must be ?"),
            ("cron(0 12 * * ? 1800)", None, "year field"),
            ("0 12 * *", None, "not a schedule"),
            ("cron(0 99 * * ? *)", None, "cron(0 99"),
            ("at(2026-13-01T09:00:00)", None, "at(yyyy"),
            ("rate(5 minutes)", Some("Mars/Olympus"), "IANA"),
        ] {
            let e = Schedule::parse(expr, tz).unwrap_err();
            assert!(e.contains(needle), "{expr}: {e}");
        }
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (expr, needle) in [
            ("rate(18446744073709551615 days)", "rate(3650 days)"),
            ("rate(9223372036854775807 minutes)", "rate(5256000 minutes)"),
            ("rate(4294967296 days)", "longest rate is 3650 days"),
            ("rate(3651 days)", "rate(3650 days)"),
            ("rate(87601 hours)", "rate(87600 hours)"),
            ("rate(315360001 seconds)", "rate(315360000 seconds)"),
            ("rate(99999999999999999999999 minutes)", "longest rate"),
            ("rate(-5 minutes)", "rate(VALUE UNIT)"),
            ("at(1969-12-31T23:59:59)", "1970..=2199"),
            ("at(2200-01-01T00:00:00)", "1970..=2199"),
            ("at(99999-01-01T00:00:00)", "at(yyyy"),
            ("cron(0 12 * * ? 2200)", "year field"),
            ("cron(0 12 * * ? 2026-2300)", "year field"),
            ("cron(0 12 * * ? 9999999999)", "year field"),
            ("cron(60 12 * * ? *)", "cron(60"),
            ("cron(0 24 * * ? *)", "cron(0 24"),
            ("cron(0 0 32 * ? *)", "cron(0 0 32"),
            ("cron(0 0 ? 13 * *)", "cron(0 0 ? 13"),
            ("*/0 * * * *", "*/0"),
            ("*/99999999999999999999 * * * *", "*/9999"),
        ] {
            let e = Schedule::parse(expr, None).unwrap_err();
            assert!(e.contains(needle), "{expr}: {e}");
        }
        let longest = Schedule::parse("rate(3650 days)", None).unwrap();
        assert!(matches!(
            longest,
            Schedule::Rate {
                every_ms: MAX_RATE_MS
            }
        ));
        assert!(Schedule::parse("at(2199-12-31T23:59:59)", None).is_ok());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn any_schedule() -> impl Strategy<Value = Schedule> {
            prop_oneof![
                any::<u64>().prop_map(|every_ms| Schedule::Rate { every_ms }),
                (0..=MAX_RATE_MS).prop_map(|every_ms| Schedule::Rate { every_ms }),
                any::<u64>().prop_map(|at_ms| Schedule::At { at_ms }),
                prop::sample::select(vec![
                    "cron(0 12 * * ? *)",
                    "cron(0/15 8-17 ? * MON-FRI *)",
                    "cron(0 0 1 1 ? 2028)",
                    "cron(0 0 L 2 ? 2100-2199)",
                    "*/5 * * * *",
                    "0 0 29 2 *",
                ])
                .prop_map(|e| Schedule::parse(e, Some("Europe/Paris")).unwrap()),
            ]
        }

        /// Instants anywhere in u64, and often near the edges and the years schedules name.
        fn any_ms() -> impl Strategy<Value = u64> {
            prop_oneof![
                any::<u64>(),
                0..8_000_000_000_000u64,
                (i64::MAX as u64 - 1_000_000)..=(i64::MAX as u64 + 1_000_000),
                (u64::MAX - 1_000_000)..=u64::MAX,
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Whatever is stored (a period, an anchor, a next fire time, a clock), the next fire
            /// is later than now or there is none: the scheduler can never loop on the past.
            #[test]
            fn next_fire_is_after_now_or_none(s in any_schedule(), now in any_ms(), anchor in any_ms()) {
                if let Some(n) = s.next_after(now, anchor) {
                    prop_assert!(n > now, "{s:?} after {now} anchored at {anchor}: {n}");
                }
            }

            /// Any rate value, in any unit, parses to a period within bounds or is refused.
            #[test]
            fn any_rate_value_parses_in_range_or_is_refused(
                n in prop_oneof![any::<u64>().prop_map(|n| n.to_string()), any::<i64>().prop_map(|n| n.to_string())],
                unit in prop::sample::select(vec!["second", "seconds", "minute", "minutes", "hour", "hours", "day", "days"]),
                now in any_ms(),
            ) {
                match Schedule::parse(&format!("rate({n} {unit})"), None) {
                    Ok(Schedule::Rate { every_ms }) => {
                        prop_assert!((1..=MAX_RATE_MS).contains(&every_ms));
                        let s = Schedule::Rate { every_ms };
                        if let Some(next) = s.next_after(now, now) {
                            prop_assert!(next > now);
                            prop_assert_eq!(next - now, every_ms);
                        }
                    }
                    Ok(other) => prop_assert!(false, "{other:?}"),
                    Err(e) => prop_assert!(e.contains("rate("), "{e}"),
                }
            }

            /// Any date in an at() is refused out of range, or fires once, after now.
            #[test]
            fn any_at_date_parses_in_range_or_is_refused(
                y in -100_000i64..100_000, mo in 0u32..14, d in 0u32..33, now in any_ms(),
            ) {
                if let Ok(s) = Schedule::parse(&format!("at({y:04}-{mo:02}-{d:02}T12:00:00)"), None) {
                    prop_assert!((1970..=2199).contains(&y));
                    if let Some(n) = s.next_after(now, 0) {
                        prop_assert!(n > now);
                        prop_assert_eq!(s.next_after(n, 0), None);
                    }
                }
            }
        }
    }

    /// Property: for random 5-field expressions and instants, the next fire time is what
    /// croner says, is after the instant, and matches the expression.
    #[test]
    fn next_fire_agrees_with_croner() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut rand = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..300 {
            let expr = format!(
                "{} {} {} * {}",
                ["*", "0", "*/7", "15,45", "5-10"][rand(5) as usize],
                ["*", "3", "*/6", "9-17"][rand(4) as usize],
                ["*", "1", "15", "L"][rand(4) as usize],
                ["*", "1-5", "0", "6"][rand(4) as usize],
            );
            let tz = [
                "UTC",
                "Europe/Paris",
                "America/New_York",
                "Australia/Sydney",
            ][rand(4) as usize];
            let after = 1_767_225_600_000 + rand(3 * 365 * 86_400) * 1000; // 2026..2029
            let ours = Schedule::parse(&expr, Some(tz))
                .unwrap()
                .next_after(after, 0)
                .unwrap();
            let zone: Tz = tz.parse().unwrap();
            let cron = croner::Cron::new(&expr).parse().unwrap();
            let start = Utc
                .timestamp_millis_opt(after as i64)
                .unwrap()
                .with_timezone(&zone);
            let theirs = cron.find_next_occurrence(&start, false).unwrap();
            assert_eq!(
                ours,
                theirs.timestamp_millis() as u64,
                "{expr} {tz} after {after}"
            );
            assert!(ours > after);
            let local = Utc
                .timestamp_millis_opt(ours as i64)
                .unwrap()
                .with_timezone(&zone);
            assert!(
                cron.is_time_matching(&local).unwrap(),
                "{expr} {tz}: {local}"
            );
        }
    }
}
