#!/usr/bin/env bash
# Starts a real Kubernetes control plane on loopback for the tests: etcd, kube-apiserver and
# kube-controller-manager (so namespaces finish deleting and garbage collection runs).
# Binaries come from tests/cluster/build.sh (built once, cached outside the checkout).
#
# Writes $DRIFTLESS_CLUSTER_DIR/kubeconfig (default /tmp/driftless-cluster) and waits for
# /readyz. Reuses a control plane that is already up in that directory. Stop it with down.sh.
# Ports (loopback only): etcd 23790/23800, kube-apiserver 16443; override with the
# DRIFTLESS_ETCD_PORT, DRIFTLESS_ETCD_PEER_PORT and DRIFTLESS_APISERVER_PORT variables.
#
# up.sh --with-node starts a second, separate cluster that runs pods: its own control plane
# with every controller on (the Deployment controller, the node lifecycle controller that
# lifts the not-ready taint), plus one node (tests/cluster/node.sh: containerd, kubelet,
# kube-scheduler, kube-proxy, a local registry). It is separate because the tests on the first
# cluster play the workload controllers themselves, which a real controller would contradict.
# Defaults: directory /tmp/driftless-node-cluster, etcd 23791/23801, kube-apiserver 16444 on
# the node IP 10.213.0.1 (DRIFTLESS_NODE_IP; pods reach the API server there through the
# `kubernetes` Service, so it cannot be loopback), the registry on 127.0.0.1:25000
# (DRIFTLESS_REGISTRY_PORT). One node cluster per machine: containerd's state and the pod
# bridge are machine-wide.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
with_node=0
[ "${1:-}" = --with-node ] && with_node=1
if [ "$with_node" = 1 ]; then
  dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-node-cluster}"
  etcd_port="${DRIFTLESS_ETCD_PORT:-23791}"
  etcd_peer_port="${DRIFTLESS_ETCD_PEER_PORT:-23801}"
  api_port="${DRIFTLESS_APISERVER_PORT:-16444}"
  api_host="${DRIFTLESS_NODE_IP:-10.213.0.1}"
  registry_port="${DRIFTLESS_REGISTRY_PORT:-25000}"
  status=("$here/status.sh" --with-node)
  # Workload controllers on: pods really run here.
  controllers='*'
else
  dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-cluster}"
  etcd_port="${DRIFTLESS_ETCD_PORT:-23790}"
  etcd_peer_port="${DRIFTLESS_ETCD_PEER_PORT:-23800}"
  api_port="${DRIFTLESS_APISERVER_PORT:-16443}"
  api_host=127.0.0.1
  status=("$here/status.sh")
  # The workload controllers are off: with no nodes, no pod ever runs, so tests play those
  # controllers themselves by writing status through the status subresource. The namespace,
  # garbage-collector and service-account controllers stay on.
  controllers='*,-deployment,-replicaset,-statefulset,-daemonset,-job,-cronjob,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pv-protection,-pvc-protection,-ttl,-bootstrapsigner,-tokencleaner'
fi
export DRIFTLESS_CLUSTER_DIR="$dir" DRIFTLESS_APISERVER_PORT="$api_port"
log() { printf 'cluster/up: %s\n' "$*" >&2; }

ready() { "${status[@]}" >/dev/null 2>&1; }
apiserver_ready() { "$here/status.sh" >/dev/null 2>&1; }

if ready; then
  log "control plane already up in $dir"
  echo "$dir/kubeconfig"
  exit 0
fi
# One start at a time per cluster: a second caller waits, then reuses what the first started
# instead of stopping it halfway through its start.
exec 9>"$dir.lock"
if ! flock -n 9; then
  log "waiting for another tests/cluster/up.sh to start $dir"
  flock 9
  if ready; then
    log "control plane already up in $dir"
    echo "$dir/kubeconfig"
    exit 0
  fi
fi

if [ "$with_node" = 1 ]; then
  build="$("$here/build.sh" --with-node)"
else
  build="$("$here/build.sh")"
fi
bin="$build/bin"
etcd_bin="$(command -v etcd || true)"
[ -n "$etcd_bin" ] || etcd_bin=/usr/bin/etcd
[ -x "$etcd_bin" ] || { log "etcd not found (package etcd-server)"; exit 1; }

if [ "$with_node" = 1 ]; then
  "$here/down.sh" --with-node >/dev/null 2>&1 || true
else
  "$here/down.sh" >/dev/null 2>&1 || true
fi
rm -rf "$dir"
mkdir -p "$dir/pki" "$dir/logs"
if [ "$with_node" = 1 ]; then
  # The node's own address. This kernel has no dummy links; a bridge without ports holds an
  # address just as well.
  ip link show driftless-node0 >/dev/null 2>&1 || ip link add driftless-node0 type bridge
  ip addr replace "$api_host/32" dev driftless-node0
  ip link set driftless-node0 up
fi

# PKI: a CA, a serving certificate for 127.0.0.1 (and the node IP) and the service-account signing key.
(
  cd "$dir/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
    -subj "/CN=driftless-test-ca" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
    -subj "/CN=kube-apiserver" >/dev/null 2>&1
  printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$api_host" >ext.cnf
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt \
    -days 3650 -extfile ext.cnf >/dev/null 2>&1
  openssl genrsa -out sa.key 2048 >/dev/null 2>&1
  openssl rsa -in sa.key -pubout -out sa.pub >/dev/null 2>&1
)

# Static bearer tokens: an admin and the controller manager. Both are system:masters: the
# controller manager runs every controller under its own identity (no per-controller service
# account credentials), which is simpler and fine for a throwaway test cluster.
admin_token="$(openssl rand -hex 24)"
kcm_token="$(openssl rand -hex 24)"
node_token="$(openssl rand -hex 24)"
printf '%s' "$admin_token" >"$dir/admin.token"
{
  printf '%s,driftless-test-admin,uid-admin,"system:masters"\n' "$admin_token"
  printf '%s,system:kube-controller-manager,uid-kcm,"system:masters"\n' "$kcm_token"
  # The node's components (kubelet, kube-scheduler, kube-proxy) share one identity.
  [ "$with_node" = 0 ] || printf '%s,system:node:driftless-node,uid-node,"system:masters"\n' "$node_token"
} >"$dir/tokens.csv"

write_kubeconfig() { # file token user
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: driftless-test
  cluster:
    server: https://$api_host:$api_port
    certificate-authority-data: $(base64 -w0 <"$dir/pki/ca.crt")
users:
- name: $3
  user:
    token: $2
contexts:
- name: driftless-test
  context:
    cluster: driftless-test
    user: $3
current-context: driftless-test
KC
}
write_kubeconfig "$dir/kubeconfig" "$admin_token" driftless-test-admin
write_kubeconfig "$dir/kcm.kubeconfig" "$kcm_token" kube-controller-manager
[ "$with_node" = 0 ] || write_kubeconfig "$dir/node.kubeconfig" "$node_token" system:node:driftless-node

start() { # name command...
  local name="$1"; shift
  # 9>&-: a daemon must not hold up.sh's start lock after up.sh has exited.
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$dir/$name.pid"
}

start etcd "$etcd_bin" --name driftless-test --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "driftless-test=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync --quota-backend-bytes 4294967296

for _ in $(seq 1 100); do
  curl -sf --max-time 1 "http://127.0.0.1:$etcd_port/health" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf --max-time 1 "http://127.0.0.1:$etcd_port/health" >/dev/null || {
  log "etcd did not become healthy; log follows"; tail -20 "$dir/logs/etcd.log" >&2; exit 1; }

start kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address "$api_host" --advertise-address "$api_host" --secure-port "$api_port" --insecure-port 0 \
  --cert-dir "$dir/pki" --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
  --client-ca-file "$dir/pki/ca.crt" --token-auth-file "$dir/tokens.csv" \
  --authorization-mode RBAC \
  --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range 10.0.0.0/16 --allow-privileged \
  --enable-admission-plugins NamespaceLifecycle,ServiceAccount,DefaultStorageClass,ResourceQuota \
  --kubelet-preferred-address-types InternalIP --event-ttl 10m --profiling=false

for _ in $(seq 1 300); do
  if apiserver_ready; then break; fi
  if ! kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null; then
    log "kube-apiserver exited; log follows"; tail -30 "$dir/logs/kube-apiserver.log" >&2; exit 1
  fi
  sleep 0.3
done
apiserver_ready || { log "kube-apiserver not ready after 90 s; log follows"; tail -30 "$dir/logs/kube-apiserver.log" >&2; exit 1; }

start kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig "$dir/kcm.kubeconfig" --authentication-kubeconfig "$dir/kcm.kubeconfig" \
  --authorization-kubeconfig "$dir/kcm.kubeconfig" \
  --bind-address 127.0.0.1 --port 0 --secure-port 0 --leader-elect=false \
  --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
  --use-service-account-credentials=false --cluster-signing-cert-file "$dir/pki/ca.crt" \
  --cluster-signing-key-file "$dir/pki/ca.key" --controllers "$controllers"

sleep 1
kill -0 "$(cat "$dir/kube-controller-manager.pid")" 2>/dev/null || {
  log "kube-controller-manager exited; log follows"; tail -30 "$dir/logs/kube-controller-manager.log" >&2; exit 1; }

[ "$with_node" = 0 ] || "$here/node.sh" "$dir" "$bin" "$api_host" "$api_port" "$registry_port"

log "control plane up: apiserver https://$api_host:$api_port, kubeconfig $dir/kubeconfig"
echo "$dir/kubeconfig"
