//! Cluster mode end to end, against a real Kubernetes API server: the `kanali-controller` and
//! `kanali-proxy` executables run as child processes on 127.0.0.1, the resources are applied,
//! patched and deleted with `kubectl`, and requests go through the proxies to in-process echo
//! upstreams.
//!
//! Configuration (environment):
//! - `KANALI_E2E_KUBECONFIG`: an admin kubeconfig (`e2e/k8s/start.sh DIR` writes
//!   `DIR/kubeconfig`). Unset: every test prints "skipped" and passes, unless `REQUIRE_K8S=1`,
//!   which makes them fail instead.
//! - `KUBECTL`: the kubectl to run (default: `kubectl` on the PATH).
//! - `KANALI_E2E_KEEP=1`: keep each test's namespace (for debugging).
//!
//! The binaries are taken from the target directory of this test (`cargo build --bins` first).
//! Each test works in its own namespace (`kanali-e2e-<test>-<random>`, deleted at the end) with
//! its own controller Lease, so the tests run in parallel. Every wait has a deadline; a test that
//! fails prints the last thing it observed and the logs of its controllers and proxies.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kanali_e2e::{Echo, start_echo};
use kanali_proto::v1 as pb;
use kanali_proto::v1::snapshot_service_client::SnapshotServiceClient;
use serde_json::Value;
use tokio::time::Instant;

/// How long any change may take to show before a test fails. A deadline, not a measurement.
const DEADLINE: Duration = Duration::from_secs(30);

/// Lease duration given to the controllers: a dead leader is replaced after about this long.
const LEASE_SECS: &str = "4";

const NO_PROXY: &str = "No ApiProxy resource was not found that matches the request.";
const NO_MOCK: &str = "No MockTarget resource was not found that matches the request.";

// ---------------------------------------------------------------------------------------------
// Configuration and binaries
// ---------------------------------------------------------------------------------------------

/// The admin kubeconfig, or `None` (after saying so) when the suite should skip.
fn kubeconfig() -> Option<PathBuf> {
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

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// `<target>/<profile>/<name>`: this test is `<target>/<profile>/deps/k8s-<hash>`.
fn binary(name: &str) -> PathBuf {
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
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A short random suffix for namespace names.
fn random_suffix() -> String {
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

// ---------------------------------------------------------------------------------------------
// kubectl
// ---------------------------------------------------------------------------------------------

use kanali_e2e::kubectl::Kubectl;

/// Installs the CRDs once per test process (several processes may race: apply is retried).
fn ensure_crds(k: &Kubectl) {
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

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A controller or proxy process, killed on drop, with its output in `log`.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Admin listener.
    admin: SocketAddr,
    /// gRPC listener (controller) or traffic listener (proxy).
    addr: SocketAddr,
}

impl Proc {
    fn spawn(
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
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `Some(status)` when the process has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_tail(&self, lines: usize) -> String {
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

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

type Http = Client<HttpConnector, Full<Bytes>>;

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("not JSON ({e}): {} {}", self.status, self.text()))
    }

    fn describe(&self) -> String {
        format!("{} {}", self.status, self.text())
    }

    /// Whether this is Kanali error `code`, byte for byte as the contract says.
    fn check_error(&self, code: u32, status: u16, message: &str) -> Result<(), String> {
        let expected = format!(
            r#"{{"status":{status},"message":"{message}","code":{code},"details":"Visit https://kanali.io/docs/v2/errorcodes/#{code:02} for more details."}}"#
        );
        let content_type = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok());
        if self.status.as_u16() == status
            && content_type == Some("application/json")
            && self.body == expected.as_bytes()
        {
            Ok(())
        } else {
            Err(format!(
                "wanted Kanali error {code:02} ({status} {expected}), got {} (content-type {content_type:?})",
                self.describe()
            ))
        }
    }

    /// Whether the echo upstream answered 200 and saw `path` (and `query`, when given).
    fn check_echo(&self, path: &str, query: Option<&str>) -> Result<(), String> {
        if self.status != StatusCode::OK {
            return Err(format!("wanted 200 from the echo, got {}", self.describe()));
        }
        let echo = self.json()?;
        if echo["path"] != path || (query.is_some() && echo["query"].as_str() != query) {
            return Err(format!(
                "the echo saw path {} query {}, wanted {path} {query:?}",
                echo["path"], echo["query"]
            ));
        }
        Ok(())
    }

    /// Whether this is the `users` MockTarget's answer.
    fn check_users_mock(&self) -> Result<(), String> {
        if self.status == StatusCode::OK
            && self.body == br#"[{"id":1}]"#[..]
            && self.headers.get("x-mock").is_some_and(|v| v == "yes")
        {
            Ok(())
        } else {
            Err(format!(
                "wanted the users mock (200 [{{\"id\":1}}] x-mock: yes), got {}",
                self.describe()
            ))
        }
    }
}

async fn http_get(http: &Http, addr: SocketAddr, path: &str) -> Result<Answer, String> {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .map_err(|_| format!("GET http://{addr}{path}: no answer within 10s"))?
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .map_err(|_| format!("GET http://{addr}{path}: body not complete within 10s"))?
        .map_err(|e| format!("GET http://{addr}{path}: body: {e}"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A request through a proxy: every proxy answer carries a correlation id.
async fn through(http: &Http, proxy: SocketAddr, path: &str) -> Result<Answer, String> {
    let a = http_get(http, proxy, path).await?;
    if !a.headers.contains_key("x-kanali-correlation-id") {
        return Err(format!(
            "no x-kanali-correlation-id on {} from {proxy}{path}",
            a.describe()
        ));
    }
    Ok(a)
}

/// Retries `check` until it returns `Ok` or `DEADLINE` passes; then fails with what it last
/// said.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => {
                assert!(
                    start.elapsed() < DEADLINE,
                    "{what}: not reached within {DEADLINE:?}; last observed: {last}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Whether the object's status is about its current generation (top-level and every condition).
fn check_current(obj: &Value) -> Result<i64, String> {
    let generation = obj["metadata"]["generation"]
        .as_i64()
        .ok_or("no metadata.generation")?;
    let status = &obj["status"];
    if status["observedGeneration"].as_i64() != Some(generation) {
        return Err(format!(
            "status.observedGeneration is {} but metadata.generation is {generation}; status: {status}",
            status["observedGeneration"]
        ));
    }
    for c in status["conditions"].as_array().into_iter().flatten() {
        if c["observedGeneration"].as_i64() != Some(generation) {
            return Err(format!(
                "condition {} has observedGeneration {} but metadata.generation is {generation}",
                c["type"], c["observedGeneration"]
            ));
        }
    }
    Ok(generation)
}

/// Whether condition `type_` has `status` (and `reason`, when given) at the current generation.
fn check_condition(
    obj: &Value,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> Result<(), String> {
    check_current(obj)?;
    let c = condition(obj, type_)
        .ok_or_else(|| format!("no {type_} condition; status: {}", obj["status"]))?;
    if c["status"] != status || reason.is_some_and(|r| c["reason"] != r) {
        return Err(format!(
            "wanted {type_}={status}{}, got {c}",
            reason.map(|r| format!(" reason {r}")).unwrap_or_default()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One test's world
// ---------------------------------------------------------------------------------------------

/// One test's namespace, controllers, proxies and echo upstream. Dropping it kills the
/// processes, prints their logs if the test failed, and deletes the namespace.
struct Env {
    k: Kubectl,
    ns: String,
    logs: tempfile::TempDir,
    controllers: Vec<Proc>,
    proxies: Vec<Proc>,
    echo: Echo,
    http: Http,
}

impl Drop for Env {
    fn drop(&mut self) {
        for p in self.controllers.iter_mut().chain(self.proxies.iter_mut()) {
            p.kill();
        }
        if std::thread::panicking() {
            let mut dump = format!("===== namespace {} =====\n", self.ns);
            if let Ok(objects) = self.k.run_sync(
                &[
                    "get",
                    "apiproxies,mocktargets,apikeybindings,leases",
                    "-n",
                    &self.ns,
                    "-o",
                    "yaml",
                ],
                None,
            ) {
                dump.push_str(&objects);
            }
            for p in self.controllers.iter().chain(self.proxies.iter()) {
                let _ = write!(
                    dump,
                    "\n===== {} (last 150 lines of {}) =====\n{}\n",
                    p.name,
                    p.log.display(),
                    p.log_tail(150)
                );
            }
            eprintln!("{dump}");
        }
        if std::env::var("KANALI_E2E_KEEP").as_deref() != Ok("1") {
            let _ = self.k.run_sync(
                &[
                    "delete",
                    "namespace",
                    &self.ns,
                    "--wait=false",
                    "--ignore-not-found",
                ],
                None,
            );
        }
    }
}

impl Env {
    /// A namespace `kanali-e2e-<test>-<random>` and an echo upstream; `None` when skipping.
    async fn new(test: &str) -> Option<Env> {
        let kubeconfig = kubeconfig()?;
        // Fail early, before anything else, when the binaries were not built.
        binary("kanali-controller");
        binary("kanali-proxy");
        let k = Kubectl::new(kubeconfig);
        tokio::task::block_in_place(|| ensure_crds(&k));
        let ns = format!("kanali-e2e-{test}-{}", random_suffix());
        k.run(&["create", "namespace", &ns], None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let echo = start_echo("127.0.0.1:0".parse().unwrap(), "echo")
            .await
            .unwrap();
        Some(Env {
            k,
            ns,
            logs: tempfile::tempdir().unwrap(),
            controllers: Vec::new(),
            proxies: Vec::new(),
            echo,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// The usual setup: `controllers` replicas (c1, c2, ...) and two proxies (p1, p2) that are
    /// given every controller, all ready and connected.
    async fn with(test: &str, controllers: usize) -> Option<Env> {
        let mut env = Env::new(test).await?;
        for i in 1..=controllers {
            env.start_controller(&format!("c{i}")).await;
        }
        let all: Vec<usize> = (0..controllers).collect();
        env.start_proxy("p1", &all).await;
        env.start_proxy("p2", &all).await;
        Some(env)
    }

    /// Starts a controller in cluster mode for this namespace and waits for its /readyz.
    async fn start_controller(&mut self, identity: &str) -> usize {
        let kubeconfig = self.k.kubeconfig.clone();
        let mut last = String::new();
        for attempt in 0..3 {
            let (grpc, admin) = (free_addr(), free_addr());
            let args: Vec<String> = [
                "--namespace",
                &self.ns,
                "--lease-namespace",
                &self.ns,
                "--identity",
                identity,
                "--lease-duration-secs",
                LEASE_SECS,
                "--grpc-listen",
                &grpc.to_string(),
                "--admin-listen",
                &admin.to_string(),
                "--log",
                "info",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            let log = self.logs.path().join(format!("{identity}-{attempt}.log"));
            let proc = Proc::spawn(
                identity,
                &binary("kanali-controller"),
                &args,
                &[("KUBECONFIG", &kubeconfig)],
                log,
                admin,
                grpc,
            );
            match self.wait_started(proc).await {
                Ok(proc) => {
                    self.controllers.push(proc);
                    return self.controllers.len() - 1;
                }
                Err(e) => last = e,
            }
        }
        panic!("controller {identity} did not start: {last}");
    }

    /// Starts a proxy subscribed to the given controllers, waits for its /readyz and until a
    /// controller reports it connected.
    async fn start_proxy(&mut self, id: &str, controllers: &[usize]) -> usize {
        let urls: Vec<String> = controllers
            .iter()
            .map(|&i| format!("http://{}", self.controllers[i].addr))
            .collect();
        let mut last = String::new();
        for attempt in 0..3 {
            let (listen, admin) = (free_addr(), free_addr());
            let args: Vec<String> = [
                "--controller",
                &urls.join(","),
                "--listen",
                &listen.to_string(),
                "--admin-listen",
                &admin.to_string(),
                "--id",
                id,
                "--worker-threads",
                "1",
                "--log",
                "info",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            let log = self.logs.path().join(format!("{id}-{attempt}.log"));
            let proc = Proc::spawn(id, &binary("kanali-proxy"), &args, &[], log, admin, listen);
            match self.wait_started(proc).await {
                Ok(proc) => {
                    self.proxies.push(proc);
                    let index = self.proxies.len() - 1;
                    let this = &*self;
                    eventually(
                        &format!("proxy {id} connected to a controller"),
                        || async move {
                            for &i in controllers {
                                if this.proxy_connected(i, id).await? {
                                    return Ok(());
                                }
                            }
                            Err(format!("no controller's /status shows {id} connected"))
                        },
                    )
                    .await;
                    return index;
                }
                Err(e) => last = e,
            }
        }
        panic!("proxy {id} did not start: {last}");
    }

    /// Waits for the process's admin /readyz to answer 200; `Err` (with its log) if it exits
    /// first, e.g. because another test took its port meanwhile.
    async fn wait_started(&self, mut proc: Proc) -> Result<Proc, String> {
        let start = Instant::now();
        loop {
            if let Some(status) = proc.exited() {
                return Err(format!(
                    "{} exited ({status}) before it was ready:\n{}",
                    proc.name,
                    proc.log_tail(40)
                ));
            }
            let last = match http_get(&self.http, proc.admin, "/readyz").await {
                Ok(a) if a.status == StatusCode::OK => return Ok(proc),
                Ok(a) => a.describe(),
                Err(e) => e,
            };
            if start.elapsed() > DEADLINE {
                panic!(
                    "{} not ready within {DEADLINE:?}; last /readyz: {last}\n{}",
                    proc.name,
                    proc.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// kubectl in this test's namespace.
    async fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let mut all = args.to_vec();
        all.extend(["-n", &self.ns]);
        self.k.run(&all, None).await
    }

    async fn apply(&self, yaml: &str) {
        self.k
            .run(&["apply", "-n", &self.ns, "-f", "-"], Some(yaml))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn get_json(&self, kind: &str, name: &str) -> Result<Value, String> {
        let out = self.kubectl(&["get", kind, name, "-o", "json"]).await?;
        serde_json::from_str(&out).map_err(|e| format!("kubectl get {kind} {name}: {e}"))
    }

    /// Waits until `kind/name` has condition `type_` = `status` (and `reason`) at its current
    /// generation; returns the object.
    async fn wait_condition(
        &self,
        kind: &str,
        name: &str,
        type_: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Value {
        eventually(
            &format!("{kind}/{name} {type_}={status} {reason:?}"),
            || async {
                let obj = self.get_json(kind, name).await?;
                check_condition(&obj, type_, status, reason)?;
                Ok(obj)
            },
        )
        .await
    }

    /// `kubectl wait --for=condition=Ready` (30 s), which must succeed.
    async fn kubectl_wait_ready(&self, kind: &str, name: &str) {
        let what = format!("{kind}/{name}");
        if let Err(e) = self
            .kubectl(&["wait", "--for=condition=Ready", &what, "--timeout=30s"])
            .await
        {
            let now = self.get_json(kind, name).await;
            panic!(
                "{e}\nstatus now: {}",
                now.map(|o| o["status"].to_string()).unwrap_or_else(|e| e)
            );
        }
    }

    /// Waits until `check` accepts every proxy's answer to `GET path`.
    async fn eventually_everywhere<C>(&self, path: &str, check: C)
    where
        C: Fn(&Answer) -> Result<(), String>,
    {
        for p in &self.proxies {
            eventually(&format!("{} GET {path}", p.name), || async {
                let a = through(&self.http, p.addr, path).await?;
                check(&a)
            })
            .await;
        }
    }

    /// Asserts, without waiting, that `check` accepts every proxy's answer to `GET path`.
    async fn now_everywhere<C>(&self, path: &str, check: C)
    where
        C: Fn(&Answer) -> Result<(), String>,
    {
        for p in &self.proxies {
            let a = through(&self.http, p.addr, path)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            if let Err(e) = check(&a) {
                panic!("{} GET {path}: {e}", p.name);
            }
        }
    }

    async fn controller_status(&self, i: usize) -> Result<Value, String> {
        let a = http_get(&self.http, self.controllers[i].admin, "/status").await?;
        a.json()
    }

    async fn proxy_connected(&self, controller: usize, id: &str) -> Result<bool, String> {
        let status = self.controller_status(controller).await?;
        Ok(status["proxies"][id]["connected"] == true)
    }

    async fn lease_holder(&self) -> Result<String, String> {
        let out = self
            .kubectl(&[
                "get",
                "lease",
                "kanali-controller",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .await?;
        Ok(out.trim().to_owned())
    }

    fn controller_index(&self, identity: &str) -> usize {
        self.controllers
            .iter()
            .position(|c| c.name == identity)
            .unwrap_or_else(|| panic!("no controller {identity}"))
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.echo.addr)
    }
}

// ---------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------

fn endpoint_proxy(name: &str, path: &str, endpoint: &str, target: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: {name}}}
spec:
  source: {{path: "{path}"}}
  target:
    path: {target}
    backend: {{endpoint: "{endpoint}"}}
"#
    )
}

fn mock_proxy(name: &str, path: &str, mock: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: {name}}}
spec:
  source: {{path: {path}}}
  target: {{backend: {{mock: {{mockTargetName: {mock}}}}}}}
"#
    )
}

fn users_mock(name: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: MockTarget
metadata: {{name: {name}}}
spec:
  routes:
  - path: /users
    status: 200
    methods: [GET]
    headers: {{content-type: application/json, x-mock: "yes"}}
    body: '[{{"id":1}}]'
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// 1. ApiProxies become Ready (all four conditions True at the current generation), `kubectl
/// wait` and `kubectl get` say so, and both proxies serve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_api_proxies_become_ready_and_are_served_by_both_proxies() {
    let Some(env) = Env::with("ready", 1).await else {
        return;
    };
    let yaml = [
        endpoint_proxy("api", "/api", &env.endpoint(), "/v1"),
        mock_proxy("users", "/mock", "users"),
        users_mock("users"),
    ]
    .join("---\n");
    env.apply(&yaml).await;
    for (kind, name) in [
        ("apiproxy", "api"),
        ("apiproxy", "users"),
        ("mocktarget", "users"),
    ] {
        env.kubectl_wait_ready(kind, name).await;
    }

    // Ready includes Programmed: both connected proxies applied this generation, so they
    // serve it now, without waiting.
    env.now_everywhere("/api/hello?x=1", |a| a.check_echo("/v1/hello", Some("x=1")))
        .await;
    env.now_everywhere("/mock/users", Answer::check_users_mock)
        .await;

    // `kubectl get` shows the Ready printer column.
    let table = env.kubectl(&["get", "apiproxy"]).await.unwrap();
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let col = header
        .find("READY")
        .unwrap_or_else(|| panic!("no READY column in:\n{table}"));
    let mut rows = 0;
    for row in lines {
        let cell = row.get(col..).unwrap_or_default();
        assert!(
            cell.starts_with("True"),
            "READY is not True in row {row:?}:\n{table}"
        );
        rows += 1;
    }
    assert_eq!(rows, 2, "{table}");

    // The status itself.
    for (name, backend) in [
        ("api", format!("endpoint:{}", env.endpoint())),
        ("users", "mock:users".to_owned()),
    ] {
        let obj = env.get_json("apiproxy", name).await.unwrap();
        check_current(&obj).unwrap_or_else(|e| panic!("apiproxy/{name}: {e}"));
        for type_ in ["Accepted", "ResolvedRefs", "Programmed", "Ready"] {
            check_condition(&obj, type_, "True", None)
                .unwrap_or_else(|e| panic!("apiproxy/{name}: {e}"));
        }
        assert_eq!(obj["status"]["backend"], backend.as_str(), "{name}");
        let programmed = condition(&obj, "Programmed").unwrap();
        assert_eq!(
            programmed["message"],
            format!(
                "2 of 2 connected proxies applied generation {}",
                obj["metadata"]["generation"]
            ),
            "apiproxy/{name}"
        );
    }
}

/// 2. A missing MockTarget is reported on the ApiProxy (and requests get error 02) until it is
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_mock_target_is_reported_until_it_is_created() {
    let Some(env) = Env::with("missing-mock", 1).await else {
        return;
    };
    env.apply(&mock_proxy("orders", "/orders", "orders-mock"))
        .await;
    let obj = env
        .wait_condition(
            "apiproxy",
            "orders",
            "Ready",
            "False",
            Some("MockTargetNotFound"),
        )
        .await;
    let ready = condition(&obj, "Ready").unwrap();
    let named = format!("MockTarget {}/orders-mock", env.ns);
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&named),
        "the message names {named}: {ready}"
    );
    check_condition(&obj, "ResolvedRefs", "False", Some("MockTargetNotFound")).unwrap();
    check_condition(&obj, "Accepted", "True", None).unwrap();
    env.eventually_everywhere("/orders/1", |a| a.check_error(2, 404, NO_MOCK))
        .await;
    // `kubectl describe` shows a Warning event for it.
    eventually("a MockTargetNotFound Warning event", || async {
        let out = env
            .kubectl(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=orders",
                "-o",
                "json",
            ])
            .await?;
        let events: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let found = events["items"].as_array().into_iter().flatten().any(|e| {
            e["type"] == "Warning"
                && e["reason"] == "MockTargetNotFound"
                && e["involvedObject"]["kind"] == "ApiProxy"
        });
        if found {
            Ok(())
        } else {
            Err(format!("events: {}", events["items"]))
        }
    })
    .await;

    env.apply(
        r#"apiVersion: kanali.io/v2
kind: MockTarget
metadata: {name: orders-mock}
spec:
  routes:
  - path: /
    status: 200
    headers: {content-type: text/plain}
    body: "all orders"
"#,
    )
    .await;
    env.kubectl_wait_ready("apiproxy", "orders").await;
    let obj = env.get_json("apiproxy", "orders").await.unwrap();
    check_condition(&obj, "ResolvedRefs", "True", Some("ResolvedRefs")).unwrap();
    env.eventually_everywhere("/orders/1", |a| {
        if a.status == StatusCode::OK && a.text() == "all orders" {
            Ok(())
        } else {
            Err(format!("wanted the orders mock, got {}", a.describe()))
        }
    })
    .await;
}

/// 3. An edit of `source.path` is observed (new generation) and served by both proxies; the old
/// path answers error 00.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_source_path_is_observed_and_served_by_both_proxies() {
    let Some(env) = Env::with("edit", 1).await else {
        return;
    };
    env.apply(&endpoint_proxy("api", "/old", &env.endpoint(), "/"))
        .await;
    env.kubectl_wait_ready("apiproxy", "api").await;
    env.now_everywhere("/old/x", |a| a.check_echo("/x", None))
        .await;
    let before = env.get_json("apiproxy", "api").await.unwrap();
    let g1 = check_current(&before).unwrap();

    env.kubectl(&[
        "patch",
        "apiproxy",
        "api",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"source":{"path":"/new"}}}"#,
    ])
    .await
    .unwrap();
    let g2 = env.get_json("apiproxy", "api").await.unwrap()["metadata"]["generation"]
        .as_i64()
        .unwrap();
    assert!(g2 > g1, "the edit made a new generation ({g1} -> {g2})");
    let obj = eventually("status.observedGeneration advances", || async {
        let obj = env.get_json("apiproxy", "api").await?;
        if obj["metadata"]["generation"].as_i64() != Some(g2) {
            return Err(format!("generation moved on: {}", obj["metadata"]));
        }
        check_condition(&obj, "Ready", "True", None)?;
        Ok(obj)
    })
    .await;
    assert_eq!(obj["status"]["observedGeneration"], g2);
    // Programmed at g2: both proxies already serve it.
    env.now_everywhere("/new/x", |a| a.check_echo("/x", None))
        .await;
    env.now_everywhere("/old/x", |a| a.check_error(0, 404, NO_PROXY))
        .await;
}

/// 4. Two replicas: kill -9 the Lease holder; the other takes the Lease, keeps writing status,
/// and the proxies move to it and serve the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surviving_replica_takes_the_lease_and_keeps_status_and_proxies_current() {
    let Some(mut env) = Env::with("failover", 2).await else {
        return;
    };
    let yaml = [
        endpoint_proxy("api", "/api", &env.endpoint(), "/"),
        mock_proxy("users", "/mock", "users"),
        users_mock("users"),
    ]
    .join("---\n");
    env.apply(&yaml).await;
    env.eventually_everywhere("/api/a", |a| a.check_echo("/a", None))
        .await;
    env.eventually_everywhere("/mock/users", Answer::check_users_mock)
        .await;
    let holder = eventually("a controller holds the Lease", || async {
        let h = env.lease_holder().await?;
        if h == "c1" || h == "c2" {
            Ok(h)
        } else {
            Err(format!("holderIdentity is {h:?}"))
        }
    })
    .await;
    // The leader writes status (Ready may also depend on which replica the proxies chose).
    env.wait_condition("apiproxy", "users", "ResolvedRefs", "True", None)
        .await;

    let dead = env.controller_index(&holder);
    let survivor_name = if holder == "c1" { "c2" } else { "c1" };
    let survivor = env.controller_index(survivor_name);
    env.controllers[dead].kill();

    eventually("the survivor takes the Lease", || async {
        let h = env.lease_holder().await?;
        if h == survivor_name {
            Ok(())
        } else {
            Err(format!("holderIdentity is {h:?}"))
        }
    })
    .await;

    // Status writes continue: break the MockTarget reference.
    env.kubectl(&[
        "patch",
        "apiproxy",
        "users",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"target":{"backend":{"mock":{"mockTargetName":"gone"}}}}}"#,
    ])
    .await
    .unwrap();
    let obj = env
        .wait_condition(
            "apiproxy",
            "users",
            "Ready",
            "False",
            Some("MockTargetNotFound"),
        )
        .await;
    let named = format!("MockTarget {}/gone", env.ns);
    let message = condition(&obj, "ResolvedRefs").unwrap()["message"].clone();
    assert!(
        message.as_str().unwrap_or_default().contains(&named),
        "{message} names {named}"
    );

    // Both proxies are on the survivor now, and serve the change.
    eventually("the survivor sees both proxies connected", || async {
        let status = env.controller_status(survivor).await?;
        let proxies = &status["proxies"];
        if proxies["p1"]["connected"] == true && proxies["p2"]["connected"] == true {
            Ok(())
        } else {
            Err(format!("proxies: {proxies}"))
        }
    })
    .await;
    env.eventually_everywhere("/mock/users", |a| a.check_error(2, 404, NO_MOCK))
        .await;
    env.now_everywhere("/api/b", |a| a.check_echo("/b", None))
        .await;
    // With every proxy on the leader, the healthy route is Ready (Programmed 2 of 2).
    env.wait_condition("apiproxy", "api", "Ready", "True", None)
        .await;
}

/// 5. The controllers die under steady traffic: not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_the_controllers_die() {
    let Some(mut env) = Env::with("no-controller", 2).await else {
        return;
    };
    let yaml = [
        endpoint_proxy("api", "/api", &env.endpoint(), "/v1"),
        mock_proxy("users", "/mock", "users"),
        users_mock("users"),
    ]
    .join("---\n");
    env.apply(&yaml).await;
    env.eventually_everywhere("/api/x", |a| a.check_echo("/v1/x", None))
        .await;
    env.eventually_everywhere("/mock/users", Answer::check_users_mock)
        .await;

    let start = Instant::now();
    let kill_at = [300usize, 900];
    let mut killed = 0;
    let mut last_kill = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut i = 0usize;
    loop {
        // Kill at a request count, or by time on a slow machine: both kills always happen.
        if killed < kill_at.len()
            && (i >= kill_at[killed]
                || start.elapsed() > Duration::from_secs(3 + 3 * killed as u64))
        {
            env.controllers[killed].kill();
            killed += 1;
            last_kill = i;
        }
        let done = i >= 2000 || start.elapsed() > Duration::from_secs(10);
        if killed == kill_at.len() && done && i >= last_kill + 200 {
            break;
        }
        let p = env.proxies[i % 2].addr;
        let result = if i.is_multiple_of(3) {
            through(&env.http, p, "/mock/users")
                .await
                .and_then(|a| a.check_users_mock())
        } else {
            let path = format!("/api/r/{i}");
            through(&env.http, p, &path)
                .await
                .and_then(|a| a.check_echo(&format!("/v1/r/{i}"), None))
        };
        if let Err(e) = result {
            failures.push(format!("request {i} via {p}: {e}"));
        }
        i += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {i} requests failed while the controllers died; first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    for p in &env.proxies {
        let ready = http_get(&env.http, p.admin, "/readyz").await.unwrap();
        assert_eq!(
            ready.status,
            200,
            "{} /readyz: {}",
            p.name,
            ready.describe()
        );
    }
    eprintln!("{i} requests, none failed");
}

/// 6. Objects the 1.20 API server accepts but Kanali cannot use are reported `Accepted=False`
/// (reason Invalid, with why), and nothing else is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_objects_are_reported_and_do_not_disturb_other_routes() {
    let Some(mut env) = Env::with("malformed", 1).await else {
        return;
    };
    env.apply(&endpoint_proxy("api", "/api", &env.endpoint(), "/"))
        .await;
    env.kubectl_wait_ready("apiproxy", "api").await;

    let bad = format!(
        r#"{spaced}---
apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: wildcard}}
spec:
  source: {{path: /wild, virtualHost: "*.example.org"}}
  target: {{backend: {{endpoint: "{endpoint}"}}}}
---
apiVersion: kanali.io/v2
kind: ApiKeyBinding
metadata: {{name: badregex}}
spec:
  keys:
  - name: somekey
    subpaths:
    - path: "/foo("
      rule: {{global: true}}
"#,
        spaced = endpoint_proxy("spaced", "/a b", &env.endpoint(), "/"),
        endpoint = env.endpoint(),
    );
    env.apply(&bad).await;

    for (kind, name, says) in [
        ("apiproxy", "spaced", vec!["spec.source.path", "\"/a b\""]),
        (
            "apiproxy",
            "wildcard",
            vec!["spec.source.virtualHost", "wildcards are not supported"],
        ),
        (
            "apikeybinding",
            "badregex",
            vec!["\"/foo(\"", "is not a valid regular expression"],
        ),
    ] {
        let obj = env
            .wait_condition(kind, name, "Accepted", "False", Some("Invalid"))
            .await;
        let message = condition(&obj, "Accepted").unwrap()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for s in says {
            assert!(
                message.contains(s),
                "{kind}/{name}: {s:?} not in {message:?}"
            );
        }
        check_condition(&obj, "Ready", "False", Some("Invalid"))
            .unwrap_or_else(|e| panic!("{kind}/{name}: {e}"));
    }

    // The controller is still running and ready, and still compiles new objects.
    let c = &mut env.controllers[0];
    assert!(c.exited().is_none(), "the controller exited");
    let ready = http_get(&env.http, c.admin, "/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.describe());
    env.apply(&endpoint_proxy(
        "after",
        "/after",
        &env.endpoint(),
        "/later",
    ))
    .await;
    env.kubectl_wait_ready("apiproxy", "after").await;

    env.now_everywhere("/api/x", |a| a.check_echo("/x", None))
        .await;
    env.now_everywhere("/after/x", |a| a.check_echo("/later/x", None))
        .await;
    // The invalid ones route nothing.
    env.now_everywhere("/wild", |a| a.check_error(0, 404, NO_PROXY))
        .await;
    env.now_everywhere("/a%20b", |a| a.check_error(0, 404, NO_PROXY))
        .await;
}

/// 7. A deleted ApiProxy's route disappears from every proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_api_proxy_disappears_from_every_proxy() {
    let Some(env) = Env::with("delete", 1).await else {
        return;
    };
    let yaml = [
        endpoint_proxy("api", "/api", &env.endpoint(), "/"),
        endpoint_proxy("keep", "/keep", &env.endpoint(), "/kept"),
    ]
    .join("---\n");
    env.apply(&yaml).await;
    env.kubectl_wait_ready("apiproxy", "api").await;
    env.kubectl_wait_ready("apiproxy", "keep").await;
    env.now_everywhere("/api/x", |a| a.check_echo("/x", None))
        .await;

    env.kubectl(&["delete", "apiproxy", "api", "--wait=true"])
        .await
        .unwrap();
    env.eventually_everywhere("/api/x", |a| a.check_error(0, 404, NO_PROXY))
        .await;
    env.now_everywhere("/keep/x", |a| a.check_echo("/kept/x", None))
        .await;
    eventually("the controller forgets the deleted object", || async {
        let status = env.controller_status(0).await?;
        let names: Vec<&Value> = status["objects"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| &o["object"]["name"])
            .collect();
        if names.iter().any(|n| *n == "api") {
            Err(format!("objects: {names:?}"))
        } else {
            Ok(())
        }
    })
    .await;
}

/// The install (`kubectl apply -k manifests/`) applies cleanly, and with a context whose
/// default namespace is a throwaway one nothing lands there: every object names its namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_install_kustomization_applies() {
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    let manifests = repo_root().join("manifests");
    if !manifests.join("kustomization.yaml").is_file() {
        eprintln!("skipped: no manifests/kustomization.yaml");
        return;
    }
    let k = Kubectl::new(kubeconfig.clone());
    tokio::task::block_in_place(|| ensure_crds(&k));
    let ns = format!("kanali-e2e-install-{}", random_suffix());
    k.run(&["create", "namespace", &ns], None).await.unwrap();
    // A copy of the kubeconfig whose context defaults to the throwaway namespace.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kubeconfig");
    std::fs::copy(&kubeconfig, &config).unwrap();
    let scoped = Kubectl::new(config.clone());
    scoped
        .run(
            &["config", "set-context", "--current", "--namespace", &ns],
            None,
        )
        .await
        .unwrap();
    let existed = k
        .run(
            &[
                "get",
                "namespace",
                "kanali-system",
                "--ignore-not-found",
                "-o",
                "name",
            ],
            None,
        )
        .await
        .unwrap();

    let m = manifests.to_str().unwrap();
    let result = scoped.run(&["apply", "-k", m], None).await;
    let listed = scoped.run(&["get", "-k", m, "-o", "name"], None).await;
    let stray = k
        .run(
            &[
                "get",
                "deployments,services,serviceaccounts,configmaps,roles,rolebindings,poddisruptionbudgets,horizontalpodautoscalers",
                "-n",
                &ns,
                "-o",
                "name",
            ],
            None,
        )
        .await;

    // Clean up before asserting: the namespace always, the install only if it was ours.
    let _ = k
        .run(&["delete", "namespace", &ns, "--wait=false"], None)
        .await;
    if existed.trim().is_empty() {
        let base = manifests.join("base");
        let _ = k
            .run(
                &[
                    "delete",
                    "-k",
                    base.to_str().unwrap(),
                    "--wait=false",
                    "--ignore-not-found",
                ],
                None,
            )
            .await;
    }

    let applied = result.unwrap_or_else(|e| panic!("{e}"));
    let listed = listed.unwrap_or_else(|e| panic!("every applied object exists: {e}"));
    assert!(
        listed.contains("deployment.apps/"),
        "the install has deployments:\n{listed}\n(apply said:\n{applied})"
    );
    let stray: Vec<&str> = stray
        .as_deref()
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            !l.starts_with("serviceaccount/default") && !l.starts_with("configmap/kube-root-ca.crt")
        })
        .collect();
    assert!(
        stray.is_empty(),
        "objects landed in the context's namespace {ns}: {stray:?}"
    );
}

/// Two replicas, and the proxies happen to be connected only to the one that does not hold the
/// Lease (with a Service in front of two replicas, each proxy picks one): the route is served
/// everywhere, so it must become Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_does_not_depend_on_which_replica_the_proxies_chose() {
    let Some(mut env) = Env::new("replica-choice").await else {
        return;
    };
    env.start_controller("c1").await;
    eventually("c1 holds the Lease", || async {
        let h = env.lease_holder().await?;
        if h == "c1" {
            Ok(())
        } else {
            Err(format!("holderIdentity is {h:?}"))
        }
    })
    .await;
    let follower = env.start_controller("c2").await;
    env.start_proxy("p1", &[follower]).await;
    env.start_proxy("p2", &[follower]).await;
    env.apply(&endpoint_proxy("api", "/api", &env.endpoint(), "/"))
        .await;
    env.eventually_everywhere("/api/x", |a| a.check_echo("/x", None))
        .await;
    env.wait_condition("apiproxy", "api", "Ready", "True", None)
        .await;
}

/// A hand-driven proxy stream, to play a proxy that is slow to apply a snapshot.
struct FakeProxy {
    tx: tokio::sync::mpsc::Sender<pb::ProxyMessage>,
    inbound: tonic::Streaming<pb::ControllerMessage>,
}

impl FakeProxy {
    async fn open(controller: SocketAddr, id: &str) -> FakeProxy {
        let mut client = SnapshotServiceClient::connect(format!("http://{controller}"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let subscribe = pb::proxy_message::Message::Subscribe(pb::Subscribe {
            proxy_id: id.into(),
            current_version: String::new(),
        });
        tx.send(pb::ProxyMessage {
            message: Some(subscribe),
        })
        .await
        .unwrap();
        let inbound = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        FakeProxy { tx, inbound }
    }

    /// The next snapshot whose routes satisfy `want`.
    async fn snapshot_where(&mut self, want: impl Fn(&pb::Snapshot) -> bool) -> pb::Snapshot {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.inbound.message())
                .await
                .expect("a snapshot within the deadline")
                .unwrap()
                .expect("the stream stays open");
            if let Some(s) = msg.snapshot
                && want(&s)
            {
                return s;
            }
        }
    }

    async fn ack(&self, version: &str) {
        let ack = pb::proxy_message::Message::Ack(pb::Ack {
            version: version.to_owned(),
        });
        self.tx
            .send(pb::ProxyMessage { message: Some(ack) })
            .await
            .unwrap();
    }
}

/// `Programmed` (and so `Ready`) must mean the proxies serve what the status says: when a
/// MockTarget appears, the ApiProxy using it is not Programmed before the connected proxies
/// applied the snapshot in which the reference resolves (until then they answer error 02).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programmed_waits_for_the_snapshot_that_resolves_a_reference() {
    let Some(mut env) = Env::new("lagging").await else {
        return;
    };
    let c = env.start_controller("c1").await;
    eventually("c1 holds the Lease", || async {
        let h = env.lease_holder().await?;
        if h == "c1" {
            Ok(())
        } else {
            Err(format!("holderIdentity is {h:?}"))
        }
    })
    .await;
    let mut laggard = FakeProxy::open(env.controllers[c].addr, "laggard").await;
    let first = laggard.snapshot_where(|_| true).await;
    laggard.ack(&first.version).await;

    env.apply(&mock_proxy("orders", "/orders", "orders-mock"))
        .await;
    let failing = laggard
        .snapshot_where(|s| s.routes.iter().any(|r| r.path == "/orders"))
        .await;
    laggard.ack(&failing.version).await;
    env.wait_condition(
        "apiproxy",
        "orders",
        "ResolvedRefs",
        "False",
        Some("MockTargetNotFound"),
    )
    .await;
    env.wait_condition("apiproxy", "orders", "Programmed", "True", None)
        .await;

    // The MockTarget appears; the proxy receives the new snapshot but has not applied it yet.
    env.apply(&users_mock("orders-mock")).await;
    let resolved = laggard
        .snapshot_where(|s| s.version != failing.version)
        .await;
    let obj = env
        .wait_condition("apiproxy", "orders", "ResolvedRefs", "True", None)
        .await;
    let programmed = condition(&obj, "Programmed").unwrap();
    let ready = condition(&obj, "Ready").unwrap();
    assert!(
        programmed["status"] != "True" && ready["status"] != "True",
        "the only proxy still serves {} (where /orders answers error 02), not {}, yet: {programmed} {ready}",
        failing.version,
        resolved.version
    );
}
