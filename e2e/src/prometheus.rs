//! A real Prometheus server (Debian's package) on 127.0.0.1, scraping targets on loopback,
//! to prove that what a proxy serves on `/metrics` is what Prometheus reads.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `prometheus` child, killed by its pid when dropped, even if the test panics.
pub struct Prometheus {
    child: Child,
    /// Its HTTP API, on 127.0.0.1.
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts one that scrapes `targets` (as job `kanali`, every 200 ms) on `port`, storing in
    /// `dir`, and waits until it is ready.
    ///
    /// # Panics
    /// If `prometheus` is not installed (CI installs it) or never gets ready.
    pub fn start(port: u16, dir: &Path, targets: &[SocketAddr]) -> Prometheus {
        match Command::new("prometheus").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            _ => panic!(
                "prometheus is not installed: `apt-get install prometheus` (.ci/run installs it)"
            ),
        }
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = dir.join("prometheus.yml");
        let written = std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 200ms, scrape_timeout: 200ms}}\n\
                 scrape_configs:\n\
                 - job_name: kanali\n  \
                   static_configs: [{{targets: [{}]}}]\n",
                targets.join(", ")
            ),
        );
        if let Err(e) = written {
            panic!("write {}: {e}", config.display());
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start prometheus: {e}"));
        let server = Prometheus { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(addr) {
            assert!(Instant::now() < deadline, "prometheus never got ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // `Child::kill` signals this child's pid (SIGKILL), nothing else.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether Prometheus answers 200 on `/-/ready`.
fn ready(addr: SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET /-/ready HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut reply = [0; 12];
    conn.write_all(request.as_bytes()).is_ok()
        && conn.read_exact(&mut reply).is_ok()
        && reply.ends_with(b" 200")
}
