//! The Kanali proxy.
//!
//! Data flow: the [`client`] task subscribes to the controller and receives snapshots; each one
//! is turned into an immutable [`table::RouteTable`] off the request path and swapped in
//! atomically. The [`server`] answers every request from whatever table is current when it
//! arrives: the [`router`] finds the route, [`path`] rewrites the upstream path, and the request
//! is either answered by a [`mock`], proxied through the pooled [`upstream`] client, or answered
//! with a Kanali error from [`errors`]. The [`listener`] accepts the connections: cleartext, and
//! optionally TLS with a certificate from [`server_tls`], reloaded when its files change.
//! A route's plugins ([`filter`]) run before its backend and, for custom plugins (WebAssembly
//! modules from `--plugins-dir`, [`filter::wasm`]), on its bodies and responses too.

pub mod admin;
pub mod balance;
pub mod body;
pub mod client;
pub mod dynamic;
pub mod errors;
pub mod filter;
pub mod headers;
pub mod listener;
pub mod mock;
pub mod path;
pub mod pool;
pub mod request;
pub mod router;
pub mod server;
pub mod server_tls;
pub mod table;
pub mod upstream;
pub mod upstream_tls;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use table::RouteTable;

/// Everything needed to start a proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Traffic listener (HTTP/1.1 and h2c).
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Controller subscription.
    pub client: client::ClientConfig,
    /// Listener limits.
    pub server: server::ServerConfig,
    /// Upstream pool settings.
    pub upstream: upstream::UpstreamConfig,
    /// Rate limits: local, or shared through Redis.
    pub rate_limits: filter::rate_limit::RateLimitConfig,
    /// Custom plugins: where their modules are, and their budgets.
    pub plugins: filter::wasm::WasmConfig,
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
    Tls(#[from] server_tls::TlsError),
    /// The rate-limit settings are unusable (e.g. a bad Redis URL).
    #[error("rate limits: {0}")]
    RateLimit(#[from] filter::rate_limit::RateLimitError),
    /// The WebAssembly runtime for plugins could not be created.
    #[error("plugins: {0}")]
    Plugins(#[from] filter::wasm::WasmError),
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
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningProxy {
    /// The version being served, if any.
    pub fn version(&self) -> Option<String> {
        self.tables.load().as_ref().map(|t| t.version.clone())
    }

    /// Stops accepting, lets in-flight requests finish, and ends the subscription.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Binds the listeners and starts serving; the table fills in when the controller answers.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let listener = bind("traffic", config.listen).await?;
    let admin = bind("admin", config.admin_listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        what: "traffic",
        addr: config.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        what: "admin",
        addr: config.admin_listen,
        source,
    })?;

    let (shutdown, rx) = watch::channel(false);
    // Files are loaded before anything starts, so a bad certificate fails start-up.
    let https = match &config.server.tls {
        None => None,
        Some(tls) => {
            let listener = bind("https", tls.listen).await?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                what: "https",
                addr: tls.listen,
                source,
            })?;
            let (server_tls, reload) = server_tls::start(tls.clone(), rx.clone())?;
            Some((listener, addr, server_tls, reload))
        }
    };
    let tls_addr = https.as_ref().map(|(_, addr, _, _)| *addr);

    let tables = Arc::new(ArcSwapOption::empty());
    let upstreams = Arc::new(upstream::Upstreams::new(config.upstream)?);
    let limits = Arc::new(filter::rate_limit::RateLimits::new(config.rate_limits)?);
    let usage = Arc::new(filter::credentials::UsageLog::default());
    let plugins = Arc::new(filter::wasm::Plugins::new(&config.plugins)?);
    let proxy = Arc::new(server::Proxy::new(
        tables.clone(),
        config.server,
        usage.clone(),
    ));
    let mut https_tasks = Vec::new();
    if let Some((listener, _, server_tls, reload)) = https {
        let serve = server::serve(listener, Some(server_tls), proxy.clone(), rx.clone());
        https_tasks.push(tokio::spawn(serve));
        https_tasks.push(tokio::spawn(reload));
    }
    let mut tasks = vec![
        tokio::spawn(server::serve(listener, None, proxy, rx.clone())),
        tokio::spawn(admin::serve(admin, tables.clone(), rx.clone())),
        tokio::spawn(limits.clone().run(rx.clone())),
        tokio::spawn(plugins.clone().watch(rx.clone())),
        tokio::spawn(client::run(
            config.client,
            client::Context {
                tables: tables.clone(),
                upstreams,
                limits,
                usage,
                plugins,
            },
            rx,
        )),
    ];
    tasks.extend(https_tasks);
    tracing::info!(%addr, ?tls_addr, %admin_addr, "proxy listening");
    Ok(RunningProxy {
        addr,
        tls_addr,
        admin_addr,
        tables,
        shutdown,
        tasks,
    })
}

/// Resolves once `shutdown` is true (or its sender is gone). Returns `()` rather than the
/// watch guard, so callers can use it in `select!` without holding a lock across awaits.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
