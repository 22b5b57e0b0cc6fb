//! Key usage in ApiKey status: when each revision was last presented by a request, so that
//! `kubectl get apikey` tells whether a rotation can be finished.
//!
//! Proxies report which revisions they saw (in batches, over their stream); every replica
//! writes what its own proxies reported — the usage the other replicas' proxies saw reaches
//! the API server through those replicas — to `status.revisions[].lastUsed`, at most once a
//! minute per key. Writes never go backwards: a replica merges the newest times it knows with
//! the ones already in status, and patches with the `resourceVersion` it read, so two replicas
//! writing at once cannot undo each other (the loser retries with what the winner wrote).
//! These fields are not the Lease holder's: it writes conditions, which a merge patch of
//! `revisions` leaves alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kanali_crds::{ApiKey, ApiKeyStatus, RevisionStatus, RevisionUsage};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

use crate::compile::api_key::revision_id;
use crate::source::kube::Cache;
use crate::state::{Shared, Usage};

/// The default shortest time between two usage writes for one key.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(60);

/// RFC 3339 (UTC, seconds) of a Unix time.
pub fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

fn parse(rfc3339: &str) -> Option<u64> {
    rfc3339
        .parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .and_then(|t| u64::try_from(t.as_second()).ok())
}

/// The usage part of an ApiKey's status given what the proxies reported: per revision the
/// newest of the reported time and the one already in `current` (matched by revision id, so
/// reordering the revisions keeps their history), and the two summaries.
pub fn usage_status(key: &ApiKey, reported: &Usage) -> ApiKeyStatus {
    let name = key.metadata.name.as_deref().unwrap_or_default();
    let known: HashMap<&str, u64> = key
        .status
        .as_ref()
        .map(|s| {
            s.revisions
                .iter()
                .filter_map(|r| Some((r.id.as_str(), parse(r.last_used.as_deref()?)?)))
                .collect()
        })
        .unwrap_or_default();
    let newest_active = key
        .spec
        .revisions
        .iter()
        .rposition(|r| r.status == RevisionStatus::Active);
    let (mut any, mut older) = (None::<u64>, None::<u64>);
    let revisions = key
        .spec
        .revisions
        .iter()
        .enumerate()
        .map(|(i, rev)| {
            let id_num = revision_id(&rev.data);
            let id = format!("{id_num:016x}");
            let last = reported
                .get(&(name.to_owned(), id_num))
                .copied()
                .into_iter()
                .chain(known.get(id.as_str()).copied())
                .max();
            if let Some(t) = last {
                any = any.max(Some(t));
                if Some(i) != newest_active {
                    older = older.max(Some(t));
                }
            }
            RevisionUsage {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                id,
                status: rev.status,
                last_used: last.map(rfc3339),
            }
        })
        .collect();
    ApiKeyStatus {
        revisions,
        last_used: any.map(rfc3339),
        older_revisions_last_used: older.map(rfc3339),
        ..ApiKeyStatus::default()
    }
}

/// Whether `want`'s usage fields say something `key`'s status does not.
fn differs(key: &ApiKey, want: &ApiKeyStatus) -> bool {
    let current = key.status.clone().unwrap_or_default();
    current.revisions != want.revisions
        || current.last_used != want.last_used
        || current.older_revisions_last_used != want.older_revisions_last_used
}

/// Writes usage into ApiKey status, at most once per `min_interval` per key, until
/// `shutdown` turns true.
pub async fn run_writer(
    client: kube::Client,
    cache: Arc<Cache>,
    shared: Arc<Shared>,
    min_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<ApiKey> = Api::all(client);
    let mut changes = shared.usage_changes();
    let mut written: BTreeMap<String, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(
        min_interval.clamp(Duration::from_millis(200), Duration::from_secs(5)),
    );
    loop {
        tokio::select! {
            _ = changes.changed() => {}
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let reported = shared.usage();
        let names: std::collections::BTreeSet<&str> =
            reported.keys().map(|(k, _)| k.as_str()).collect();
        for name in names {
            if written
                .get(name)
                .is_some_and(|at| at.elapsed() < min_interval)
            {
                continue;
            }
            let Some(key) = cache.api_key(name) else {
                continue;
            };
            let want = usage_status(&key, &reported);
            if !differs(&key, &want) {
                continue;
            }
            let patch = json!({
                // A precondition: a concurrent write by another replica makes this one fail
                // (409) instead of overwriting newer times with older ones.
                "metadata": { "resourceVersion": key.metadata.resource_version },
                "status": {
                    "revisions": want.revisions,
                    "lastUsed": want.last_used,
                    "olderRevisionsLastUsed": want.older_revisions_last_used,
                }
            });
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => {
                    written.insert(name.to_owned(), Instant::now());
                }
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                    tracing::debug!(key = %name, code = e.code, "usage write lost a race; retrying with the newer object");
                }
                Err(error) => {
                    tracing::warn!(key = %name, %error, "cannot write key usage");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kanali_crds::{ApiKeySpec, Revision};

    fn key(revisions: &[(&str, RevisionStatus)]) -> ApiKey {
        ApiKey::new(
            "k",
            ApiKeySpec {
                revisions: revisions
                    .iter()
                    .map(|(d, s)| Revision {
                        data: (*d).to_owned(),
                        status: *s,
                        last_used: None,
                    })
                    .collect(),
            },
        )
    }

    #[test]
    fn usage_merges_never_goes_back_and_names_older_revisions() {
        use RevisionStatus::{Active, Inactive};
        let mut k = key(&[("b2xk", Inactive), ("bmV3", Active)]);
        let (old, new) = (revision_id("b2xk"), revision_id("bmV3"));
        let reported: Usage = [
            (("k".to_owned(), old), 1_000),
            (("k".to_owned(), new), 2_000),
        ]
        .into();
        let s = usage_status(&k, &reported);
        assert_eq!(
            s.revisions[0].last_used.as_deref(),
            Some("1970-01-01T00:16:40Z")
        );
        assert_eq!(
            s.revisions[1].last_used.as_deref(),
            Some("1970-01-01T00:33:20Z")
        );
        assert_eq!(s.last_used, s.revisions[1].last_used);
        assert_eq!(s.older_revisions_last_used, s.revisions[0].last_used);
        assert_eq!(s.revisions[0].id, format!("{old:016x}"));

        // Written; later this replica only knows an older time: the status keeps the newer.
        k.status = Some(s.clone());
        let stale: Usage = [(("k".to_owned(), old), 10)].into();
        let again = usage_status(&k, &stale);
        assert_eq!(again, s);
        assert!(!differs(&k, &again));

        // Reordered: history follows the revision, not the index.
        k.spec.revisions.reverse();
        let moved = usage_status(&k, &Usage::new());
        assert_eq!(moved.revisions[1].id, format!("{old:016x}"));
        assert_eq!(moved.revisions[1].last_used, s.revisions[0].last_used);
        // Now the old revision is listed last but Inactive: the newest Active one is still
        // "new", so "older" is the old revision's time.
        assert_eq!(moved.older_revisions_last_used, s.revisions[0].last_used);
    }
}
