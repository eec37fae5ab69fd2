//! Log storage limits, end to end: a real server with small log bounds and real node functions
//! that print a 100 MB line and flood stdout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gust::client::Client;
use gust::server::{self, ServerConfig};
use gust_store::LogLimits;

const FUNCTION_BYTES: u64 = 4 << 20;
const TOTAL_BYTES: u64 = 8 << 20;

async fn start_small() -> TestServer {
    let data = TempDir::new("logs");
    let server = server::start(ServerConfig {
        logs: LogLimits {
            function_lines: 50_000,
            function_bytes: FUNCTION_BYTES,
            total_lines: 100_000,
            total_bytes: TOTAL_BYTES,
        },
        ..config(data.path())
    })
    .await
    .expect("server starts");
    TestServer {
        client: Client::new(&server.url(), Some(server.token.clone())),
        anon: Client::new(&server.url(), None),
        server: Some(server),
        data,
        dirs: Vec::new(),
    }
}

/// (lines, bytes of line text) stored for `function`, and the size of gust.db.
fn stored(ts: &TestServer, function: &str) -> (u64, u64, u64) {
    let db = ts.data.path().join("gust.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (n, b): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(octet_length(line)), 0) FROM logs WHERE function = ?1",
            [function],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    (n as u64, b as u64, std::fs::metadata(&db).unwrap().len())
}

fn lines_of(ts: &TestServer, function: &str, stream: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(ts.data.path().join("gust.db")).unwrap();
    let mut st = conn
        .prepare("SELECT line FROM logs WHERE function = ?1 AND stream = ?2 ORDER BY id")
        .unwrap();
    st.query_map([function, stream], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn wait_report(ts: &TestServer, function: &str, reports: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = lines_of(ts, function, "platform")
            .iter()
            .filter(|l| l.starts_with("REPORT "))
            .count();
        if n >= reports {
            return;
        }
        assert!(Instant::now() < deadline, "no REPORT line for {function}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const HUGE: &str = r#"
exports.handler = async () => {
  console.log('before');
  process.stdout.write('x'.repeat(100 * 1024 * 1024) + '\n');
  console.log('after');
  return { ok: true };
};
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_line_is_one_truncated_row_and_storage_stays_bounded() {
    let mut ts = start_small().await;
    ts.deploy(
        &manifest(
            "lh",
            "huge",
            "nodejs",
            "index.handler",
            "memory = 1024\ntimeout = 60",
        ),
        &[("index.js", HUGE)],
    )
    .await;
    for round in 1..=3 {
        let v = ts.invoke_ok("huge", "{}").await;
        assert_eq!(v["ok"], true);
        wait_report(&ts, "huge", round).await;
    }
    let out = lines_of(&ts, "huge", "stdout");
    let huge: Vec<&String> = out.iter().filter(|l| l.starts_with("xxxx")).collect();
    // One row per 100 MB line (not 1,600), its first 64 KiB and the marker.
    assert_eq!(huge.len(), 3, "{} stdout rows", out.len());
    let dropped = 100 * 1024 * 1024 - (gust_core::MAX_LOG_LINE - 64);
    for l in &huge {
        assert!(
            l.ends_with(&format!(" [gust: line truncated, {dropped} bytes dropped]")),
            "{}",
            &l[l.len() - 80..]
        );
        assert!(l.len() <= gust_core::MAX_LOG_LINE);
    }
    // The lines around it are whole and in order.
    assert_eq!(
        out.iter().filter(|l| l.ends_with("\tINFO\tafter")).count(),
        3
    );
    let (_, bytes, db) = stored(&ts, "huge");
    assert!(bytes <= FUNCTION_BYTES, "{bytes}");
    assert!(db < 32 << 20, "gust.db is {db} bytes");
}

const FLOOD: &str = r#"
exports.handler = async (event) => {
  const pad = 'y'.repeat(1000);
  for (let i = 0; i < event.n; i++) console.log(`${pad} #${i}`);
  return { printed: event.n };
};
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_stored_up_to_the_bound_and_nothing_is_lost_silently() {
    let mut ts = start_small().await;
    ts.deploy(
        &manifest(
            "lf",
            "flood",
            "nodejs",
            "index.handler",
            "memory = 512\ntimeout = 120",
        ),
        &[("index.js", FLOOD)],
    )
    .await;
    // 200,000 lines of ~1 KB: 200 MB, 25 times the total bound.
    let n = 200_000u64;
    let v = ts.invoke_ok("flood", &format!("{{\"n\": {n}}}")).await;
    assert_eq!(v["printed"], n);
    wait_report(&ts, "flood", 1).await;
    let (lines, bytes, db) = stored(&ts, "flood");
    assert!(bytes <= FUNCTION_BYTES, "{lines} lines, {bytes} bytes");
    assert!(lines > 1_000, "{lines} lines");
    assert!(db < 32 << 20, "gust.db is {db} bytes");
    // What is kept is the newest lines, without a gap, unless a platform line counts what
    // was dropped.
    let numbers: Vec<u64> = lines_of(&ts, "flood", "stdout")
        .iter()
        .filter_map(|l| l.rsplit_once(" #").and_then(|(_, i)| i.parse().ok()))
        .collect();
    assert_eq!(numbers.last(), Some(&(n - 1)));
    let gapless = numbers.windows(2).all(|w| w[1] == w[0] + 1);
    let counted = lines_of(&ts, "flood", "platform")
        .iter()
        .any(|l| l.starts_with("[gust] ") && l.contains(" log lines dropped: "));
    assert!(gapless || counted, "lines missing without a dropped count");
}

/// A process the function leaves behind keeps writing to stdout after the invocation ended
/// (`yes`, inherited stdout): the invocation still ends, and the server keeps answering — the
/// capture reads a bounded amount at a time and never holds a worker thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_after_the_reply_holds_up_nothing() {
    let mut ts = start_small().await;
    ts.deploy(
        &manifest(
            "lf",
            "leftover",
            "nodejs",
            "index.handler",
            "timeout = 5",
        ),
        &[(
            "index.js",
            r#"
const { spawn } = require("child_process");
exports.handler = async () => {
  // Short lines: the most work per byte for the capture.
  for (let i = 0; i < 3; i++) spawn("yes", [], { stdio: ["ignore", "inherit", "inherit"], detached: true });
  return { ok: true };
};
"#,
        )],
    )
    .await;
    // Every wait bounded. A capture that never lets go pins the server's worker threads, which
    // are this test's too (the server runs in-process): only a thread outside the runtime can
    // end the test then.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watched = done.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !watched.load(std::sync::atomic::Ordering::Relaxed) {
            if Instant::now() > deadline {
                eprintln!("output_after_the_reply_holds_up_nothing: the server hung for 60 s");
                std::process::exit(101);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let within = Duration::from_secs(10);
    let v = tokio::time::timeout(within, ts.invoke_ok("leftover", "{}"))
        .await
        .expect("the invocation ends although its leftover process floods stdout");
    assert_eq!(v["ok"], true, "{v}");
    // While `yes` floods, the server answers at once, and so does the same function again.
    for _ in 0..5 {
        let t = Instant::now();
        let r = tokio::time::timeout(within, ts.get("/_gust/health"))
            .await
            .expect("health answers");
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "health took {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = tokio::time::timeout(within, ts.invoke("leftover", "{}"))
        .await
        .expect("the function answers again");
    assert_eq!(r.status, 200);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
}
