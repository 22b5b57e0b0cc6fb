//! The Kanali controller.
//!
//! Data flow: a source ([`source::file`] in standalone mode, the cluster in issue #3) produces
//! the current objects; the pure [`compile`] turns them into a routing snapshot plus one
//! diagnostic per object; [`state::Shared`] publishes the snapshot, which [`serve`] streams to
//! every proxy (latest wins) while recording their ACK/NACK; [`admin`] shows it all as JSON.

pub mod admin;
pub mod compile;
pub mod serve;
pub mod source;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use source::file::{FileSource, Scan};
use source::watch::Debounce;
use state::Shared;

/// Settings for standalone mode.
#[derive(Clone, Debug)]
pub struct StandaloneConfig {
    /// Directory of YAML manifests.
    pub manifests: PathBuf,
    /// gRPC listen address for proxies.
    pub grpc_listen: SocketAddr,
    /// Admin HTTP listen address.
    pub admin_listen: SocketAddr,
    /// File-event debouncing.
    pub debounce: Debounce,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The manifests directory could not be read.
    #[error("cannot read manifests directory {dir}: {source}")]
    Manifests {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
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
}

/// A running controller.
pub struct Controller {
    /// Where proxies connect.
    pub grpc_addr: SocketAddr,
    /// Where the admin endpoints are.
    pub admin_addr: SocketAddr,
    /// The shared state (snapshot, diagnostics, proxies).
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Controller {
    /// Stops serving: open proxy streams end, listeners close, the watcher stops.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn publish(shared: &Shared, scan: Scan) {
    let compiled = compile::compile(&scan.objects);
    for d in compiled.diagnostics.iter().filter(|d| !d.is_ok()) {
        let ready = d.ready();
        tracing::warn!(object = %d.object, reason = %ready.reason, message = %ready.message, "object not ready");
    }
    for ignored in &scan.ignored {
        tracing::info!(%ignored, "skipped document");
    }
    shared.publish(compiled, scan.errors, scan.ignored);
}

/// Starts standalone mode: reads the manifests directory, compiles it, serves proxies, and
/// recompiles whenever a file changes.
pub async fn start_standalone(config: StandaloneConfig) -> Result<Controller, StartError> {
    let mut source = FileSource::new(&config.manifests);
    let scan = source.scan().map_err(|source| StartError::Manifests {
        dir: config.manifests.clone(),
        source,
    })?;
    let shared = Arc::new(Shared::default());
    publish(&shared, scan);

    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let grpc = bind("gRPC", config.grpc_listen).await?;
    let admin = bind("admin", config.admin_listen).await?;
    let grpc_addr = grpc.local_addr().map_err(|source| StartError::Bind {
        what: "gRPC",
        addr: config.grpc_listen,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        what: "admin",
        addr: config.admin_listen,
        source,
    })?;
    let (shutdown, shutdown_rx) = watch::channel(false);

    let mut tasks = Vec::new();
    let watch_shared = shared.clone();
    tasks.push(tokio::spawn(source::watch::watch_dir(
        source,
        config.debounce,
        move |scan| publish(&watch_shared, scan),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(admin::serve(
        admin,
        shared.clone(),
        shutdown_rx.clone(),
    )));
    let service = serve::SnapshotServer::new(shared.clone(), shutdown_rx.clone());
    let mut stop = shutdown_rx;
    tasks.push(tokio::spawn(async move {
        let incoming = TcpListenerStream::new(grpc);
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));
    tracing::info!(%grpc_addr, %admin_addr, dir = %config.manifests.display(), "controller running in standalone mode");
    Ok(Controller {
        grpc_addr,
        admin_addr,
        shared,
        shutdown,
        tasks,
    })
}
