//! The subscription to the controller: receive snapshots, apply them off the request path,
//! answer ACK/NACK, and reconnect (with exponential backoff and jitter, rotating through the
//! configured controllers) whenever the stream breaks — serving the last good table meanwhile.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use kanali_proto::v1 as pb;
use kanali_proto::view;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::filter::credentials::UsageLog;
use crate::filter::rate_limit::RateLimits;
use crate::filter::wasm::Plugins;
use crate::route::table::RouteTable;
use crate::upstream::Upstreams;

/// How often, by default, the keys used meanwhile are reported to the controller.
pub const USAGE_INTERVAL: Duration = Duration::from_secs(10);

/// What applying an update needs besides the update: the upstream pools and TLS, the rate
/// limiters the credentials share across updates, and where key usage is logged.
#[derive(Clone)]
pub struct Context {
    /// The serving table, swapped whole by every update.
    pub tables: Arc<ArcSwapOption<RouteTable>>,
    /// Upstream pools, shared across tables.
    pub upstreams: Arc<Upstreams>,
    /// Rate limiters, shared across credential updates.
    pub limits: Arc<RateLimits>,
    /// Key revisions used since the last report.
    pub usage: Arc<UsageLog>,
    /// The plugin runtime the routes' Wasm plugins run in.
    pub plugins: Arc<Plugins>,
}

/// Subscription settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Controller gRPC URLs, tried in turn.
    pub controllers: Vec<String>,
    /// Identity sent in `Subscribe`.
    pub proxy_id: String,
    /// First reconnect delay; doubles per failure up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// TLS to the controller (`https://` URLs); `None`: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Name the controller's certificate must carry; default: the host of its URL (the
    /// configured name, even after it was resolved to addresses).
    pub tls_server_name: Option<String>,
    /// How often the key revisions used meanwhile are reported ([`USAGE_INTERVAL`]).
    pub usage_interval: Duration,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("invalid controller URL: {0}")]
    Url(String),
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the controller closed the stream")]
    Closed,
    #[error("out of sync with the controller")]
    OutOfSync,
    #[error("applying an update failed: {0}")]
    Apply(String),
}

/// Runs until `shutdown` turns true.
pub async fn run(config: ClientConfig, ctx: Context, mut shutdown: watch::Receiver<bool>) {
    let tables = &ctx.tables;
    if config.controllers.is_empty() {
        tracing::error!("no controller configured");
        return;
    }
    let mut failures: u32 = 0;
    loop {
        // Every round re-resolves and reshuffles the controllers, so a fleet of proxies
        // spreads over the replicas again after one of them went away.
        for (url, host) in candidates(&config.controllers).await {
            let mut received = false;
            let result = tokio::select! {
                r = subscribe(&url, host.as_deref(), &config, &ctx, &mut received) => r,
                () = crate::stopped(&mut shutdown) => return,
            };
            let error = match result {
                Ok(()) => StreamError::Closed,
                Err(e) => e,
            };
            let serving = tables
                .load()
                .as_ref()
                .map(|t| t.version.clone())
                .unwrap_or_default();
            tracing::warn!(controller = %url, %error, serving = %serving,
                "controller stream lost or unavailable; serving the last applied snapshot");
            if received {
                // That stream worked: start the backoff over.
                failures = 0;
                break;
            }
        }
        let delay = backoff(failures, config.min_backoff, config.max_backoff);
        failures = failures.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = crate::stopped(&mut shutdown) => return,
        }
    }
}

/// The controller URLs to try, in random order: each configured URL, or, for a host name,
/// one URL per address it resolves to (a headless Service names every replica).
async fn candidates(urls: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for url in urls {
        let Ok(uri) = url.parse::<http::Uri>() else {
            out.push((url.clone(), None));
            continue;
        };
        let (Some(host), Some(scheme)) = (uri.host(), uri.scheme_str()) else {
            out.push((url.clone(), None));
            continue;
        };
        if host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok()
        {
            out.push((url.clone(), None));
            continue;
        }
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => {
                let before = out.len();
                // The address is dialled, but TLS still checks the configured name.
                out.extend(addrs.map(|a| (format!("{scheme}://{a}"), Some(host.to_owned()))));
                if out.len() == before {
                    out.push((url.clone(), None));
                }
            }
            // Let the connect attempt report it, with the URL as configured.
            Err(_) => out.push((url.clone(), None)),
        }
    }
    out.dedup();
    fastrand::shuffle(&mut out);
    out
}

/// Exponential backoff with "equal jitter": uniform in [cap/2, cap] with cap = min(max,
/// base·2^n). The jitter spreads a fleet of proxies reconnecting to a restarted controller;
/// the floor keeps a flapping controller from being hammered.
fn backoff(failures: u32, base: Duration, max: Duration) -> Duration {
    let cap = base
        .saturating_mul(2u32.saturating_pow(failures.min(20)))
        .min(max);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(millis / 2..=millis.max(1)))
}

async fn subscribe(
    url: &str,
    host: Option<&str>,
    config: &ClientConfig,
    ctx: &Context,
    received: &mut bool,
) -> Result<(), StreamError> {
    let proxy_id = config.proxy_id.as_str();
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| StreamError::Url(format!("{url}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        // Detects a controller that vanished without closing the connection.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = &config.tls {
        let mut tls = tls.clone();
        if let Some(name) = config.tls_server_name.as_deref().or(host) {
            tls = tls.domain_name(name);
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await?;
    // The generated client, but reading each route as it came (`kanali_proto::view`): an
    // update decodes only the routes that changed.
    let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(256 * 1024 * 1024);

    let (tx, rx) = mpsc::channel(4);
    // What this proxy holds, so the controller (any replica: versions are content hashes)
    // sends only what differs.
    let subscribe = {
        let current = ctx.tables.load();
        pb::Subscribe {
            proxy_id: proxy_id.to_owned(),
            current_version: current
                .as_ref()
                .map(|t| t.version.clone())
                .unwrap_or_default(),
            snapshot_version: current
                .as_ref()
                .map(|t| t.snapshot_version.clone())
                .unwrap_or_default(),
            credential_versions: current
                .as_ref()
                .map(|t| t.credentials.versions())
                .unwrap_or_default(),
        }
    };
    let send = |message| {
        let tx = tx.clone();
        async move {
            tx.send(pb::ProxyMessage {
                message: Some(message),
            })
            .await
            .map_err(|_| StreamError::Closed)
        }
    };
    send(pb::proxy_message::Message::Subscribe(subscribe)).await?;
    let mut inbound = view::stream(&mut client, ReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(controller = %url, "subscribed to controller");

    let mut pending = Pending::default();
    let mut report = tokio::time::interval(config.usage_interval);
    report.tick().await;
    let mut plugin_changes = ctx.plugins.changes();
    loop {
        let msg = tokio::select! {
            msg = inbound.message() => msg?,
            _ = report.tick() => {
                if let Some(usage) = ctx.usage.drain() {
                    send(pb::proxy_message::Message::Usage(usage)).await?;
                }
                continue;
            }
            _ = plugin_changes.changed() => {
                // A module file changed: the version served is the same, what works of it
                // is not. Ack it again with the problems as they are now.
                if let Some(table) = ctx.tables.load_full() {
                    send(pb::proxy_message::Message::Ack(pb::Ack {
                        version: table.version.clone(),
                        problems: table.problems(),
                    }))
                    .await?;
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        let Some(commit) = pending.add(msg) else {
            continue;
        };
        *received = true;
        let update = std::mem::take(&mut pending);
        // Building a table of thousands of routes takes milliseconds; on a worker thread that
        // would stall every request it serves. A blocking thread builds it; the swap is atomic.
        let (answer, in_sync) = {
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || apply(update, &commit, &ctx))
                .await
                .map_err(|e| StreamError::Apply(e.to_string()))?
        };
        send(answer).await?;
        if !in_sync {
            // Resubscribing says what this proxy holds, and the controller sends the rest.
            return Err(StreamError::OutOfSync);
        }
    }
    Ok(())
}

/// What arrived since the last commit.
#[derive(Debug, Default)]
pub struct Pending {
    /// The routing snapshot, if it changed.
    pub snapshot: Option<view::Snapshot>,
    /// The credential shards that changed.
    pub shards: Vec<pb::CredentialShard>,
}

impl Pending {
    /// Adds a message; returns its commit when it completes an update.
    pub fn add(&mut self, msg: view::ControllerMessage) -> Option<pb::Commit> {
        if msg.snapshot.is_some() {
            self.snapshot = msg.snapshot;
        }
        self.shards.extend(msg.credentials);
        msg.commit
    }
}

/// Applies an update and swaps in the result, or keeps the current table and explains why.
/// The second value is false when the proxy's state no longer adds up to what the controller
/// committed (it then resubscribes, so the controller learns what it holds).
pub fn apply(
    update: Pending,
    commit: &pb::Commit,
    ctx: &Context,
) -> (pb::proxy_message::Message, bool) {
    use pb::proxy_message::Message;
    let started = std::time::Instant::now();
    let version = commit.version.clone();
    let nack = |errors: Vec<pb::ResourceError>| {
        tracing::error!(%version, ?errors, "rejected an update; keeping the previous configuration");
        Message::Nack(pb::Nack {
            version: version.clone(),
            errors,
        })
    };
    let current = ctx.tables.load_full();
    if update.snapshot.is_none()
        && update.shards.is_empty()
        && let Some(current) = current.as_ref().filter(|t| t.version == version)
    {
        let problems = current.problems();
        return (Message::Ack(pb::Ack { version, problems }), true);
    }
    let routing = match (&update.snapshot, &current) {
        (Some(snapshot), _) => RouteTable::apply_with_plugins(
            snapshot,
            &ctx.upstreams,
            Some(&ctx.plugins),
            current.as_deref(),
        ),
        (None, Some(current)) => Ok(RouteTable::clone(current)),
        (None, None) => {
            return (
                nack(vec![pb::ResourceError {
                    resource: None,
                    message: "the update has no routing snapshot and the proxy holds none"
                        .to_owned(),
                    reason: String::new(),
                }]),
                false,
            );
        }
    };
    let mut table = match routing {
        Ok(table) => table,
        Err(errors) => {
            let errors = errors
                .into_iter()
                .map(|e| pb::ResourceError {
                    resource: e.resource,
                    message: e.message,
                    reason: String::new(),
                })
                .collect();
            return (nack(errors), true);
        }
    };
    let base = current
        .as_ref()
        .map(|t| t.credentials.clone())
        .unwrap_or_default();
    let credentials = if update.shards.is_empty() {
        base
    } else {
        match base.update(&update.shards, &ctx.limits) {
            Ok(c) => Arc::new(c),
            Err(message) => {
                return (
                    nack(vec![pb::ResourceError {
                        resource: None,
                        message: format!("credentials: {message}"),
                        reason: String::new(),
                    }]),
                    true,
                );
            }
        }
    };
    if table.snapshot_version != commit.snapshot_version
        || credentials.version() != commit.credentials_version
    {
        return (
            nack(vec![pb::ResourceError {
                resource: None,
                message: "out of sync with the controller (what this proxy holds does not add up to the committed version); resubscribing".to_owned(),
                reason: String::new(),
            }]),
            false,
        );
    }
    let keys = credentials.len();
    let routes = table.router.len();
    let problems = table.problems();
    let apply_ms = started.elapsed().as_secs_f64() * 1e3;
    let endpoints_only = current
        .as_ref()
        .is_some_and(|c| Arc::ptr_eq(&c.router, &table.router));
    table.version = version.clone();
    table.credentials = credentials;
    let old = ctx.tables.swap(Some(Arc::new(table)));
    // Limiters no credential refers to any more go (after in-flight requests drop theirs).
    drop(old);
    ctx.limits.prune();
    tracing::info!(%version, routes, keys, endpoints_only, problems = problems.len(), apply_ms, "applied update");
    (Message::Ack(pb::Ack { version, problems }), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::credentials::Credentials;

    #[tokio::test]
    async fn candidates_expand_host_names_and_keep_addresses() {
        let got = candidates(&[
            "http://127.0.0.1:9443".into(),
            "http://localhost:9444".into(),
        ])
        .await;
        assert!(
            got.contains(&("http://127.0.0.1:9443".to_owned(), None)),
            "{got:?}"
        );
        // Resolved to an address, with the name kept for TLS.
        assert!(
            got.iter().any(|(u, host)| u.ends_with(":9444")
                && !u.contains("localhost")
                && host.as_deref() == Some("localhost")),
            "{got:?}"
        );
        let bad = candidates(&["not a url".into()]).await;
        assert_eq!(bad, [("not a url".to_owned(), None)]);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for _ in 0..100 {
            let d0 = backoff(0, base, max);
            assert!(d0 >= Duration::from_millis(50) && d0 <= base, "{d0:?}");
            let d3 = backoff(3, base, max);
            assert!(
                d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800),
                "{d3:?}"
            );
            assert!(backoff(40, base, max) <= max);
        }
    }

    fn context() -> Context {
        Context {
            tables: Arc::new(ArcSwapOption::empty()),
            upstreams: Arc::new(Upstreams::new(Default::default()).unwrap()),
            limits: Arc::new(RateLimits::new(Default::default()).unwrap()),
            usage: Arc::default(),
            plugins: Arc::new(Plugins::new(&Default::default()).unwrap()),
        }
    }

    fn commit(snapshot: &str, credentials: &Credentials) -> pb::Commit {
        let credentials_version = credentials.version();
        pb::Commit {
            version: kanali_proto::version::combined_version(snapshot, &credentials_version),
            snapshot_version: snapshot.into(),
            credentials_version,
        }
    }

    #[test]
    fn a_bad_snapshot_is_nacked_and_the_old_table_kept() {
        let ctx = context();
        let route = |path: &str, code| pb::Route {
            source: Some(pb::ResourceRef {
                kind: "ApiProxy".into(),
                namespace: "ns".into(),
                name: path.into(),
                generation: 1,
            }),
            path: path.into(),
            virtual_host: String::new(),
            target_path: "/".into(),
            backend: Some(pb::route::Backend::Failure(pb::Failure { code })),
            timeout_ms: 0,
            plugins: Vec::new(),
        };
        let good = pb::Snapshot {
            version: "v1".into(),
            routes: vec![route("/a", 2)],
            ..Default::default()
        };
        let empty = Credentials::default();
        let c1 = commit("v1", &empty);
        let update = Pending {
            snapshot: Some((&good).into()),
            shards: Vec::new(),
        };
        assert!(matches!(
            apply(update, &c1, &ctx),
            (pb::proxy_message::Message::Ack(_), true)
        ));
        let bad = pb::Snapshot {
            version: "v2".into(),
            routes: vec![route("/a", 99)],
            ..Default::default()
        };
        let c2 = commit("v2", &empty);
        let update = Pending {
            snapshot: Some((&bad).into()),
            shards: Vec::new(),
        };
        match apply(update, &c2, &ctx) {
            (pb::proxy_message::Message::Nack(n), true) => {
                assert_eq!(n.version, c2.version);
                assert_eq!(n.errors[0].resource.as_ref().unwrap().name, "/a");
                assert!(n.errors[0].message.contains("99"));
            }
            other => panic!("expected NACK, got {other:?}"),
        }
        assert_eq!(ctx.tables.load().as_ref().unwrap().version, c1.version);
    }

    #[test]
    fn credential_shards_apply_on_their_own_and_a_mismatch_resubscribes() {
        let ctx = context();
        let snapshot = pb::Snapshot {
            version: "v1".into(),
            ..Default::default()
        };
        let empty = Credentials::default();
        let first = apply(
            Pending {
                snapshot: Some((&snapshot).into()),
                shards: Vec::new(),
            },
            &commit("v1", &empty),
            &ctx,
        );
        assert!(matches!(first, (pb::proxy_message::Message::Ack(_), true)));
        let router = ctx.tables.load_full().unwrap().router.clone();

        let digest: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            b"secret",
        ))
        .into();
        let shard = pb::CredentialShard {
            index: u32::from(digest[0]),
            version: "s1".into(),
            entries: vec![pb::Credential {
                digest: digest.to_vec(),
                key: "k".into(),
                revision: 7,
                active: true,
                grants: Vec::new(),
            }],
        };
        let expected = empty
            .update(std::slice::from_ref(&shard), &ctx.limits)
            .unwrap();
        let c = commit("v1", &expected);
        let answer = apply(
            Pending {
                snapshot: None,
                shards: vec![shard.clone()],
            },
            &c,
            &ctx,
        );
        assert!(matches!(answer, (pb::proxy_message::Message::Ack(_), true)));
        let table = ctx.tables.load_full().unwrap();
        assert!(
            Arc::ptr_eq(&table.router, &router),
            "routes were not rebuilt"
        );
        assert_eq!(
            table.credentials.lookup(b"secret").unwrap().key.as_ref(),
            "k"
        );
        assert!(table.credentials.lookup(b"other").is_none());

        // A commit the proxy's shards do not add up to: NACK, and resubscribe.
        let wrong = pb::Commit {
            version: "x".into(),
            snapshot_version: "v1".into(),
            credentials_version: "not this".into(),
        };
        let answer = apply(
            Pending {
                snapshot: None,
                shards: vec![shard],
            },
            &wrong,
            &ctx,
        );
        assert!(matches!(
            answer,
            (pb::proxy_message::Message::Nack(_), false)
        ));
        assert_eq!(ctx.tables.load().as_ref().unwrap().version, c.version);
    }
}
