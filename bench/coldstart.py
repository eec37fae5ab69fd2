#!/usr/bin/env python3
"""Cold start through gust against the bare interpreter start, in the same run.

Cold start = wall time of one request to a function with no instance (its instances are stopped
through the admin API's recycle call first): sandbox or process start, runtime init, module
load, the invocation and the HTTP round trip. Each server given is one mode:
  process  gust --no-sandbox (plain processes)
  sandbox  namespaces + cgroup + seccomp, no pre-warmed pool (--prewarm 0)
  pool     the same sandbox, specialised from the pre-warmed pool (the pool is refilled
           between samples: the script waits until /_gust/v1/status shows one ready)
  before-* the same modes served by another (older) gust binary, for a before/after
Baseline = wall time of `node -e 0` / `python3 -S -c 0` from launch to exit, with a clean
environment, run with the same interpreter binaries gust resolves.
Usage: coldstart.py N MODE=URL,TOKEN ...
"""
import http.client, json, statistics, subprocess, sys, time, urllib.parse

n = int(sys.argv[1])
servers = []
for arg in sys.argv[2:]:
    mode, rest = arg.split("=", 1)
    url, token = rest.split(",", 1)
    servers.append((mode, urllib.parse.urlparse(url).netloc, token))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def request(host, method, path, headers=None):
    c = http.client.HTTPConnection(host)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def wait_pool(host, token, runtime):
    deadline = time.time() + 10
    while time.time() < deadline:
        s, b = request(host, "GET", "/_gust/v1/status", {"authorization": f"Bearer {token}"})
        assert s == 200, b
        if json.loads(b)["prewarmed"][runtime] >= 1:
            return
        time.sleep(0.005)
    raise SystemExit(f"no pre-warmed {runtime} sandbox within 10 s")


def gust_cold(mode, host, token, fn, runtime):
    out = []
    auth = {"authorization": f"Bearer {token}"}
    for _ in range(n):
        s, b = request(host, "POST", f"/_gust/v1/functions/{fn}/recycle", auth)
        assert s == 200, b
        if mode.endswith("pool"):
            wait_pool(host, token, runtime)
        t = time.perf_counter()
        s, b = request(host, "GET", f"/fn/{fn}")
        out.append((time.perf_counter() - t) * 1000)
        assert s == 200, (s, b)
    return out


def bare(cmd):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, check=True)
        out.append((time.perf_counter() - t) * 1000)
    return out


def real(cmd, code):
    return subprocess.run([cmd, "-c" if cmd.startswith("python") else "-e", code],
                          capture_output=True, text=True, check=True).stdout


node = real("node", "process.stdout.write(process.execPath)")
python = real("python3", "import sys; sys.stdout.write(sys.executable)")
# gust starts Python with -S (see runtimes/python/bootstrap.py), so the baseline is
# `python3 -S -c 0`.
cases = [
    ("nodejs", "hello-node", [node, "-e", "0"], "node -e 0"),
    ("python", "hello-python", [python, "-S", "-c", "0"], "python3 -S -c 0"),
]
print(f"Interpreters: {node}, {python}\n")
modes = [m for m, _, _ in servers]
print("| runtime | bare start p50 / p99 (ms) | " + " | ".join(f"{m} p50 / p99 (ms)" for m in modes)
      + " | " + " | ".join(f"{m} added p50" for m in modes) + " |")
print("|---|---|" + "---|" * (2 * len(modes)))
for runtime, fn, cmd, label in cases:
    bare_ms = bare(cmd)
    b50 = statistics.median(bare_ms)
    cells, added = [], []
    for mode, host, token in servers:
        ms = gust_cold(mode, host, token, fn, runtime)
        p50 = statistics.median(ms)
        cells.append(f"{p50:.1f} / {pct(ms, 99):.1f}")
        added.append(f"{p50 - b50:+.1f}")
    print(f"| {runtime} (`{label}`) | {b50:.1f} / {pct(bare_ms, 99):.1f} | " + " | ".join(cells)
          + " | " + " | ".join(added) + " |")
