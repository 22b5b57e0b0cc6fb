//! `kanali-controller`: compiles ApiProxies, MockTargets, ApiKeys and ApiKeyBindings into routing
//! snapshots and streams them to proxies.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use kanali_controller::keys::KeySource;
use kanali_controller::lease::LeaseConfig;
use kanali_controller::source::watch::Debounce;
use kanali_controller::{
    ClusterConfig, GrpcTls, StandaloneConfig, start_cluster, start_standalone,
};

// Compile allocates and frees millions of small values for a hundred thousand ApiKeys;
// mimalloc's thread-local free lists make that about twice as fast as glibc malloc.
// Through `System`, with mimalloc as the process's malloc: see kanali-proxy.rs for why.
#[global_allocator]
static ALLOCATOR: std::alloc::System = std::alloc::System;
use mimalloc as _;

/// Kanali controller.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Standalone mode: read every *.yaml/*.yml in this directory (and watch it) instead of a
    /// Kubernetes cluster.
    #[arg(long, env = "KANALI_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Standalone mode: rescan once the directory has had no change for this many
    /// milliseconds (and at most 5x that after the first change). Lower it for tools that
    /// rewrite the directory often; editors write a file in several steps.
    #[arg(
        long,
        env = "KANALI_MANIFESTS_DEBOUNCE_MS",
        default_value_t = 100,
        value_parser = clap::value_parser!(u64).range(1..=60_000)
    )]
    manifests_debounce_ms: u64,
    /// Address of the gRPC server proxies subscribe to.
    #[arg(long, env = "KANALI_GRPC_LISTEN", default_value = "127.0.0.1:9443")]
    grpc_listen: SocketAddr,
    /// PEM certificate (chain) for the gRPC listener; with --grpc-tls-key-file, proxies must
    /// connect over TLS (`https://` controller URLs). Snapshots carry upstream private keys:
    /// use TLS wherever the stream leaves a trusted host.
    #[arg(
        long,
        env = "KANALI_GRPC_TLS_CERT_FILE",
        requires = "grpc_tls_key_file"
    )]
    grpc_tls_cert_file: Option<PathBuf>,
    /// PEM private key for --grpc-tls-cert-file.
    #[arg(
        long,
        env = "KANALI_GRPC_TLS_KEY_FILE",
        requires = "grpc_tls_cert_file"
    )]
    grpc_tls_key_file: Option<PathBuf>,
    /// PEM CA: proxies must present a client certificate it issued (mutual TLS).
    #[arg(
        long,
        env = "KANALI_GRPC_CLIENT_CA_FILE",
        requires = "grpc_tls_cert_file"
    )]
    grpc_client_ca_file: Option<PathBuf>,
    /// Address of the admin server (/status, /healthz, /readyz).
    #[arg(long, env = "KANALI_ADMIN_LISTEN", default_value = "127.0.0.1:9080")]
    admin_listen: SocketAddr,
    /// Cluster mode: only watch this namespace (default: all). ApiKeys are cluster-scoped and
    /// always watched.
    #[arg(long, env = "KANALI_NAMESPACE")]
    namespace: Option<String>,
    /// Cluster mode: identity in the leader Lease (default: $POD_NAME, else the host name).
    #[arg(long, env = "KANALI_IDENTITY")]
    identity: Option<String>,
    /// Cluster mode: namespace of the leader Lease (default: $POD_NAMESPACE, else kanali-system).
    #[arg(long, env = "KANALI_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Cluster mode: seconds a leader's Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
    /// PEM RSA private key (PKCS#1 or PKCS#8) that decrypts ApiKeys, re-read when the file
    /// changes. Without it (or --decryption-key-secret) the controller runs, and every ApiKey
    /// says it cannot be used.
    #[arg(
        long,
        env = "KANALI_DECRYPTION_KEY_FILE",
        conflicts_with = "decryption_key_secret"
    )]
    decryption_key_file: Option<PathBuf>,
    /// Cluster mode: the Secret NAMESPACE/NAME whose data key `key.pem` holds that private key
    /// (as `kanalictl keypair generate` makes it); watched, so a replaced key applies at once.
    #[arg(long, env = "KANALI_DECRYPTION_KEY_SECRET", value_parser = parse_secret_ref)]
    decryption_key_secret: Option<(String, String)>,
    /// Cluster mode: the shortest time, in seconds, between two writes of one ApiKey's
    /// `status.revisions[].lastUsed` (the proxies report use every few seconds).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    key_usage_interval_secs: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `kanali_controller=debug`.
    #[arg(long, env = "KANALI_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "KANALI_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log, args.log_json)?;
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
    };
    let grpc_tls = match (&args.grpc_tls_cert_file, &args.grpc_tls_key_file) {
        (Some(cert), Some(key)) => Some(GrpcTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: args.grpc_client_ca_file.as_ref().map(read).transpose()?,
        }),
        _ => None,
    };
    let decryption = match (args.decryption_key_file, args.decryption_key_secret) {
        (Some(path), _) => KeySource::File(path),
        (None, Some((namespace, name))) => {
            if args.manifests.is_some() {
                anyhow::bail!(
                    "--decryption-key-secret needs cluster mode; in standalone mode use --decryption-key-file"
                );
            }
            KeySource::Secret { namespace, name }
        }
        (None, None) => KeySource::None,
    };
    let controller = match args.manifests {
        Some(manifests) => {
            start_standalone(StandaloneConfig {
                manifests,
                grpc_listen: args.grpc_listen,
                admin_listen: args.admin_listen,
                debounce: Debounce {
                    quiet: Duration::from_millis(args.manifests_debounce_ms),
                    max_delay: Duration::from_millis(args.manifests_debounce_ms * 5),
                    ..Debounce::default()
                },
                grpc_tls,
                decryption,
            })
            .await?
        }
        None => {
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!("cannot reach Kubernetes ({e}); set KUBECONFIG, run in a pod, or pass --manifests DIR for standalone mode")
            })?;
            let identity = args
                .identity
                .or_else(|| std::env::var("POD_NAME").ok())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_owned())
                })
                .unwrap_or_else(|| format!("kanali-controller-{}", std::process::id()));
            let lease_namespace = args
                .lease_namespace
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "kanali-system".to_owned());
            let duration = Duration::from_secs(args.lease_duration_secs.max(2));
            start_cluster(
                client,
                ClusterConfig {
                    namespace: args.namespace,
                    grpc_listen: args.grpc_listen,
                    admin_listen: args.admin_listen,
                    grpc_tls,
                    decryption,
                    key_usage_interval: Duration::from_secs(args.key_usage_interval_secs),
                    lease: LeaseConfig {
                        name: "kanali-controller".to_owned(),
                        namespace: lease_namespace,
                        identity,
                        duration,
                        renew_every: duration / 3,
                    },
                    // A kubectl apply of many objects arrives as a burst of events within a
                    // few ms; 5 ms of quiet catches most of a burst without adding much to
                    // the apply-to-serving latency (goal: p99 < 100 ms).
                    debounce: Debounce {
                        quiet: Duration::from_millis(5),
                        max_delay: Duration::from_millis(50),
                        resync: Duration::from_secs(300),
                    },
                },
            )
            .await?
        }
    };
    shutdown_signal().await;
    tracing::info!("shutting down");
    controller.shutdown().await;
    Ok(())
}

fn parse_secret_ref(v: &str) -> Result<(String, String), String> {
    match v.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("{v:?} is not NAMESPACE/NAME")),
    }
}

fn init_logging(filter: &str, json: bool) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Counted for `kanali_log_count`, after the filter: what is logged, not what could be.
    let counted = kanali_proto::exposition::CountLogs;
    if json {
        builder.json().finish().with(counted).init()
    } else {
        builder.finish().with(counted).init()
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
