#!/usr/bin/env bash
# Exits 0 when the test control plane in $DRIFTLESS_CLUSTER_DIR answers /readyz.
# With --with-node (directory default /tmp/driftless-node-cluster, see up.sh), also requires
# its node to be Ready, and prints the node as `kubectl get node` does.
set -uo pipefail
with_node=0
[ "${1:-}" = --with-node ] && with_node=1
if [ "$with_node" = 1 ]; then
  dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-node-cluster}"
else
  dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-cluster}"
fi
[ -f "$dir/kubeconfig" ] && [ -f "$dir/admin.token" ] || exit 1
# The API server's address as the kubeconfig has it (loopback, or the node IP).
server="$(sed -n 's/^ *server: *//p' "$dir/kubeconfig" | head -n1)"
curl -sf --max-time 2 --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $(cat "$dir/admin.token")" \
  "$server/readyz" >/dev/null || exit 1
[ "$with_node" = 1 ] || exit 0
ready="$(kubectl --kubeconfig "$dir/kubeconfig" --request-timeout 5s get node driftless-node \
  -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)"
kubectl --kubeconfig "$dir/kubeconfig" --request-timeout 5s get node driftless-node 2>/dev/null
[ "$ready" = True ]
