#!/usr/bin/env bash
# Webhook receiver benchmark: signed 7 KB GitHub push deliveries from wrk over loopback
# (64 connections), against a baseline in the same run: the same wrk load on GET /healthz,
# which does no verification, parsing or queueing. Then a flood of oversized (26 MiB) bodies
# while the receiver's peak RSS is watched.
# Usage: bench/webhook.sh RESULTS_DIR   (writes rows.md and details.md there)
set -euo pipefail
cd "$(dirname "$0")/.."
results="$1"
mkdir -p "$results"
duration="${BENCH_DURATION:-10s}"
port="${BENCH_PORT:-18080}"
bin="${CARGO_TARGET_DIR:-target}/release/driftless"
work="$(mktemp -d)"
server_pid=""
trap 'kill "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

printf 'bench-secret\n' >"$work/secret"
printf 'unused-token\n' >"$work/token"
cat >"$work/driftless.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[kubernetes]
state_namespace = "driftless-bench"
[forges.github]
# Nothing here may leave the machine: queued jobs fail fast against a closed local port.
api_url = "http://127.0.0.1:9"
token_file = "$work/token"
webhook_secret_file = "$work/secret"
[[apps]]
name = "hello"
forge = "github"
repo = "Codertocat/Hello-World"
branch = "master"
TOML

# A 7 KB (7168-byte) compact push payload: fixture push-5 (8.8 KB pretty-printed) without its
# `installation` and `sender` blocks, with the commit message padded to the exact size.
python3 - "$work" <<'PY'
import hashlib, hmac, json, sys
work = sys.argv[1]
d = json.load(open("../shared/fixtures/github/push-5.json"))
d.pop("installation", None)
d.pop("sender", None)
base = json.dumps(d, separators=(",", ":")).encode()
pad = 7168 - len(base)
assert pad >= 0, len(base)
d["head_commit"]["message"] += "x" * pad
body = json.dumps(d, separators=(",", ":")).encode()
assert len(body) == 7168, len(body)
open(f"{work}/body.json", "wb").write(body)
sig = "sha256=" + hmac.new(b"bench-secret", body, hashlib.sha256).hexdigest()
open(f"{work}/signature", "w").write(sig)
open(f"{work}/big.json", "wb").write(b" " * (26 << 20))
PY

cat >"$work/push.lua" <<'LUA'
local body = io.open(os.getenv("BODY_FILE"), "rb"):read("*a")
local sig = io.open(os.getenv("SIG_FILE")):read("*a")
local n = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function request()
  n = n + 1
  return wrk.format("POST", "/hooks/github", {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "push",
    ["X-GitHub-Delivery"] = tostring(tid) .. "-" .. tostring(n),
    ["X-Hub-Signature-256"] = sig,
  }, body)
end
LUA
cat >"$work/report.lua" <<'LUA'
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d socket_errors=%d non2xx=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
LUA
cat "$work/report.lua" >>"$work/push.lua"
# The same deliveries paced: each of the 64 connections waits 12 ms between requests, an
# offered load of about 5,300/s, so latency is measured at the bar's rate, not at saturation.
{ cat "$work/push.lua"; echo 'function delay() return 12 end'; } >"$work/paced.lua"
{ cat "$work/report.lua"; echo 'function delay() return 12 end'; } >"$work/paced-base.lua"
cat >"$work/big.lua" <<'LUA'
local body = io.open(os.getenv("BIG_FILE"), "rb"):read("*a")
function request()
  return wrk.format("POST", "/hooks/github", {
    ["Content-Type"] = "application/json", ["X-GitHub-Event"] = "push",
    ["X-Hub-Signature-256"] = "sha256=00",
  }, body)
end
LUA

: "${DRIFTLESS_TEST_KUBECONFIG:?the webhook benchmark needs the test control plane (scripts/bench starts it)}"
KUBECONFIG="$DRIFTLESS_TEST_KUBECONFIG" "$bin" serve --config "$work/driftless.toml" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "bench/webhook.sh: driftless serve did not start:" >&2; tail -20 "$work/server.log" >&2; exit 1; }

field() { sed -n "s/.*$1=\([0-9]*\).*/\1/p" <<<"$2"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$server_pid/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$server_pid/status"; }

export BODY_FILE="$work/body.json" SIG_FILE="$work/signature" BIG_FILE="$work/big.json"
wrk -t2 -c64 -d2s -s "$work/push.lua" "http://127.0.0.1:$port" >/dev/null  # warm-up
base="$(wrk -t2 -c64 -d"$duration" -s "$work/report.lua" "http://127.0.0.1:$port/healthz" | grep RESULT)"
push="$(wrk -t2 -c64 -d"$duration" -s "$work/push.lua" "http://127.0.0.1:$port" | grep RESULT)"
paced="$(wrk -t2 -c64 -d"$duration" -s "$work/paced.lua" "http://127.0.0.1:$port" | grep RESULT)"
paced_base="$(wrk -t2 -c64 -d"$duration" -s "$work/paced-base.lua" "http://127.0.0.1:$port/healthz" | grep RESULT)"

accepted="$(curl -sf "http://127.0.0.1:$port/metrics" | sed -n 's/^driftless_webhook_deliveries_total{forge="github",event="push",outcome="accepted"} \([0-9]*\).*/\1/p')"
rss_before="$(rss_kib)"; hwm_before="$(hwm_kib)"
flood="$(wrk -t2 -c16 -d"$duration" -s "$work/big.lua" -s "$work/big.lua" "http://127.0.0.1:$port" 2>&1 | grep -E 'Requests/sec|Non-2xx|requests in' || true)"
too_large="$(curl -sf "http://127.0.0.1:$port/metrics" | sed -n 's/^driftless_webhook_deliveries_total{forge="github",event="unknown",outcome="too_large"} \([0-9]*\).*/\1/p')"
rss_after="$(rss_kib)"; hwm_after="$(hwm_kib)"

rate() { python3 -c "print(round($(field requests "$1") / ($(field duration_us "$1") / 1e6)))"; }
push_rps="$(rate "$push")"; base_rps="$(rate "$base")"
ratio="$(python3 -c "print(f'{$push_rps / $base_rps:.2f}')")"
ms() { python3 -c "print(f'{$(field "$1" "$2") / 1000:.2f}')"; }
p50="$(ms p50_us "$paced")"; p99="$(ms p99_us "$paced")"; paced_rps="$(rate "$paced")"
sat_p50="$(ms p50_us "$push")"; sat_p99="$(ms p99_us "$push")"
bp50="$(python3 -c "print(f'{$(field p50_us "$base") / 1000:.2f}')")"
bp99="$(python3 -c "print(f'{$(field p99_us "$base") / 1000:.2f}')")"
non2xx="$(field non2xx "$push")"

cat >"$results/rows.md" <<ROWS
| webhook: verified 7 KB push deliveries/s (64 conns, wrk) | $push_rps/s | GET /healthz under the same load: $base_rps/s | $ratio× | bar ≥ 5,000/s; $non2xx non-2xx answers |
| webhook: ack latency p50 / p99 at $paced_rps deliveries/s (64 conns, paced) | $p50 ms / $p99 ms | /healthz paced the same: $(ms p50_us "$paced_base") ms / $(ms p99_us "$paced_base") ms | p99 $(python3 -c "print(f'{$(field p99_us "$paced") / max(1, $(field p99_us "$paced_base")):.1f}')")× | bar: p99 < 5 ms; $(field non2xx "$paced") non-2xx |
| webhook: ack latency p50 / p99 at saturation ($push_rps/s) | $sat_p50 ms / $sat_p99 ms | /healthz at saturation: $bp50 ms / $bp99 ms | p99 $(python3 -c "print(f'{$(field p99_us "$push") / max(1, $(field p99_us "$base")):.1f}')")× | queueing-dominated: 64 requests always in flight |
| webhook: peak RSS, before → after a ${duration} flood of 26 MiB bodies (16 conns) | $((hwm_before / 1024)) MiB → $((hwm_after / 1024)) MiB | RSS before the flood: $((rss_before / 1024)) MiB | $(python3 -c "print(f'{$hwm_after / $hwm_before:.2f}')")× | ${too_large:-0} bodies refused with 413 |
ROWS
cat >"$results/details.md" <<DETAILS
### Webhook receiver (bench/webhook.sh)
- deliveries: \`$push\`
- baseline /healthz: \`$base\`
- accepted push deliveries counted by the receiver's own metric: ${accepted:-0}
- oversized flood (wrk output): $(tr '\n' ';' <<<"$flood")
- RSS after the flood: $((rss_after / 1024)) MiB
DETAILS
cat "$results/rows.md"
