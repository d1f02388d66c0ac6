#!/usr/bin/env bash
# Exits 0 when the test control plane in $DRIFTLESS_CLUSTER_DIR answers /readyz.
set -uo pipefail
dir="${DRIFTLESS_CLUSTER_DIR:-/tmp/driftless-cluster}"
api_port="${DRIFTLESS_APISERVER_PORT:-16443}"
[ -f "$dir/kubeconfig" ] && [ -f "$dir/admin.token" ] || exit 1
curl -sf --max-time 2 --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $(cat "$dir/admin.token")" \
  "https://127.0.0.1:$api_port/readyz" >/dev/null
