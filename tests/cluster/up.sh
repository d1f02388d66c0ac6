#!/usr/bin/env bash
# Starts a real Kubernetes control plane on loopback for the tests: etcd, kube-apiserver and
# kube-controller-manager (so namespaces finish deleting and garbage collection runs).
# Binaries come from tests/cluster/build.sh (built once, cached outside the checkout).
#
# Writes $DRIFTLESS_CLUSTER_DIR/kubeconfig (default /tmp/driftless-cluster) and waits for
# /readyz. Reuses a control plane that is already up in that directory. Stop it with down.sh.
# Ports (loopback only): etcd 23790/23800, kube-apiserver 16443; override with the
# DRIFTLESS_ETCD_PORT, DRIFTLESS_ETCD_PEER_PORT and DRIFTLESS_APISERVER_PORT variables.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-cluster}"
etcd_port="${DRIFTLESS_ETCD_PORT:-23790}"
etcd_peer_port="${DRIFTLESS_ETCD_PEER_PORT:-23800}"
api_port="${DRIFTLESS_APISERVER_PORT:-16443}"
log() { printf 'cluster/up: %s\n' "$*" >&2; }

ready() { "$here/status.sh" >/dev/null 2>&1; }

if ready; then
  log "control plane already up in $dir"
  echo "$dir/kubeconfig"
  exit 0
fi

build="$("$here/build.sh")"
bin="$build/bin"
etcd_bin="$(command -v etcd || true)"
[ -n "$etcd_bin" ] || etcd_bin=/usr/bin/etcd
[ -x "$etcd_bin" ] || { log "etcd not found (package etcd-server)"; exit 1; }

"$here/down.sh" >/dev/null 2>&1 || true
rm -rf "$dir"
mkdir -p "$dir/pki" "$dir/logs"

# PKI: a CA, a serving certificate for 127.0.0.1 and the service-account signing key.
(
  cd "$dir/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
    -subj "/CN=driftless-test-ca" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
    -subj "/CN=kube-apiserver" >/dev/null 2>&1
  printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >ext.cnf
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
printf '%s' "$admin_token" >"$dir/admin.token"
{
  printf '%s,driftless-test-admin,uid-admin,"system:masters"\n' "$admin_token"
  printf '%s,system:kube-controller-manager,uid-kcm,"system:masters"\n' "$kcm_token"
} >"$dir/tokens.csv"

write_kubeconfig() { # file token user
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: driftless-test
  cluster:
    server: https://127.0.0.1:$api_port
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

start() { # name command...
  local name="$1"; shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null &
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
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" --insecure-port 0 \
  --cert-dir "$dir/pki" --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
  --client-ca-file "$dir/pki/ca.crt" --token-auth-file "$dir/tokens.csv" \
  --authorization-mode RBAC \
  --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range 10.0.0.0/16 --allow-privileged \
  --enable-admission-plugins NamespaceLifecycle,ServiceAccount,DefaultStorageClass,ResourceQuota \
  --event-ttl 10m --profiling=false

for _ in $(seq 1 300); do
  if ready; then break; fi
  if ! kill -0 "$(cat "$dir/kube-apiserver.pid")" 2>/dev/null; then
    log "kube-apiserver exited; log follows"; tail -30 "$dir/logs/kube-apiserver.log" >&2; exit 1
  fi
  sleep 0.3
done
ready || { log "kube-apiserver not ready after 90 s; log follows"; tail -30 "$dir/logs/kube-apiserver.log" >&2; exit 1; }

# The workload controllers are off: with no nodes, no pod ever runs, so tests play those
# controllers themselves by writing status through the status subresource. The namespace,
# garbage-collector and service-account controllers stay on.
start kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig "$dir/kcm.kubeconfig" --authentication-kubeconfig "$dir/kcm.kubeconfig" \
  --authorization-kubeconfig "$dir/kcm.kubeconfig" \
  --bind-address 127.0.0.1 --port 0 --secure-port 0 --leader-elect=false \
  --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
  --use-service-account-credentials=false --cluster-signing-cert-file "$dir/pki/ca.crt" \
  --cluster-signing-key-file "$dir/pki/ca.key" --controllers '*,-deployment,-replicaset,-statefulset,-daemonset,-job,-cronjob,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pv-protection,-pvc-protection,-ttl,-bootstrapsigner,-tokencleaner'

sleep 1
kill -0 "$(cat "$dir/kube-controller-manager.pid")" 2>/dev/null || {
  log "kube-controller-manager exited; log follows"; tail -30 "$dir/logs/kube-controller-manager.log" >&2; exit 1; }

log "control plane up: apiserver https://127.0.0.1:$api_port, kubeconfig $dir/kubeconfig"
echo "$dir/kubeconfig"
