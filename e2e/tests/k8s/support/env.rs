//! One test's world: its namespace, controllers, proxies and echo upstream.

use std::fmt::Write as _;
use std::time::Duration;

use http::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kanali_e2e::kubectl::Kubectl;
use kanali_e2e::{Echo, start_echo};
use serde_json::Value;
use tokio::time::Instant;

use super::client::{Http, through_with};
use super::process::Proc;
use super::{
    Answer, DEADLINE, LEASE_SECS, binary, check_condition, ensure_crds, eventually, free_addr,
    http_get, kubeconfig, random_suffix,
};

/// One test's namespace, controllers, proxies and echo upstream. Dropping it kills the
/// processes, prints their logs if the test failed, and deletes the namespace.
pub struct Env {
    k: Kubectl,
    /// The test's namespace.
    pub ns: String,
    logs: tempfile::TempDir,
    pub controllers: Vec<Proc>,
    pub proxies: Vec<Proc>,
    /// Extra arguments every proxy started from now on gets.
    pub proxy_args: Vec<String>,
    /// Extra arguments every controller started from now on gets.
    pub controller_args: Vec<String>,
    /// An echo upstream on 127.0.0.1, named `echo` (see [`Env::endpoint`]).
    echo: Echo,
    pub http: Http,
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
                    "apiproxies,mocktargets,apikeybindings,leases,services,endpoints,secrets",
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
    pub async fn new(test: &str) -> Option<Env> {
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
            proxy_args: Vec::new(),
            controller_args: Vec::new(),
            echo,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// The usual setup: `controllers` replicas (c1, c2, ...) and two proxies (p1, p2) that are
    /// given every controller, all ready and connected.
    pub async fn with(test: &str, controllers: usize) -> Option<Env> {
        Env::with_proxy_args(test, controllers, &[]).await
    }

    /// [`Env::with`], the proxies started with `proxy_args` as well.
    pub async fn with_proxy_args(
        test: &str,
        controllers: usize,
        proxy_args: &[&str],
    ) -> Option<Env> {
        let mut env = Env::new(test).await?;
        env.proxy_args = proxy_args.iter().map(|s| (*s).to_owned()).collect();
        for i in 1..=controllers {
            env.start_controller(&format!("c{i}")).await;
        }
        let all: Vec<usize> = (0..controllers).collect();
        env.start_proxy("p1", &all).await;
        env.start_proxy("p2", &all).await;
        Some(env)
    }

    /// Starts a controller in cluster mode for this namespace and waits for its /readyz.
    pub async fn start_controller(&mut self, identity: &str) -> usize {
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
            .chain(self.controller_args.iter().cloned())
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
    pub async fn start_proxy(&mut self, id: &str, controllers: &[usize]) -> usize {
        let urls: Vec<String> = controllers
            .iter()
            .map(|&i| format!("http://{}", self.controllers[i].addr))
            .collect();
        // One worker unless the test asks for others.
        let one_worker: &[&str] = if self.proxy_args.iter().any(|a| a == "--worker-threads") {
            &[]
        } else {
            &["--worker-threads", "1"]
        };
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
                "--log",
                "info",
            ]
            .iter()
            .chain(one_worker)
            .map(|s| (*s).to_owned())
            .chain(self.proxy_args.iter().cloned())
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
    pub async fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let mut all = args.to_vec();
        all.extend(["-n", &self.ns]);
        self.k.run(&all, None).await
    }

    pub async fn apply(&self, yaml: &str) {
        self.k
            .run(&["apply", "-n", &self.ns, "-f", "-"], Some(yaml))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub async fn get_json(&self, kind: &str, name: &str) -> Result<Value, String> {
        let out = self.kubectl(&["get", kind, name, "-o", "json"]).await?;
        serde_json::from_str(&out).map_err(|e| format!("kubectl get {kind} {name}: {e}"))
    }

    /// Waits until `kind/name` has condition `type_` = `status` (and `reason`) at its current
    /// generation; returns the object.
    pub async fn wait_condition(
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
    pub async fn kubectl_wait_ready(&self, kind: &str, name: &str) {
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
    pub async fn eventually_everywhere<C>(&self, path: &str, check: C)
    where
        C: Fn(&Answer) -> Result<(), String>,
    {
        self.eventually_everywhere_with(path, &[], check).await;
    }

    /// [`Env::eventually_everywhere`] for a request with `headers`.
    pub async fn eventually_everywhere_with<C>(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        check: C,
    ) where
        C: Fn(&Answer) -> Result<(), String>,
    {
        for p in &self.proxies {
            eventually(&format!("{} GET {path} {headers:?}", p.name), || async {
                let a = through_with(&self.http, p.addr, path, headers).await?;
                check(&a)
            })
            .await;
        }
    }

    /// Asserts, without waiting, that `check` accepts every proxy's answer to `GET path`.
    pub async fn now_everywhere<C>(&self, path: &str, check: C)
    where
        C: Fn(&Answer) -> Result<(), String>,
    {
        self.now_everywhere_with(path, &[], check).await;
    }

    /// [`Env::now_everywhere`] for a request with `headers`.
    pub async fn now_everywhere_with<C>(&self, path: &str, headers: &[(&str, &str)], check: C)
    where
        C: Fn(&Answer) -> Result<(), String>,
    {
        for p in &self.proxies {
            let a = through_with(&self.http, p.addr, path, headers)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            if let Err(e) = check(&a) {
                panic!("{} GET {path} {headers:?}: {e}", p.name);
            }
        }
    }

    pub async fn controller_status(&self, i: usize) -> Result<Value, String> {
        let a = http_get(&self.http, self.controllers[i].admin, "/status").await?;
        a.json()
    }

    /// An unlabelled sample of controller `i`'s `/metrics`.
    pub async fn controller_metric(&self, i: usize, name: &str) -> Result<f64, String> {
        let a = http_get(&self.http, self.controllers[i].admin, "/metrics").await?;
        kanali_e2e::check::samples(&String::from_utf8_lossy(&a.body))?
            .get(name)
            .copied()
            .ok_or_else(|| format!("no {name} in /metrics"))
    }

    async fn proxy_connected(&self, controller: usize, id: &str) -> Result<bool, String> {
        let status = self.controller_status(controller).await?;
        Ok(status["proxies"][id]["connected"] == true)
    }

    pub async fn lease_holder(&self) -> Result<String, String> {
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

    /// Waits until `identity` holds the controllers' Lease.
    pub async fn wait_lease_holder(&self, identity: &str) {
        eventually(&format!("{identity} holds the Lease"), || async {
            let h = self.lease_holder().await?;
            if h == identity {
                Ok(())
            } else {
                Err(format!("holderIdentity is {h:?}"))
            }
        })
        .await;
    }

    pub fn controller_index(&self, identity: &str) -> usize {
        self.controllers
            .iter()
            .position(|c| c.name == identity)
            .unwrap_or_else(|| panic!("no controller {identity}"))
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.echo.addr)
    }
}
