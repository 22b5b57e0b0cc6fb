//! `kanali-controller`: compiles ApiProxies, MockTargets, ApiKeys and ApiKeyBindings into routing
//! snapshots and streams them to proxies.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kanali_controller::source::watch::Debounce;
use kanali_controller::{StandaloneConfig, start_standalone};

/// Kanali controller.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Standalone mode: read every *.yaml/*.yml in this directory (and watch it) instead of a
    /// Kubernetes cluster.
    #[arg(long, env = "KANALI_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Address of the gRPC server proxies subscribe to.
    #[arg(long, env = "KANALI_GRPC_LISTEN", default_value = "127.0.0.1:9443")]
    grpc_listen: SocketAddr,
    /// Address of the admin server (/status, /healthz, /readyz).
    #[arg(long, env = "KANALI_ADMIN_LISTEN", default_value = "127.0.0.1:9080")]
    admin_listen: SocketAddr,
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
    let Some(manifests) = args.manifests else {
        anyhow::bail!("cluster mode is not available yet: pass --manifests DIR to run standalone");
    };
    let controller = start_standalone(StandaloneConfig {
        manifests,
        grpc_listen: args.grpc_listen,
        admin_listen: args.admin_listen,
        debounce: Debounce::default(),
    })
    .await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    controller.shutdown().await;
    Ok(())
}

fn init_logging(filter: &str, json: bool) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init()
    } else {
        builder.init()
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
