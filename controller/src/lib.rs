//! The Kanali controller.
//!
//! Data flow: a source ([`source::file`] in standalone mode, the cluster in issue #3) produces
//! the current objects; the pure [`compile`] turns them into a routing snapshot plus one
//! diagnostic per object; [`state::Shared`] publishes the snapshot, which [`serve`] streams to
//! every proxy (latest wins) while recording their ACK/NACK; [`admin`] shows it all as JSON.

pub mod admin;
pub mod compile;
pub mod crypto;
pub mod keys;
pub mod lease;
pub mod peers;
pub mod serve;
pub mod source;
pub mod state;
pub mod status;
pub mod usage;

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
    /// TLS for the gRPC listener; `None`: plaintext.
    pub grpc_tls: Option<GrpcTls>,
    /// Where the RSA key that decrypts ApiKeys comes from (a file here).
    pub decryption: keys::KeySource,
}

/// How often a decryption key file is checked for a new key.
const KEY_FILE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// TLS for the snapshot stream. Snapshots carry the private keys of upstream client
/// certificates, so outside a trusted loopback the stream should be encrypted, and with a
/// client CA only proxies holding a certificate from it may subscribe.
#[derive(Clone, Debug)]
pub struct GrpcTls {
    /// PEM certificate chain of the controller.
    pub cert_pem: Vec<u8>,
    /// PEM private key of that certificate.
    pub key_pem: Vec<u8>,
    /// PEM CA certificates; when set, proxies must present a client certificate they issued.
    pub client_ca_pem: Option<Vec<u8>>,
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
    /// The gRPC TLS certificate, key or client CA is unusable.
    #[error("gRPC TLS: {0}")]
    GrpcTls(String),
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

/// Decrypts what is new, then compiles and publishes.
async fn decrypt_and_publish(
    shared: &Shared,
    vault: &keys::SharedVault,
    compiler: &mut compile::Compiler,
    scan: &mut Scan,
) {
    scan.objects.decrypted = keys::decrypt(vault, scan.objects.api_keys.clone()).await;
    publish(shared, compiler, scan);
}

fn publish(shared: &Shared, compiler: &mut compile::Compiler, scan: &Scan) {
    let started = std::time::Instant::now();
    let compiled = compiler.compile(&scan.objects);
    tracing::debug!(elapsed = ?started.elapsed(), routes = compiled.snapshot.routes.len(),
        reused = compiler.reused(), "compiled");
    for d in compiled.diagnostics.iter().filter(|d| !d.is_ok()) {
        let ready = d.ready();
        tracing::warn!(object = %d.object, reason = %ready.reason, message = %ready.message, "object not ready");
    }
    for ignored in &scan.ignored {
        tracing::info!(%ignored, "skipped document");
    }
    shared.publish(compiled, scan.errors.clone(), scan.ignored.clone());
}

/// Binds the gRPC and admin listeners and serves them until shutdown.
async fn serve_all(
    shared: &Arc<Shared>,
    grpc_listen: SocketAddr,
    admin_listen: SocketAddr,
    grpc_tls: Option<&GrpcTls>,
    leader: Option<watch::Receiver<bool>>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(SocketAddr, SocketAddr, Vec<JoinHandle<()>>), StartError> {
    let mut server = tonic::transport::Server::builder()
        // Proxies hold one stream for hours: keepalives notice a vanished proxy.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)));
    if let Some(tls) = grpc_tls {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        // tonic reports unusable PEM as a bare "transport error": check it here, by name.
        compile::upstream::key_pair(&tls.cert_pem, &tls.key_pem)
            .map_err(|e| StartError::GrpcTls(format!("certificate and key: {e}")))?;
        if let Some(ca) = &tls.client_ca_pem {
            compile::upstream::parse_certs(ca)
                .map_err(|e| StartError::GrpcTls(format!("client CA: {e}")))?;
        }
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        server = server
            .tls_config(config)
            .map_err(|e| StartError::GrpcTls(e.to_string()))?;
    }
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let grpc = bind("gRPC", grpc_listen).await?;
    let admin = bind("admin", admin_listen).await?;
    let local = |l: &TcpListener, what, addr| {
        l.local_addr()
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let grpc_addr = local(&grpc, "gRPC", grpc_listen)?;
    let admin_addr = local(&admin, "admin", admin_listen)?;
    let mut tasks = vec![tokio::spawn(admin::serve(
        admin,
        shared.clone(),
        leader,
        shutdown.clone(),
    ))];
    let service = serve::SnapshotServer::new(shared.clone(), shutdown.clone());
    let mut stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let incoming = TcpListenerStream::new(grpc);
        let result = server
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));
    Ok((grpc_addr, admin_addr, tasks))
}

/// Starts standalone mode: reads the manifests directory, compiles it, serves proxies, and
/// recompiles whenever a file changes.
pub async fn start_standalone(config: StandaloneConfig) -> Result<Controller, StartError> {
    let mut source = FileSource::new(&config.manifests);
    let mut scan = source.scan().map_err(|source| StartError::Manifests {
        dir: config.manifests.clone(),
        source,
    })?;
    let shared = Arc::new(Shared::default());
    let vault = Arc::new(std::sync::Mutex::new(keys::KeyVault::new(
        config.decryption.clone(),
    )));
    if let keys::KeySource::File(path) = &config.decryption {
        let pem = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the decryption key file {}: {e}",
                path.display()
            )
        });
        keys::lock(&vault).set_key(pem.as_deref().map_err(Clone::clone));
    }
    let mut compiler = compile::Compiler::default();
    decrypt_and_publish(&shared, &vault, &mut compiler, &mut scan).await;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let (grpc_addr, admin_addr, mut tasks) = serve_all(
        &shared,
        config.grpc_listen,
        config.admin_listen,
        config.grpc_tls.as_ref(),
        None,
        &shutdown_rx,
    )
    .await?;
    // A newer scan than the last compiled, handed over rather than copied: a scan holds
    // every object, and copying it was a tenth of a change's work.
    let newer = Arc::new(std::sync::Mutex::new(None::<Scan>));
    let arrived = Arc::new(tokio::sync::Notify::new());
    tasks.push(tokio::spawn(source::watch::watch_dir(
        source,
        config.debounce,
        {
            let (newer, arrived) = (newer.clone(), arrived.clone());
            move |scan| {
                *newer.lock().unwrap_or_else(|p| p.into_inner()) = Some(scan);
                arrived.notify_one();
            }
        },
        shutdown_rx.clone(),
    )));
    let (rekeyed, mut rekeys) = watch::channel(());
    if let keys::KeySource::File(path) = &config.decryption {
        let rekeyed = rekeyed.clone();
        tasks.push(tokio::spawn(keys::watch_file(
            path.clone(),
            vault.clone(),
            KEY_FILE_INTERVAL,
            move || {
                rekeyed.send_replace(());
            },
            shutdown_rx.clone(),
        )));
    }
    let compile_shared = shared.clone();
    let mut stop = shutdown_rx;
    tasks.push(tokio::spawn(async move {
        // Held here, so `rekeys` stays open even without a key file to watch.
        let _rekeyed = rekeyed;
        // The last scan is kept: a new decryption key recompiles it.
        loop {
            tokio::select! {
                () = arrived.notified() => {}
                changed = rekeys.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            let taken = newer.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(taken) = taken {
                scan = taken;
            }
            decrypt_and_publish(&compile_shared, &vault, &mut compiler, &mut scan).await;
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

/// Settings for cluster mode.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Only watch this namespace (ApiKeys are cluster-scoped and always watched).
    pub namespace: Option<String>,
    /// gRPC listen address for proxies.
    pub grpc_listen: SocketAddr,
    /// Admin HTTP listen address.
    pub admin_listen: SocketAddr,
    /// Leader election (only the leader writes status).
    pub lease: lease::LeaseConfig,
    /// Event debouncing: compile once events stop for `quiet`, at most `max_delay` after the
    /// first.
    pub debounce: Debounce,
    /// TLS for the gRPC listener; `None`: plaintext.
    pub grpc_tls: Option<GrpcTls>,
    /// Where the RSA key that decrypts ApiKeys comes from.
    pub decryption: keys::KeySource,
    /// The shortest time between two writes of one ApiKey's usage to its status.
    pub key_usage_interval: std::time::Duration,
}

/// Starts cluster mode: watches the API server, compiles on every (debounced) change, serves
/// proxies, campaigns for the Lease and, while holding it, writes status.
pub async fn start_cluster(
    client: kube::Client,
    config: ClusterConfig,
) -> Result<Controller, StartError> {
    let shared = Arc::new(Shared::default());
    let cache = Arc::new(source::kube::Cache::default());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks =
        source::kube::spawn_watchers(&client, config.namespace.as_deref(), &cache, &shutdown_rx)
            .await;
    // Made here, so that the admin port can say whether this replica leads.
    let (leader, leader_rx) = watch::channel(false);
    let (grpc_addr, admin_addr, served) = serve_all(
        &shared,
        config.grpc_listen,
        config.admin_listen,
        config.grpc_tls.as_ref(),
        Some(leader_rx.clone()),
        &shutdown_rx,
    )
    .await?;
    tasks.extend(served);
    let vault = Arc::new(std::sync::Mutex::new(keys::KeyVault::new(
        config.decryption.clone(),
    )));
    let wake = {
        let cache = cache.clone();
        move || cache.changed.notify_one()
    };
    match &config.decryption {
        keys::KeySource::None => {}
        keys::KeySource::File(path) => tasks.push(tokio::spawn(keys::watch_file(
            path.clone(),
            vault.clone(),
            KEY_FILE_INTERVAL,
            wake,
            shutdown_rx.clone(),
        ))),
        keys::KeySource::Secret { namespace, name } => {
            tasks.push(tokio::spawn(keys::watch_secret(
                client.clone(),
                namespace.clone(),
                name.clone(),
                vault.clone(),
                wake,
                shutdown_rx.clone(),
            )))
        }
    }
    tasks.push(tokio::spawn(compile_loop(
        cache.clone(),
        shared.clone(),
        vault,
        config.debounce,
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(lease::run(
        client.clone(),
        config.lease.clone(),
        leader,
        shutdown_rx.clone(),
    )));
    let peers = peers::PeerConfig {
        namespace: config.lease.namespace.clone(),
        identity: config.lease.identity.clone(),
        ttl: config.lease.duration,
    };
    tasks.push(tokio::spawn(peers::run_reporter(
        client.clone(),
        peers.clone(),
        shared.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(usage::run_writer(
        client.clone(),
        cache.clone(),
        shared.clone(),
        config.key_usage_interval,
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(status::run_writer(
        client,
        cache,
        shared.clone(),
        peers,
        leader_rx,
        shutdown_rx,
    )));
    tracing::info!(%grpc_addr, %admin_addr, namespace = ?config.namespace, identity = %config.lease.identity,
        "controller running in cluster mode");
    Ok(Controller {
        grpc_addr,
        admin_addr,
        shared,
        shutdown,
        tasks,
    })
}

/// How long the first compile waits for every kind's initial list.
const SYNC_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

async fn compile_loop(
    cache: Arc<source::kube::Cache>,
    shared: Arc<Shared>,
    vault: keys::SharedVault,
    debounce: Debounce,
    mut shutdown: watch::Receiver<bool>,
) {
    // No snapshot before every kind is listed: a half-listed cluster would look like
    // missing MockTargets and Services, and proxies would serve errors for them. A kind that
    // cannot be listed at all (e.g. forbidden) must not hold everything else back forever:
    // after a grace period, compile says which routes lack it (error 09 for Services).
    let grace = tokio::time::Instant::now() + SYNC_GRACE;
    while !cache.synced() {
        tokio::select! {
            () = cache.changed.notified() => {}
            () = tokio::time::sleep_until(grace) => {
                tracing::error!(unsynced = ?cache.unsynced(), grace = ?SYNC_GRACE,
                    "these kinds could not be listed; compiling without them");
                break;
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
    let mut compiler = compile::Compiler::default();
    loop {
        let mut scan = Scan {
            objects: cache.objects(),
            ..Scan::default()
        };
        decrypt_and_publish(&shared, &vault, &mut compiler, &mut scan).await;
        tokio::select! {
            () = cache.changed.notified() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let deadline = tokio::time::Instant::now() + debounce.max_delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep(debounce.quiet) => break,
                () = tokio::time::sleep_until(deadline) => break,
                () = cache.changed.notified() => {}
            }
        }
    }
}
