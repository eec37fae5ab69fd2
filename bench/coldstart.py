#!/usr/bin/env python3
"""Cold start through gust against the bare interpreter start, in the same run.

Cold start = wall time of one request to a function with no instance (its instances are stopped
through the admin API's recycle call first): process spawn, runtime init, module load, the
invocation and the HTTP round trip. Baseline = wall time of `node -e 0` / `python3 -c 0` from
launch to exit, with a clean environment, run with the same interpreter binaries gust resolves
(version-manager shims such as pyenv's are resolved to the real binary, as gust does).
Usage: coldstart.py URL TOKEN N
"""
import http.client, json, statistics, subprocess, sys, time, urllib.parse

url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host = urllib.parse.urlparse(url).netloc


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def request(method, path, headers=None):
    c = http.client.HTTPConnection(host)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def gust_cold(fn):
    out = []
    for _ in range(n):
        s, b = request("POST", f"/_gust/v1/functions/{fn}/recycle", {"authorization": f"Bearer {token}"})
        assert s == 200, b
        t = time.perf_counter()
        s, b = request("GET", f"/fn/{fn}")
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
rows = []
# gust starts Python with -S (see runtimes/python/bootstrap.py), so the stricter baseline for
# Python is `python3 -S -c 0`; the plain `python3 -c 0` is shown beside it.
cases = [
    ("node", "hello-node", [node, "-e", "0"], None),
    ("python", "hello-python", [python, "-S", "-c", "0"], [python, "-c", "0"]),
]
for runtime, fn, cmd, also in cases:
    bare_ms = bare(cmd)
    also_ms = bare(also) if also else None
    cold_ms = gust_cold(fn)
    rows.append({
        "runtime": runtime, "cmd": " ".join(["node" if runtime == "node" else "python3"] + cmd[1:]),
        "bare_p50": statistics.median(bare_ms), "bare_p99": pct(bare_ms, 99),
        "also": f"{statistics.median(also_ms):.1f} (`python3 -c 0`)" if also_ms else "",
        "gust_p50": statistics.median(cold_ms), "gust_p99": pct(cold_ms, 99),
    })
print(f"Interpreters: {node}, {python}\n")
print("| runtime | baseline | bare start p50 / p99 (ms) | gust cold start p50 / p99 (ms) | added p50 (ms) | target (within 20 ms) |")
print("|---|---|---|---|---|---|")
for r in rows:
    added = r["gust_p50"] - r["bare_p50"]
    also = f"; {r['also']}" if r["also"] else ""
    print(f"| {r['runtime']} | `{r['cmd']}` | {r['bare_p50']:.1f} / {r['bare_p99']:.1f}{also} "
          f"| {r['gust_p50']:.1f} / {r['gust_p99']:.1f} | {added:+.1f} | {'met' if added <= 20 else 'missed'} |")
