#!/usr/bin/env bash
# Webhook receiver benchmark: signed 7 KB GitHub push deliveries from wrk over loopback
# (64 connections), against a baseline in the same run: the same wrk load on GET /healthz,
# which does no verification, parsing or queueing. Then a flood of oversized (26 MiB) bodies
# while the receiver's peak RSS is watched, and slow chunked uploads (no Content-Length, a
# signature that does not verify), several at once, while its RSS is sampled: the memory an
# unauthenticated sender can make it hold, against its RSS just before.
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
d = json.load(open("tests/fixtures/github/push-5.json"))
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

# Slow uploads: SLOW_CONNS senders, each sending a 24 MiB chunked body 64 KiB every 20 ms
# (about 3 MiB/s, so the whole body takes 8 s) and starting again whenever the receiver
# answers, for the whole duration, while the receiver's RSS is sampled every 100 ms.
cat >"$work/slow.py" <<'PY'
import socket, sys, threading, time
port, pid, conns, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
head = (b"POST /hooks/github HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"X-GitHub-Event: push\r\nX-Hub-Signature-256: sha256=" + b"0" * 64 + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
piece = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
statuses, lock, stop = {}, threading.Lock(), time.monotonic() + seconds
def rss_kib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def answer(s):
    s.setblocking(False)
    try:
        data = s.recv(64)
    except BlockingIOError:
        return None
    except OSError:
        return "reset"
    finally:
        s.setblocking(True)
    if not data:
        return "closed"
    return data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "other"
def sender():
    while time.monotonic() < stop:
        s = socket.create_connection(("127.0.0.1", port))
        status = None
        try:
            s.sendall(head)
            for _ in range(24 * 16):  # 24 MiB
                status = answer(s)
                if status or time.monotonic() >= stop:
                    break
                s.sendall(piece)
                time.sleep(0.02)
        except OSError:
            status = status or answer(s) or "reset"
        finally:
            s.close()
        with lock:
            statuses[status or "unfinished"] = statuses.get(status or "unfinished", 0) + 1
        time.sleep(0.05)
before = rss_kib()
threads = [threading.Thread(target=sender) for _ in range(conns)]
for t in threads: t.start()
peak = before
while any(t.is_alive() for t in threads):
    peak = max(peak, rss_kib())
    time.sleep(0.1)
summary = " ".join(f"{k}={v}" for k, v in sorted(statuses.items()))
print(f"SLOW before_kib={before} peak_kib={peak} {summary}")
PY

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
slow_conns="${SLOW_CONNS:-24}"
slow="$(python3 "$work/slow.py" "$port" "$server_pid" "$slow_conns" "${duration%s}" | grep SLOW)"
slow_before="$(field before_kib "$slow")"; slow_peak="$(field peak_kib "$slow")"
busy="$(curl -sf "http://127.0.0.1:$port/metrics" | sed -n 's/^driftless_webhook_deliveries_total{forge="github",event="unknown",outcome="busy"} \([0-9]*\).*/\1/p')"
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true

# The same slow uploads against a fresh receiver with the limits driftless had before the
# body budget (25 MiB a body, 30 s to send it, no shared budget: 1GiB is the most allowed).
sed -e 's/^\[server\]$/[server]\nbody_limit = "25MiB"\nbody_budget = "1GiB"\nread_timeout = "30s"/' \
  "$work/driftless.toml" >"$work/unbounded.toml"
KUBECONFIG="$DRIFTLESS_TEST_KUBECONFIG" "$bin" serve --config "$work/unbounded.toml" >"$work/unbounded.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/healthz" >/dev/null || { echo "bench/webhook.sh: the unbounded receiver did not start:" >&2; tail -20 "$work/unbounded.log" >&2; exit 1; }
old="$(python3 "$work/slow.py" "$port" "$server_pid" "$slow_conns" "${duration%s}" | grep SLOW)"
old_before="$(field before_kib "$old")"; old_peak="$(field peak_kib "$old")"

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
| webhook: RSS growth during ${duration} of $slow_conns concurrent slow chunked 24 MiB uploads (no Content-Length, bad signature, ~3 MiB/s each), default limits (1 MiB a body, 16 MiB budget) | +$(((slow_peak - slow_before) / 1024)) MiB ($((slow_before / 1024)) → $((slow_peak / 1024)) MiB) | the same uploads against the old limits (25 MiB a body, no budget): +$(((old_peak - old_before) / 1024)) MiB ($((old_before / 1024)) → $((old_peak / 1024)) MiB) | $(python3 -c "print(f'{max(1, $slow_peak - $slow_before) / max(1, $old_peak - $old_before):.3f}')")× the growth | ${busy:-0} uploads refused with 503 before their body; answers: $(sed 's/^SLOW before_kib=[0-9]* peak_kib=[0-9]* //' <<<"$slow"); old limits: $(sed 's/^SLOW before_kib=[0-9]* peak_kib=[0-9]* //' <<<"$old") |
ROWS
cat >"$results/details.md" <<DETAILS
### Webhook receiver (bench/webhook.sh)
- deliveries: \`$push\`
- baseline /healthz: \`$base\`
- accepted push deliveries counted by the receiver's own metric: ${accepted:-0}
- oversized flood (wrk output): $(tr '\n' ';' <<<"$flood")
- RSS after the flood: $((rss_after / 1024)) MiB
- slow uploads (status=count per upload attempt; "unfinished" ran into the end of the run): \`$slow\`
- the same against the old limits: \`$old\`
DETAILS
cat "$results/rows.md"
