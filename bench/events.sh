#!/usr/bin/env bash
# Event benchmarks against baselines in the same run:
#  - durable accept rate: async Invoke API calls and queue sends acknowledged per second (each
#    on disk before its answer), beside `GET /_gust/health` on the same server (the HTTP floor);
#  - end-to-end async latency (202 → run → callback) beside a synchronous call of the function;
#  - schedule firing lateness for a 1-second schedule.
# Usage: bash bench/events.sh [seconds per accept run (default 5)] [latency samples (default 50)]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-5}
N=${2:-50}
command -v wrk >/dev/null || (apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null))
cargo build --release -q -p gust
BIN=target/release/gust
DATA=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { kill "$GUST_PID" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT
RUST_LOG=warn $BIN --data-dir "$DATA" serve --listen "127.0.0.1:$PORT" --prewarm 0 --allow-callback 127.0.0.1 2>"$DATA/server.log" &
GUST_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/_gust/health" >/dev/null && break; sleep 0.05; done
GUST_SERVER="http://127.0.0.1:$PORT" GUST_DATA_DIR="$DATA" $BIN deploy bench/events >/dev/null 2>&1
TOKEN=$(cat "$DATA/admin-token")
U="http://127.0.0.1:$PORT"

rate() { # url [script] -> req/s and non-2xx count
  wrk -t2 -c32 -d"${DUR}s" ${2:+-s "$2"} "$1" | awk '/Requests\/sec/ {r=$2} /Non-2xx/ {e=$NF} END {printf "%s %s\n", r, (e==""?0:e)}'
}
echo "## gust event benchmarks — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
echo
echo "### Durable accept rate (wrk, 32 connections, ${DUR}s)"
echo
read -r base berr < <(rate "$U/_gust/health")
read -r asy aerr < <(rate "$U/2015-03-31/functions/echo/invocations" bench/events/event.lua)
read -r snd serr < <(rate "$U/q/sink" bench/events/send.lua)
depth=$(curl -s -H "authorization: Bearer $TOKEN" "$U/_gust/v1/queues" | python3 -c 'import json,sys; print(json.load(sys.stdin)["queues"][0]["depth"])')
echo "| request | acknowledged/s | non-2xx | vs the HTTP floor |"
echo "|---|---|---|---|"
echo "| \`GET /_gust/health\` (baseline, nothing stored) | $base | $berr | 1.00x |"
echo "| async Invoke API (\`X-Amz-Invocation-Type: Event\`) | $asy | $aerr | $(python3 -c "print(f'{$asy/$base:.2f}x')") |"
echo "| queue send (\`POST /q/sink\`) | $snd | $serr | $(python3 -c "print(f'{$snd/$base:.2f}x')") |"
echo
echo "Messages stored in \`sink\` after the run: $depth."
echo
echo "### Latency at low load (n=$N, sequential)"
echo
sleep 2 # let the tick schedule accumulate a few slots
python3 bench/events/measure.py "$U" "$TOKEN" "$N"
