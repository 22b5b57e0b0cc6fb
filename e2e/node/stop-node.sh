#!/usr/bin/env bash
# Stop what start-node.sh DIR started and restore the host: kill every container it ran, stop
# the kubelet, kube-proxy, containerd, scheduler, controller-manager, API server and etcd (only
# the PIDs recorded in DIR, and only while they still run the program they were started as),
# unmount DIR's mounts, delete the bridge, remove the KUBE-* iptables chains, restore the
# sysctls start-node.sh recorded, remove empty /kubepods cgroups and the pod log entries made
# since the start. Safe to run twice, or after a partial start. Usage: stop-node.sh DIR
# (DIR is kept: its logs).
D=$(cd "${1:?usage: stop-node.sh DIR}" 2>/dev/null && pwd) || { echo "stop-node.sh: ${1:-} does not exist: nothing to stop"; exit 0; }
BIN=${KANALI_K8S_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/kanali/k8s-v1.20.2}
BRIDGE=kanali-br0; [ -f "$D/env" ] && . "$D/env"
SOCK=$D/containerd/containerd.sock
# What each pid file's process must be running (a stale pid file must never make us kill a
# process that has since reused the pid).
declare -A EXE=([dnsmasq]=dnsmasq [kubelet]=kubelet [kube-proxy]=kube-proxy [containerd]=containerd
  [scheduler]=kube-scheduler [kcm]=kube-controller-manager [apiserver]=kube-apiserver [etcd]=etcd)
# Alive and not a zombie: finished daemons are reparented to PID 1, which here reaps them
# seconds late, so `kill -0` would say they still run.
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/^.*) //' "/proc/$1/stat" | cut -c1)" != Z ]; }
stop_pid() { # name
  local f=$D/$1.pid p
  [ -f "$f" ] || return 0
  p=$(cat "$f"); rm -f "$f"
  [[ "$p" =~ ^[0-9]+$ ]] && alive "$p" || return 0
  tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- "${EXE[$1]}" || return 0
  kill "$p" 2>/dev/null
  for _ in $(seq 1 100); do alive "$p" || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null
}
# The DNS sync pipeline runs in its own session: end the whole group.
if [ -f "$D/dns-sync.pid" ]; then
  p=$(cat "$D/dns-sync.pid")
  [[ "$p" =~ ^[0-9]+$ ]] && [ "$(ps -o sid= -p "$p" 2>/dev/null | tr -d ' ')" = "$p" ] && kill -- -"$p" 2>/dev/null
  rm -f "$D/dns-sync.pid"
fi
stop_pid dnsmasq
stop_pid kubelet
stop_pid kube-proxy
# Every container (pods and sandboxes) lives in containerd's k8s.io namespace.
if [ -S "$SOCK" ]; then
  C="ctr -a $SOCK -n k8s.io"
  for t in $($C tasks ls -q 2>/dev/null); do $C tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
  sleep 0.5
  for t in $($C tasks ls -q 2>/dev/null); do $C tasks delete -f "$t" >/dev/null 2>&1; done
  for c in $($C containers ls -q 2>/dev/null); do $C containers delete "$c" >/dev/null 2>&1; done
fi
stop_pid containerd
# Sockets the pods left behind outlive them: a FIN sent to a pod already gone is retransmitted
# for ~100 s, and keeps its network namespace — and the veth on our bridge — alive that long.
# Destroy them while containerd's mounts still name the namespaces.
awk -v d="$D/" 'index($5, d) == 1 { for (i = 7; i < NF; i++) if ($i == "-") { if ($(i + 1) == "nsfs") print $5; break } }' \
  /proc/self/mountinfo | while read -r n; do nsenter --net="$n" ss -K -t -a >/dev/null 2>&1; done
# Mounts below DIR (pod netns, secret tmpfs, overlay rootfs), deepest first.
awk -v d="$D/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
# Newest first: the API server hangs on SIGTERM once etcd is gone.
stop_pid scheduler
stop_pid kcm
stop_pid apiserver
stop_pid etcd
[ -f "$D/etcd.dir" ] && rm -rf "$(cat "$D/etcd.dir")" && rm -f "$D/etcd.dir"
# Network: veths die with their pod netns (unmounted above, their sockets gone); the bridge is
# ours.
ip link del "$BRIDGE" 2>/dev/null
# iptables: kube-proxy's own cleanup, then any KUBE-* chain left (the kubelet's KUBE-FIREWALL...).
[ -x "$BIN/kube-proxy" ] && "$BIN/kube-proxy" --cleanup --proxy-mode=iptables >/dev/null 2>&1
for t in filter nat mangle; do
  iptables -t "$t" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | grep -vE '^-A KUBE-' | sed 's/^-A /-D /' |
    while read -r r; do eval iptables -t "$t" "$r" 2>/dev/null; done
  for ch in $(iptables -t "$t" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do iptables -t "$t" -F "$ch" 2>/dev/null; done
  for ch in $(iptables -t "$t" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do iptables -t "$t" -X "$ch" 2>/dev/null; done
done
restore() { # file, sysctl
  [ -f "$D/$1" ] && sysctl -qw "$2=$(cat "$D/$1")" && rm -f "$D/$1"
}
restore sysctl.route_localnet net.ipv4.conf.all.route_localnet
restore sysctl.ip_forward net.ipv4.ip_forward
restore sysctl.bridge_nf net.bridge.bridge-nf-call-iptables
# cgroups made by the kubelet (empty once every container is gone).
for s in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do [ -d "$s" ] && find "$s" -depth -type d -exec rmdir {} \; 2>/dev/null; done
# containerd 1.6 keeps shim sockets, runc state and fifos under /run/containerd whatever `state`
# says; all empty once the tasks are gone (and removed only if empty).
rmdir /run/containerd/runc/k8s.io /run/containerd/runc /run/containerd/s /run/containerd/fifo /run/containerd 2>/dev/null
# libcni's result cache (containerd cannot move it); the containers were killed without CNI DEL.
[ -f "$D/.start-stamp" ] && [ -d /var/lib/cni/results ] && find /var/lib/cni/results -maxdepth 1 -type f \
  -newer "$D/.start-stamp" \( -name 'kanali-*' -o -name 'cni-loopback-*' \) -delete 2>/dev/null
rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null  # only if empty
# Container logs: the kubelet hard-codes /var/log/pods and /var/log/containers.
if [ -f "$D/.start-stamp" ]; then
  for l in /var/log/pods /var/log/containers; do
    [ -d "$l" ] && find "$l" -mindepth 1 -maxdepth 1 -newer "$D/.start-stamp" -exec rm -rf {} + 2>/dev/null
    rmdir "$l" 2>/dev/null  # only if empty
  done
fi
exit 0
