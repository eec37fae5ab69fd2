#!/usr/bin/env bash
# gust benchmarks, each against its baseline in the same run:
#  - cold start p50/p99 (Node, Python) vs the bare `node -e` / `python3 -S -c` start, three ways:
#    plain processes (--no-sandbox), sandbox without the pool, sandbox from the pre-warmed pool;
#  - warm latency p50/p99 and requests/s at concurrency 1, 8, 32 through gust vs a bare Node
#    HTTP server calling the same handler in-process (bench/bare-node.js);
#  - noisy neighbour: hello-node p50/p99 alone vs while `burn` holds ~200 of its 256 MB and burns
#    CPU (its cgroup caps it at one vCPU);
#  - memory per instance: the sandbox's PID 1 (private memory) and gust's own growth per instance.
# Usage: bash bench/run.sh [seconds-per-warm-run (default 5)] [cold-start samples (default 30)]
# With GUST_BEFORE_BIN=path/to/an/older/gust, the cold starts of that binary (sandbox, pool) are
# measured in the same run, as before-sandbox and before-pool.
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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
DATA=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

# start_gust NAME ARGS...: a server with its own data dir; sets URL_<NAME>, TOKEN_<NAME>, PID_<NAME>.
start_gust() {
  local name=$1; shift
  local port; port=$(free_port)
  mkdir -p "$DATA/$name"
  RUST_LOG=warn ${START_BIN:-$BIN} --data-dir "$DATA/$name" serve --listen "127.0.0.1:$port" "$@" 2>"$DATA/$name.log" &
  PIDS+=($!)
  printf -v "PID_$name" %s $!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/_gust/health" >/dev/null && break; sleep 0.05; done
  GUST_SERVER="http://127.0.0.1:$port" GUST_DATA_DIR="$DATA/$name" $BIN deploy bench/functions >/dev/null 2>&1
  printf -v "URL_$name" %s "http://127.0.0.1:$port"
  printf -v "TOKEN_$name" %s "$(cat "$DATA/$name/admin-token")"
}
start_gust process --no-sandbox --prewarm 0
start_gust sandbox --prewarm 0
start_gust pool --prewarm 1
BEFORE=()
if [ -n "${GUST_BEFORE_BIN:-}" ]; then
  START_BIN=$GUST_BEFORE_BIN start_gust before_sandbox --prewarm 0
  START_BIN=$GUST_BEFORE_BIN start_gust before_pool --prewarm 1
  BEFORE=("before-sandbox=$URL_before_sandbox,$TOKEN_before_sandbox" "before-pool=$URL_before_pool,$TOKEN_before_pool")
fi
BARE_PORT=$(free_port)
node bench/bare-node.js "$BARE_PORT" >/dev/null &
BARE_PID=$!
PIDS+=($BARE_PID)
# The warm, noisy-neighbour and memory runs use the default configuration (sandbox + pool).
PORT=${URL_pool##*:}
GUST_PID=$PID_pool
TOKEN=$TOKEN_pool

echo "## gust benchmarks — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r)"
echo
echo "### Cold start (n=$COLD_N)"
echo
python3 bench/coldstart.py "$COLD_N" "process=$URL_process,$TOKEN_process" \
  "sandbox=$URL_sandbox,$TOKEN_sandbox" "pool=$URL_pool,$TOKEN_pool" ${BEFORE[@]+"${BEFORE[@]}"}
kill "$PID_process" "$PID_sandbox" ${PID_before_sandbox:-} ${PID_before_pool:-} 2>/dev/null || true

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
echo "### Noisy neighbour (hello-node at 1 connection, ${DUR}s)"
echo
read -r a50 a99 arps _ < <(measure "http://127.0.0.1:$PORT/fn/hello-node" 1)
curl -s -o /dev/null -X POST "http://127.0.0.1:$PORT/2015-03-31/functions/burn/invocations" \
  -d "{\"mb\":200,\"ms\":$(( (DUR + 3) * 1000 ))}" &
BURN=$!
sleep 1 # the burner starts (cold) and takes its memory before the measured run
read -r n50 n99 nrps _ < <(measure "http://127.0.0.1:$PORT/fn/hello-node" 1)
wait $BURN || true
echo "| hello-node | p50 (ms) | p99 (ms) | req/s |"
echo "|---|---|---|---|"
echo "| alone | $(to_ms "$a50") | $(to_ms "$a99") | $arps |"
echo "| beside \`burn\` (1 vCPU, 200 of 256 MB) | $(to_ms "$n50") | $(to_ms "$n99") | $nrps |"

echo
echo "### Memory per instance"
echo
# 16 concurrent slow calls start 16 instances of hello-node (sandbox + pool server).
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
uss() { awk '/^Private_(Clean|Dirty)/ {s+=$2} END {print s}' "/proc/$1/smaps_rollup"; }
curl -s -X POST "$URL_pool/_gust/v1/functions/hello-node/recycle" -H "authorization: Bearer $TOKEN" >/dev/null
sleep 0.5
before=$(rss "$GUST_PID")
wrk -t2 -c16 -d2s "http://127.0.0.1:$PORT/fn/hello-node?sleep=1" >/dev/null
after=$(rss "$GUST_PID")
inits=$(pgrep -P "$GUST_PID" -f '^gust-init' || true)
count=$(echo "$inits" | wc -w)
init_uss=0; rt_uss=0; rt_rss=0
for p in $inits; do
  init_uss=$(( init_uss + $(uss "$p") ))
  rt=$(pgrep -P "$p" | head -1)
  [ -n "$rt" ] && rt_uss=$(( rt_uss + $(uss "$rt") )) && rt_rss=$(( rt_rss + $(rss "$rt") ))
done
python3 - "$count" "$init_uss" "$rt_uss" "$rt_rss" "$before" "$after" <<'PY'
import sys
n, init_uss, rt_uss, rt_rss, before, after = map(int, sys.argv[1:])
n = max(n, 1)
print(f"{n} sandboxes (instances and pre-warmed). Per sandbox, in MB:")
print()
print("| PID 1 (gust-init) private | gust server growth per instance | platform total | runtime (node) private / RSS |")
print("|---|---|---|---|")
per_init = init_uss / n / 1024
growth = max(after - before, 0) / n / 1024
print(f"| {per_init:.2f} | {growth:.2f} | {per_init + growth:.2f} | {rt_uss / n / 1024:.1f} / {rt_rss / n / 1024:.1f} |")
PY
echo
echo "Targets: cold start within 20 ms of the bare start (sandbox), p50 <= 10 ms from the pool; added warm p50 <= 0.3 ms; c=8 throughput >= 0.6x bare; platform memory <= 2 MB per instance."
