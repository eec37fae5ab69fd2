#!/usr/bin/env bash
# gust benchmarks, each against its baseline in the same run:
#  - cold start p50/p99 (Node, Python) through gust vs the bare `node -e` / `python3 -c` start;
#  - warm latency p50/p99 and requests/s at concurrency 1, 8, 32 through gust vs a bare Node
#    HTTP server calling the same handler in-process (bench/bare-node.js).
# Usage: bash bench/run.sh [seconds-per-warm-run (default 5)] [cold-start samples (default 30)]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-5}
COLD_N=${2:-30}

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null))
fi
cargo build --release -q -p gust
BIN=target/release/gust

DATA=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BARE_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { kill "$GUST_PID" "$BARE_PID" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

RUST_LOG=warn $BIN --data-dir "$DATA" serve --listen "127.0.0.1:$PORT" 2>"$DATA/server.log" &
GUST_PID=$!
node bench/bare-node.js "$BARE_PORT" >/dev/null &
BARE_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/_gust/health" >/dev/null && break; sleep 0.05; done
export GUST_SERVER="http://127.0.0.1:$PORT" GUST_DATA_DIR="$DATA"
$BIN deploy bench/functions >/dev/null 2>&1
TOKEN=$(cat "$DATA/admin-token")

echo "## gust benchmarks — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r)"
echo
echo "### Cold start (n=$COLD_N)"
echo
python3 bench/coldstart.py "http://127.0.0.1:$PORT" "$TOKEN" "$COLD_N"

# wrk prints latency percentiles with --latency; pick p50, p99 and requests/s.
measure() { # url conns
  local conns=$2 threads=$(( $2 < 2 ? 1 : 2 ))
  wrk -t"$threads" -c"$conns" -d"${DUR}s" --latency "$1" | awk '
    / 50%/ {p50=$2} / 99%/ {p99=$2} /Requests\/sec/ {rps=$2}
    /Non-2xx/ {err=$NF}
    END {printf "%s %s %s %s\n", p50, p99, rps, (err==""?0:err)}'
}
# CPU ticks (utime+stime) of a process and its children that are still running.
ticks() { # pid...
  local t=0
  for p in "$@"; do
    for q in $p $(pgrep -P "$p" || true); do
      t=$(( t + $(awk '{print $14+$15}' /proc/$q/stat 2>/dev/null || echo 0) ))
    done
  done
  echo $t
}
to_ms() { # wrk units (us, ms, s) -> ms
  python3 -c "import sys,re; v=sys.argv[1]; m=re.match(r'([0-9.]+)(us|ms|s)',v); n=float(m.group(1)); print(round(n/1000 if m.group(2)=='us' else n*1000 if m.group(2)=='s' else n,3))" "$1"
}

# Warm both up (start instances up to the concurrency used).
wrk -t2 -c32 -d2s "http://127.0.0.1:$PORT/fn/hello-node" >/dev/null
wrk -t2 -c32 -d1s "http://127.0.0.1:$BARE_PORT/" >/dev/null
GUST_T=$(ticks "$GUST_PID")

echo
echo "### Warm requests, hello handler (wrk, ${DUR}s per run)"
echo
echo "| conns | bare Node p50 / p99 (ms) | bare req/s | gust p50 / p99 (ms) | gust req/s | gust/bare throughput | gust added p50 (ms) | CPU µs/req bare / gust+instances |"
echo "|---|---|---|---|---|---|---|---|"
HZ=$(getconf CLK_TCK)
for c in 1 8 32; do
  t0=$(ticks "$BARE_PID")
  read -r bp50 bp99 brps _ < <(measure "http://127.0.0.1:$BARE_PORT/" "$c")
  t1=$(ticks "$BARE_PID")
  read -r gp50 gp99 grps gerr < <(measure "http://127.0.0.1:$PORT/fn/hello-node" "$c")
  t2=$(ticks "$GUST_PID")
  # gust's own CPU is read after the run too: instances may have started during it.
  g0=$GUST_T
  GUST_T=$t2
  cpu=$(python3 -c "print(f'{($t1-$t0)/$HZ*1e6/($brps*$DUR):.0f} / {($t2-$g0)/$HZ*1e6/($grps*$DUR):.0f}')")
  bp50=$(to_ms "$bp50"); bp99=$(to_ms "$bp99"); gp50=$(to_ms "$gp50"); gp99=$(to_ms "$gp99")
  ratio=$(python3 -c "print(f'{float(\"$grps\")/float(\"$brps\"):.2f}x')")
  added=$(python3 -c "print(f'{$gp50-$bp50:+.3f}')")
  [ "$gerr" != "0" ] && echo "WARNING: $gerr non-2xx responses from gust at c=$c" >&2
  echo "| $c | $bp50 / $bp99 | $brps | $gp50 / $gp99 | $grps | $ratio | $added | $cpu |"
done
echo
echo "Targets: cold start within 20 ms of the bare start; added warm p50 <= 0.3 ms; c=8 throughput >= 0.6x bare."
