#!/usr/bin/env bash
# Builds the driftless container image from this checkout without pulling anything, pushes it
# to the node cluster's local registry and prints its reference on stdout:
#   driftless-image.sh [REGISTRY]        (default 127.0.0.1:${DRIFTLESS_REGISTRY_PORT:-25000})
#
# The Dockerfile (for users) builds a static musl binary on distroless static:nonroot. Neither
# its base images nor a musl target can be had on this machine, so this builds the equivalent
# from what is here: the release binary (`cargo build --release`, glibc) plus exactly the
# shared libraries `ldd` lists for it, on a scratch root holding what distroless static adds
# (the CA bundle, /etc/passwd and /etc/group naming nonroot 65532, a /tmp). Same user
# (65532:65532), entrypoint (/driftless), command, port (8080) and no shell; the read-only
# root filesystem is the Deployment's securityContext, which both images run under.
# Kustomize: the Dockerfile downloads a kustomize release, which cannot be had here; this image
# carries a static kubectl 1.27 or later instead (the machine's; it bundles Kustomize v5) at
# /usr/local/bin/kubectl, so settings with render.kustomize_command = ["kubectl", "kustomize"]
# render Kustomize apps. Set DRIFTLESS_IMAGE_KUBECTL to choose the binary.
#
# The tag is a SHA-256 prefix of the binaries: a changed binary gets a new tag, so pods with
# imagePullPolicy IfNotPresent never run a stale image.
set -euo pipefail

registry="${1:-127.0.0.1:${DRIFTLESS_REGISTRY_PORT:-25000}}"
here="$(cd "$(dirname "$0")" && pwd)"
root_dir="$(cd "$here/../.." && pwd)"
store="${DRIFTLESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftless}/buildah"
log() { printf 'cluster/driftless-image: %s\n' "$*" >&2; }
bah() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }

command -v buildah >/dev/null || { log "buildah is missing (tests/cluster/build.sh --with-node installs it)"; exit 1; }
curl -sf "http://$registry/v2/" >/dev/null ||
  { log "no registry answers on $registry: start the node cluster with tests/cluster/up.sh --with-node"; exit 1; }

log "cargo build --release --bin driftless"
(cd "$root_dir" && cargo build --release --locked --bin driftless >&2)
target="${CARGO_TARGET_DIR:-$root_dir/target}"
bin="$target/release/driftless"
[ -x "$bin" ] || { log "no $bin after the build"; exit 1; }

# A static kubectl: the one named, else a versioned binary next to the machine's kubectl (which
# may be a dispatcher that needs its siblings), else that kubectl itself.
static_kubectl() {
  local k candidate
  k="$(readlink -f "$(command -v kubectl)" 2>/dev/null || true)"
  for candidate in ${DRIFTLESS_IMAGE_KUBECTL:-} $(ls -r "$k".1.* 2>/dev/null) "$k"; do
    [ -x "$candidate" ] || continue
    case "$(ldd "$candidate" 2>&1 || true)" in *"not a dynamic"*) ;; *) continue ;; esac
    "$candidate" kustomize --help >/dev/null 2>&1 && { echo "$candidate"; return 0; }
  done
  return 1
}
kubectl_bin="$(static_kubectl)" ||
  { log "no static kubectl with kustomize found (set DRIFTLESS_IMAGE_KUBECTL)"; exit 1; }

tag="$(cat "$bin" "$kubectl_bin" | sha256sum | cut -c1-16)"
ref="$registry/driftless:$tag"
if skopeo inspect --tls-verify=false "docker://$ref" >/dev/null 2>&1; then
  log "$ref already in the registry"
  echo "$ref"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/root"
mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/usr/local/bin"
chmod 1777 "$rootfs/tmp"
cp "$bin" "$rootfs/driftless"
cp "$kubectl_bin" "$rootfs/usr/local/bin/kubectl"
# Every library the dynamic loader resolves, at the path it resolves it from (the loader
# itself included), with symlinks followed.
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
[ -n "$(find "$rootfs" -name 'ld-linux*' -print -quit)" ] || { log "ldd named no dynamic loader for $bin"; exit 1; }
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"

ctr="$(bah from --quiet scratch)"
bah copy --quiet "$ctr" "$rootfs/." / >/dev/null
bah config --os linux --arch amd64 --user 65532:65532 --port 8080 \
  --env PATH=/usr/local/bin:/usr/bin:/bin \
  --entrypoint '["/driftless"]' --cmd '["serve", "--config", "/etc/driftless/driftless.toml"]' "$ctr"
bah commit --quiet --rm "$ctr" "$ref" >/dev/null
bah push --quiet --tls-verify=false "$ref" "docker://$ref"
bah rmi "$ref" >/dev/null 2>&1 || true
log "pushed $ref"
echo "$ref"
