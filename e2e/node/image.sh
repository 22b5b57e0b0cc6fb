#!/usr/bin/env bash
# Build a FROM-scratch OCI image out of local binaries plus the shared libraries `ldd` says they
# need (glibc-dynamic Rust binaries work), without Docker, buildah or a registry: the layer
# tarball, config, manifest and index are written by hand (tar, gzip, sha256sum). Then, if a
# containerd socket is given, import it into containerd's `k8s.io` namespace so that pods with
# `imagePullPolicy: Never` (or IfNotPresent) can use it.
# The image is the equivalent of the Dockerfile's distroless one for the e2e suite: the host's
# CA bundle, user `nonroot` (65532) by default, no shell unless -b.
#
# Usage: image.sh [-b] [-u UID] [-o OUT.tar] [-a CONTAINERD_SOCK] REF BINARY [FILE...]
#   REF      full image name, e.g. ghcr.io/kanali/kanali-proxy:e2e (pods must use exactly this)
#   BINARY   entrypoint; copied to /usr/local/bin/<name>; the image's ENTRYPOINT
#   FILE     more executables (also to /usr/local/bin) - their libraries are added too
#   -b       add busybox-static as /bin/sh and friends (for kubectl exec / debugging)
#   -u       the image's user (default 65532, distroless's nonroot; 0 for root)
#   -o       where to write the OCI archive (default: a temp file, removed after import); with
#            Docker around, `kind load image-archive OUT.tar` loads it into a kind cluster
#   -a       containerd socket to import into (default $CONTAINERD_ADDRESS; no import if unset)
set -euo pipefail
OUTTAR= ; SOCK=${CONTAINERD_ADDRESS:-}; BUSYBOX=; IMAGE_USER=65532
while getopts "bu:o:a:" o; do case $o in b) BUSYBOX=1;; u) IMAGE_USER=$OPTARG;; o) OUTTAR=$OPTARG;; a) SOCK=$OPTARG;; *) exit 2;; esac; done
shift $((OPTIND-1))
REF=${1:?usage: image.sh [-b] [-o OUT.tar] [-a SOCK] REF BINARY [FILE...]}; shift
[ $# -ge 1 ] || { echo "need at least one binary" >&2; exit 2; }
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
R=$W/rootfs; mkdir -p "$R"/{usr/local/bin,etc,tmp,proc,sys,dev,run,var/run}; chmod 1777 "$R/tmp"
printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/false\n' > "$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\nnonroot:x:65532:\n' > "$R/etc/group"
# Upstream TLS verifies against the system roots, as with distroless's ca-certificates.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$R/etc/ssl/certs"; cp -L /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/"
fi
copy_with_libs() { # $1 host file, $2 path in image
  mkdir -p "$R$(dirname "$2")"; cp -L "$1" "$R$2"
  # ldd prints "name => /path (addr)" or "/path (addr)"; statically linked files print nothing useful.
  ldd "$1" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
    [ -e "$lib" ] || continue
    mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"
  done || true
}
first=
for f in "$@"; do
  p=/usr/local/bin/$(basename "$f"); copy_with_libs "$f" "$p"; [ -n "$first" ] || first=$p
done
if [ -n "$BUSYBOX" ]; then
  mkdir -p "$R/bin"; cp /bin/busybox "$R/bin/busybox"
  for a in sh ls cat ps sleep wget nc env ip ping nslookup; do ln -sf busybox "$R/bin/$a"; done
fi
# One layer, reproducible: fixed mtimes and owners, sorted names.
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$R" -cf "$W/layer.tar" .
diffid=$(sha256sum "$W/layer.tar" | cut -d' ' -f1)
gzip -n -1 "$W/layer.tar"
mkdir -p "$W/oci/blobs/sha256"
blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$W/oci/blobs/sha256/$d"; echo "$d $(stat -c %s "$W/oci/blobs/sha256/$d")"; }
read -r ldig lsize < <(blob "$W/layer.tar.gz")
ARCH=$(uname -m); case $ARCH in x86_64) ARCH=amd64;; aarch64) ARCH=arm64;; esac
printf '{"architecture":"%s","os":"linux","config":{"User":"%s","Entrypoint":["%s"],"Env":["PATH=/usr/local/bin:/usr/bin:/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$ARCH" "$IMAGE_USER" "$first" "$diffid" > "$W/config.json"
read -r cdig csize < <(blob "$W/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
  "$cdig" "$csize" "$ldig" "$lsize" > "$W/manifest.json"
read -r mdig msize < <(blob "$W/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s","io.containerd.image.name":"%s"}}]}' \
  "$mdig" "$msize" "$REF" "$REF" > "$W/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$W/oci/oci-layout"
[ -n "$OUTTAR" ] || OUTTAR=$W/image.tar
tar -C "$W/oci" -cf "$OUTTAR" oci-layout index.json blobs
if [ -n "$SOCK" ]; then
  ctr -a "$SOCK" -n k8s.io images import "$OUTTAR" >/dev/null
  echo "imported $REF (sha256:$mdig, $(( lsize / 1024 )) KiB compressed)"
else
  echo "wrote $OUTTAR ($REF, sha256:$mdig)"
fi
