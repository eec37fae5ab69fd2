//! Timestamp formatting without a calendar crate: ISO-8601 for logs, the API Gateway
//! `requestContext.time` format, and the log-stream date.

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

struct Parts {
    y: i64,
    mo: u32,
    d: u32,
    h: u64,
    mi: u64,
    s: u64,
    ms: u64,
}

fn parts(epoch_ms: u64) -> Parts {
    let secs = epoch_ms / 1000;
    let (y, mo, d) = civil((secs / 86_400) as i64);
    let sod = secs % 86_400;
    Parts {
        y,
        mo,
        d,
        h: sod / 3600,
        mi: sod % 3600 / 60,
        s: sod % 60,
        ms: epoch_ms % 1000,
    }
}

/// `2026-11-22T15:51:08.123Z`
pub fn iso8601_ms(epoch_ms: u64) -> String {
    let p = parts(epoch_ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        p.y, p.mo, p.d, p.h, p.mi, p.s, p.ms
    )
}

/// `22/Nov/2026:15:51:08 +0000`, API Gateway's `requestContext.time`.
pub fn clf(epoch_ms: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let p = parts(epoch_ms);
    format!(
        "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000",
        p.d,
        MONTHS[(p.mo - 1) as usize],
        p.y,
        p.h,
        p.mi,
        p.s
    )
}

/// `2026/11/22`, the date prefix of a Lambda log stream name.
pub fn ymd_slash(epoch_ms: u64) -> String {
    let p = parts(epoch_ms);
    format!("{:04}/{:02}/{:02}", p.y, p.mo, p.d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        // 2020-03-12T19:03:58.390Z, the timeEpoch in the API Gateway docs' example, is 1584039838390.
        assert_eq!(iso8601_ms(1_584_039_838_390), "2020-03-12T19:03:58.390Z");
        assert_eq!(clf(1_584_039_838_390), "12/Mar/2020:19:03:58 +0000");
        assert_eq!(iso8601_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(ymd_slash(951_782_400_000), "2000/02/29");
    }
}
