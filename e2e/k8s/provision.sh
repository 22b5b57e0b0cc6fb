#!/usr/bin/env bash
# Build a real kube-apiserver and kube-controller-manager (Kubernetes v1.20.2) from Debian
# bookworm's source package `kubernetes` (which vendors every Go dependency), with Debian's Go.
# The only network used is Debian's package archive, through apt: there is no container image
# and no Go module download.
#
# Idempotent: the binaries are cached in $KANALI_K8S_BIN (default
# ~/.cache/kanali/k8s-v1.20.2); when they are there and etcd/openssl/curl are installed, it
# returns at once. First run: about 6.5 min and 1.4 GB peak memory on 2 cores.
# Needs root (or sudo) for apt-get.
set -euo pipefail

K8S_VERSION=1.20.2
OUT=${KANALI_K8S_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/kanali/k8s-v$K8S_VERSION}
RUNTIME_PKGS=(etcd-server openssl curl)
BUILD_PKGS=(golang-go make rsync dpkg-dev
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)

say() { echo "[provision $(date +%H:%M:%S)] $*"; }
die() { echo "provision.sh: error: $*" >&2; exit 1; }

have_bins() { [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ]; }
have_runtime() { command -v etcd >/dev/null && command -v openssl >/dev/null && command -v curl >/dev/null; }

if have_bins && have_runtime; then echo "cached: $OUT"; exit 0; fi

# apt needs root; use sudo when we are not.
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "apt-get needs root: run as root or install sudo"
  SUDO=sudo
fi
command -v apt-get >/dev/null || die "needs a Debian (bookworm) system with apt-get; elsewhere use kind (see README.md)"

# One build at a time: a second concurrent run waits, then finds the cache.
mkdir -p "$(dirname "$OUT")"
exec 9>"$OUT.lock"
flock 9
if have_bins && have_runtime; then echo "cached: $OUT"; exit 0; fi

t0=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  say "apt-get install $*"
  $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed (run it by hand to see why)"
}

say "apt-get update"
# `apt-get source` needs deb-src entries: add them for the archive the machine already uses.
if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      | $SUDO tee /etc/apt/sources.list.d/kanali-debian-src.sources >/dev/null
  elif [ -f /etc/apt/sources.list ] && grep -qE '^deb ' /etc/apt/sources.list; then
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list \
      | $SUDO tee /etc/apt/sources.list.d/kanali-debian-src.list >/dev/null
  else
    die "no Debian apt source found to derive a deb-src entry from"
  fi
fi
$SUDO apt-get update -q >/dev/null || die "apt-get update failed"

if have_bins; then
  apt_install "${RUNTIME_PKGS[@]}"
  echo "cached: $OUT (runtime packages installed)"; exit 0
fi
apt_install "${RUNTIME_PKGS[@]}" "${BUILD_PKGS[@]}"

WORK=$(mktemp -d)
LOG=$OUT.build.log
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
say "apt-get source kubernetes"
apt-get source --download-only kubernetes >"$WORK/source.log" 2>&1 \
  || { cat "$WORK/source.log" >&2; die "apt-get source kubernetes failed"; }
# bookworm's is "1.20.5+really1.20.2" (a revert to 1.20.2, plus Debian's security patches in
# the .debian.tar.xz, which, like the original recipe, we do not apply).
origs=(kubernetes_*"$K8S_VERSION".orig.tar.gz)
[ -f "${origs[0]}" ] || die "Debian's kubernetes source is not v$K8S_VERSION: $(echo kubernetes_*)"
tar xzf "${origs[0]}"
srcs=(kubernetes-*/)
if [ ! -f "${srcs[0]}Makefile" ]; then die "unexpected layout of ${origs[0]}"; fi
cd "${srcs[0]}"
# The vendored reflect2 v1.0.1 crashes under Go >= 1.18 on the first custom-resource create;
# Debian's reflect2 1.0.2 and json-iterator 1.1.12 fix it.
for p in modern-go/reflect2 json-iterator/go; do
  [ -d "/usr/share/gocode/src/github.com/$p" ] || die "missing /usr/share/gocode/src/github.com/$p"
  rm -rf "vendor/github.com/$p"; cp -rL "/usr/share/gocode/src/github.com/$p" "vendor/github.com/$p"
done
# A plain `go build` wants go.mod updates (network); Kubernetes' own make in GOPATH mode works
# offline. HOME/GOCACHE live in $WORK so nothing of the build outlives it.
export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS='' HOME=$WORK/home
mkdir -p .go/src/k8s.io "$HOME"; ln -sfn ../../.. .go/src/k8s.io/kubernetes
say "building kube-apiserver and kube-controller-manager with $(go version | cut -d' ' -f3) (log: $LOG)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$LOG" 2>&1 \
  || { tail -30 "$LOG" >&2; die "build failed, full log: $LOG"; }
# Copy, then rename: an interrupted run never leaves a half-written binary that looks cached.
mkdir -p "$OUT"
for b in kube-apiserver kube-controller-manager; do
  cp "_output/bin/$b" "$OUT/.$b.tmp" && mv -f "$OUT/.$b.tmp" "$OUT/$b"
done
"$OUT/kube-apiserver" --version
say "built in $(( $(date +%s)-t0 ))s -> $OUT"
