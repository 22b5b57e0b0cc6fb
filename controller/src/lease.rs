//! Leader election with a `coordination.k8s.io/v1` Lease. Every replica watches, compiles and
//! serves proxies; only the holder of the Lease writes status, so two replicas never fight
//! over a condition.
//!
//! Expiry is judged on this replica's monotonic clock — "the record has not changed for a
//! lease duration" — as client-go does, so clock skew between nodes cannot cause two leaders.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and others check).
    pub renew_every: Duration,
}

/// What this replica last saw of the Lease record, and when it last changed.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

/// Campaigns for the Lease until `shutdown`, publishing whether this replica leads. On a clean
/// shutdown a held Lease is released so another replica takes over at once.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    loop {
        let leading = match try_acquire_or_renew(&api, &config, &mut observed).await {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(%error, lease = %config.name, "lease update failed");
                // A holder that cannot renew must stop acting as leader before its lease
                // could expire for the others.
                false
            }
        };
        leader.send_if_modified(|was| {
            if *was != leading {
                tracing::info!(identity = %config.identity, leading, "leadership changed");
                *was = leading;
                true
            } else {
                false
            }
        });
        tokio::select! {
            () = tokio::time::sleep(config.renew_every) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        if let Err(error) = release(&api, &config).await {
            tracing::warn!(%error, "could not release the lease; another replica takes over when it expires");
        } else {
            tracing::info!(lease = %config.name, "lease released");
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(seconds(config.duration)),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let record = (holder.clone(), spec.renew_time.clone());
    let changed = observed.as_ref().is_none_or(|o| o.record != record);
    if changed {
        *observed = Some(Observed {
            record,
            since: Instant::now(),
        });
    }
    let held_for = spec.lease_duration_seconds.map_or(config.duration, |s| {
        Duration::from_secs(u64::try_from(s).unwrap_or(0))
    });
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.since.elapsed() > held_for);
    let mine = holder.as_deref() == Some(config.identity.as_str());
    if !mine && holder.is_some() && !expired {
        return Ok(false);
    }
    if !mine {
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.holder_identity = Some(config.identity.clone());
        tracing::info!(identity = %config.identity, previous = ?holder, "taking the lease");
    }
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(seconds(config.duration));
    // Replace carries the resourceVersion we read: if another replica wrote in between, the
    // API server answers 409 and this round is lost, never both won.
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), kube::Error> {
    let mut lease = api.get(&config.name).await?;
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    api.replace(&config.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}
