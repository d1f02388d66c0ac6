#!/usr/bin/env bash
# Stops the test control plane started by up.sh (same DRIFTLESS_CLUSTER_DIR) and keeps its logs.
set -uo pipefail
dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-cluster}"
for name in kube-controller-manager kube-apiserver etcd; do
  pidfile="$dir/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
done
rm -f "$dir/kubeconfig"
