#!/usr/bin/env bash
# Provision what turns e2e/k8s/'s API server into a real single-node cluster: a kubelet, kube-proxy
# and kube-scheduler v1.20.2 built offline from Debian bookworm's source package `kubernetes`
# (exactly as e2e/k8s/provision.sh builds the API server), a static `pause` binary (the pod
# sandbox), and Debian's packages for the rest:
#   containerd + runc          the CRI runtime the kubelet drives
#   containernetworking-plugins  bridge, host-local, loopback, portmap (pod networking)
#   iptables + conntrack       kube-proxy's iptables mode
#   busybox-static             a static toolbox image.sh can put into debug images (-b)
#   dnsmasq-base               Service DNS for pods (start-node.sh)
#   socat, ethtool, ebtables   what the kubelet probes for (port-forward, hairpin)
#
# Prerequisite: e2e/k8s/provision.sh (API server, controller-manager, etcd, Go toolchain).
# Idempotent: binaries cached in $KANALI_K8S_BIN (default ~/.cache/kanali/k8s-v1.20.2) next to
# the API server's; when they and the packages are there it returns at once.
# The kubelet is patched to leave host kernel tunables alone (see below).
# Needs root (or sudo) for apt-get. Cold: ~10 s of apt, ~5 min of build on 2 cores, 1.35 GB peak.
set -euo pipefail

K8S_VERSION=1.20.2
OUT=${KANALI_K8S_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/kanali/k8s-v$K8S_VERSION}
HERE=$(cd "$(dirname "$0")" && pwd)
RUNTIME_PKGS=(runc containerd containernetworking-plugins iptables conntrack busybox-static
  socat ethtool ebtables dnsmasq-base)
BUILD_PKGS=(gcc libc6-dev golang-go make rsync dpkg-dev
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
BINS=(kubelet kube-proxy kube-scheduler pause)

say() { echo "[provision-node $(date +%H:%M:%S)] $*"; }
die() { echo "provision-node.sh: error: $*" >&2; exit 1; }

have_bins() { for b in "${BINS[@]}"; do [ -x "$OUT/$b" ] || return 1; done; }
missing_pkgs() {
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done
}
[ -x "$OUT/kube-apiserver" ] || die "run $HERE/../k8s/provision.sh first (no $OUT/kube-apiserver)"
if have_bins && [ -z "$(missing_pkgs "${RUNTIME_PKGS[@]}")" ]; then echo "cached: $OUT"; exit 0; fi

SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "apt-get needs root: run as root or install sudo"
  SUDO=sudo
fi
command -v apt-get >/dev/null || die "needs a Debian (bookworm) system with apt-get; elsewhere use kind (see README.md)"

# One build at a time (the same lock as provision.sh: two Go builds at once do not fit 2 cores).
exec 9>"$OUT.lock"
flock 9
t0=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  [ $# -gt 0 ] || return 0
  say "apt-get install $*"
  $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed (run it by hand to see why)"
}
want=(); have_bins || want=("${BUILD_PKGS[@]}")
mapfile -t need < <(missing_pkgs "${RUNTIME_PKGS[@]}" "${want[@]}")
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get update"
  $SUDO apt-get update -q >/dev/null || die "apt-get update failed"
  apt_install "${need[@]}"
fi
say "packages ready after $(( $(date +%s)-t0 ))s"
if have_bins; then echo "cached: $OUT"; exit 0; fi

# provision.sh added the deb-src entry `apt-get source` needs; refuse clearly if it is gone.
grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
  || die "no deb-src entry: run $HERE/../k8s/provision.sh (it adds one)"
WORK=$(mktemp -d)
LOG=$OUT.node-build.log
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
say "apt-get source kubernetes"
apt-get source --download-only kubernetes >"$WORK/source.log" 2>&1 \
  || { cat "$WORK/source.log" >&2; die "apt-get source kubernetes failed"; }
origs=(kubernetes_*"$K8S_VERSION".orig.tar.gz)
[ -f "${origs[0]}" ] || die "Debian's kubernetes source is not v$K8S_VERSION: $(echo kubernetes_*)"
tar xzf "${origs[0]}"
srcs=(kubernetes-*/)
[ -f "${srcs[0]}Makefile" ] || die "unexpected layout of ${origs[0]}"
cd "${srcs[0]}"
# Same vendor swap as provision.sh: reflect2 v1.0.1 crashes under Go >= 1.18.
for p in modern-go/reflect2 json-iterator/go; do
  [ -d "/usr/share/gocode/src/github.com/$p" ] || die "missing /usr/share/gocode/src/github.com/$p"
  rm -rf "vendor/github.com/$p"; cp -rL "/usr/share/gocode/src/github.com/$p" "vendor/github.com/$p"
done
# The kubelet, when it starts, rewrites host-wide sysctls it likes (vm.overcommit_memory=1,
# kernel.panic=10, kernel.panic_on_oops=1, ...) unless --protect-kernel-defaults, which makes it
# refuse to start instead. On a shared dev or CI machine neither is acceptable: only log them.
f=pkg/kubelet/cm/container_manager_linux.go
sed -i 's/^\tb := KernelTunableModify$/\tb := KernelTunableWarn \/\/ kanali: never touch host sysctls/' "$f"
grep -q 'b := KernelTunableWarn' "$f" || die "could not patch $f (the kubelet would change host sysctls)"
mkdir -p "$OUT"
# The pod sandbox ("infra") container's binary: reaps zombies, sleeps until SIGTERM/SIGINT.
# Static, so image.sh's image of it needs no libraries.
gcc -Os -static -Wall -Werror -DVERSION=v3.4-kanali -o "$WORK/pause" build/pause/linux/pause.c
strip "$WORK/pause"
export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS='' HOME=$WORK/home
mkdir -p .go/src/k8s.io "$HOME"; ln -sfn ../../.. .go/src/k8s.io/kubernetes
say "building kubelet, kube-proxy and kube-scheduler with $(go version | cut -d' ' -f3) (log: $LOG)"
make WHAT="cmd/kubelet cmd/kube-proxy cmd/kube-scheduler" >"$LOG" 2>&1 \
  || { tail -30 "$LOG" >&2; die "build failed, full log: $LOG"; }
# Copy, then rename: an interrupted run never leaves a half-written binary that looks cached.
for b in kubelet kube-proxy kube-scheduler; do
  cp "_output/bin/$b" "$OUT/.$b.tmp" && mv -f "$OUT/.$b.tmp" "$OUT/$b"
done
cp "$WORK/pause" "$OUT/.pause.tmp" && mv -f "$OUT/.pause.tmp" "$OUT/pause"
"$OUT/kubelet" --version
say "built in $(( $(date +%s)-t0 ))s -> $OUT"
