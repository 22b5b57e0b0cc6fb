//! The controller and proxy processes under test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A controller or proxy process, killed on drop, with its output in `log`.
pub struct Proc {
    /// Its identity (`c1`, `p1`, ...).
    pub name: String,
    child: Option<Child>,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Admin listener.
    pub admin: SocketAddr,
    /// gRPC listener (controller) or traffic listener (proxy).
    pub addr: SocketAddr,
}

impl Proc {
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &Path)],
        log: PathBuf,
        admin: SocketAddr,
        addr: SocketAddr,
    ) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
            admin,
            addr,
        }
    }

    /// SIGKILL (no clean shutdown, no Lease release) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
