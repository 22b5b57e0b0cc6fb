//! The subscription to the controller: receive snapshots, apply them off the request path,
//! answer ACK/NACK, and reconnect (with exponential backoff and jitter, rotating through the
//! configured controllers) whenever the stream breaks — serving the last good table meanwhile.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use kanali_proto::v1 as pb;
use kanali_proto::v1::snapshot_service_client::SnapshotServiceClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::table::RouteTable;
use crate::upstream::Upstreams;

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
}

/// Runs until `shutdown` turns true.
pub async fn run(
    config: ClientConfig,
    tables: Arc<ArcSwapOption<RouteTable>>,
    upstreams: Arc<Upstreams>,
    mut shutdown: watch::Receiver<bool>,
) {
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
                r = subscribe(&url, host.as_deref(), &config, &tables, &upstreams, &mut received) => r,
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
    tables: &ArcSwapOption<RouteTable>,
    upstreams: &Upstreams,
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
    let mut client =
        SnapshotServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);

    let (tx, rx) = mpsc::channel(4);
    let current_version = tables
        .load()
        .as_ref()
        .map(|t| t.version.clone())
        .unwrap_or_default();
    let subscribe = pb::proxy_message::Message::Subscribe(pb::Subscribe {
        proxy_id: proxy_id.to_owned(),
        current_version,
    });
    let _ = tx
        .send(pb::ProxyMessage {
            message: Some(subscribe),
        })
        .await;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(controller = %url, "subscribed to controller");

    while let Some(msg) = inbound.message().await? {
        let Some(snapshot) = msg.snapshot else {
            continue;
        };
        *received = true;
        let answer = apply(&snapshot, tables, upstreams);
        if tx
            .send(pb::ProxyMessage {
                message: Some(answer),
            })
            .await
            .is_err()
        {
            return Err(StreamError::Closed);
        }
    }
    Ok(())
}

/// Builds the new table (or, when only endpoints changed, updates the addresses and keeps the
/// router) and swaps it in, or keeps the old one and explains why.
pub fn apply(
    snapshot: &pb::Snapshot,
    tables: &ArcSwapOption<RouteTable>,
    upstreams: &Upstreams,
) -> pb::proxy_message::Message {
    use pb::proxy_message::Message;
    let version = snapshot.version.clone();
    let current = tables.load_full();
    if current.as_ref().is_some_and(|t| t.version == version) {
        return Message::Ack(pb::Ack { version });
    }
    match RouteTable::apply(snapshot, upstreams, current.as_deref()) {
        Ok(table) => {
            let routes = table.router.len();
            let endpoints_only = current
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(&c.router, &table.router));
            tables.store(Some(Arc::new(table)));
            tracing::info!(%version, routes, endpoints_only, "applied snapshot");
            Message::Ack(pb::Ack { version })
        }
        Err(errors) => {
            tracing::error!(%version, ?errors, "rejected snapshot; keeping the previous one");
            let errors = errors
                .into_iter()
                .map(|e| pb::ResourceError {
                    resource: e.resource,
                    message: e.message,
                })
                .collect();
            Message::Nack(pb::Nack { version, errors })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_bad_snapshot_is_nacked_and_the_old_table_kept() {
        let tables = ArcSwapOption::empty();
        let upstreams = Upstreams::new(Default::default()).unwrap();
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
        };
        let good = pb::Snapshot {
            version: "v1".into(),
            routes: vec![route("/a", 2)],
            ..Default::default()
        };
        assert!(matches!(
            apply(&good, &tables, &upstreams),
            pb::proxy_message::Message::Ack(_)
        ));
        let bad = pb::Snapshot {
            version: "v2".into(),
            routes: vec![route("/a", 99)],
            ..Default::default()
        };
        match apply(&bad, &tables, &upstreams) {
            pb::proxy_message::Message::Nack(n) => {
                assert_eq!(n.version, "v2");
                assert_eq!(n.errors[0].resource.as_ref().unwrap().name, "/a");
                assert!(n.errors[0].message.contains("99"));
            }
            other => panic!("expected NACK, got {other:?}"),
        }
        assert_eq!(tables.load().as_ref().unwrap().version, "v1");
    }
}
