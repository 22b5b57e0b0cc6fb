#!/usr/bin/env bash
# Start a real single-node Kubernetes v1.20.2 on this host (root, no Docker, no registry), so
# that manifests/ runs as pods:
#   etcd + kube-apiserver (ServiceAccount admission on) + kube-controller-manager (all default
#   controllers, service-account tokens) + kube-scheduler,
#   containerd (CRI) with its own root, state and socket under DIR (never a system containerd),
#   a CNI bridge $BRIDGE with host-local IPAM ($POD_CIDR), the kubelet (cgroupfs driver),
#   kube-proxy (iptables mode), and a host dnsmasq (DNS=1, the default) answering
#   <svc>.<ns>.svc.cluster.local.
# Images come only from containerd's local store: build them with image.sh and use
# `imagePullPolicy: Never` or IfNotPresent (a `:latest` tag makes the kubelet pull, and fail).
#
# Usage: start-node.sh DIR      writes DIR/kubeconfig (admin) and DIR/kubeconfig-controller
# (user kanali-controller, no rights), logs DIR/*.log, pids DIR/*.pid. Stop with stop-node.sh DIR
# (called here when the start fails half-way). One node per host at a time.
# Needs e2e/k8s/provision.sh and provision-node.sh first, and kubectl on the PATH.
# Env: ETCD_PORT (23890, +1 for peers) API_PORT (16543) KUBELET_PORT (10250) BRIDGE POD_CIDR
#      NODE_IP SVC_CIDR NODE_NAME DNS CNI_BIN. The ports differ from e2e/k8s/start.sh's, so an
#      API-server suite can run at the same time — but not its tests of ClusterIPs: this node's
#      kube-proxy owns 10.96.0.0/16 on this host.
# Host changes, all undone by stop-node.sh: the bridge, iptables KUBE-* chains (kube-proxy,
# kubelet), net.ipv4.conf.all.route_localnet (kube-proxy 1.20 sets it to 1 unconditionally),
# cgroups under /kubepods, /var/log/pods + /var/log/containers entries. IP forwarding is left as
# it is (the CNI bridge is not the pods' "gateway", which would switch it on): pods reach each
# other over the bridge, the node's own addresses directly, and the host reaches Services
# through kube-proxy's OUTPUT DNAT. A pod calling a ClusterIP whose endpoint is another pod
# would need forwarding; nothing here does.
set -euo pipefail

die() { echo "start-node.sh: error: $*" >&2; exit 1; }

D=$(mkdir -p "${1:?usage: start-node.sh DIR}" && cd "$1" && pwd)
BIN=${KANALI_K8S_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/kanali/k8s-v1.20.2}
HERE=$(cd "$(dirname "$0")" && pwd)
ETCD_PORT=${ETCD_PORT:-23890}; API_PORT=${API_PORT:-16543}; KUBELET_PORT=${KUBELET_PORT:-10250}
# Not 10.88.0.0/16: that is podman/buildah's default CNI network (bridge cni-podman0), which a
# single `buildah bud` with a RUN step creates and leaves behind.
BRIDGE=${BRIDGE:-kanali-br0}; POD_CIDR=${POD_CIDR:-10.244.0.0/16}; NODE_IP=${NODE_IP:-10.244.0.1}
CNI_BIN=${CNI_BIN:-/usr/lib/cni}; [ -x "$CNI_BIN/bridge" ] || CNI_BIN=/opt/cni/bin  # Debian / upstream
SVC_CIDR=${SVC_CIDR:-10.96.0.0/16}; NODE_NAME=${NODE_NAME:-kanali-node}; DNS=${DNS:-1}
CLUSTER_DNS=; [ "$DNS" = 1 ] && CLUSTER_DNS=$NODE_IP

[ "$(id -u)" -eq 0 ] || die "run as root (bridge, iptables, containerd, kubelet)"
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause; do
  [ -x "$BIN/$b" ] || die "missing $BIN/$b: run e2e/k8s/provision.sh and $HERE/provision-node.sh"
done
for c in etcd openssl curl containerd ctr runc iptables ip kubectl; do
  command -v "$c" >/dev/null || die "$c not found: run $HERE/provision-node.sh"
done
[ "$DNS" != 1 ] || command -v dnsmasq >/dev/null || die "dnsmasq not found: run $HERE/provision-node.sh"
[ -x "$CNI_BIN/bridge" ] || die "no CNI plugins in $CNI_BIN: run $HERE/provision-node.sh"
for f in etcd apiserver kubelet containerd; do
  if [ -f "$D/$f.pid" ] && kill -0 "$(cat "$D/$f.pid")" 2>/dev/null; then
    die "$f already running for $D (pid $(cat "$D/$f.pid")): run $HERE/stop-node.sh $D first"
  fi
done
port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
for p in "$ETCD_PORT" "$((ETCD_PORT+1))"; do
  port_busy 127.0.0.1 "$p" && die "127.0.0.1:$p is already in use (set ETCD_PORT)"
done
if ip -4 addr show dev "$BRIDGE" 2>/dev/null | grep -q "inet $NODE_IP/"; then
  port_busy "$NODE_IP" "$API_PORT" && die "a node already runs on $BRIDGE ($NODE_IP:$API_PORT): stop it first (stop-node.sh DIR)"
fi
# Refuse a pod range that another interface already routes: pods would be unreachable.
other=$(ip -4 route show to match "$NODE_IP" | grep -v '^default' | grep -v " dev $BRIDGE " || true)
[ -z "$other" ] || die "POD_CIDR $POD_CIDR overlaps an existing route: $other (set POD_CIDR/NODE_IP)"

# From here on, a failure stops what this run started and restores the host.
ok=
cleanup() { [ -n "$ok" ] || "$HERE/stop-node.sh" "$D" >/dev/null 2>&1 || true; }
trap cleanup EXIT

t0=$(date +%s%N)
el() { local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '%d.%01ds' $((ms/1000)) $((ms%1000/100)); }
mkdir -p "$D/pki" "$D/cni/net.d" "$D/cni/ipam" "$D/containerd" "$D/kubelet"
touch "$D/.start-stamp"
cat > "$D/env" <<ENV
BRIDGE=$BRIDGE
API_PORT=$API_PORT
ENV
# ---- host network. The bridge exists before the API server so that it can advertise NODE_IP,
# the address pods reach it at (through the `kubernetes` Service, 10.96.0.1:443).
sysctl -n net.ipv4.conf.all.route_localnet > "$D/sysctl.route_localnet"
sysctl -n net.ipv4.ip_forward > "$D/sysctl.ip_forward"  # in case anything turns it on
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
fi
ip link set "$BRIDGE" up
# kube-proxy's Service NAT must also see pod-to-pod traffic crossing the bridge (a pod calling
# a ClusterIP that leads to a pod). Usually on already; only then left untouched.
nf=/proc/sys/net/bridge/bridge-nf-call-iptables
if [ -r "$nf" ] && [ "$(cat "$nf")" != 1 ]; then
  cat "$nf" > "$D/sysctl.bridge_nf"; sysctl -qw net.bridge.bridge-nf-call-iptables=1
elif [ ! -r "$nf" ]; then
  echo "warning: br_netfilter not loaded: pods cannot reach pods through a ClusterIP (the host can)" >&2
fi
# ---- PKI, reused across restarts of the same DIR
cd "$D/pki"
if [ ! -f sa.pub ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=kanali-node-ca" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
  printf "subjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$NODE_IP" > san.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile san.ext 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  # Static bearer tokens: token,user,uid[,"group,..."]
  printf 'admin-token,admin,admin,system:masters\ncontroller-token,kanali-controller,kanali-controller\n' > tokens.csv
fi
cd "$D"
for who in admin controller; do
  f=kubeconfig; user=$who; [ "$who" = controller ] && f=kubeconfig-controller && user=kanali-controller
  cat > "$f" <<KC
apiVersion: v1
kind: Config
clusters: [{name: kanali-node, cluster: {server: "https://$NODE_IP:$API_PORT", certificate-authority: "$D/pki/ca.crt"}}]
users: [{name: $user, user: {token: $who-token}}]
contexts: [{name: kanali-node, context: {cluster: kanali-node, user: $user, namespace: default}}]
current-context: kanali-node
KC
done
# ---- control plane. etcd 3.4 has no --unsafe-no-fsync: its data lives in memory when it can.
ETCD_DIR=$(mktemp -d /dev/shm/kanali-node-etcd.XXXXXX 2>/dev/null || mktemp -d "$D/etcd.XXXXXX")
echo "$ETCD_DIR" > "$D/etcd.dir"
[ "$(uname -m)" = aarch64 ] && export ETCD_UNSUPPORTED_ARCH=arm64
etcd --name node --data-dir "$ETCD_DIR" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT+1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT+1))" \
  --initial-cluster "node=http://127.0.0.1:$((ETCD_PORT+1))" > etcd.log 2>&1 &
echo $! > etcd.pid
# Listens on NODE_IP only (the bridge's address: reachable from the host and from pods, not from
# the network): host clients and pods (through the `kubernetes` Service) both use it.
"$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" \
  --tls-cert-file=pki/apiserver.crt --tls-private-key-file=pki/apiserver.key --client-ca-file=pki/ca.crt \
  --token-auth-file=pki/tokens.csv --authorization-mode=Node,RBAC --allow-privileged=true \
  --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=pki/sa.pub \
  --service-account-signing-key-file=pki/sa.key --service-cluster-ip-range="$SVC_CIDR" \
  --kubelet-preferred-address-types=InternalIP --watch-cache=true --v=1 > apiserver.log 2>&1 &
echo $! > apiserver.pid
ready=
for _ in $(seq 1 240); do
  kill -0 "$(cat apiserver.pid)" 2>/dev/null || { tail -20 apiserver.log >&2; die "kube-apiserver exited (log: $D/apiserver.log)"; }
  if curl -fsS --cacert pki/ca.crt -H "Authorization: Bearer admin-token" "https://$NODE_IP:$API_PORT/readyz" >/dev/null 2>&1; then
    ready=1; break
  fi
  sleep 0.5
done
[ -n "$ready" ] || { tail -20 apiserver.log >&2; die "kube-apiserver not ready after 120s (log: $D/apiserver.log)"; }
echo "api server ready at $(el)"
"$BIN/kube-controller-manager" --kubeconfig="$D/kubeconfig" --leader-elect=false --port=0 --secure-port=0 \
  --service-account-private-key-file=pki/sa.key --root-ca-file=pki/ca.crt \
  --use-service-account-credentials=false --cluster-signing-cert-file=pki/ca.crt \
  --cluster-signing-key-file=pki/ca.key --v=1 > kcm.log 2>&1 &
echo $! > kcm.pid
"$BIN/kube-scheduler" --kubeconfig="$D/kubeconfig" --leader-elect=false --port=0 --secure-port=0 \
  --v=1 > scheduler.log 2>&1 &
echo $! > scheduler.pid
# ---- containerd (own root, state and socket: never touches a system containerd)
SOCK=$D/containerd/containerd.sock
cat > containerd/config.toml <<TOML
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:3.4"
  netns_mounts_under_state_dir = true
  # The kubelet asks for oom_score_adj -998 (sandboxes) / -997 (Guaranteed pods); lowering it
  # needs CAP_SYS_RESOURCE, which root lacks on some VMs ("can't get final child's PID from
  # pipe: EOF" for every sandbox). Clamp to containerd's own score instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$D/cni/net.d"
TOML
cat > cni/net.d/10-kanali.conflist <<CNI
{"cniVersion": "0.4.0", "name": "kanali", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$D/cni/ipam",
            "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]], "routes": [{"dst": "0.0.0.0/0"}]}}
]}
CNI
containerd --config containerd/config.toml > containerd.log 2>&1 &
echo $! > containerd.pid
for _ in $(seq 1 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { tail -20 containerd.log >&2; die "containerd did not start (log: $D/containerd.log)"; }
"$HERE/image.sh" -a "$SOCK" localhost/pause:3.4 "$BIN/pause" >/dev/null
echo "containerd ready at $(el)"
# ---- kubelet + kube-proxy, both with the admin kubeconfig (system:masters). The kubelet API
# (exec, logs, port-forward) allows anonymous requests, so it listens on NODE_IP only.
# Eviction thresholds near zero and no image GC: a busy dev machine's disk must not evict the
# test's pods or delete its locally built images (they cannot be pulled again).
"$BIN/kubelet" --kubeconfig="$D/kubeconfig" --root-dir="$D/kubelet" --cert-dir="$D/kubelet/pki" \
  --volume-plugin-dir="$D/kubelet/volume-plugins" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
  --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" --runtime-request-timeout=2m \
  --pod-infra-container-image=localhost/pause:3.4 --cgroup-driver=cgroupfs --fail-swap-on=false \
  --address="$NODE_IP" --port="$KUBELET_PORT" --read-only-port=0 --healthz-port=0 --anonymous-auth=true --authorization-mode=AlwaysAllow \
  --cluster-domain=cluster.local ${CLUSTER_DNS:+--cluster-dns=$CLUSTER_DNS} \
  --eviction-hard="memory.available<1Mi,nodefs.available<1%,imagefs.available<1%" \
  --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
  --node-status-update-frequency=4s --sync-frequency=10s --v=1 > kubelet.log 2>&1 &
echo $! > kubelet.pid
# Conntrack limits and timeouts 0: kube-proxy would otherwise rewrite host-wide nf_conntrack
# sysctls.
"$BIN/kube-proxy" --kubeconfig="$D/kubeconfig" --hostname-override="$NODE_NAME" --bind-address="$NODE_IP" \
  --cluster-cidr="$POD_CIDR" --proxy-mode=iptables --conntrack-max-per-core=0 \
  --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 \
  --healthz-bind-address= --metrics-bind-address= --v=1 > kube-proxy.log 2>&1 &
echo $! > kube-proxy.pid
export KUBECONFIG=$D/kubeconfig
# ---- DNS (DNS=0 to skip): no CoreDNS image exists offline, so a host dnsmasq on NODE_IP:53
# answers <svc>.<ns>.svc.cluster.local from a hosts file that a `kubectl get -w` loop rewrites
# on every Service or Endpoints event (ClusterIP -> its IP; headless -> its ready addresses; no
# SRV, no ExternalName; lags up to ~1 s); other names go to the host's resolvers.
if [ "$DNS" = 1 ]; then
  mkdir -p dns; : > dns/hosts
  dnsmasq --keep-in-foreground --conf-file=/dev/null --no-hosts --addn-hosts="$D/dns/hosts" \
    --bind-interfaces --listen-address="$NODE_IP" --local=/cluster.local/ --domain-needed \
    --pid-file= --user=root --log-facility=- > dnsmasq.log 2>&1 &
  echo $! > dnsmasq.pid
  cat > dns/sync.sh <<'SYNC'
#!/usr/bin/env bash
cd "$(dirname "$0")"
regen() {
  { kubectl get svc -A -o jsonpath='{range .items[*]}S {.metadata.namespace} {.metadata.name} {.spec.clusterIP}{"\n"}{end}'
    kubectl get endpoints -A -o jsonpath='{range .items[*]}E {.metadata.namespace} {.metadata.name}{range .subsets[*].addresses[*]} {.ip}{end}{"\n"}{end}'
  } | awk '$1=="S" {ip[$2" "$3]=$4} $1=="E" {k=$2" "$3; ep[k]=$0}
      END {for (k in ip) {split(k, a, " "); n=a[2]"."a[1]".svc.cluster.local"
        if (ip[k] != "None") print ip[k], n
        else if (k in ep) {m=split(ep[k], e, " "); for (i=4; i<=m; i++) print e[i], n}}}' > hosts.tmp &&
  mv hosts.tmp hosts && kill -HUP "$(cat ../dnsmasq.pid)"
}
{ kubectl get svc -A -w -o name & kubectl get endpoints -A -w -o name & wait; } 2>/dev/null |
  while read -r _; do while read -r -t 0.3 _; do :; done; regen; done  # coalesce bursts
SYNC
  chmod +x dns/sync.sh
  # Its own session, so that stop-node.sh ends the whole pipeline with one kill -- -PGID.
  setsid dns/sync.sh > dns-sync.log 2>&1 &
  echo $! > dns-sync.pid
fi
for _ in $(seq 1 240); do
  if [ "$(kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; then
    ok=1
    echo "node $NODE_NAME Ready at $(el)"
    echo "  export KUBECONFIG=$D/kubeconfig CONTAINERD_ADDRESS=$SOCK"
    echo "  stop: $HERE/stop-node.sh $D"
    exit 0
  fi
  kill -0 "$(cat kubelet.pid)" 2>/dev/null || { tail -20 kubelet.log >&2; die "kubelet exited (log: $D/kubelet.log)"; }
  sleep 0.5
done
tail -30 kubelet.log >&2
die "node not Ready after 120s (log: $D/kubelet.log)"
