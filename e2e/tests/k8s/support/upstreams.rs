//! Upstreams behind Services. The API server refuses Endpoints addresses in the loopback range
//! (`may not be in the loopback range (127.0.0.0/8)`), so an upstream a Service leads to
//! listens on this host's own non-loopback address instead.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use tokio::net::{TcpListener, TcpStream};

/// This host's address that Endpoints may name and that the proxies can dial:
/// `$KANALI_E2E_HOST_IP`, else the source address of the route to the outside (no packet is
/// sent).
pub fn host_ip() -> IpAddr {
    static IP: OnceLock<Result<IpAddr, String>> = OnceLock::new();
    let found = IP.get_or_init(|| {
        let ip = match std::env::var("KANALI_E2E_HOST_IP") {
            Ok(v) if !v.is_empty() => v
                .parse::<IpAddr>()
                .map_err(|e| format!("KANALI_E2E_HOST_IP={v}: {e}"))?,
            _ => routed_ip()?,
        };
        // Proves the address is this host's.
        std::net::TcpListener::bind((ip, 0)).map_err(|e| format!("cannot listen on {ip}: {e}"))?;
        Ok(ip)
    });
    found.clone().unwrap_or_else(|e| {
        panic!(
            "no address for Endpoints ({e}); set KANALI_E2E_HOST_IP to a non-loopback address of this host"
        )
    })
}

fn routed_ip() -> Result<IpAddr, String> {
    let mut last = String::new();
    // Documentation addresses: only used to choose a route, never contacted.
    for target in ["203.0.113.1:9", "[2001:db8::1]:9"] {
        let target: SocketAddr = target.parse().unwrap();
        let bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let ip = std::net::UdpSocket::bind(bind)
            .and_then(|s| {
                s.connect(target)?;
                s.local_addr()
            })
            .map(|a| a.ip());
        match ip {
            Ok(ip) if usable(ip) => return Ok(ip),
            Ok(ip) => last = format!("the route to {target} leaves from {ip}"),
            Err(e) => last = format!("no route to {target}: {e}"),
        }
    }
    Err(last)
}

/// What the API server accepts in Endpoints: not unspecified, loopback or link-local.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_loopback() || v4.is_link_local()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_unicast_link_local()),
    }
}

/// Forwards TCP connections from a new listener on `ip` (port 0) to `to`, bytes unchanged
/// (so TLS passes through). Stops when the returned task is aborted.
pub async fn relay(ip: IpAddr, to: SocketAddr) -> (SocketAddr, Relay) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, Relay(task))
}

/// A running [`relay`]; dropping it stops accepting.
pub struct Relay(tokio::task::JoinHandle<()>);

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}
