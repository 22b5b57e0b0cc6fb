#!/usr/bin/env bash
# Memory per client connection (issue #12): the proxy's RSS with CONNS idle connections open,
# after each of them served one request (a proxied 200 by default, or a 404 with PATH), and
# after they all closed, and once 20 000 more requests went through one new connection: mimalloc
# returns freed pages to the OS (MADV_DONTNEED) at least 1 s after the free, during a later
# collection, which its slow-path allocations trigger (a few seconds of traffic); a proxy with
# no traffic at all keeps them until it has some. Prints KiB per connection for each state.
# Usage: e2e/bench/conn-memory.sh   (env: CONNS=10000 PATH_=/api/ EXTRA="more proxy flags";
#        release build)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$root/../shared/bench}
CONNS=${CONNS:-10000} PATH_=${PATH_:-/api/}
command -v nginx >/dev/null || "$BENCH_DIR/setup.sh" >/dev/null
cd "$root"
cargo build -q --release --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
# Each side holds CONNS descriptors: raise the soft limit as far as allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
tmp=$(mktemp -d); chmod 755 "$tmp"; mkdir -p "$tmp/www"
pids=()
source "$root/e2e/bench/stop.sh"
cleanup() { stop_started; rm -rf "$tmp"; }
trap cleanup EXIT
nginx -p "$tmp" -e "$tmp/upstream.err" -c "$BENCH_DIR/conf/upstream.conf" -g 'daemon off;' & pids+=($!)
"$bin/kanali-controller" --manifests e2e/bench/manifests --grpc-listen 127.0.0.1:19443 \
  --admin-listen 127.0.0.1:19080 --log warn & pids+=($!)
"$bin/kanali-proxy" --controller http://127.0.0.1:19443 --listen 127.0.0.1:18083 \
  --admin-listen 127.0.0.1:18084 --worker-threads 1 --log warn --idle-timeout-secs 600 \
  --header-read-timeout-secs 600 --shutdown-delay-secs 0 ${EXTRA:-} & proxy=$!; pids+=($proxy)
for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:18083$PATH_" 2>/dev/null && break; sleep 0.1; done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$proxy/status"; }
python3 - "$CONNS" "$PATH_" "$proxy" <<'PY'
import asyncio, sys
n, path, pid = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
async def exchange(r, w, req):
    w.write(req)
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await r.readexactly(length)
async def main():
    base = rss()
    conns = []
    for i in range(n):
        conns.append(await asyncio.open_connection("127.0.0.1", 18083))
    await asyncio.sleep(1)
    idle = rss()
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    for i in range(0, n, 500):
        batch = conns[i:i + 500]
        await asyncio.gather(*(exchange(r, w, req) for r, w in batch))
    await asyncio.sleep(1)
    served = rss()
    for r, w in conns:
        w.close()
    await asyncio.sleep(2)
    closed = rss()
    r, w = await asyncio.open_connection("127.0.0.1", 18083)
    for _ in range(20000):
        await exchange(r, w, req)
    w.close()
    await asyncio.sleep(1.5)
    later = rss()
    kib = lambda a, b: (a - b) * 1.0 / n
    print(f"RSS: {base} KiB before, {idle} with {n} idle connections ({kib(idle, base):.2f} KiB each),"
          f" {served} after one request on each ({kib(served, base):.2f} KiB each), {closed} after closing"
          f" ({kib(closed, base):.2f} KiB each left), {later} after 20 000 more requests"
          f" ({kib(later, base):.2f} KiB each left)")
asyncio.run(main())
PY
