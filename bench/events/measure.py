#!/usr/bin/env python3
"""End-to-end async latency (202 → result at a callback URL) against a synchronous call of
the same function, and schedule firing lateness, through a running gust.
Usage: measure.py URL TOKEN N"""
import http.client, http.server, json, statistics, sys, threading, time, urllib.parse

url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host = urllib.parse.urlparse(url).netloc
arrived = {}


class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        arrived[self.headers["x-call-id"]] = time.perf_counter()
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
threading.Thread(target=srv.serve_forever, daemon=True).start()
cb = f"http://127.0.0.1:{srv.server_address[1]}/"


def req(method, path, headers=None, body=None):
    c = http.client.HTTPConnection(host)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    b = r.read()
    c.close()
    return r.status, r.headers, b


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


req("GET", "/fn/lat")  # warm
sync_ms, async_ms = [], []
for _ in range(n):
    t = time.perf_counter()
    s, _, _ = req("GET", "/fn/lat")
    sync_ms.append((time.perf_counter() - t) * 1000)
    assert s == 200
for _ in range(n):
    t = time.perf_counter()
    s, h, b = req("POST", "/async/fn/lat", {"x-callback-url": cb})
    assert s == 202, b
    cid = h["x-call-id"]
    while cid not in arrived:
        time.sleep(0.0005)
    async_ms.append((arrived[cid] - t) * 1000)
print("| path | p50 (ms) | p99 (ms) |")
print("|---|---|---|")
print(f"| synchronous `GET /fn/lat` (baseline) | {statistics.median(sync_ms):.2f} | {pct(sync_ms, 99):.2f} |")
print(f"| async `POST /async/fn/lat` → stored → run → callback received | {statistics.median(async_ms):.2f} | {pct(async_ms, 99):.2f} |")

# Schedule lateness: the tick function's recent runs, from the event store.
auth = {"authorization": f"Bearer {token}"}
_, _, b = req("GET", "/_gust/v1/functions/tick/logs?limit=1000", auth)
ids = []
for l in json.loads(b)["logs"]:
    line = l["line"]
    if line.startswith("START RequestId: sched-"):
        ids.append(line.split()[2])
fire, start = [], []
for i in ids:
    _, _, b = req("GET", f"/_gust/v1/events/{i}", auth)
    e = json.loads(b)
    slot = e["attributes"]["slot_ms"]
    fire.append(e["created_ms"] - slot)
    start.append(e["first_receive_ms"] - slot)
print()
print(f"Schedule `rate(1 second)`, {len(ids)} slots: event stored {statistics.median(fire):.0f} ms after "
      f"the slot (p50; max {max(fire)} ms), delivery started {statistics.median(start):.0f} ms after it "
      f"(max {max(start)} ms).")
