//! The Kanali proxy.
//!
//! Data flow: the [`control`] task subscribes to the controller and receives snapshots; each one
//! is turned into an immutable [`route::table::RouteTable`] off the request path and swapped in
//! atomically. The [`listen`] side accepts the connections (cleartext, and optionally TLS with a
//! certificate reloaded when its files change) and answers every request from whatever table is
//! current when it arrives: the [`route`] module finds the route and rewrites the upstream path,
//! and the request is either answered by a mock, proxied through the pooled [`upstream`] client,
//! or answered with a Kanali error from [`errors`]. With [`workers`], each worker thread accepts
//! on a socket of its own and serves what it accepted. A route's plugins ([`filter`]) run before
//! its backend and, for custom plugins (WebAssembly modules from `--plugins-dir`,
//! [`filter::wasm`]), on its bodies and responses too. [`observe`] counts and logs what was
//! served; [`shutdown`] takes a proxy out of service without losing requests.

pub mod admin;
pub mod body;
pub mod control;
pub mod errors;
pub mod filter;
pub mod h1;
pub mod headers;
pub mod listen;
pub mod observe;
pub mod request;
pub mod route;
pub mod shutdown;
pub mod upstream;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use route::table::RouteTable;
use shutdown::{Drain, ShutdownConfig};
use workers::{Worker, Workers};

/// Everything needed to start a proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Traffic listener (HTTP/1.1 and h2c).
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Controller subscription.
    pub client: control::client::ClientConfig,
    /// Listener limits.
    pub server: listen::server::ServerConfig,
    /// Upstream pool settings.
    pub upstream: upstream::UpstreamConfig,
    /// Rate limits: local, or shared through Redis.
    pub rate_limits: filter::rate_limit::RateLimitConfig,
    /// Custom plugins: where their modules are, and their budgets.
    pub plugins: filter::wasm::WasmConfig,
    /// Which threads serve the connections.
    pub workers: Workers,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    /// The HTTPS listener's certificate, key or client CA does not load.
    #[error("HTTPS listener: {0}")]
    Tls(#[from] listen::tls::TlsError),
    /// The rate-limit settings are unusable (e.g. a bad Redis URL).
    #[error("rate limits: {0}")]
    RateLimit(#[from] filter::rate_limit::RateLimitError),
    /// The WebAssembly runtime for plugins could not be created.
    #[error("plugins: {0}")]
    Plugins(#[from] filter::wasm::WasmError),
    /// A worker thread could not be started.
    #[error("cannot start a worker thread: {0}")]
    Worker(std::io::Error),
}

/// A running proxy.
pub struct RunningProxy {
    /// Traffic address.
    pub addr: SocketAddr,
    /// HTTPS traffic address, if the HTTPS listener is configured.
    pub tls_addr: Option<SocketAddr>,
    /// Admin address.
    pub admin_addr: SocketAddr,
    /// The table being served (None until the first snapshot).
    pub tables: Arc<ArcSwapOption<RouteTable>>,
    /// Phase 1 of [`shutdown`]: readiness fails, connections are asked to go.
    drain: Drain,
    /// Phase 2: the listeners close and drain.
    shutdown: watch::Sender<bool>,
    /// Phase 3: the admin port, the subscription and the certificate reload end.
    exit: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// With [`Workers::PerCore`]: they end after the tasks.
    workers: Vec<Worker>,
}

impl RunningProxy {
    /// The version being served, if any.
    pub fn version(&self) -> Option<String> {
        self.tables.load().as_ref().map(|t| t.version.clone())
    }

    /// Stops accepting at once, lets in-flight requests finish, and ends the subscription:
    /// [`RunningProxy::shutdown_gracefully`] with [`ShutdownConfig::IMMEDIATE`].
    pub async fn shutdown(self) {
        self.shutdown_gracefully(ShutdownConfig::IMMEDIATE).await
    }

    /// Leaves service without losing requests (see [`shutdown`]): readiness fails and
    /// connections are asked to go while the listeners keep accepting for `config.delay`;
    /// then the listeners close and in-flight requests get `config.drain_timeout` to finish.
    /// Connections still open after that are left to the runtime's end.
    pub async fn shutdown_gracefully(self, config: ShutdownConfig) {
        self.drain.start();
        if !config.delay.is_zero() {
            tracing::info!(delay = ?config.delay, "draining: not ready, still accepting while load balancers catch up");
            tokio::time::sleep(config.delay).await;
        }
        let _ = self.shutdown.send(true);
        let aborts: Vec<_> = self
            .listeners
            .iter()
            .map(JoinHandle::abort_handle)
            .collect();
        let drained = futures_util::future::join_all(self.listeners);
        if tokio::time::timeout(config.drain_timeout, drained)
            .await
            .is_err()
        {
            tracing::warn!(drain_timeout = ?config.drain_timeout, "requests still in flight after the drain timeout; leaving them");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
        let _ = self.exit.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        for worker in self.workers {
            worker.ended().await;
        }
    }
}

/// Binds the listeners and starts serving (with [`Workers::PerCore`], on worker threads it
/// starts); the table fills in when the controller answers.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    let (drain, draining) = Drain::new();
    let (shutdown, rx) = watch::channel(false);
    let (exit, exit_rx) = watch::channel(false);
    let traffic = bind("traffic", config.listen, config.workers).await?;
    let addr = traffic.addr;
    let admin_failed = |source| StartError::Bind {
        what: "admin",
        addr: config.admin_listen,
        source,
    };
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(admin_failed)?;
    let admin_addr = admin.local_addr().map_err(admin_failed)?;

    // Files are loaded before anything starts, so a bad certificate fails start-up.
    let https = match &config.server.tls {
        None => None,
        Some(tls) => {
            let bound = bind("https", tls.listen, config.workers).await?;
            let (server_tls, reload) = listen::tls::start(tls.clone(), exit_rx.clone())?;
            Some((bound, server_tls, reload))
        }
    };
    let tls_addr = https.as_ref().map(|(bound, _, _)| bound.addr);

    let tables = Arc::new(ArcSwapOption::empty());
    let upstreams = Arc::new(upstream::Upstreams::for_workers(
        config.upstream,
        config.workers.count(),
    )?);
    let limits = Arc::new(filter::rate_limit::RateLimits::new(config.rate_limits)?);
    let usage = Arc::new(filter::credentials::UsageLog::default());
    let plugins = Arc::new(filter::wasm::Plugins::new(&config.plugins)?);
    let metrics = Arc::new(observe::metrics::Metrics::new(config.workers.count()));
    let proxy = Arc::new(
        listen::server::Proxy::new(tables.clone(), config.server, usage.clone())
            .with_metrics(metrics.clone()),
    );
    // Last, so that nothing above that fails leaves threads behind.
    let workers = match config.workers {
        Workers::Caller => Vec::new(),
        Workers::PerCore(_) => (0..config.workers.count())
            .map(|i| Worker::start(i, exit_rx.clone()))
            .collect::<Result<_, _>>()
            .map_err(StartError::Worker)?,
    };
    // Listener `i` is served by worker `i`, or by the caller's runtime without workers.
    let serve = |(i, listener): (usize, TcpListener), tls: Option<listen::tls::ServerTls>| {
        let serving = listen::server::serve(
            listener,
            tls,
            proxy.clone(),
            i,
            draining.clone(),
            rx.clone(),
        );
        match workers.get(i) {
            Some(worker) => worker.handle.spawn(serving),
            None => tokio::spawn(serving),
        }
    };
    let mut running: Vec<JoinHandle<()>> = traffic
        .serve_on(&workers)?
        .into_iter()
        .enumerate()
        .map(|l| serve(l, None))
        .collect();
    let mut tasks = vec![
        tokio::spawn(admin::serve(
            admin,
            admin::Sources {
                tables: tables.clone(),
                metrics,
                limits: limits.clone(),
            },
            draining.clone(),
            exit_rx.clone(),
        )),
        tokio::spawn(limits.clone().run(exit_rx.clone())),
        tokio::spawn(upstreams.clone().run_sweeper(exit_rx.clone())),
        tokio::spawn(plugins.clone().watch(exit_rx.clone())),
        tokio::spawn(control::client::run(
            config.client,
            control::client::Context {
                tables: tables.clone(),
                upstreams,
                limits,
                usage,
                plugins,
            },
            exit_rx,
        )),
    ];
    if let Some((bound, server_tls, reload)) = https {
        running.extend(
            bound
                .serve_on(&workers)?
                .into_iter()
                .enumerate()
                .map(|l| serve(l, Some(server_tls.clone()))),
        );
        tasks.push(tokio::spawn(reload));
    }
    tracing::info!(%addr, ?tls_addr, %admin_addr, workers = workers.len(), "proxy listening");
    Ok(RunningProxy {
        addr,
        tls_addr,
        admin_addr,
        tables,
        drain,
        shutdown,
        exit,
        listeners: running,
        tasks,
        workers,
    })
}

/// A listener's sockets, bound: one on the caller's runtime without workers, else one per
/// worker, for its runtime to watch.
struct Bound {
    what: &'static str,
    addr: SocketAddr,
    sockets: Sockets,
}

enum Sockets {
    Here(TcpListener),
    Workers(Vec<std::net::TcpListener>),
}

async fn bind(what: &'static str, addr: SocketAddr, workers: Workers) -> Result<Bound, StartError> {
    let failed = |source| StartError::Bind { what, addr, source };
    let (sockets, bound) = match workers {
        Workers::Caller => {
            let listener = TcpListener::bind(addr).await.map_err(failed)?;
            let bound = listener.local_addr().map_err(failed)?;
            (Sockets::Here(listener), bound)
        }
        Workers::PerCore(_) => {
            let sockets = workers::reuseport_listeners(addr, workers.count()).map_err(failed)?;
            let bound = match sockets.first() {
                Some(first) => first.local_addr().map_err(failed)?,
                None => return Err(failed(std::io::ErrorKind::AddrNotAvailable.into())),
            };
            (Sockets::Workers(sockets), bound)
        }
    };
    Ok(Bound {
        what,
        addr: bound,
        sockets,
    })
}

impl Bound {
    /// The listeners, each watched by the runtime that serves it: worker `i` the `i`th.
    fn serve_on(self, workers: &[Worker]) -> Result<Vec<TcpListener>, StartError> {
        let failed = |source| StartError::Bind {
            what: self.what,
            addr: self.addr,
            source,
        };
        match self.sockets {
            Sockets::Here(listener) => Ok(vec![listener]),
            Sockets::Workers(sockets) => sockets
                .into_iter()
                .zip(workers)
                .map(|(socket, worker)| worker.adopt(socket).map_err(failed))
                .collect(),
        }
    }
}

/// Resolves once `shutdown` is true (or its sender is gone). Returns `()` rather than the
/// watch guard, so callers can use it in `select!` without holding a lock across awaits.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// `Box::pin(make())`, with the box allocated before the value is made, so the value can be
/// built where it goes. `Box::pin(value)` builds it on the stack and copies it in: between the
/// two the allocation may unwind, and the value must then be dropped where it is. For a
/// request's futures that copy was hundreds of bytes, twice a request (~130 instructions).
#[inline(always)]
pub(crate) fn boxed<T>(make: impl FnOnce() -> T) -> std::pin::Pin<Box<T>> {
    let place = Box::new_uninit();
    Box::into_pin(Box::write(place, make()))
}
