#!/usr/bin/env bash
# Stops the test control plane started by up.sh (same DRIFTLESS_CLUSTER_DIR) and keeps its logs.
# With --with-node, stops the node cluster (default /tmp/driftless-node-cluster): the node's
# pods and containers first, then its components, then the control plane, and removes the
# node's network (its address, the pod bridge, kube-proxy's iptables rules).
set -uo pipefail
with_node=0
[ "${1:-}" = --with-node ] && with_node=1
if [ "$with_node" = 1 ]; then
  dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-node-cluster}"
else
  dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-cluster}"
fi

stop() { # name
  local pidfile="$dir/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

if [ "$with_node" = 1 ]; then
  stop kubelet
  stop kube-scheduler
  stop kube-proxy
  # The containers outlive kubelet and containerd (each has its own shim): kill them through
  # containerd while it still runs, then remove them so their mounts and netns go too.
  sock=/run/driftless-containerd.sock
  if [ -S "$sock" ]; then
    ctr_() { ctr --address "$sock" --namespace k8s.io "$@"; }
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    sleep 1
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1; done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1; done
  fi
  stop containerd
  stop registry
  bin="$(ls -d "${DRIFTLESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftless}"/kubernetes-*/bin 2>/dev/null | tail -n1)"
  [ -x "$bin/kube-proxy" ] && "$bin/kube-proxy" --cleanup >/dev/null 2>&1
  # Whatever containerd left mounted (sandbox shm, rootfs) under its directories.
  grep -oE " ($dir|/run/driftless-containerd)[^ ]*" /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do ip netns delete "$ns" 2>/dev/null; done
  ip link delete driftless-cni0 2>/dev/null
  ip link delete driftless-node0 2>/dev/null
fi

for name in kube-controller-manager kube-apiserver etcd; do stop "$name"; done
rm -f "$dir/kubeconfig"
