#!/usr/bin/env bash
# Stop what start.sh DIR started, newest first (the API server hangs on SIGTERM once etcd is
# gone), and drop etcd's data. Safe to run twice, or after a partial start. Usage: stop.sh DIR
set -euo pipefail
D=${1:?usage: stop.sh DIR}
[ -d "$D" ] || { echo "stop.sh: $D does not exist: nothing to stop"; exit 0; }

# name in the pid file -> what its command line must contain (a stale pid file must never make
# us kill a process that has since reused the pid).
declare -A EXE=([kcm]=kube-controller-manager [apiserver]=kube-apiserver [etcd]=etcd)
for f in kcm apiserver etcd; do
  pidf=$D/$f.pid
  [ -f "$pidf" ] || continue
  p=$(cat "$pidf")
  if [[ "$p" =~ ^[0-9]+$ ]] && kill -0 "$p" 2>/dev/null \
     && tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- "${EXE[$f]}"; then
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null || true
    echo "stopped $f ($p)"
  fi
  rm -f "$pidf"
done
if [ -f "$D/etcd.dir" ]; then rm -rf "$(cat "$D/etcd.dir")"; rm -f "$D/etcd.dir"; fi
