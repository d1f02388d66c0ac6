#!/usr/bin/env bash
# Builds the images the node runs, from what is on this machine, and pushes them to the local
# registry (nothing is pulled from outside):
#   pause:3.4.1       the sandbox image: the static pause binary tests/cluster/build.sh --with-node
#                     compiled from the Kubernetes source;
#   busybox-httpd:1   a tiny web server (Debian's busybox-static) serving /www on port 80,
#                     the workload of the tests and the demo;
#   busybox-httpd:2   the same with another page, so that a commit can change the image.
#
#   images.sh REGISTRY BIN base
#
# buildah runs as root with the vfs driver and its storage under the cache, `from scratch`,
# so it needs no daemon, no overlay mounts and no user namespaces.
set -euo pipefail

registry="$1" bin="$2" what="$3"
store="${DRIFTLESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftless}/buildah"
log() { printf 'cluster/images: %s\n' "$*" >&2; }
bah() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }

# Builds an image from a root directory and pushes it. `config` holds buildah config flags.
push_rootfs() { # name:tag rootfs config...
  local ref="$1" rootfs="$2"; shift 2
  local ctr
  ctr="$(bah from --quiet scratch)"
  bah copy --quiet "$ctr" "$rootfs/." / >/dev/null
  bah config "$@" "$ctr"
  bah commit --quiet --rm "$ctr" "$registry/$ref" >/dev/null
  bah push --quiet --tls-verify=false "$registry/$ref" "docker://$registry/$ref"
  log "pushed $registry/$ref"
}

case "$what" in
base)
  [ -x "$bin/pause" ] || { log "no $bin/pause: run tests/cluster/build.sh --with-node"; exit 1; }
  [ -x /bin/busybox ] && file_is_static="$(ldd /bin/busybox 2>&1 || true)"
  case "${file_is_static:-}" in
  *"not a dynamic"*) ;;
  *) log "/bin/busybox is missing or not static (package busybox-static)"; exit 1 ;;
  esac
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT

  mkdir -p "$work/pause"
  cp "$bin/pause" "$work/pause/pause"
  push_rootfs pause:3.4.1 "$work/pause" --entrypoint '["/pause"]' --os linux --arch amd64

  for tag in 1 2; do
    root="$work/httpd-$tag"
    mkdir -p "$root/bin" "$root/www"
    cp /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    printf 'busybox-httpd %s\n' "$tag" >"$root/www/index.html"
    push_rootfs "busybox-httpd:$tag" "$root" --os linux --arch amd64 --port 80 \
      --entrypoint '["/bin/busybox", "httpd", "-f", "-v", "-p", "80", "-h", "/www"]'
  done
  ;;
*)
  log "unknown image set $what (base)"; exit 1 ;;
esac
