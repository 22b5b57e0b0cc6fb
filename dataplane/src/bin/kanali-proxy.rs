//! `kanali-proxy`: subscribes to the Kanali controller and serves API traffic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kanali_dataplane::control::client::ClientConfig;
use kanali_dataplane::filter::rate_limit::{RateLimitConfig, RedisConfig};
use kanali_dataplane::filter::wasm::WasmConfig;
use kanali_dataplane::listen::server::ServerConfig;
use kanali_dataplane::listen::tls::{DEFAULT_RELOAD_INTERVAL, TlsConfig};
use kanali_dataplane::shutdown::ShutdownConfig;
use kanali_dataplane::upstream::dynamic::HeaderDefaults;
use kanali_dataplane::upstream::{AddressMode, UpstreamConfig};
use kanali_dataplane::workers::Workers;
use kanali_dataplane::{ProxyConfig, start};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Kanali proxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Controller gRPC URL; repeat for several controller replicas.
    #[arg(
        long = "controller",
        env = "KANALI_CONTROLLER",
        default_value = "http://127.0.0.1:9443",
        value_delimiter = ','
    )]
    controllers: Vec<String>,
    /// PEM CA that issued the controller's gRPC certificate: connect over TLS (controller
    /// URLs must be `https://`). Snapshots carry upstream private keys.
    #[arg(long, env = "KANALI_CONTROLLER_CA_FILE")]
    controller_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate presented to the controller (when it requires one).
    #[arg(long, env = "KANALI_CONTROLLER_CERT_FILE", requires_all = ["controller_key_file", "controller_ca_file"])]
    controller_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of --controller-cert-file.
    #[arg(
        long,
        env = "KANALI_CONTROLLER_KEY_FILE",
        requires = "controller_cert_file"
    )]
    controller_key_file: Option<std::path::PathBuf>,
    /// Name the controller's certificate must carry; default: the host of its URL.
    #[arg(
        long,
        env = "KANALI_CONTROLLER_SERVER_NAME",
        requires = "controller_ca_file"
    )]
    controller_server_name: Option<String>,
    /// Traffic listener (HTTP/1.1 and HTTP/2 cleartext).
    #[arg(long, env = "KANALI_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin listener (/healthz, /readyz, /version).
    #[arg(long, env = "KANALI_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    admin_listen: SocketAddr,
    /// Worker threads; default: one per core (as the CPU limit allows). Each has its own
    /// listening socket on the same address (SO_REUSEPORT), and serves the connections it
    /// accepts from start to end.
    #[arg(long, env = "KANALI_WORKER_THREADS", value_parser = clap::value_parser!(u64).range(1..=1024))]
    worker_threads: Option<u64>,
    /// Serve all connections from one work-stealing runtime over the worker threads instead:
    /// a few busy HTTP/2 connections then spread their streams over all cores, at a few per
    /// cent more CPU per request (e2e/bench/RESULTS.md).
    #[arg(long, env = "KANALI_WORK_STEALING")]
    work_stealing: bool,
    /// Identity reported to the controller; default: $POD_NAME, else the host name.
    #[arg(long, env = "KANALI_PROXY_ID")]
    id: Option<String>,
    /// Seconds a client has to send the request head.
    #[arg(long, default_value_t = 10)]
    header_read_timeout_secs: u64,
    /// Largest request head in bytes (at least 8192); larger ones get 431.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u64).range(8192..=16 * 1024 * 1024))]
    max_header_bytes: u64,
    /// Request bodies are read up to this many bytes before anything is sent upstream, so a
    /// malformed or truncated body gets 400 instead of reaching the upstream half sent; the
    /// rest of a longer body streams. 0: stream every body from its first byte.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u64).range(..=64 * 1024 * 1024))]
    request_buffer_bytes: u64,
    /// HTTP/1: keep handling a request after its client shut down the sending side of the
    /// connection (a half-close). By default the end of the client's stream cancels the
    /// request and its upstream exchange: clients usually close only when they give up.
    #[arg(long)]
    http1_half_close: bool,
    /// Seconds a connection may stay open with no request in flight (HTTP/1.1 keep-alive
    /// connections are also closed when the next request head takes longer than
    /// --header-read-timeout-secs).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_secs: u64,
    /// Seconds between HTTP/2 keep-alive pings on a quiet connection; 0: no pings.
    #[arg(long, default_value_t = 30)]
    http2_keep_alive_interval_secs: u64,
    /// Seconds an HTTP/2 keep-alive ping may go unanswered before the connection is closed.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    http2_keep_alive_timeout_secs: u64,
    /// HTTPS listener (HTTP/1.1 and HTTP/2 over TLS); off unless set.
    #[arg(long, env = "KANALI_TLS_LISTEN", requires_all = ["tls_cert_file", "tls_key_file"])]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) of the HTTPS listener; reloaded when it changes.
    #[arg(long, env = "KANALI_TLS_CERT_FILE", requires = "tls_listen")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the HTTPS listener; reloaded when it changes.
    #[arg(long, env = "KANALI_TLS_KEY_FILE", requires = "tls_listen")]
    tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: when set, HTTPS clients must present a certificate they issued.
    #[arg(long, env = "KANALI_TLS_CLIENT_CA_FILE", requires = "tls_listen")]
    tls_client_ca_file: Option<PathBuf>,
    /// Seconds an upstream has to start answering before the request fails with error 08.
    #[arg(long, default_value_t = 60)]
    upstream_timeout_secs: u64,
    /// Seconds to wait for an upstream TCP connection.
    #[arg(long, default_value_t = 5)]
    upstream_connect_timeout_secs: u64,
    /// Seconds an idle upstream connection is kept for reuse.
    #[arg(long, default_value_t = 50)]
    upstream_idle_timeout_secs: u64,
    /// How Service backends are dialled: `endpoints` balances over the ready endpoint
    /// addresses, `cluster-ip` dials the Service's cluster IP, `dns` its DNS name.
    #[arg(long, env = "KANALI_UPSTREAM_MODE", value_enum, default_value_t = UpstreamMode::Endpoints)]
    upstream_mode: UpstreamMode,
    /// Cluster DNS domain, for Service names `<svc>.<ns>.svc.<domain>`.
    #[arg(long, env = "KANALI_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Accept upstream certificates issued for another name (the chain is still verified).
    #[arg(long)]
    upstream_tls_insecure_skip_hostname_verification: bool,
    /// `NAME=VALUE`: the value of request header NAME (case-insensitive) for dynamic-Service
    /// labels when a request lacks it; repeatable.
    #[arg(long = "default-header-value", value_name = "NAME=VALUE", value_parser = parse_header_default)]
    default_header_values: Vec<(String, String)>,
    /// Request header that carries API keys for the `apikey` plugin (a route's plugin config
    /// `header` overrides it). The header is never forwarded upstream.
    #[arg(long, env = "KANALI_APIKEY_HEADER", default_value = "apikey", value_parser = parse_header_name)]
    apikey_header: http::HeaderName,
    /// Share rate limits across all proxies through this Redis
    /// (`redis://[user[:password]@]host[:port][/db]`): each proxy counts locally and
    /// synchronises every --rate-limit-sync-ms, so no request waits for Redis. Without it,
    /// each proxy enforces every limit on its own (exact for one proxy). While Redis is down
    /// or slow, limits fall back to per proxy.
    #[arg(long, env = "KANALI_RATE_LIMIT_REDIS")]
    rate_limit_redis: Option<String>,
    /// Prefix of the rate-limit keys in Redis.
    #[arg(
        long,
        env = "KANALI_RATE_LIMIT_REDIS_PREFIX",
        default_value = "kanali:rl:"
    )]
    rate_limit_redis_prefix: String,
    /// Milliseconds between synchronisations with Redis.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=10_000))]
    rate_limit_sync_ms: u64,
    /// Directory of custom plugin modules (`<name>.wasm` or `<name>_<version>.wasm`,
    /// proxy-wasm ABI 0.2.x); checked for changes every --plugins-poll-ms. Without it, routes
    /// with custom plugins answer error 03.
    #[arg(long, env = "KANALI_PLUGINS_DIR")]
    plugins_dir: Option<PathBuf>,
    /// Milliseconds between checks of --plugins-dir for new, changed or removed modules.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    plugins_poll_ms: u64,
    /// WebAssembly instructions one plugin may execute per request (all its callbacks
    /// together); a plugin that needs more gets error 11.
    #[arg(long, default_value_t = 20_000_000, value_parser = clap::value_parser!(u64).range(1000..))]
    plugin_fuel: u64,
    /// Milliseconds one plugin callback may run; a longer one gets error 11.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    plugin_timeout_ms: u64,
    /// Largest memory of one plugin VM, in MiB; growing past it gets error 11.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    plugin_memory_mib: u64,
    /// Responses of a known length up to this many bytes are buffered for plugins'
    /// `proxy_on_response_body`; longer or unsized ones stream without that callback.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u64).range(..=64 * 1024 * 1024))]
    plugin_response_buffer_bytes: u64,
    /// Seconds the proxy keeps accepting after SIGTERM while /readyz fails, so that
    /// kube-proxy and load balancers stop sending it connections before it closes its
    /// listeners; responses meanwhile ask clients to reconnect (HTTP/1.1 `Connection: close`,
    /// HTTP/2 GOAWAY). A second signal exits at once.
    #[arg(long, env = "KANALI_SHUTDOWN_DELAY_SECS", default_value_t = 5)]
    shutdown_delay_secs: u64,
    /// Seconds in-flight requests get to finish once the listeners are closed. The pod's
    /// terminationGracePeriodSeconds must exceed --shutdown-delay-secs plus this.
    #[arg(long, env = "KANALI_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    drain_timeout_secs: u64,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "KANALI_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long, env = "KANALI_LOG_JSON")]
    log_json: bool,
    /// Log a `request details` line for every request (target `kanali::access`, level info):
    /// correlation id, client address, method, host, path without the query, status, Kanali
    /// error code and duration.
    #[arg(long, env = "KANALI_ACCESS_LOG")]
    access_log: bool,
}

/// `--upstream-mode` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum UpstreamMode {
    Endpoints,
    ClusterIp,
    Dns,
}

impl From<UpstreamMode> for AddressMode {
    fn from(mode: UpstreamMode) -> Self {
        match mode {
            UpstreamMode::Endpoints => AddressMode::Endpoints,
            UpstreamMode::ClusterIp => AddressMode::ClusterIp,
            UpstreamMode::Dns => AddressMode::Dns,
        }
    }
}

fn parse_header_default(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

// The request path allocates small, short-lived objects at a high rate (headers, futures);
// mimalloc's thread-local free lists make that measurably cheaper than glibc malloc.
//
// mimalloc is the process's malloc (the workspace builds it with `override`), reached through
// `System`, which asks for plain `malloc` at ordinary alignments. The `mimalloc` crate's own
// allocator asks for every block aligned, and mimalloc serves an aligned block over 1 KiB (a
// header map, say) by over-allocating and aligning inside it: 0.8 % of the instructions per
// request (e2e/bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: std::alloc::System = std::alloc::System;
use mimalloc as _;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Counted for `kanali_log_count`, after the filter: what is logged, not what could be.
    let counted = kanali_proto::exposition::CountLogs;
    if args.log_json {
        logs.json().finish().with(counted).init()
    } else {
        logs.finish().with(counted).init()
    }

    let workers = match args.worker_threads {
        Some(n) => usize::try_from(n)?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // Thread per core: this thread's runtime keeps the subscription, the admin port and the
    // timers, and each worker thread a runtime of its own. Work stealing: every thread takes
    // part in one runtime, which runs everything; one thread alone gets the current-thread
    // runtime, which skips the stealing scheduler's cross-thread bookkeeping.
    let mut runtime = if args.work_stealing && workers > 1 {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let threads = if args.work_stealing {
        Workers::Caller
    } else {
        Workers::PerCore(workers)
    };
    runtime
        .enable_all()
        .build()?
        .block_on(run(args, workers, threads))
}

/// TLS to the controller from the `--controller-*` files, read once at start-up.
fn controller_tls(args: &Args) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
    };
    let Some(ca) = &args.controller_ca_file else {
        return Ok(None);
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&args.controller_cert_file, &args.controller_key_file) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(tls))
}

async fn run(args: Args, workers: usize, threads: Workers) -> anyhow::Result<()> {
    let controller_tls = controller_tls(&args)?;
    let proxy_id = args
        .id
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| format!("proxy-{}", std::process::id()));
    let plugins = WasmConfig {
        dir: args.plugins_dir,
        poll_interval: Duration::from_millis(args.plugins_poll_ms),
        fuel_per_request: args.plugin_fuel,
        call_timeout: Duration::from_millis(args.plugin_timeout_ms),
        memory_limit: usize::try_from(args.plugin_memory_mib * 1024 * 1024)?,
        response_buffer_bytes: usize::try_from(args.plugin_response_buffer_bytes)?,
        // One VM per worker thread.
        vms_per_plugin: workers,
    };
    let config = ProxyConfig {
        listen: args.listen,
        admin_listen: args.admin_listen,
        client: ClientConfig {
            controllers: args.controllers,
            proxy_id: proxy_id.clone(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            tls: controller_tls,
            tls_server_name: args.controller_server_name,
            usage_interval: kanali_dataplane::control::client::USAGE_INTERVAL,
        },
        server: ServerConfig {
            header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
            max_header_bytes: usize::try_from(args.max_header_bytes)?,
            request_buffer_bytes: usize::try_from(args.request_buffer_bytes)?,
            http1_half_close: args.http1_half_close,
            access_log: args.access_log,
            upstream_timeout: Duration::from_secs(args.upstream_timeout_secs),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            http2_keep_alive_interval: (args.http2_keep_alive_interval_secs > 0)
                .then(|| Duration::from_secs(args.http2_keep_alive_interval_secs)),
            http2_keep_alive_timeout: Duration::from_secs(args.http2_keep_alive_timeout_secs),
            tls: match (args.tls_listen, args.tls_cert_file, args.tls_key_file) {
                (Some(listen), Some(cert_file), Some(key_file)) => Some(TlsConfig {
                    listen,
                    cert_file,
                    key_file,
                    client_ca_file: args.tls_client_ca_file,
                    reload_interval: DEFAULT_RELOAD_INTERVAL,
                }),
                // clap requires all three together.
                _ => None,
            },
        },
        upstream: UpstreamConfig {
            connect_timeout: Duration::from_secs(args.upstream_connect_timeout_secs),
            idle_timeout: Duration::from_secs(args.upstream_idle_timeout_secs),
            mode: args.upstream_mode.into(),
            cluster_domain: args.cluster_domain,
            verify_hostname: !args.upstream_tls_insecure_skip_hostname_verification,
            default_header_values: HeaderDefaults::new(args.default_header_values),
            api_key_header: args.apikey_header,
            ..UpstreamConfig::default()
        },
        rate_limits: RateLimitConfig {
            redis: args.rate_limit_redis.map(|url| RedisConfig {
                key_prefix: args.rate_limit_redis_prefix,
                sync_interval: Duration::from_millis(args.rate_limit_sync_ms),
                proxy_id: proxy_id.clone(),
                ..RedisConfig::new(url)
            }),
        },
        plugins,
        workers: threads,
    };
    let leave = ShutdownConfig {
        delay: Duration::from_secs(args.shutdown_delay_secs),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
    };
    let proxy = start(config).await?;
    let mut signals = Signals::new()?;
    signals.next().await;
    tracing::info!(delay = ?leave.delay, drain_timeout = ?leave.drain_timeout, "shutting down");
    tokio::select! {
        () = proxy.shutdown_gracefully(leave) => tracing::info!("drained"),
        // An impatient operator (or a second Ctrl-C) gets an immediate exit.
        () = signals.next() => tracing::warn!("second signal: exiting without draining"),
    }
    Ok(())
}

fn parse_header_name(v: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(v.as_bytes()).map_err(|_| format!("{v:?} is not a header name"))
}

/// SIGTERM (what Kubernetes sends) and SIGINT (Ctrl-C), as one stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
