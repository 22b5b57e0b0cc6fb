//! Test hosts of our own: a network namespace joined to this one by a veth pair, each end with
//! an address from 198.18.0.0/15 (RFC 2544's benchmarking range: routed nowhere).
//!
//! Tests send traffic only to loopback or to hosts they create. Some peers cannot be on
//! loopback — the API server refuses loopback addresses in Endpoints — so those upstreams
//! listen inside a [`TestHost`]: its sockets are created in the namespace (by a thread that
//! enters it and leaves again by ending), then served by this process as usual, so a test keeps
//! its in-process upstreams and their counters. Needs root (CI runs as root) and `ip` from
//! iproute2.
//!
//! Dropping a `TestHost` deletes the namespace and the veth pair. A test process killed before
//! that leaves them behind; the next [`TestHost::create`] removes those whose process is gone.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

/// Prefix of every namespace this module creates: `kanali-e2e-<pid>-<n>`.
const PREFIX: &str = "kanali-e2e-";

/// A network namespace with one address, reachable from this namespace.
#[derive(Debug)]
pub struct TestHost {
    netns: String,
    host_if: String,
    ip: Ipv4Addr,
}

impl TestHost {
    /// Creates the namespace, the veth pair and their addresses.
    ///
    /// # Errors
    /// If `ip` fails (not root, no iproute2), naming the command.
    pub fn create() -> io::Result<TestHost> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let netns = format!("{PREFIX}{pid}-{n}");
        // Interface names have at most 15 bytes.
        let tag = format!("{:x}", (pid << 4) | (n & 0xf));
        let (host_if, peer_if) = (format!("ke{tag}h"), format!("ke{tag}n"));
        let subnet = free_subnet()?;
        let [a, b, c, d] = subnet.octets();
        let host_ip = Ipv4Addr::new(a, b, c, d + 1);
        let ip = Ipv4Addr::new(a, b, c, d + 2);
        let host = TestHost {
            netns: netns.clone(),
            host_if: host_if.clone(),
            ip,
        };
        // From here on, Drop cleans up whatever part was made.
        run(&["netns", "add", &netns])?;
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ])?;
        run(&["link", "set", &peer_if, "netns", &netns])?;
        run(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        run(&["link", "set", &host_if, "up"])?;
        run(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            &peer_if,
        ])?;
        run(&["-n", &netns, "link", "set", &peer_if, "up"])?;
        run(&["-n", &netns, "link", "set", "lo", "up"])?;
        host.wait_reachable()?;
        Ok(host)
    }

    /// A veth pair carries traffic only once both ends are up, which the kernel finishes a
    /// moment after `ip` returns: until then connections fail at once. Waits for a connection
    /// to a probe listener inside to succeed.
    fn wait_reachable(&self) -> io::Result<()> {
        let probe = self.bind(0)?;
        let addr = probe.local_addr()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200))
            {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("test host {addr} not reachable after 10 s: {e}"),
                    ));
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }

    /// The host's address.
    pub fn ip(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// A TCP listener on the host's address (port 0: any), created inside the namespace.
    ///
    /// # Errors
    /// If the namespace cannot be entered or the port bound.
    pub fn bind(&self, port: u16) -> io::Result<std::net::TcpListener> {
        let path = format!("/run/netns/{}", self.netns);
        let addr = SocketAddr::new(self.ip(), port);
        // A thread of its own enters the namespace: the socket stays there, the thread ends.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    /// [`bind`](Self::bind), as a tokio listener.
    ///
    /// # Errors
    /// As `bind`, or if tokio cannot take the socket.
    pub fn listen(&self, port: u16) -> io::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::from_std(self.bind(port)?)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; the namespace goes last.
        let _ = run(&["link", "del", &self.host_if]);
        let _ = run(&["netns", "del", &self.netns]);
    }
}

fn run(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run `ip` (iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A /30 of 198.18.0.0/15 no interface of this namespace is in.
fn free_subnet() -> io::Result<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()?;
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = std::process::id().wrapping_mul(2_654_435_761) % 32_768;
    for i in 0..32_768u32 {
        let block = (start + i) % 32_768;
        let base = (198u32 << 24) | (18 << 16) | (block << 2);
        let ip = Ipv4Addr::from(base);
        let [a, b, c, d] = ip.octets();
        let prefix = format!("inet {a}.{b}.{c}.{}", d + 1);
        let peer = format!("inet {a}.{b}.{c}.{}", d + 2);
        if !used.contains(&format!("{prefix}/")) && !used.contains(&format!("{peer}/")) {
            return Ok(ip);
        }
    }
    Err(io::Error::other("no free /30 in 198.18.0.0/15"))
}

/// Deletes namespaces (and their veth pairs) left by test processes that no longer run.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Its veth pair goes with it.
            let _ = run(&["netns", "del", name]);
        }
    }
}
