//! `kanali-proxy`: subscribes to the Kanali controller and serves API traffic.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use kanali_dataplane::client::ClientConfig;
use kanali_dataplane::server::ServerConfig;
use kanali_dataplane::upstream::UpstreamConfig;
use kanali_dataplane::{ProxyConfig, start};

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
    /// Traffic listener (HTTP/1.1 and HTTP/2 cleartext).
    #[arg(long, env = "KANALI_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin listener (/healthz, /readyz, /version).
    #[arg(long, env = "KANALI_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    admin_listen: SocketAddr,
    /// Worker threads; default: one per core.
    #[arg(long, env = "KANALI_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Identity reported to the controller; default: $POD_NAME, else the host name.
    #[arg(long, env = "KANALI_PROXY_ID")]
    id: Option<String>,
    /// Seconds a client has to send the request head.
    #[arg(long, default_value_t = 10)]
    header_read_timeout_secs: u64,
    /// Largest request head in bytes (at least 8192); larger ones get 431.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u64).range(8192..=16 * 1024 * 1024))]
    max_header_bytes: u64,
    /// Seconds an upstream has to start answering before the request fails with error 08.
    #[arg(long, default_value_t = 60)]
    upstream_timeout_secs: u64,
    /// Seconds to wait for an upstream TCP connection.
    #[arg(long, default_value_t = 5)]
    upstream_connect_timeout_secs: u64,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "KANALI_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines.
    #[arg(long, env = "KANALI_LOG_JSON")]
    log_json: bool,
}

// The request path allocates small, short-lived objects at a high rate (headers, futures);
// mimalloc's thread-local free lists make that measurably cheaper than glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        logs.json().init()
    } else {
        logs.init()
    }

    // One worker: a current-thread runtime, which skips the work-stealing scheduler's
    // cross-thread bookkeeping (measurably faster when pinned to one core).
    let mut runtime = match args.worker_threads {
        Some(0) => anyhow::bail!("--worker-threads must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
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
    let config = ProxyConfig {
        listen: args.listen,
        admin_listen: args.admin_listen,
        client: ClientConfig {
            controllers: args.controllers,
            proxy_id,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        },
        server: ServerConfig {
            header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
            max_header_bytes: usize::try_from(args.max_header_bytes)?,
            upstream_timeout: Duration::from_secs(args.upstream_timeout_secs),
        },
        upstream: UpstreamConfig {
            connect_timeout: Duration::from_secs(args.upstream_connect_timeout_secs),
            ..UpstreamConfig::default()
        },
    };
    let proxy = start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    proxy.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
