//! Every replica serves its own share of the proxies, but only the Lease holder writes status.
//! So each replica reports what its proxies applied in a small Lease object of its own
//! (`kanali-proxies-<identity>`, labelled `kanali.io/proxy-report`), and the holder merges
//! those reports with its own view before computing `Programmed`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tokio::sync::watch;

use crate::state::{ProxyState, Shared};

/// Label on every report.
pub const REPORT_LABEL: &str = "kanali.io/proxy-report";
/// Annotation holding the report (JSON: proxy id → state).
pub const REPORT_ANNOTATION: &str = "kanali.io/proxies";

/// Where reports live and how long one stays believable.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Namespace of the report Leases (the leader Lease's namespace).
    pub namespace: String,
    /// This replica's identity.
    pub identity: String,
    /// A report not renewed for this long is ignored (its replica is gone).
    pub ttl: Duration,
}

fn report_name(identity: &str) -> String {
    let clean: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("kanali-proxies-{}", clean.trim_matches('-'))
}

/// Publishes this replica's proxies whenever they change (and at least every ttl/3), until
/// shutdown; then deletes the report.
pub async fn run_reporter(
    client: Client,
    config: PeerConfig,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let name = report_name(&config.identity);
    let mut changes = shared.changes();
    let mut last_sent: Option<String> = None;
    let mut refresh = tokio::time::interval(config.ttl / 3);
    loop {
        tokio::select! {
            _ = changes.changed() => {}
            _ = refresh.tick() => last_sent = None,
            _ = shutdown.wait_for(|s| *s) => break,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let proxies = shared.status().proxies.clone();
        let report = serde_json::to_string(&proxies).unwrap_or_default();
        if last_sent.as_deref() == Some(report.as_str()) {
            continue;
        }
        match write(&api, &name, &config, &report).await {
            Ok(()) => last_sent = Some(report),
            Err(error) => {
                tracing::warn!(%error, report = %name, "cannot publish this replica's proxy report")
            }
        }
    }
    let _ = api.delete(&name, &DeleteParams::default()).await;
}

async fn write(
    api: &Api<Lease>,
    name: &str,
    config: &PeerConfig,
    report: &str,
) -> Result<(), kube::Error> {
    let lease = |resource_version| Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            resource_version,
            labels: Some(BTreeMap::from([(
                REPORT_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                REPORT_ANNOTATION.to_owned(),
                report.to_owned(),
            )])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_duration_seconds: Some(
                i32::try_from(config.ttl.as_secs())
                    .unwrap_or(i32::MAX)
                    .max(1),
            ),
            ..Default::default()
        }),
    };
    match api.get_opt(name).await? {
        None => api
            .create(&PostParams::default(), &lease(None))
            .await
            .map(|_| ()),
        Some(current) => api
            .replace(
                name,
                &PostParams::default(),
                &lease(current.metadata.resource_version),
            )
            .await
            .map(|_| ()),
    }
}

/// The proxies the other replicas report, from reports renewed within their TTL.
pub async fn peer_proxies(client: &Client, config: &PeerConfig) -> BTreeMap<String, ProxyState> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let leases = match api
        .list(&ListParams::default().labels(&format!("{REPORT_LABEL}=true")))
        .await
    {
        Ok(l) => l,
        Err(error) => {
            tracing::warn!(%error, "cannot read the other replicas' proxy reports");
            return BTreeMap::new();
        }
    };
    let now = Timestamp::now();
    let mut merged = BTreeMap::new();
    for lease in leases {
        let spec = lease.spec.unwrap_or_default();
        if spec.holder_identity.as_deref() == Some(config.identity.as_str()) {
            continue;
        }
        let ttl = i64::from(spec.lease_duration_seconds.unwrap_or(0));
        let fresh = spec
            .renew_time
            .is_some_and(|t| now.as_second() - t.0.as_second() <= ttl);
        if !fresh {
            continue;
        }
        let report = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REPORT_ANNOTATION));
        let Some(proxies) =
            report.and_then(|r| serde_json::from_str::<BTreeMap<String, ProxyState>>(r).ok())
        else {
            continue;
        };
        for (id, state) in proxies {
            merged.insert(id, state);
        }
    }
    merged
}
