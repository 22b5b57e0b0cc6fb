//! A real `redis-server` (Debian's package) on 127.0.0.1, for the rate limits shared across
//! proxies.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child, killed by its pid when dropped, even if the test panics.
pub struct RedisServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl RedisServer {
    /// Starts one on `port` (no persistence, data in `dir`) and waits until it answers PING.
    ///
    /// # Panics
    /// If `redis-server` is not installed (CI installs it) or never answers.
    pub fn start(port: u16, dir: &Path) -> RedisServer {
        match Command::new("redis-server").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            _ => panic!(
                "redis-server is not installed: `apt-get install redis-server` (.ci/run installs it)"
            ),
        }
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start redis-server: {e}"));
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pong(port) {
            assert!(
                Instant::now() < deadline,
                "redis-server never answered PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // `Child::kill` signals this child's pid (SIGKILL), nothing else.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Redis answers PING on `port`.
pub fn pong(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0; 7];
    conn.write_all(b"PING\r\n").is_ok()
        && conn.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}
