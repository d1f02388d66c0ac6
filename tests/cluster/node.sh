#!/usr/bin/env bash
# Starts one real node for the control plane that up.sh --with-node has just started in $dir:
# a local image registry, containerd + runc with the CNI bridge, kubelet, kube-scheduler and
# kube-proxy, then builds the images the tests run (tests/cluster/images.sh) and waits until
# the node is Ready. Everything comes from Debian packages and the Debian `kubernetes` source
# (tests/cluster/build.sh --with-node); no image is pulled from outside.
#
# Called by up.sh with: node.sh DIR BIN NODE_IP API_PORT REGISTRY_PORT
# What this sandbox needed, each explained where it is set:
#   - containerd's CRI `restrict_oom_score_adj`: negative oom_score_adj is refused here;
#   - a node IP that is not loopback (kubelet refuses one), on a bridge with no ports of its
#     own, since this kernel has no dummy links; the API server listens on it so that pods
#     reach it through the `kubernetes` Service;
#   - the node registers with the not-ready taint, removed by the node lifecycle controller,
#     which is why the node's control plane runs every controller.
set -euo pipefail

dir="$1" bin="$2" node_ip="$3" api_port="$4" registry_port="$5"
here="$(cd "$(dirname "$0")" && pwd)"
node_name=driftless-node
# The pod network of the CNI bridge; the host reaches pods on it directly.
pod_cidr=10.88.0.0/16
log() { printf 'cluster/node: %s\n' "$*" >&2; }

start() { # name command...
  local name="$1"; shift
  # 9>&-: a daemon must not hold up.sh's start lock after up.sh has exited.
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$dir/$name.pid"
}
alive_or_die() { # name
  kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null && return 0
  log "$1 exited; log follows"; tail -30 "$dir/logs/$1.log" >&2; exit 1
}
wait_for() { # what seconds command...
  local what="$1" secs="$2"; shift 2
  for _ in $(seq 1 $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  log "$what not ready after ${secs}s"
  return 1
}

# The local registry, plain HTTP on loopback. The packaged config demands htpasswd auth, so it
# gets a config of its own; its storage lives and dies with the cluster directory.
mkdir -p "$dir/registry"
cat >"$dir/registry/config.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $dir/registry/data}
  delete: {enabled: true}
http:
  addr: 127.0.0.1:$registry_port
EOF
start registry docker-registry serve "$dir/registry/config.yml"
wait_for "the registry on 127.0.0.1:$registry_port" 20 curl -sf "http://127.0.0.1:$registry_port/v2/" ||
  { alive_or_die registry; exit 1; }

registry="127.0.0.1:$registry_port"
pause_image="$registry/pause:3.4.1"
"$here/images.sh" "$registry" "$bin" base

# containerd with the CRI plugin, all state under $dir; the socket path stays short (unix
# sockets are limited to 108 bytes).
cd_dir="$dir/containerd"
mkdir -p "$cd_dir/certs.d/$registry" "$dir/cni"
# Plain HTTP to the local registry (containerd otherwise insists on HTTPS for a non-loopback
# name, and the hosts.toml path is how 1.6 is told for any name).
cat >"$cd_dir/certs.d/$registry/hosts.toml" <<EOF
server = "http://$registry"
[host."http://$registry"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
EOF
cat >"$cd_dir/config.toml" <<EOF
version = 2
root = "$cd_dir/root"
state = "/run/driftless-containerd"
[grpc]
  address = "/run/driftless-containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  # This sandbox refuses negative oom_score_adj; without this every pod sandbox fails with
  # runc's "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$cd_dir/certs.d"
EOF
cat >"$dir/cni/10-driftless.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "driftless",
  "plugins": [
    {"type": "bridge", "bridge": "driftless-cni0", "isGateway": true, "ipMasq": true,
     "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pod_cidr"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$dir/cni/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
start containerd containerd --config "$cd_dir/config.toml"
wait_for containerd 30 ctr --address /run/driftless-containerd.sock version || { alive_or_die containerd; exit 1; }

# Service traffic between pods on the bridge goes through iptables (kube-proxy's rules).
sysctl -qw net.ipv4.ip_forward=1 || true
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true

start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$dir/node.kubeconfig" \
  --authentication-kubeconfig "$dir/node.kubeconfig" --authorization-kubeconfig "$dir/node.kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --port 0 --secure-port 0

mkdir -p "$dir/kubelet"
start kubelet "$bin/kubelet" --kubeconfig "$dir/node.kubeconfig" \
  --hostname-override "$node_name" --node-ip "$node_ip" --address "$node_ip" --read-only-port 0 \
  --container-runtime=remote --container-runtime-endpoint unix:///run/driftless-containerd.sock \
  --pod-infra-container-image "$pause_image" \
  --cgroup-driver=cgroupfs --fail-swap-on=false --cgroups-per-qos=false --enforce-node-allocatable="" \
  --root-dir "$dir/kubelet" --cert-dir "$dir/kubelet/pki" \
  --eviction-hard 'memory.available<100Mi,nodefs.available<2%,imagefs.available<2%' \
  --image-gc-high-threshold 99 --image-gc-low-threshold 98 \
  --healthz-bind-address 127.0.0.1 --healthz-port 0 --v 1

start kube-proxy "$bin/kube-proxy" --kubeconfig "$dir/node.kubeconfig" \
  --hostname-override "$node_name" --proxy-mode iptables --cluster-cidr "$pod_cidr" \
  --bind-address "$node_ip" --healthz-bind-address 127.0.0.1:25256 --metrics-bind-address 127.0.0.1:25249 \
  --conntrack-max-per-core 0

kubectl_() { kubectl --kubeconfig "$dir/kubeconfig" "$@"; }
node_ready() {
  [ "$(kubectl_ get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] &&
    [ -z "$(kubectl_ get node "$node_name" -o jsonpath='{.spec.taints}')" ]
}
for _ in $(seq 1 300); do
  node_ready && break
  for name in containerd kubelet kube-scheduler kube-proxy registry; do alive_or_die "$name"; done
  sleep 0.5
done
node_ready || {
  log "node $node_name not Ready (and untainted) after 150 s; kubelet log follows"
  tail -30 "$dir/logs/kubelet.log" >&2
  kubectl_ describe node "$node_name" >&2 || true
  exit 1
}
log "node $node_name Ready at $node_ip, registry $registry"
