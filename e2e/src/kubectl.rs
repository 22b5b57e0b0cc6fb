//! Running `kubectl` against a test API server, for the e2e suite and the benchmarks.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `kubectl --kubeconfig <kubeconfig> ...`.
#[derive(Clone, Debug)]
pub struct Kubectl {
    /// The program (default `kubectl`, or `$KUBECTL`).
    pub program: String,
    /// The kubeconfig every call uses.
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    /// `$KUBECTL` (else `kubectl`) with `kubeconfig`.
    pub fn new(kubeconfig: PathBuf) -> Self {
        let program = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
        Kubectl {
            program,
            kubeconfig,
        }
    }

    /// A command with the kubeconfig set, for callers that need the child itself (watches).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd
    }

    /// Runs kubectl to completion: `Ok(stdout)`, or `Err` with the command, exit status,
    /// stderr and (when given) stdin.
    pub fn run_sync(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .map_err(|e| format!("kubectl stdin: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("kubectl: {e}"))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stdin = stdin
            .map(|s| format!("\n--- stdin ---\n{s}"))
            .unwrap_or_default();
        Err(format!(
            "`kubectl {}` failed ({}): {}{stdin}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
        ))
    }

    /// [`Kubectl::run_sync`] off the async worker threads.
    pub async fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let this = self.clone();
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let stdin = stdin.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            this.run_sync(&args, stdin.as_deref())
        })
        .await
        .map_err(|e| format!("kubectl task: {e}"))?
    }
}
