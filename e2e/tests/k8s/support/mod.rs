//! What every scenario needs: the configuration, the binaries under test, the world of one
//! test ([`Env`]: namespace, controllers, proxies, echo upstream), requests through the proxies
//! ([`Answer`]), status conditions, and the YAML of the objects the scenarios apply.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use kanali_e2e::kubectl::Kubectl;

mod client;
mod env;
mod fake_proxy;
mod process;
mod status;
mod upstreams;
pub mod yaml;

pub use client::{Answer, eventually, http_get, through};
pub use env::Env;
pub use fake_proxy::FakeProxy;
pub use status::{check_condition, check_current, condition};
pub use upstreams::test_host;

/// How long any change may take to show before a test fails. A deadline, not a measurement.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Lease duration given to the controllers: a dead leader is replaced after about this long.
pub const LEASE_SECS: &str = "4";

/// Error 00's message (v2's grammar, kept).
pub const NO_PROXY: &str = "No ApiProxy resource was not found that matches the request.";
/// Error 02's message.
pub const NO_MOCK: &str = "No MockTarget resource was not found that matches the request.";
/// Error 06's message: the upstream TLS Secret is missing or unusable.
pub const NO_SECRET: &str = "Could not retrieve Kubernetes secret.";
/// Error 07's message: the Secret's certificate and key do not pair.
pub const BAD_KEY_PAIR: &str = "Could not create x509 key pair.";
/// Error 08's message: the upstream could not be reached or gave no valid answer.
pub const NO_UPSTREAM: &str = "Could not get a valid or any response from the upstream server.";
/// Error 10's message: no Service matches the backend.
pub const NO_SERVICE: &str = "Could not retrieve any matching Kubernetes services.";

/// The admin kubeconfig, or `None` (after saying so) when the suite should skip.
pub fn kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("KANALI_E2E_KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "KANALI_E2E_KUBECONFIG={} does not exist (start an API server with e2e/k8s/start.sh DIR)",
                path.display()
            );
            Some(path)
        }
        None if std::env::var("REQUIRE_K8S").as_deref() == Ok("1") => panic!(
            "REQUIRE_K8S=1 but KANALI_E2E_KUBECONFIG is not set: point it at an admin kubeconfig \
             (e2e/k8s/start.sh DIR writes DIR/kubeconfig)"
        ),
        None => {
            eprintln!("skipped: no API server (set KANALI_E2E_KUBECONFIG)");
            None
        }
    }
}

pub fn repo_root() -> PathBuf {
    kanali_e2e::repo_root()
}

/// `<target>/<profile>/<name>`: this test is `<target>/<profile>/deps/k8s-<hash>`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --bins` first",
        path.display()
    );
    path
}

/// A port nobody listens on right now (bound, then released).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A short random suffix for namespace names.
pub fn random_suffix() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    format!("{:06x}", h.finish() & 0xff_ffff)
}

/// Installs the CRDs once per test process (several processes may race: apply is retried).
pub fn ensure_crds(k: &Kubectl) {
    static CRDS: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CRDS.get_or_init(|| {
        let dir = repo_root().join("manifests/crds");
        let dir = dir.to_str().unwrap();
        // A kustomization.yaml in the directory would be read by `-f` as an object.
        let how = if ["kustomization.yaml", "kustomization.yml", "Kustomization"]
            .iter()
            .any(|f| Path::new(dir).join(f).is_file())
        {
            "-k"
        } else {
            "-f"
        };
        let mut last = String::new();
        for _ in 0..5 {
            match k.run_sync(&["apply", how, dir], None) {
                Ok(_) => {
                    last.clear();
                    break;
                }
                // Another test process created them between our read and our create.
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        if !last.is_empty() {
            return Err(last);
        }
        k.run_sync(
            &[
                "wait",
                "--for",
                "condition=established",
                "--timeout=60s",
                "crd/apiproxies.kanali.io",
                "crd/mocktargets.kanali.io",
                "crd/apikeys.kanali.io",
                "crd/apikeybindings.kanali.io",
            ],
            None,
        )
        .map(drop)
    });
    if let Err(e) = result {
        panic!("installing the CRDs failed: {e}");
    }
}
