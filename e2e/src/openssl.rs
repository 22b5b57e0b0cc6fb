//! Certificates and a TLS server made by the `openssl` command line: an implementation
//! independent of ours, with its defaults — `openssl x509 -req` without extensions issues
//! X.509 v1 certificates, which rustls-based test tooling never produces.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A CA, a server certificate for 127.0.0.1 and a **v1** client certificate, all made by
/// `openssl` in a directory of the test's.
pub struct OpensslPki {
    /// Where the files are.
    pub dir: PathBuf,
}

impl OpensslPki {
    /// Makes the CA (`ca.pem`), the server pair (`server.pem`, `server.key`, v3 with the SAN
    /// `IP:127.0.0.1`, as clients verify names there) and the client pair (`client.pem`,
    /// `client.key`: v1, no extensions).
    ///
    /// # Panics
    /// If `openssl` is missing or fails (CI installs it).
    pub fn new(dir: &Path) -> OpensslPki {
        let pki = OpensslPki {
            dir: dir.to_owned(),
        };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=openssl test CA",
            "-days",
            "2",
        ]);
        for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=v1-client")] {
            pki.openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                subject,
            ]);
        }
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n")
            .unwrap_or_else(|e| panic!("{e}"));
        pki.sign("server", Some("server.ext"));
        pki.sign("client", None);
        pki
    }

    fn sign(&self, name: &str, extensions: Option<&str>) {
        let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
        ];
        if let Some(ext) = extensions {
            args.extend(["-extfile", ext]);
        }
        self.openssl(&args);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl (install the openssl package): {e}"));
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The contents of one of the files.
    ///
    /// # Panics
    /// If it cannot be read.
    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    /// The version line `openssl x509 -text` prints for a certificate file, e.g.
    /// `Version: 1 (0x0)`.
    ///
    /// # Panics
    /// If openssl fails.
    pub fn version(&self, file: &str) -> String {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in", file])
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("openssl: {e}"));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Version: ").map(str::to_owned))
            .unwrap_or_default()
    }

    /// Starts `openssl s_server -www` on `addr` with the server pair, requiring a client
    /// certificate issued by the CA. It answers every GET with a page describing the session,
    /// the client's certificate included.
    ///
    /// # Panics
    /// If it does not start listening.
    pub async fn s_server(&self, addr: SocketAddr) -> SServer {
        let child = Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &addr.to_string(),
                "-cert",
                "server.pem",
                "-key",
                "server.key",
                "-CAfile",
                "ca.pem",
                "-Verify",
                "1",
            ])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start openssl s_server: {e}"));
        let server = SServer { child, addr };
        let start = tokio::time::Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                start.elapsed() < crate::check::DEADLINE,
                "openssl s_server does not listen on {addr}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        server
    }
}

/// A running `openssl s_server`, stopped (by its PID) when dropped.
pub struct SServer {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a new 2048-bit RSA private key (PKCS#8 PEM, OpenSSL 3's default) to `path` with
/// `openssl genpkey`: much faster than generating one in a debug build.
///
/// # Panics
/// If openssl is missing or fails.
pub fn rsa_key(path: &Path) {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (install the openssl package): {e}"));
    assert!(
        out.status.success(),
        "openssl genpkey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
