#!/usr/bin/env bash
# Start a real Kubernetes v1.20.2 control plane on loopback: etcd (Debian's etcd-server),
# kube-apiserver, and kube-controller-manager (garbage collection + namespace deletion only).
# No kubelet and no scheduler: objects are stored, validated and watched, but pods never run.
#
# Usage: start.sh DIR            (build the binaries first: provision.sh)
# Writes DIR/kubeconfig (user `admin`, group system:masters) and DIR/kubeconfig-controller
# (user `kanali-controller`, no groups and no rights until RBAC grants them: use it to prove the
# manifests' RBAC is enough). Logs in DIR/*.log, pids in DIR/*.pid; stop with stop.sh DIR.
# Ports: $ETCD_PORT (default 23790, and +1 for etcd peers) and $API_PORT (default 16443).
set -euo pipefail

die() { echo "start.sh: error: $*" >&2; exit 1; }

D=$(mkdir -p "${1:?usage: start.sh DIR}" && cd "$1" && pwd)
BIN=${KANALI_K8S_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/kanali/k8s-v1.20.2}
ETCD_PORT=${ETCD_PORT:-23790}; API_PORT=${API_PORT:-16443}
HERE=$(cd "$(dirname "$0")" && pwd)

for b in kube-apiserver kube-controller-manager; do
  [ -x "$BIN/$b" ] || die "$BIN/$b not found: run $HERE/provision.sh first (or set KANALI_K8S_BIN)"
done
for c in etcd openssl curl; do
  command -v "$c" >/dev/null || die "$c not found: run $HERE/provision.sh first"
done
for f in kcm apiserver etcd; do
  if [ -f "$D/$f.pid" ] && kill -0 "$(cat "$D/$f.pid")" 2>/dev/null; then
    die "$f already running for $D (pid $(cat "$D/$f.pid")): run $HERE/stop.sh $D first"
  fi
done
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$ETCD_PORT" "$((ETCD_PORT+1))" "$API_PORT"; do
  port_busy "$p" && die "127.0.0.1:$p is already in use (set ETCD_PORT / API_PORT to other ports)"
done
# A previous run that was not stopped cleanly may have left its in-memory etcd data behind.
[ -f "$D/etcd.dir" ] && rm -rf "$(cat "$D/etcd.dir")" && rm -f "$D/etcd.dir"

# On any failure from here on, stop what this run started.
ok=
cleanup() { [ -n "$ok" ] || "$HERE/stop.sh" "$D" >/dev/null 2>&1 || true; }
trap cleanup EXIT

t0=$(date +%s%N)
cd "$D"
# Test PKI, reused across restarts of the same DIR; regenerated whole if any piece is missing.
PKI=(ca.crt ca.key apiserver.crt apiserver.key sa.key sa.pub tokens.csv)
if ! (cd pki 2>/dev/null && ls "${PKI[@]}" >/dev/null 2>&1); then
  rm -rf pki; mkdir pki; cd pki
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=kanali-test-ca" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  printf "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" > san.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile san.ext 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  # Static bearer tokens: token,user,uid[,"group,..."]
  printf 'admin-token,admin,admin,system:masters\ncontroller-token,kanali-controller,kanali-controller\n' > tokens.csv
  cd "$D"
fi

# etcd 3.4 has no --unsafe-no-fsync: keep its data in memory when /dev/shm exists.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then ETCD_DIR=$(mktemp -d /dev/shm/kanali-etcd.XXXXXX); else ETCD_DIR=$D/etcd-data; rm -rf "$ETCD_DIR"; fi
echo "$ETCD_DIR" > etcd.dir
# etcd 3.4 refuses to start on arm64 unless told to.
[ "$(uname -m)" = aarch64 ] && export ETCD_UNSUPPORTED_ARCH=arm64
etcd --name test --data-dir "$ETCD_DIR" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT+1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT+1))" \
  --initial-cluster "test=http://127.0.0.1:$((ETCD_PORT+1))" > etcd.log 2>&1 &
echo $! > etcd.pid

"$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
  --tls-cert-file=pki/apiserver.crt --tls-private-key-file=pki/apiserver.key --client-ca-file=pki/ca.crt \
  --token-auth-file=pki/tokens.csv --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=pki/sa.pub \
  --service-account-signing-key-file=pki/sa.key --service-cluster-ip-range=10.96.0.0/16 \
  --enable-admission-plugins=NamespaceLifecycle --disable-admission-plugins=ServiceAccount \
  --watch-cache=true --v=1 > apiserver.log 2>&1 &
echo $! > apiserver.pid

for who in admin controller; do
  f=kubeconfig; [ "$who" = controller ] && f=kubeconfig-controller
  user=$who; [ "$who" = controller ] && user=kanali-controller
  cat > "$f" <<KC
apiVersion: v1
kind: Config
clusters: [{name: kanali-test, cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$D/pki/ca.crt"}}]
users: [{name: $user, user: {token: $who-token}}]
contexts: [{name: kanali-test, context: {cluster: kanali-test, user: $user, namespace: default}}]
current-context: kanali-test
KC
done

ready=
for _ in $(seq 1 240); do
  kill -0 "$(cat etcd.pid)" 2>/dev/null || { tail -20 etcd.log >&2; die "etcd exited (log: $D/etcd.log)"; }
  kill -0 "$(cat apiserver.pid)" 2>/dev/null || { tail -20 apiserver.log >&2; die "kube-apiserver exited (log: $D/apiserver.log)"; }
  if curl -fsS --cacert pki/ca.crt -H "Authorization: Bearer admin-token" "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1; then
    ready=1; break
  fi
  sleep 0.5
done
[ -n "$ready" ] || { tail -20 apiserver.log >&2; die "kube-apiserver not ready after 120s (log: $D/apiserver.log)"; }

"$BIN/kube-controller-manager" --kubeconfig="$D/kubeconfig" --controllers=garbagecollector,namespace \
  --leader-elect=false --port=0 --secure-port=0 --v=1 > kcm.log 2>&1 &
echo $! > kcm.pid
sleep 0.3
kill -0 "$(cat kcm.pid)" 2>/dev/null || { tail -20 kcm.log >&2; die "kube-controller-manager exited (log: $D/kcm.log)"; }

ok=1
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "Kubernetes v1.20.2 API server ready on https://127.0.0.1:$API_PORT after ${ms}ms"
echo "  export KUBECONFIG=$D/kubeconfig             # admin (system:masters)"
echo "  $D/kubeconfig-controller                    # user kanali-controller, RBAC only"
echo "  stop: $HERE/stop.sh $D"
