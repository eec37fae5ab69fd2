//! Captures an instance's stdout and stderr line by line, stamps each line with the time and the
//! request id of the invocation in progress, and sends it to the log sink.
//!
//! The built-in runtimes write to their pipes synchronously before they post a response, so when
//! a response arrives, `drain()` reads whatever is already in the pipes: the invocation's lines
//! are attributed to it and land before its END/REPORT lines.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex};

use gust_core::{LogRecord, LogSink, now_ms};
use tokio::net::unix::pipe;

/// Longest line kept; the rest of a longer one is counted and dropped, so a 100 MB line is
/// one stored line (its first 64 KiB and a marker), and a line being read holds at most this
/// much memory.
const MAX_LINE: usize = gust_core::MAX_LOG_LINE;
/// Bytes one `drain` reads at most: it runs on async workers, and on the reply path of an
/// invocation.
const DRAIN_BUDGET: usize = 256 * 1024;
/// Lambda's `X-Amz-Log-Result` carries the last 4 KB.
pub(crate) const TAIL_BYTES: usize = 4096;
/// Lines remembered from init, quoted when init fails.
const RECENT_LINES: usize = 12;

pub(crate) struct Capture {
    out: pipe::Receiver,
    err: pipe::Receiver,
    inner: Mutex<Inner>,
    sink: Arc<dyn LogSink>,
    function: String,
    instance: String,
}

#[derive(Default)]
struct Inner {
    partial: [Vec<u8>; 2],
    /// Bytes of the current line dropped past `MAX_LINE`.
    overflow: [u64; 2],
    eof: [bool; 2],
    request_id: Option<String>,
    tail: Option<String>,
    recent: VecDeque<String>,
}

const STREAMS: [&str; 2] = ["stdout", "stderr"];

impl Capture {
    pub(crate) fn new(
        out: pipe::Receiver,
        err: pipe::Receiver,
        sink: Arc<dyn LogSink>,
        function: String,
        instance: String,
    ) -> Arc<Capture> {
        Arc::new(Capture {
            out,
            err,
            inner: Mutex::new(Inner::default()),
            sink,
            function,
            instance,
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads both pipes until they close.
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            let [out_eof, err_eof] = self.inner().eof;
            if out_eof && err_eof {
                break;
            }
            // The log writer is behind: leave the output in the pipes, so the function's
            // writes block (the built-in runtimes write synchronously) instead of lines
            // being dropped further on.
            while self.sink.congested() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            tokio::select! {
                r = self.out.readable(), if !out_eof => { if r.is_err() { self.inner().eof[0] = true; } }
                r = self.err.readable(), if !err_eof => { if r.is_err() { self.inner().eof[1] = true; } }
            }
            if !self.drain() {
                // More is waiting: let other tasks run before reading on (a function that
                // floods its output must not hold a worker thread).
                tokio::task::yield_now().await;
            }
        }
        // Whatever is left without a final newline.
        let mut inner = self.inner();
        for i in 0..2 {
            let rest = std::mem::take(&mut inner.partial[i]);
            let dropped = std::mem::take(&mut inner.overflow[i]);
            if !rest.is_empty() || dropped > 0 {
                self.line(&mut inner, i, &rest, dropped);
            }
        }
    }

    /// Reads what is available now, without waiting, up to `DRAIN_BUDGET` bytes (a process that
    /// keeps writing, even after its invocation ended, must not keep the caller here): true when
    /// the pipes had nothing more, false when the budget ran out first.
    pub(crate) fn drain(&self) -> bool {
        let mut inner = self.inner();
        let mut buf = [0u8; 16 * 1024];
        let mut budget = DRAIN_BUDGET;
        for i in 0..2 {
            let rx = if i == 0 { &self.out } else { &self.err };
            while !inner.eof[i] {
                if budget == 0 {
                    return false;
                }
                match rx.try_read(&mut buf) {
                    Ok(0) => inner.eof[i] = true,
                    Ok(n) => {
                        budget = budget.saturating_sub(n);
                        self.feed(&mut inner, i, &buf[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => inner.eof[i] = true,
                }
            }
        }
        true
    }

    fn feed(&self, inner: &mut Inner, i: usize, mut data: &[u8]) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let (line, rest) = data.split_at(pos);
            data = &rest[1..];
            if inner.partial[i].is_empty() && inner.overflow[i] == 0 && line.len() <= MAX_LINE {
                self.line(inner, i, line, 0);
            } else {
                let mut whole = std::mem::take(&mut inner.partial[i]);
                let mut dropped = std::mem::take(&mut inner.overflow[i]);
                keep(&mut whole, &mut dropped, line);
                self.line(inner, i, &whole, dropped);
            }
        }
        let Inner {
            partial, overflow, ..
        } = inner;
        keep(&mut partial[i], &mut overflow[i], data);
    }

    /// One line; `dropped`: bytes of it already cut off past `MAX_LINE`.
    fn line(&self, inner: &mut Inner, i: usize, raw: &[u8], dropped: u64) {
        let raw = if dropped == 0 {
            raw.strip_suffix(b"\r").unwrap_or(raw)
        } else {
            raw
        };
        let mut text = String::from_utf8_lossy(raw).into_owned();
        if dropped > 0 {
            gust_core::truncate_log_line(&mut text, dropped);
        }
        if let Some(tail) = inner.tail.as_mut() {
            push_tail(tail, &text);
        }
        if inner.request_id.is_none() {
            if inner.recent.len() == RECENT_LINES {
                inner.recent.pop_front();
            }
            inner.recent.push_back(text.clone());
        }
        self.sink.emit(LogRecord {
            function: self.function.clone(),
            ts_ms: now_ms(),
            request_id: inner.request_id.clone(),
            instance: self.instance.clone(),
            stream: STREAMS[i].to_string(),
            line: text,
        });
    }

    /// Starts attributing lines to an invocation (and collecting its tail if asked).
    pub(crate) fn begin(&self, request_id: &str, tail: bool) {
        let mut inner = self.inner();
        inner.request_id = Some(request_id.to_string());
        inner.tail = tail.then(String::new);
    }

    /// A platform line (START, END, REPORT, notices).
    pub(crate) fn platform(&self, request_id: Option<&str>, text: String) {
        let mut inner = self.inner();
        if let Some(tail) = inner.tail.as_mut() {
            push_tail(tail, &text);
        }
        self.sink.emit(LogRecord {
            function: self.function.clone(),
            ts_ms: now_ms(),
            request_id: request_id.map(str::to_string),
            instance: self.instance.clone(),
            stream: "platform".to_string(),
            line: text,
        });
    }

    /// Ends the invocation: returns its log tail (last 4 KB) if one was asked for.
    pub(crate) fn end(&self) -> Option<String> {
        let mut inner = self.inner();
        inner.request_id = None;
        inner.tail.take().map(|t| {
            if t.len() <= TAIL_BYTES {
                return t;
            }
            let mut start = t.len() - TAIL_BYTES;
            while !t.is_char_boundary(start) {
                start += 1;
            }
            t[start..].to_string()
        })
    }

    /// The last lines printed outside any invocation (init output), for init-failure messages.
    pub(crate) fn recent(&self) -> Vec<String> {
        self.inner().recent.iter().cloned().collect()
    }
}

/// Appends to a line being read what fits under `MAX_LINE`; counts the rest as dropped.
fn keep(buf: &mut Vec<u8>, dropped: &mut u64, data: &[u8]) {
    let n = MAX_LINE.saturating_sub(buf.len()).min(data.len());
    buf.extend_from_slice(&data[..n]);
    *dropped += (data.len() - n) as u64;
}

fn push_tail(tail: &mut String, line: &str) {
    tail.push_str(line);
    tail.push('\n');
    // Keep the buffer bounded on chatty functions; `end()` cuts to the exact 4 KB.
    if tail.len() > 4 * TAIL_BYTES {
        let mut cut = tail.len() - TAIL_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail.drain(..cut);
    }
}
