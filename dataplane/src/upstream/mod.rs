//! Where proxied requests go: the registry that hands every table the same connection pools
//! ([`HostPool`], one per address) and Service backends ([`ServiceBackend`], one per Service
//! port), the TLS configurations built from the snapshot's material, and the settings that
//! decide how a Service is dialled.
//!
//! The registry's maps are only touched when a snapshot is applied and by the sweep, once a
//! second on a blocking thread; the request path holds `Arc`s and never takes its locks.

pub mod balance;
pub mod dynamic;
pub mod pool;
pub mod tls;

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use http::Request;
use http::uri::Authority;
use kanali_proto::v1 as pb;
use rustls::ClientConfig;

use crate::body::RequestBody;
use crate::headers::Added;
use crate::upstream::balance::{ServiceBackend, ServiceKey};
use crate::upstream::dynamic::HeaderDefaults;
use crate::upstream::pool::{HostPool, PoolKey, PoolSettings, Sent, SweepList};
use crate::upstream::tls::{TlsContext, TlsError};

/// How a Service's address is chosen (`--upstream-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AddressMode {
    /// Balance over the ready endpoint addresses shipped in the snapshot.
    #[default]
    Endpoints,
    /// Dial the Service's cluster IP (kube-proxy balances); headless Services fall back to
    /// endpoints.
    ClusterIp,
    /// Dial `<svc>.<ns>.svc.<cluster-domain>`, resolved by the system resolver.
    Dns,
}

/// Upstream connection settings.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// TCP connect (and TLS handshake) timeout.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection may be reused.
    pub idle_timeout: Duration,
    /// Idle connections kept per upstream address.
    pub max_idle_per_host: usize,
    /// How Services are dialled.
    pub mode: AddressMode,
    /// Cluster DNS suffix in `<svc>.<ns>.svc.<cluster-domain>`.
    pub cluster_domain: String,
    /// Check that upstream certificates are issued for the name dialled.
    pub verify_hostname: bool,
    /// Values for dynamic-Service header labels when a request lacks the header.
    pub default_header_values: HeaderDefaults,
    /// The header that carries API keys, unless a route's `apikey` plugin names another.
    pub api_key_header: http::HeaderName,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            // Below the common 60-75 s keep-alive of upstream servers, so we rarely reuse a
            // connection the server is about to close.
            idle_timeout: Duration::from_secs(50),
            max_idle_per_host: 256,
            mode: AddressMode::Endpoints,
            cluster_domain: "cluster.local".to_owned(),
            verify_hostname: true,
            default_header_values: HeaderDefaults::default(),
            api_key_header: crate::filter::api_key::DEFAULT_HEADER,
        }
    }
}

/// Why an upstream request failed (every variant becomes error 08 for the client).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TLS could not be set up.
    #[error("cannot set up upstream TLS: {0}")]
    Tls(#[from] TlsError),
    /// Connecting (TCP or TLS) failed.
    #[error("cannot connect to {upstream}: {source}")]
    Connect {
        /// The address dialled.
        upstream: Box<str>,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Connecting took too long.
    #[error("connecting to {0} timed out")]
    ConnectTimeout(Box<str>),
    /// The HTTP exchange failed.
    #[error("request to {upstream} failed: {source}")]
    Http {
        /// The address dialled.
        upstream: Box<str>,
        /// What went wrong.
        source: hyper::Error,
    },
    /// The HTTP/1.1 exchange failed.
    #[error("request to {upstream} failed: {source}")]
    H1 {
        /// The address dialled.
        upstream: Box<str>,
        /// What went wrong.
        source: crate::h1::H1Error,
    },
    /// The Service has no ready endpoint.
    #[error("{0} has no ready endpoint")]
    NoAddresses(String),
    /// The request could not be put into the upstream's protocol.
    #[error("{0}")]
    Request(String),
}

impl UpstreamError {
    /// Whether nothing reached the upstream, so another address may be tried.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. } | UpstreamError::ConnectTimeout(_)
        )
    }
}

/// Where a route sends: one fixed address, or a Service's balanced set.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// An `endpoint` backend.
    Host(Arc<HostPool>),
    /// A Service backend.
    Service(Arc<ServiceBackend>),
}

impl Upstream {
    /// The upstream as it is known (for the `Host` fallback and logs).
    pub fn authority(&self) -> &Authority {
        match self {
            Upstream::Host(pool) => pool.authority(),
            Upstream::Service(service) => service.authority(),
        }
    }

    /// Sends `req` (origin-form URI, headers final) with the headers `added` beside its map,
    /// and returns the response head, with the balancer's in-flight guard for a Service (keep
    /// it until the body is done).
    pub fn send(
        &self,
        req: Request<RequestBody>,
        added: Option<Added>,
    ) -> impl Future<Output = Result<Sent, UpstreamError>> + Send + use<> {
        use futures_util::future::Either;
        // Not an `async fn`: see `HostPool::send`.
        match self {
            Upstream::Host(pool) => Either::Left(pool.send(req, added, None)),
            Upstream::Service(service) => Either::Right(service.send(req, added)),
        }
    }
}

/// The TLS configurations of one snapshot, by material id.
#[derive(Debug)]
pub struct TlsSet {
    default: Arc<ClientConfig>,
    by_id: HashMap<String, Result<Arc<ClientConfig>, String>>,
}

impl TlsSet {
    /// The configuration for material `id` (empty: the default one), or why it is unusable.
    pub fn get(&self, id: &str) -> Result<Arc<ClientConfig>, String> {
        if id.is_empty() {
            return Ok(self.default.clone());
        }
        match self.by_id.get(id) {
            Some(Ok(config)) => Ok(config.clone()),
            Some(Err(e)) => Err(format!("TLS material {id}: {e}")),
            None => Err(format!("TLS material {id} is not in the snapshot")),
        }
    }
}

/// Creates the pools and Service backends and hands the same ones to every table that needs
/// them.
pub struct Upstreams {
    config: UpstreamConfig,
    tls: TlsContext,
    default_tls: Arc<ClientConfig>,
    tls_cache: Mutex<HashMap<String, Arc<ClientConfig>>>,
    pools: Mutex<HashMap<PoolKey, Weak<HostPool>, FastHash>>,
    /// Every pool a table used at the last prune, with when: see [`POOL_LINGER`].
    lingering: Mutex<HashMap<PoolKey, (Arc<HostPool>, Instant), FastHash>>,
    services: Mutex<HashMap<ServiceKey, Weak<ServiceBackend>, FastHash>>,
    /// The pools with idle connections, for [`Upstreams::sweep`].
    sweep_list: Arc<SweepList>,
    /// How many workers keep idle connections apart (see [`crate::workers`]).
    workers: usize,
}

/// The hasher of the registry's maps, which a prune walks whole: SipHash over every pool's key
/// was most of it. The keys come from the controller's snapshots, not from the network.
type FastHash = foldhash::fast::RandomState;

/// How long a pool stays after the last table that used it is gone, with its idle
/// connections: an upstream that comes back meanwhile (endpoints that flap, a route moved
/// there and back) finds them warm instead of reconnecting on every snapshot.
pub const POOL_LINGER: Duration = Duration::from_secs(30);

/// How often [`Upstreams::sweep`] runs. An upstream that closes an idle connection — its own
/// keep-alive timeout, a pod shutting down — gets the proxy's side closed within this: soon
/// enough that the peer is still there to acknowledge it.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Every how many sweeps the pools are also pruned ([`Upstreams::prune`]), besides at each
/// update: pruning visits every pool (1.3 ms at 10 000, 14 ms at 50 000), so a pool lingers
/// [`POOL_LINGER`] plus up to this many sweep intervals.
pub const PRUNE_EVERY: u64 = 10;

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gets the live value for `key`, or makes one; the map holds only weak references, so what no
/// table uses any more goes away.
fn get_or_make<K: Eq + Hash, V>(
    map: &Mutex<HashMap<K, Weak<V>, FastHash>>,
    key: K,
    make: impl FnOnce() -> Result<V, String>,
) -> Result<Arc<V>, String> {
    let mut map = lock(map);
    if let Some(v) = map.get(&key).and_then(Weak::upgrade) {
        return Ok(v);
    }
    let v = Arc::new(make()?);
    map.insert(key, Arc::downgrade(&v));
    Ok(v)
}

impl Upstreams {
    /// Loads the system roots and builds the default TLS configuration.
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        Self::for_workers(config, 1)
    }

    /// [`Upstreams::new`], for a proxy whose connections `workers` worker threads serve: each
    /// keeps idle upstream connections of its own, `max_idle_per_host` shared out among them.
    pub fn for_workers(config: UpstreamConfig, workers: usize) -> Result<Self, UpstreamError> {
        let tls = TlsContext::new(config.verify_hostname);
        let default_tls = tls.default_config()?;
        Ok(Upstreams {
            config,
            tls,
            default_tls,
            tls_cache: Mutex::new(HashMap::new()),
            pools: Mutex::default(),
            lingering: Mutex::default(),
            services: Mutex::default(),
            sweep_list: Arc::new(SweepList::new()),
            workers: workers.max(1),
        })
    }

    /// The settings this proxy runs with.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// A pool with this proxy's settings, listed for the sweep when a connection goes idle in
    /// it: every pool is made here, so none holds connections the sweep never sees.
    fn new_pool(&self, key: PoolKey, tls: Option<Arc<ClientConfig>>) -> Result<HostPool, String> {
        HostPool::new(key, tls, self.settings())
            .map(|pool| pool.swept_from(self.sweep_list.clone()))
    }

    fn settings(&self) -> PoolSettings {
        PoolSettings {
            connect_timeout: self.config.connect_timeout,
            idle_timeout: self.config.idle_timeout,
            max_idle: self.config.max_idle_per_host,
            workers: self.workers,
        }
    }

    /// The TLS configurations for `materials`; material seen before (same id) is not parsed
    /// again.
    pub fn tls_set(&self, materials: &[pb::TlsMaterial]) -> TlsSet {
        let cache = lock(&self.tls_cache);
        let by_id = materials
            .iter()
            .map(|m| {
                let config = match cache.get(&m.id) {
                    Some(config) => Ok(config.clone()),
                    None => self.tls.config(m).map_err(|e| e.to_string()),
                };
                (m.id.clone(), config)
            })
            .collect();
        TlsSet {
            default: self.default_tls.clone(),
            by_id,
        }
    }

    /// Remembers the usable configurations of an applied snapshot, and forgets the rest.
    pub fn keep_tls(&self, set: &TlsSet) {
        let mut cache = lock(&self.tls_cache);
        cache.clear();
        for (id, config) in &set.by_id {
            if let Ok(config) = config {
                cache.insert(id.clone(), config.clone());
            }
        }
    }

    /// The pool for an `endpoint` backend; `tls` is the material id and its configuration for
    /// https.
    pub fn endpoint(
        &self,
        https: bool,
        authority: &str,
        tls: Option<(&str, Arc<ClientConfig>)>,
    ) -> Result<Arc<HostPool>, String> {
        let parsed: Authority = authority
            .parse()
            .map_err(|e| format!("invalid upstream authority {authority:?}: {e}"))?;
        let dial = match parsed.port_u16() {
            Some(_) => authority.to_owned(),
            None => format!("{}:{}", parsed.host(), if https { 443 } else { 80 }),
        };
        let (tls_id, config) = match tls {
            Some((id, config)) if https => (id, Some(config)),
            _ => ("", None),
        };
        let key = PoolKey {
            https,
            dial: dial.into(),
            authority: authority.into(),
            tls: tls_id.into(),
        };
        get_or_make(&self.pools, key.clone(), || self.new_pool(key, config))
    }

    /// The backend for Service port `key`, with the addresses of `endpoints` when it is new
    /// (a backend already in use keeps its addresses until [`Upstreams::refresh_services`]).
    pub fn service(
        &self,
        key: ServiceKey,
        tls: Option<Arc<ClientConfig>>,
        endpoints: Option<&pb::ServiceEndpoints>,
    ) -> Result<Arc<ServiceBackend>, String> {
        let dns = format!(
            "{}.{}.svc.{}:{}",
            key.name, key.namespace, self.config.cluster_domain, key.port
        );
        let authority: Authority = dns
            .parse()
            .map_err(|e| format!("invalid Service DNS name {dns:?}: {e}"))?;
        let tls = tls.filter(|_| key.https);
        get_or_make(&self.services, key.clone(), || {
            let addresses = self.addresses(&key, &authority, tls.as_ref(), endpoints)?;
            Ok(ServiceBackend::new(key, authority, tls, addresses))
        })
    }

    /// Points every live Service backend at the addresses in `services` (a Service that is not
    /// listed has none).
    pub fn refresh_services(&self, services: &[pb::ServiceEndpoints]) {
        let index: HashMap<(&str, &str, u32), &pb::ServiceEndpoints> = services
            .iter()
            .map(|s| ((s.namespace.as_str(), s.name.as_str(), s.port), s))
            .collect();
        let backends: Vec<Arc<ServiceBackend>> = {
            let mut map = lock(&self.services);
            map.retain(|_, weak| weak.strong_count() > 0);
            map.values().filter_map(Weak::upgrade).collect()
        };
        for backend in backends {
            let key = backend.key();
            let endpoints = index
                .get(&(&*key.namespace, &*key.name, u32::from(key.port)))
                .copied();
            match self.addresses(key, backend.authority(), backend.tls(), endpoints) {
                Ok(addresses) => backend.set_addresses(addresses),
                Err(error) => {
                    tracing::warn!(%error, service = %backend.authority(), "keeping the previous addresses")
                }
            }
        }
    }

    /// Closes the idle connections their upstreams closed or that idled out, in the pools
    /// that hold idle connections; returns how many it closed. [`Upstreams::run_sweeper`]
    /// calls it every [`SWEEP_INTERVAL`].
    pub fn sweep(&self) -> usize {
        self.sweep_at(Instant::now())
    }

    fn sweep_at(&self, now: Instant) -> usize {
        let at = tokio::time::Instant::from_std(now);
        let mut closed = 0;
        // The pools listed now; one listed meanwhile waits for the next sweep.
        for _ in 0..self.sweep_list.len() {
            let Some(pool) = self.sweep_list.pop() else {
                break;
            };
            // A pool that is gone closed its connections as it went.
            if let Some(pool) = pool.upgrade() {
                closed += pool.sweep_listed(at);
            }
        }
        closed
    }

    /// Sweep number `n`: [`Upstreams::sweep`], and every [`PRUNE_EVERY`] sweeps
    /// [`Upstreams::prune`], so that a pool no table uses goes without waiting for an update.
    fn tick_at(&self, n: u64, now: Instant) -> usize {
        if n.is_multiple_of(PRUNE_EVERY) {
            self.prune_at(now);
        }
        self.sweep_at(now)
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until `shutdown`, on a blocking thread: a prune of tens
    /// of thousands of pools takes milliseconds, which the workers serving requests need not
    /// wait for.
    pub async fn run_sweeper(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 1.. {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::stopped(&mut shutdown) => return,
            }
            let upstreams = self.clone();
            let sweep = move || upstreams.tick_at(n, Instant::now());
            match tokio::task::spawn_blocking(sweep).await {
                Ok(0) => {}
                Ok(closed) => tracing::debug!(closed, "closed idle upstream connections"),
                Err(error) => {
                    tracing::warn!(%error, "the sweep of idle upstream connections failed")
                }
            }
        }
    }

    /// Forgets pools no table has used for [`POOL_LINGER`], as of the applies and sweeps that
    /// prune.
    pub fn prune(&self) {
        self.prune_at(Instant::now());
    }

    fn prune_at(&self, now: Instant) {
        {
            let mut lingering = lock(&self.lingering);
            let mut pools = lock(&self.pools);
            for (key, weak) in pools.iter() {
                let Some(pool) = weak.upgrade() else { continue };
                // Held by a table (or a request) besides `lingering` and this upgrade: in use,
                // so its time starts again. The key is copied only the first time: a sweep
                // comes by every second.
                match lingering.get_mut(key) {
                    Some((_, used)) => {
                        if Arc::strong_count(&pool) > 2 {
                            *used = now;
                        }
                    }
                    None => {
                        if Arc::strong_count(&pool) > 1 {
                            lingering.insert(key.clone(), (pool, now));
                        }
                    }
                }
            }
            lingering.retain(|_, (_, used)| now.saturating_duration_since(*used) < POOL_LINGER);
            pools.retain(|_, weak| weak.strong_count() > 0);
        }
        lock(&self.services).retain(|_, weak| weak.strong_count() > 0);
    }

    /// The pools a Service port is dialled through under this proxy's address mode. The TLS
    /// server name is the Service's DNS name, even when an IP address is dialled; for an
    /// ExternalName Service it is the external name.
    fn addresses(
        &self,
        key: &ServiceKey,
        authority: &Authority,
        tls: Option<&Arc<ClientConfig>>,
        endpoints: Option<&pb::ServiceEndpoints>,
    ) -> Result<Box<[Arc<HostPool>]>, String> {
        let external = endpoints
            .map(|e| e.external_name.as_str())
            .filter(|n| !n.is_empty());
        let cluster_ip = endpoints.and_then(|e| cluster_ip(&e.cluster_ip));
        let external_authority: Authority;
        let (dials, authority): (Vec<String>, &Authority) = match (
            external,
            self.config.mode,
            cluster_ip,
        ) {
            // An ExternalName Service is a DNS alias: dialled (and verified) by that name in
            // every mode, as cluster DNS would resolve the Service name to it.
            (Some(external), _, _) => {
                let dial = format!("{external}:{}", key.port);
                external_authority = dial
                    .parse()
                    .map_err(|e| format!("invalid ExternalName {dial:?}: {e}"))?;
                (vec![dial], &external_authority)
            }
            (None, AddressMode::Dns, _) => (vec![authority.to_string()], authority),
            (None, AddressMode::ClusterIp, Some(ip)) => {
                (vec![SocketAddr::new(ip, key.port).to_string()], authority)
            }
            (None, AddressMode::Endpoints | AddressMode::ClusterIp, _) => {
                let dials = endpoints
                    .map(|e| e.addresses.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|a| match a.parse::<SocketAddr>() {
                        Ok(addr) => Some(addr.to_string()),
                        Err(_) => {
                            tracing::warn!(address = %a, service = %authority, "ignoring an endpoint address that is not ip:port");
                            None
                        }
                    })
                    .collect();
                (dials, authority)
            }
        };
        dials
            .into_iter()
            .map(|dial| {
                let pool_key = PoolKey {
                    https: key.https,
                    dial: dial.into(),
                    authority: authority.as_str().into(),
                    tls: key.tls.clone(),
                };
                get_or_make(&self.pools, pool_key.clone(), || {
                    self.new_pool(pool_key, tls.cloned())
                })
            })
            .collect()
    }
}

/// The cluster IP to dial, `None` for headless Services (`None` in the API, empty here).
fn cluster_ip(ip: &str) -> Option<IpAddr> {
    ip.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_no_table_uses_lingers_then_goes() {
        let upstreams = Upstreams::new(UpstreamConfig::default()).unwrap();
        let get = || upstreams.endpoint(false, "127.0.0.1:18080", None).unwrap();
        let t0 = Instant::now();
        // A table holds the pool while an update is applied...
        let first = get();
        upstreams.prune_at(t0);
        // ...then the table goes, and the next update routes elsewhere.
        let weak = Arc::downgrade(&first);
        drop(first);
        upstreams.prune_at(t0 + Duration::from_secs(1));
        let back = get();
        assert!(
            Weak::ptr_eq(&weak, &Arc::downgrade(&back)),
            "a route that comes back finds the same pool"
        );
        upstreams.prune_at(t0 + Duration::from_secs(2));
        drop(back);
        // In use at the prune at 2 s: kept until 2 s + POOL_LINGER, gone after.
        upstreams.prune_at(t0 + Duration::from_secs(2) + POOL_LINGER - Duration::from_millis(1));
        assert!(weak.upgrade().is_some(), "still lingering");
        upstreams.prune_at(t0 + Duration::from_secs(2) + POOL_LINGER);
        assert!(
            weak.upgrade().is_none(),
            "forgotten after POOL_LINGER unused"
        );
        assert!(lock(&upstreams.pools).is_empty());
    }

    #[test]
    fn sweeps_forget_lingering_pools_without_an_update() {
        let upstreams = Upstreams::new(UpstreamConfig::default()).unwrap();
        let pool = upstreams.endpoint(false, "127.0.0.1:18080", None).unwrap();
        let t0 = Instant::now();
        assert_eq!(upstreams.tick_at(PRUNE_EVERY, t0), 0, "no idle connections");
        let weak = Arc::downgrade(&pool);
        drop(pool);
        let later = t0 + POOL_LINGER;
        upstreams.tick_at(2 * PRUNE_EVERY, later - Duration::from_millis(1));
        assert!(weak.upgrade().is_some(), "still lingering");
        upstreams.tick_at(2 * PRUNE_EVERY + 1, later);
        assert!(
            weak.upgrade().is_some(),
            "pruned only every PRUNE_EVERY sweeps"
        );
        upstreams.tick_at(3 * PRUNE_EVERY, later);
        assert!(weak.upgrade().is_none(), "forgotten with no update applied");
    }
}
