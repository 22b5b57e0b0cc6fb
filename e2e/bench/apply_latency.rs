//! `kanali-apply-latency`: how long a `kubectl` edit takes to be served by the proxies.
//!
//! A measurement, not a test: it asserts nothing about the numbers. Against a real API server
//! (`KUBECONFIG`), in a fresh namespace `kanali-bench-<random>`, it applies `--routes` ApiProxies
//! (`/svc-<i>`, to an in-process echo upstream) plus one `probe` ApiProxy, starts one
//! `kanali-controller` in cluster mode and two `kanali-proxy` processes (one worker thread each),
//! waits until both proxies serve every route, then `--edits` times patches the probe's
//! `spec.source.path` to `/probe-<n>` with `kubectl patch` and polls both proxies (about every
//! `--poll-ms`) until both answer `GET /probe-<n>/x` from the echo. A `kubectl get --watch` on
//! the probe timestamps when the API server's watch event for each edit arrives.
//!
//! It prints p50/p90/p99/max of: (a) kubectl started → both proxies serving, (b) kubectl
//! returned → both serving, (c) watch event → both serving, and the pieces in between. The
//! namespace, the child processes and (unless the run failed or `--keep`) their logs are
//! removed at the end. Usually run through `e2e/bench/apply-latency.sh`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use clap::Parser;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Time from `kubectl apply` to both proxies serving the change.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Admin kubeconfig of the API server (`e2e/k8s/start.sh DIR` writes `DIR/kubeconfig`).
    #[arg(long, env = "KUBECONFIG", default_value = "/tmp/kanali-k8s/kubeconfig")]
    kubeconfig: PathBuf,
    /// The kubectl to run.
    #[arg(long, env = "KUBECTL", default_value = "kubectl")]
    kubectl: String,
    /// Directory holding `kanali-controller` and `kanali-proxy` (default: the target
    /// directory's release binaries if present and newer, else the debug ones).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// ApiProxies applied besides the probe.
    #[arg(long, default_value_t = 1000)]
    routes: usize,
    /// Edits of the probe measured.
    #[arg(long, default_value_t = 50)]
    edits: usize,
    /// Milliseconds between polls of a proxy.
    #[arg(long, default_value_t = 1)]
    poll_ms: u64,
    /// Milliseconds of quiet after each edit is served, before the next one.
    #[arg(long, default_value_t = 250)]
    pause_ms: u64,
    /// Seconds an edit may take before it counts as lost.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Seconds to wait, before measuring, until the controller has written every ApiProxy's
    /// status (`Ready`), so its initial burst of status writes is not measured; 0: do not wait.
    #[arg(long, default_value_t = 600)]
    ready_timeout_secs: u64,
    /// Log filter of the controller and the proxies.
    #[arg(long, default_value = "info")]
    log: String,
    /// Keep the namespace and the logs.
    #[arg(long)]
    keep: bool,
    /// Print each edit's timestamps (UTC wall clock, to line up with the processes' logs).
    #[arg(long)]
    verbose: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut world = World::new(&args)?;
        let result = tokio::select! {
            r = run(&args, &mut world) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        if let Err(e) = &result {
            world.failed = true;
            eprintln!("{}", world.logs_tail(40));
            eprintln!("error: {e:#}");
        }
        drop(world);
        result
    })
}

// ---------------------------------------------------------------------------------------------
// The world: kubectl, the namespace, the child processes, cleaned up on drop
// ---------------------------------------------------------------------------------------------

/// The shared kubectl runner, with this binary's anyhow errors.
#[derive(Clone)]
struct Kubectl(kanali_e2e::kubectl::Kubectl);

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        self.0.command(args)
    }

    /// Runs kubectl to completion: its stdout, or an error with its stderr.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        self.0.run_sync(args, stdin).map_err(anyhow::Error::msg)
    }

    /// `run` off the async worker threads.
    async fn run_async(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        self.0.run(args, stdin).await.map_err(anyhow::Error::msg)
    }
}

/// A child process, killed on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct World {
    k: Kubectl,
    ns: String,
    ns_created: bool,
    logs: PathBuf,
    procs: Vec<Proc>,
    keep: bool,
    failed: bool,
}

impl World {
    fn new(args: &Args) -> anyhow::Result<World> {
        let suffix = random_suffix();
        let logs = std::env::temp_dir().join(format!("kanali-apply-latency-{suffix}"));
        std::fs::create_dir_all(&logs)?;
        Ok(World {
            k: Kubectl(kanali_e2e::kubectl::Kubectl {
                program: args.kubectl.clone(),
                kubeconfig: args.kubeconfig.clone(),
            }),
            ns: format!("kanali-bench-{suffix}"),
            ns_created: false,
            logs,
            procs: Vec::new(),
            keep: args.keep,
            failed: false,
        })
    }

    fn spawn(&mut self, name: &str, mut cmd: Command) -> anyhow::Result<&mut Proc> {
        let log = self.logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log,
        });
        let index = self.procs.len() - 1;
        Ok(&mut self.procs[index])
    }

    fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let _ = write!(
                out,
                "===== {} (last {lines} lines of {}) =====\n{}\n",
                p.name,
                p.log.display(),
                p.log_tail(lines)
            );
        }
        out
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Newest first: the proxies go before their controller (no "stream lost" noise).
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
        if self.ns_created && !self.keep {
            let _ = self.k.run(
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
        if self.keep || self.failed {
            eprintln!("logs kept in {}", self.logs.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

const ECHO_NAME: &str = "bench-echo";

async fn run(args: &Args, world: &mut World) -> anyhow::Result<()> {
    let bin = bin_dir(args.bin_dir.as_deref())?;
    let k = world.k.clone();
    k.run_async(&["get", "--raw", "/readyz"], None)
        .await
        .context("the API server is not reachable (start one with e2e/k8s/start.sh DIR)")?;
    ensure_crds(&k).await?;
    k.run_async(&["create", "namespace", &world.ns], None)
        .await?;
    world.ns_created = true;
    let ns = world.ns.clone();
    let echo = kanali_e2e::start_echo(([127, 0, 0, 1], 0).into(), ECHO_NAME).await?;
    let endpoint = format!("http://{}", echo.addr);
    println!(
        "namespace {ns}, binaries {}, {} routes + probe, {} edits",
        bin.display(),
        args.routes,
        args.edits
    );

    let started = Instant::now();
    let mut yaml = String::new();
    for i in 0..args.routes {
        yaml.push_str(&api_proxy(
            &format!("svc-{i}"),
            &format!("/svc-{i}"),
            &endpoint,
        ));
    }
    yaml.push_str(&api_proxy("probe", "/probe-0", &endpoint));
    k.run_async(&["apply", "-n", &ns, "-f", "-"], Some(&yaml))
        .await?;
    println!(
        "applied {} ApiProxies in {:?}",
        args.routes + 1,
        started.elapsed()
    );

    // One controller, cluster mode, this namespace only.
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let (grpc, admin) = (free_addr()?, free_addr()?);
    let mut cmd = Command::new(bin.join("kanali-controller"));
    cmd.args([
        "--namespace",
        &ns,
        "--lease-namespace",
        &ns,
        "--identity",
        "bench",
    ])
    .args(["--grpc-listen", &grpc.to_string()])
    .args(["--admin-listen", &admin.to_string()])
    .args(["--log", &args.log])
    .env("KUBECONFIG", &args.kubeconfig);
    world.spawn("controller", cmd)?;
    wait_ready(&http, world, 0, admin).await?;

    // Two proxies.
    let mut proxies = Vec::new();
    for id in ["p1", "p2"] {
        let (listen, admin) = (free_addr()?, free_addr()?);
        let mut cmd = Command::new(bin.join("kanali-proxy"));
        cmd.args(["--controller", &format!("http://{grpc}")])
            .args(["--listen", &listen.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--id", id, "--worker-threads", "1", "--log", &args.log]);
        world.spawn(id, cmd)?;
        let index = world.procs.len() - 1;
        wait_ready(&http, world, index, admin).await?;
        proxies.push(listen);
    }

    // Both proxies serve every route.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut paths: Vec<String> = (0..args.routes).map(|i| format!("/svc-{i}/x")).collect();
    paths.push("/probe-0/x".to_owned());
    for &proxy in &proxies {
        for path in &paths {
            poll_until_served(&http, proxy, path, Duration::from_millis(20), deadline).await?;
        }
    }
    println!(
        "both proxies serve all {} routes {:?} after the controller started",
        paths.len(),
        started.elapsed()
    );
    // Let the leader write every object's status first: that burst is not what we measure.
    // (Counted with one list per round: `kubectl wait --all` checks objects one by one and
    // alone takes minutes for a thousand of them.)
    if args.ready_timeout_secs > 0 {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(args.ready_timeout_secs);
        let jsonpath = r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#;
        loop {
            let out = k
                .run_async(&["get", "apiproxy", "-n", &ns, "-o", jsonpath], None)
                .await?;
            let ready = out.lines().filter(|l| *l == "True").count();
            if ready == paths.len() {
                println!(
                    "all ApiProxies Ready (status written) {:?} later",
                    started.elapsed()
                );
                break;
            }
            if Instant::now() > deadline {
                eprintln!("warning: only {ready} of {} ApiProxies Ready", paths.len());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The watch: the time each value of the probe's path first arrives.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut cmd = k.command(&[
        "get",
        "apiproxy",
        "probe",
        "-n",
        &ns,
        "--watch",
        "-o",
        r#"jsonpath={.spec.source.path}{"\n"}"#,
    ]);
    let log = world.logs.join("watch.log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("cannot start kubectl --watch")?;
    let stdout = child.stdout.take().context("kubectl --watch stdout")?;
    world.procs.push(Proc {
        name: "kubectl-watch".to_owned(),
        child,
        log,
    });
    {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let now = Instant::now();
                let Ok(line) = line else { break };
                if let Ok(mut seen) = seen.lock() {
                    seen.entry(line.trim().to_owned()).or_insert(now);
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen
        .lock()
        .map_err(|_| anyhow!("poisoned"))?
        .contains_key("/probe-0")
    {
        if Instant::now() > deadline {
            bail!("kubectl --watch printed nothing within 30s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The initial list is printed before the watch request goes out.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The edits.
    let mut samples = Samples::default();
    let clock = (Instant::now(), SystemTime::now());
    let mut lost = 0;
    let poll = Duration::from_millis(args.poll_ms);
    for n in 1..=args.edits {
        let path = format!("/probe-{n}");
        let probe = format!("{path}/x");
        let patch = format!(r#"{{"spec":{{"source":{{"path":"{path}"}}}}}}"#);
        let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
        let kubectl = {
            let (k, ns) = (k.clone(), ns.clone());
            tokio::task::spawn_blocking(move || {
                let t0 = Instant::now();
                let r = k.run(
                    &[
                        "patch",
                        "apiproxy",
                        "probe",
                        "-n",
                        &ns,
                        "--type",
                        "merge",
                        "-p",
                        &patch,
                        "--request-timeout=30s",
                    ],
                    None,
                );
                (t0, Instant::now(), r)
            })
        };
        let polls: Vec<_> = proxies
            .iter()
            .map(|&proxy| {
                let (http, probe) = (http.clone(), probe.clone());
                tokio::spawn(async move {
                    poll_until_served(&http, proxy, &probe, poll, deadline).await
                })
            })
            .collect();
        let (t0, returned, r) = kubectl.await?;
        r?;
        let mut served = Vec::new();
        for p in polls {
            match p.await? {
                Ok(t) => served.push(t),
                Err(e) => eprintln!("edit {n}: {e:#}"),
            }
        }
        if served.len() < proxies.len() {
            lost += 1;
            continue;
        }
        let first = served.iter().copied().min().unwrap_or(t0);
        let t1 = served.iter().copied().max().unwrap_or(t0);
        // The watch event normally arrives long before; give it a moment if not.
        let event_deadline = Instant::now() + Duration::from_secs(2);
        let event = loop {
            let event = seen
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .get(&path)
                .copied();
            if event.is_some() || Instant::now() > event_deadline {
                break event;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        samples.add(t0, returned, event, first, t1);
        if args.verbose {
            let at = |t: Instant| wall(clock, t);
            println!(
                "edit {n}: kubectl {} returned {} watch {} proxies {} {} (proxy order as started: {})",
                at(t0),
                at(returned),
                event.map_or_else(|| "-".to_owned(), at),
                at(first),
                at(t1),
                served
                    .iter()
                    .map(|&t| format!("{:.1}", ms(t0, t)))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    }

    for p in world.procs.iter_mut() {
        if let Ok(Some(status)) = p.child.try_wait() {
            eprintln!("warning: {} exited early ({status})", p.name);
        }
    }
    println!();
    print!("{}", samples.table());
    if lost > 0 {
        println!(
            "{lost} of {} edits not served within {}s",
            args.edits, args.timeout_secs
        );
    }
    drop(echo);
    Ok(())
}

fn api_proxy(name: &str, path: &str, endpoint: &str) -> String {
    format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: {name}}}\nspec:\n  \
         source: {{path: \"{path}\"}}\n  target: {{backend: {{endpoint: \"{endpoint}\"}}}}\n---\n"
    )
}

/// Installs the CRDs unless they are there.
async fn ensure_crds(k: &Kubectl) -> anyhow::Result<()> {
    const CRDS: [&str; 4] = [
        "crd/apiproxies.kanali.io",
        "crd/mocktargets.kanali.io",
        "crd/apikeys.kanali.io",
        "crd/apikeybindings.kanali.io",
    ];
    let mut get = vec!["get"];
    get.extend(CRDS);
    if k.run_async(&get, None).await.is_ok() {
        return Ok(());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    let dir = dir.to_str().context("non-UTF-8 path")?;
    k.run_async(&["apply", "-f", dir], None).await?;
    let mut wait = vec!["wait", "--for", "condition=established", "--timeout=60s"];
    wait.extend(CRDS);
    k.run_async(&wait, None).await.map(drop)
}

/// `--bin-dir`, else `<target>/release` when its binaries are there and newer than
/// `<target>/debug`'s, else `<target>/debug`. This program is `<target>/<profile>/<name>`.
fn bin_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let names = ["kanali-controller", "kanali-proxy"];
    if let Some(dir) = explicit {
        for n in names {
            if !dir.join(n).is_file() {
                bail!("{} not found", dir.join(n).display());
            }
        }
        return Ok(dir.to_owned());
    }
    let exe = std::env::current_exe()?;
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => exe
            .parent()
            .and_then(Path::parent)
            .context("cannot find the target directory: pass --bin-dir")?
            .to_owned(),
    };
    // The newest modification time of the pair, when both are there.
    let built = |profile: &str| -> Option<SystemTime> {
        names
            .iter()
            .map(|n| std::fs::metadata(target.join(profile).join(n)).and_then(|m| m.modified()))
            .collect::<Result<Vec<_>, _>>()
            .ok()?
            .into_iter()
            .max()
    };
    match (built("release"), built("debug")) {
        (Some(r), Some(d)) if r >= d => Ok(target.join("release")),
        (Some(_), None) => Ok(target.join("release")),
        (_, Some(_)) => Ok(target.join("debug")),
        (None, None) => bail!(
            "no kanali-controller and kanali-proxy in {}/{{release,debug}}: run `cargo build --release --bins`",
            target.display()
        ),
    }
}

/// A port nobody listens on right now (bound, then released).
fn free_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn random_suffix() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:06x}", h.finish() & 0xff_ffff)
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

type Http = Client<HttpConnector, Full<Bytes>>;

async fn get(http: &Http, addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let req = Request::get(format!("http://{addr}{path}")).body(Full::default())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), async {
        let (parts, body) = http.request(req).await?.into_parts();
        anyhow::Ok((parts.status, body.collect().await?.to_bytes()))
    })
    .await
    .map_err(|_| anyhow!("GET http://{addr}{path}: no answer within 5s"))?;
    resp.with_context(|| format!("GET http://{addr}{path}"))
}

/// Polls until `GET path` on `proxy` is answered 200 by the echo upstream; returns when.
async fn poll_until_served(
    http: &Http,
    proxy: SocketAddr,
    path: &str,
    every: Duration,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    loop {
        let last = match get(http, proxy, path).await {
            Ok((status, body)) => {
                let now = Instant::now();
                let from_echo = serde_json::from_slice::<serde_json::Value>(&body)
                    .is_ok_and(|v| v["upstream"] == ECHO_NAME);
                if status == StatusCode::OK && from_echo {
                    return Ok(now);
                }
                format!("{status} {}", String::from_utf8_lossy(&body))
            }
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("proxy {proxy} does not serve {path}; last answer: {last}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits for `world.procs[index]`'s admin `/readyz` to answer 200.
async fn wait_ready(
    http: &Http,
    world: &mut World,
    index: usize,
    admin: SocketAddr,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = &mut world.procs[index];
        if let Some(status) = p.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", p.name, p.log_tail(40));
        }
        let last = match get(http, admin, "/readyz").await {
            Ok((StatusCode::OK, _)) => return Ok(()),
            Ok((status, body)) => format!("{status} {}", String::from_utf8_lossy(&body)),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("{} not ready within 60s; last /readyz: {last}", p.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Per-edit durations in milliseconds (signed: a proxy may serve before kubectl returns).
#[derive(Default)]
struct Samples {
    kubectl_to_served: Vec<f64>,
    returned_to_served: Vec<f64>,
    event_to_served: Vec<f64>,
    kubectl_duration: Vec<f64>,
    kubectl_to_event: Vec<f64>,
    event_to_first: Vec<f64>,
    first_to_second: Vec<f64>,
}

fn ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        to.duration_since(from).as_secs_f64() * 1e3
    } else {
        -(from.duration_since(to).as_secs_f64() * 1e3)
    }
}

impl Samples {
    fn add(
        &mut self,
        t0: Instant,
        returned: Instant,
        event: Option<Instant>,
        first: Instant,
        t1: Instant,
    ) {
        self.kubectl_to_served.push(ms(t0, t1));
        self.returned_to_served.push(ms(returned, t1));
        self.kubectl_duration.push(ms(t0, returned));
        self.first_to_second.push(ms(first, t1));
        if let Some(e) = event {
            self.event_to_served.push(ms(e, t1));
            self.kubectl_to_event.push(ms(t0, e));
            self.event_to_first.push(ms(e, first));
        }
    }

    fn table(&self) -> String {
        let rows: [(&str, &[f64]); 7] = [
            (
                "(a) kubectl started -> both proxies serving",
                &self.kubectl_to_served,
            ),
            (
                "(b) kubectl returned -> both proxies serving",
                &self.returned_to_served,
            ),
            (
                "(c) watch event -> both proxies serving",
                &self.event_to_served,
            ),
            (
                "    kubectl started -> kubectl returned",
                &self.kubectl_duration,
            ),
            ("    kubectl started -> watch event", &self.kubectl_to_event),
            (
                "    watch event -> first proxy serving",
                &self.event_to_first,
            ),
            (
                "    first proxy -> second proxy serving",
                &self.first_to_second,
            ),
        ];
        let mut out = format!(
            "{:<46} {:>7} {:>8} {:>8} {:>8} {:>8}\n",
            "latency (ms)", "samples", "p50", "p90", "p99", "max"
        );
        for (name, values) in rows {
            let mut v = values.to_vec();
            v.sort_by(f64::total_cmp);
            let _ = writeln!(
                out,
                "{name:<46} {:>7} {:>8} {:>8} {:>8} {:>8}",
                v.len(),
                fmt(percentile(&v, 50.0)),
                fmt(percentile(&v, 90.0)),
                fmt(percentile(&v, 99.0)),
                fmt(v.last().copied()),
            );
        }
        out.push_str(
            "(nearest-rank percentiles: with fewer than 100 samples p99 is the maximum)\n",
        );
        out
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// `t` as UTC time of day (HH:MM:SS.micros), given one (Instant, SystemTime) pair.
fn wall(clock: (Instant, SystemTime), t: Instant) -> String {
    let sys = if t >= clock.0 {
        clock.1 + (t - clock.0)
    } else {
        clock.1 - (clock.0 - t)
    };
    let d = sys
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_micros()
    )
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}
