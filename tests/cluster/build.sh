#!/usr/bin/env bash
# Builds (once) the test control plane's binaries from Debian's own packages and caches them
# outside the checkout, keyed by version, so later runs start in seconds:
#   etcd             from the `etcd-server` package
#   kube-apiserver   \ from the `kubernetes` source package (bookworm: 1.20.2, Go deps vendored)
#   kube-controller-manager /
# With --with-node it also builds, from the same source tree, what a node needs:
#   kube-scheduler, kubelet, kube-proxy, and the pause binary (`gcc -static` of
#   build/pause/linux/pause.c) that tests/cluster/images.sh turns into the sandbox image.
# Prints the cache directory holding bin/ on stdout. Everything else goes to stderr.
set -euo pipefail

with_node=0
[ "${1:-}" = --with-node ] && with_node=1
cache_root="${DRIFTLESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/driftless}"
log() { printf 'cluster/build: %s\n' "$*" >&2; }

# One build at a time per cache: a second caller (another checkout's tests, a benchmark) waits
# here, then finds the binaries cached, instead of deleting the build directory under the
# first one.
mkdir -p "$cache_root"
exec 9>"$cache_root/.build.lock"
if ! flock -n 9; then
  log "waiting for another tests/cluster/build.sh to finish"
  flock 9
fi

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# etcd and the tools the scripts use (openssl for the serving cert, curl for readiness).
apt_install etcd-server openssl curl ca-certificates
# The node's runtime, network, registry and image tools (tests/cluster/node.sh, images.sh).
if [ "$with_node" = 1 ]; then
  apt_install containerd runc containernetworking-plugins iptables conntrack iproute2 \
    docker-registry buildah skopeo umoci busybox-static
fi

# Enable source packages by deriving a deb-src entry from the existing deb822 sources.
ensure_deb_src() {
  local src=/etc/apt/sources.list.d/debian.sources dst=/etc/apt/sources.list.d/driftless-src.sources
  [ -f "$dst" ] && return 0
  [ -f "$src" ] || { log "no $src to derive a deb-src entry from"; exit 1; }
  sed -e 's/^Types: *deb$/Types: deb-src/' "$src" >"$dst"
  apt_updated=0
}

# Empty when the source lists are not fetched yet: apt-cache then fails (exit 100), which must
# not end the script under `set -e`, since the fix is the update below.
version_of_source() {
  { apt-cache showsrc kubernetes 2>/dev/null || true; } | awk '/^Version:/ {print $2; exit}'
}

ensure_deb_src
version="$(version_of_source)"
if [ -z "$version" ]; then
  log "apt-get update (sources)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  apt_updated=1
  version="$(version_of_source)"
fi
[ -n "$version" ] || { log "apt-cache showsrc kubernetes found no source package"; exit 1; }
# Bump when the patches below change, so a stale cached build is never reused.
patch_level=p1
dir="$cache_root/kubernetes-$version-$patch_level"
control_plane=(kube-apiserver kube-controller-manager)
node=(kube-scheduler kubelet kube-proxy pause)
wanted=("${control_plane[@]}")
[ "$with_node" = 1 ] && wanted+=("${node[@]}")
# Only what is not cached yet is built: a cache made before --with-node existed keeps its control
# plane and gains the node binaries next to it.
missing=()
for b in "${wanted[@]}"; do
  [ -x "$dir/bin/$b" ] || missing+=("$b")
done
if [ ${#missing[@]} -eq 0 ]; then
  log "using cached build in $dir"
  echo "$dir"
  exit 0
fi

apt_install golang-go rsync jq dpkg-dev make gcc libc6-dev
work="$cache_root/build-$version"
rm -rf "$work"
mkdir -p "$work"
log "fetching kubernetes $version source into $work"
(cd "$work" && apt-get source --download-only kubernetes >&2)
dsc="$(ls "$work"/kubernetes_*.dsc | head -n1)"
(cd "$work" && dpkg-source --no-check -x "$dsc" src >&2)

# Kubernetes 1.20 vendors github.com/modern-go/reflect2 v1.0.1, whose linkname to
# reflect.mapiterinit predates Go 1.18's signature: built with bookworm's Go 1.19 the API server
# dies with SIGSEGV in mapiterinit the first time json-iterator encodes certain maps (seen with
# CRDs). Apply the fix reflect2 v1.0.2 made: the caller provides a full-size hiter.
r2="$work/src/vendor/github.com/modern-go/reflect2"
python3 - "$r2" <<'PY'
import pathlib, sys
d = pathlib.Path(sys.argv[1])
link = d / "unsafe_link.go"
s = link.read_text()
old_sig = "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter"
old_hiter = """type hiter struct {
	key   unsafe.Pointer // Must be in first position.  Write nil to indicate iteration end (see cmd/internal/gc/range.go).
	value unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).
	// rest fields are ignored
}"""
new_hiter = """type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}"""
assert old_sig in s and old_hiter in s, "reflect2 unsafe_link.go is not the expected v1.0.1"
s = s.replace(old_sig, "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)")
s = s.replace(old_hiter, new_hiter)
link.write_text(s)
m = d / "unsafe_map.go"
s = m.read_text()
old = """	return &UnsafeMapIterator{
		hiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),"""
new = """	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{
		hiter:      &it,"""
assert old in s, "reflect2 unsafe_map.go is not the expected v1.0.1"
m.write_text(s.replace(old, new))
PY
targets=()
for b in "${missing[@]}"; do
  [ "$b" = pause ] || targets+=("cmd/$b")
done
if [ ${#targets[@]} -gt 0 ]; then
  log "building ${targets[*]} (about 5 minutes on 2 cores for the control plane, as much again for a node)"
  (
    cd "$work/src"
    export GOFLAGS=-mod=vendor GO111MODULE=on GOPATH="$work/gopath" GOCACHE="$work/gocache"
    make generated_files >&2
    make WHAT="${targets[*]}" >&2
  )
fi
mkdir -p "$dir/bin"
# Each binary lands under a temporary name first and is renamed into place, so another run
# checking the cache never sees half a file.
for b in "${missing[@]}"; do
  if [ "$b" = pause ]; then
    gcc -Os -static -o "$dir/bin/.pause.tmp" "$work/src/build/pause/linux/pause.c"
  else
    found="$(find "$work/src/_output" -type f -name "$b" -perm -u+x | head -n1)"
    [ -n "$found" ] || { log "build produced no $b"; exit 1; }
    cp "$found" "$dir/bin/.$b.tmp"
  fi
  mv "$dir/bin/.$b.tmp" "$dir/bin/$b"
done
rm -rf "$work"
log "cached in $dir"
echo "$dir"
