//! Status conditions on the resources: computing them (pure) and writing them (leader only).
//!
//! Each object gets `Accepted` and `ResolvedRefs` from compile, `Programmed` from what the
//! connected proxies ACKed, and `Ready` summarising them, all with `observedGeneration`. The
//! writer patches `/status` only when something other than a timestamp changed, so its own
//! writes (which come back as watch events) never cause another write.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use kanali_crds::{ApiKey, ApiKeyBinding, ApiProxy, MockTarget};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::compile::diagnostics::summarize;
use crate::compile::{Condition, Diagnostic, Kind, ObjectRef, condition};
use crate::source::kube::Cache;
use crate::state::{Fingerprints, ProxyState, Shared};

/// `Programmed`: did the connected proxies apply a snapshot in which this object compiled to
/// what it compiles to now (`current`, its fingerprint in the newest snapshot)?
pub fn programmed(
    d: &Diagnostic,
    current: Option<u64>,
    proxies: &BTreeMap<String, ProxyState>,
    fingerprints_of: impl Fn(&str) -> Option<Arc<Fingerprints>>,
) -> Condition {
    if d.condition(condition::ACCEPTED).is_some_and(|c| !c.status) {
        return Condition::failed(
            condition::PROGRAMMED,
            "NotAccepted",
            "not accepted, so not sent to proxies",
        );
    }
    let connected: Vec<(&String, &ProxyState)> =
        proxies.iter().filter(|(_, p)| p.connected).collect();
    if connected.is_empty() {
        return Condition::failed(
            condition::PROGRAMMED,
            "NoProxies",
            "no proxy is connected to the controller",
        );
    }
    let name = |o: &ObjectRef| match &o.namespace {
        Some(ns) => format!("{} {ns}/{}", o.kind.as_str(), o.name),
        None => format!("{} {}", o.kind.as_str(), o.name),
    };
    let me = name(&d.object);
    let mut applied = 0;
    for (id, p) in &connected {
        if let Some(r) = &p.rejected
            && let Some(err) = r.errors.iter().find(|e| e.starts_with(&format!("{me}:")))
        {
            return Condition::failed(
                condition::PROGRAMMED,
                "Rejected",
                format!("proxy {id} rejected it: {err}"),
            );
        }
        let has = current.is_some()
            && p.applied_version
                .as_deref()
                .and_then(&fingerprints_of)
                .is_some_and(|f| f.get(&d.object).copied() == current);
        if has {
            // Applied, but not working there (a plugin module that does not load). Problems
            // describe the applied version, so they count only while that is the current one.
            if let Some(problem) = p.problems.iter().find(|x| x.object == me) {
                let reason = if problem.reason.is_empty() {
                    "ProxyProblem"
                } else {
                    problem.reason.as_str()
                };
                return Condition::failed(
                    condition::PROGRAMMED,
                    reason,
                    format!("proxy {id}: {}", problem.message),
                );
            }
            applied += 1;
        }
    }
    let m = connected.len();
    let message = format!(
        "{applied} of {m} connected proxies applied generation {}",
        d.generation.unwrap_or(0)
    );
    if applied == m {
        Condition::ok(condition::PROGRAMMED, "Programmed", message)
    } else {
        Condition::failed(condition::PROGRAMMED, "Pending", message)
    }
}

/// The `status` an object should have. `current` is what the API server has, used to keep
/// `lastTransitionTime` when a condition's status did not change; `now` is RFC 3339.
pub fn desired(d: &Diagnostic, programmed: Condition, current: Option<&Value>, now: &str) -> Value {
    let mut conditions: Vec<&Condition> = d.conditions.iter().collect();
    conditions.push(&programmed);
    let ready = summarize(conditions.iter().copied());
    conditions.push(&ready);
    let current_conditions = current
        .and_then(|c| c.get("conditions"))
        .and_then(Value::as_array);
    let rendered: Vec<Value> = conditions
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = current_conditions
                .and_then(|cs| {
                    cs.iter()
                        .find(|x| x["type"] == c.type_ && x["status"] == status)
                })
                .and_then(|x| x["lastTransitionTime"].as_str())
                .unwrap_or(now);
            json!({
                "type": c.type_,
                "status": status,
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": d.generation.unwrap_or(0),
                "lastTransitionTime": since,
            })
        })
        .collect();
    let mut status =
        json!({ "observedGeneration": d.generation.unwrap_or(0), "conditions": rendered });
    if let Some(backend) = &d.backend {
        status["backend"] = json!(backend);
    }
    status
}

/// Whether `desired` says something `current` does not (timestamps aside). Only the fields
/// this writer owns count: an ApiKey's usage fields are written by [`crate::usage`].
pub fn differs(desired: &Value, current: Option<&Value>) -> bool {
    let current = current.map(|c| match (desired.as_object(), c.as_object()) {
        (Some(want), Some(have)) => Value::Object(
            have.iter()
                .filter(|(k, _)| want.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        _ => c.clone(),
    });
    let current = current.as_ref();
    fn strip(v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs.iter_mut() {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastTransitionTime");
                }
            }
        }
        v
    }
    match current {
        Some(c) if !c.is_null() => strip(desired) != strip(c),
        _ => true,
    }
}

fn rfc3339_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Events worth telling a human about: a condition turning False (Warning, with the
/// condition's reason and message) and `Ready` turning True (Normal). Compares the `desired`
/// status with the `current` one, so a condition that stays False is reported once.
pub fn transitions(desired: &Value, current: Option<&Value>) -> Vec<(EventType, String, String)> {
    let condition_of = |v: Option<&Value>, t: &str| {
        v.and_then(|v| v.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
            .cloned()
    };
    let mut out = Vec::new();
    for c in desired["conditions"].as_array().into_iter().flatten() {
        let (Some(t), Some(now)) = (c["type"].as_str(), c["status"].as_str()) else {
            continue;
        };
        let previous = condition_of(current, t);
        let before = previous
            .as_ref()
            .and_then(|p| p["status"].as_str().map(str::to_owned));
        let reason = c["reason"].as_str().unwrap_or_default().to_owned();
        // Programmed goes from False (Pending, while proxies apply) to False (a plugin does
        // not load): a new reason is the news there.
        let new_plugin_problem = t == condition::PROGRAMMED
            && reason.starts_with("Plugin")
            && previous.as_ref().is_none_or(|p| p["reason"] != c["reason"]);
        if before.as_deref() == Some(now) && !new_plugin_problem {
            continue;
        }
        let message = c["message"].as_str().unwrap_or_default().to_owned();
        match (t, now) {
            (condition::ACCEPTED | condition::RESOLVED_REFS, "False") => {
                out.push((EventType::Warning, reason, message))
            }
            // A proxy cannot run one of its plugins; the other Programmed=False reasons
            // (Pending, NoProxies) come and go with every change.
            (condition::PROGRAMMED, "False") if reason.starts_with("Plugin") => {
                out.push((EventType::Warning, reason, message))
            }
            (condition::READY, "True") if before.is_some() => {
                out.push((EventType::Normal, reason, message))
            }
            _ => {}
        }
    }
    out
}

/// Writes status while `leader` is true, after every change to diagnostics or proxy state.
pub async fn run_writer(
    client: Client,
    cache: Arc<Cache>,
    shared: Arc<Shared>,
    peers: crate::peers::PeerConfig,
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = shared.changes();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kanali-controller".to_owned(),
            instance: Some(peers.identity.clone()),
        },
    );
    // Other replicas' proxies change without telling us: look at their reports regularly.
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = changes.changed() => {}
            _ = leader.changed() => {}
            _ = poll.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Coalesce bursts (a compile is followed by ACKs from every proxy within ms).
        tokio::time::sleep(Duration::from_millis(50)).await;
        changes.borrow_and_update();
        if !*leader.borrow_and_update() {
            continue;
        }
        let (objects, mut proxies) = {
            let view = shared.status();
            (view.objects.clone(), view.proxies.clone())
        };
        for (id, state) in crate::peers::peer_proxies(&client, &peers).await {
            // A proxy that moved between replicas: its live stream wins over a stale entry.
            let keep_ours = proxies
                .get(&id)
                .is_some_and(|ours| ours.connected && !state.connected);
            if !keep_ours {
                proxies.insert(id, state);
            }
        }
        let now = rfc3339_now();
        let latest = shared.version().and_then(|v| shared.fingerprints(&v));
        let mut todo = Vec::new();
        for o in objects {
            let d = &o.diagnostic;
            let current = cache.status_of(&d.object);
            let fingerprint = latest.as_ref().and_then(|f| f.get(&d.object).copied());
            let p = programmed(d, fingerprint, &proxies, |v| shared.fingerprints(v));
            let want = desired(d, p, current.as_ref(), &now);
            if differs(&want, current.as_ref()) {
                let events = transitions(&want, current.as_ref());
                todo.push((d.object.clone(), want, events));
            }
        }
        // A few patches in flight at once: one at a time, a thousand objects took minutes
        // against a real API server; unbounded would flood it after a mass apply.
        let (client, leader, recorder, cache) = (&client, &leader, &recorder, &cache);
        futures_util::stream::iter(todo)
            .for_each_concurrent(PATCHES_IN_FLIGHT, |(object, want, events)| async move {
                if !*leader.borrow() {
                    return;
                }
                if let Err(error) = patch(client, &object, want).await {
                    tracing::warn!(%object, %error, "status patch failed; will retry on the next change");
                    return;
                }
                let Some(reference) = cache.reference_of(&object) else { return };
                for (type_, reason, note) in events {
                    let event = Event { type_, reason, note: Some(note), action: "Reconcile".to_owned(), secondary: None };
                    if let Err(error) = recorder.publish(&event, &reference).await {
                        tracing::debug!(%object, %error, "could not record an event");
                    }
                }
            })
            .await;
    }
}

/// Status patches sent concurrently by the leader.
const PATCHES_IN_FLIGHT: usize = 16;

async fn patch(client: &Client, object: &ObjectRef, status: Value) -> Result<(), kube::Error> {
    async fn one<K>(api: Api<K>, name: &str, status: Value) -> Result<(), kube::Error>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let patch = Patch::Merge(json!({ "status": status }));
        match api
            .patch_status(name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => Ok(()),
            // Deleted meanwhile: nothing to report on.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
    let ns = object.namespace.as_deref().unwrap_or("default");
    let c = client.clone();
    match object.kind {
        Kind::ApiProxy => one(Api::<ApiProxy>::namespaced(c, ns), &object.name, status).await,
        Kind::MockTarget => one(Api::<MockTarget>::namespaced(c, ns), &object.name, status).await,
        Kind::ApiKeyBinding => {
            one(
                Api::<ApiKeyBinding>::namespaced(c, ns),
                &object.name,
                status,
            )
            .await
        }
        Kind::ApiKey => one(Api::<ApiKey>::all(c), &object.name, status).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Rejection;

    fn diag(generation: i64, ok: bool) -> Diagnostic {
        Diagnostic {
            object: ObjectRef {
                kind: Kind::ApiProxy,
                namespace: Some("ns".into()),
                name: "p".into(),
            },
            generation: Some(generation),
            conditions: vec![
                Condition::ok(condition::ACCEPTED, "Accepted", "ok"),
                if ok {
                    Condition::ok(condition::RESOLVED_REFS, "ResolvedRefs", "ok")
                } else {
                    Condition::failed(
                        condition::RESOLVED_REFS,
                        "MockTargetNotFound",
                        "requests get error 02",
                    )
                },
            ],
            backend: Some("mock:m".into()),
        }
    }

    fn proxy(version: Option<&str>, connected: bool) -> ProxyState {
        ProxyState {
            connected,
            streams: 1,
            applied_version: version.map(Into::into),
            ..Default::default()
        }
    }

    /// Version `version` compiled the object to fingerprint `fp`.
    fn history(version: &str, fp: u64) -> impl Fn(&str) -> Option<Arc<Fingerprints>> {
        let mut f = Fingerprints::default();
        f.insert(diag(1, true).object, fp);
        let version = version.to_owned();
        let f = Arc::new(f);
        move |v| (v == version).then(|| f.clone())
    }

    #[test]
    fn programmed_counts_proxies_that_applied_this_generation() {
        let mut proxies = BTreeMap::new();
        proxies.insert("a".to_owned(), proxy(Some("v2"), true));
        proxies.insert("b".to_owned(), proxy(Some("v1"), true));
        proxies.insert("gone".to_owned(), proxy(Some("v1"), false));
        let c = programmed(&diag(2, true), Some(7), &proxies, history("v2", 7));
        assert_eq!((c.status, c.reason.as_str()), (false, "Pending"));
        assert_eq!(c.message, "1 of 2 connected proxies applied generation 2");
        proxies.get_mut("b").unwrap().applied_version = Some("v2".into());
        let c = programmed(&diag(2, true), Some(7), &proxies, history("v2", 7));
        assert_eq!((c.status, c.reason.as_str()), (true, "Programmed"));
        // The object now compiles differently (e.g. its MockTarget changed): the snapshot the
        // proxies applied no longer counts, whatever the generation says.
        let c = programmed(&diag(2, true), Some(8), &proxies, history("v2", 7));
        assert_eq!(c.reason, "Pending");
    }

    #[test]
    fn programmed_reports_nacks_and_missing_proxies() {
        let mut proxies = BTreeMap::new();
        assert_eq!(
            programmed(&diag(1, true), Some(1), &proxies, |_| None).reason,
            "NoProxies"
        );
        let mut p = proxy(None, true);
        p.rejected = Some(Rejection {
            version: "v1".into(),
            errors: vec!["ApiProxy ns/p: bad header".into()],
        });
        proxies.insert("a".to_owned(), p);
        let c = programmed(&diag(1, true), Some(1), &proxies, |_| None);
        assert_eq!(
            (c.reason.as_str(), c.message.as_str()),
            ("Rejected", "proxy a rejected it: ApiProxy ns/p: bad header")
        );
    }

    #[test]
    fn programmed_shows_a_plugin_problem_of_the_applied_version() {
        use crate::state::Problem;
        let mut proxies = BTreeMap::new();
        proxies.insert("a".to_owned(), proxy(Some("v2"), true));
        let mut b = proxy(Some("v2"), true);
        b.problems = vec![
            Problem {
                object: "ApiProxy ns/other".into(),
                reason: "PluginAbiMismatch".into(),
                message: "not this one".into(),
            },
            Problem {
                object: "ApiProxy ns/p".into(),
                reason: "PluginNotFound".into(),
                message:
                    "plugin \"auth\": /plugins/auth.wasm does not exist; requests get error 03"
                        .into(),
            },
        ];
        proxies.insert("b".to_owned(), b);
        let c = programmed(&diag(2, true), Some(7), &proxies, history("v2", 7));
        assert_eq!((c.status, c.reason.as_str()), (false, "PluginNotFound"));
        assert_eq!(
            c.message,
            "proxy b: plugin \"auth\": /plugins/auth.wasm does not exist; requests get error 03"
        );
        // The object changed since (say, the plugin was removed): the old problem no longer
        // describes it, the proxies simply have not applied the change yet.
        let c = programmed(&diag(3, true), Some(8), &proxies, history("v2", 7));
        assert_eq!(c.reason, "Pending");
        // Fixed on the proxy: it Acks again without problems.
        proxies.get_mut("b").unwrap().problems.clear();
        let c = programmed(&diag(2, true), Some(7), &proxies, history("v2", 7));
        assert_eq!(c.reason, "Programmed");
    }

    #[test]
    fn events_are_emitted_on_transitions_only() {
        let p = Condition::ok(condition::PROGRAMMED, "Programmed", "1 of 1");
        let broken = desired(&diag(1, false), p.clone(), None, "t0");
        let first = transitions(&broken, None);
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(matches!(first[0].0, EventType::Warning));
        assert_eq!(first[0].1, "MockTargetNotFound");
        // Still broken: no new event.
        assert!(transitions(&broken, Some(&broken)).is_empty());
        // Fixed: Ready turned True.
        let fixed = desired(&diag(2, true), p, Some(&broken), "t1");
        let events = transitions(&fixed, Some(&broken));
        assert_eq!(events.len(), 1);
        assert!(matches!(events[0].0, EventType::Normal));
        assert_eq!(events[0].1, "Ready");
    }

    #[test]
    fn a_plugin_problem_is_an_event_even_after_pending() {
        let pending = Condition::failed(condition::PROGRAMMED, "Pending", "0 of 1");
        let problem = Condition::failed(
            condition::PROGRAMMED,
            "PluginNotFound",
            "proxy p: plugin \"x\": ...",
        );
        let before = desired(&diag(1, true), pending, None, "t0");
        let after = desired(&diag(1, true), problem.clone(), Some(&before), "t1");
        let events = transitions(&after, Some(&before));
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(events[0].0, EventType::Warning));
        assert_eq!(events[0].1, "PluginNotFound");
        // Still the same problem: once.
        let again = desired(&diag(1, true), problem, Some(&after), "t2");
        assert!(transitions(&again, Some(&after)).is_empty());
    }

    #[test]
    fn desired_status_keeps_transition_times_and_only_differs_on_content() {
        let p = Condition::ok(condition::PROGRAMMED, "Programmed", "1 of 1");
        let first = desired(&diag(4, false), p.clone(), None, "2026-01-01T00:00:00Z");
        assert_eq!(first["observedGeneration"], 4);
        assert_eq!(first["backend"], "mock:m");
        let types: Vec<&str> = first["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Accepted", "ResolvedRefs", "Programmed", "Ready"]);
        let ready = &first["conditions"][3];
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("MockTargetNotFound"))
        );
        assert_eq!(ready["observedGeneration"], 4);

        // Same content later: same transition times, and no patch needed.
        let again = desired(
            &diag(4, false),
            p.clone(),
            Some(&first),
            "2026-01-01T00:05:00Z",
        );
        assert_eq!(again, first);
        assert!(!differs(&again, Some(&first)));

        // ResolvedRefs flips: its time (and Ready's) moves, Accepted's stays.
        let fixed = desired(&diag(4, true), p, Some(&first), "2026-01-01T00:09:00Z");
        assert!(differs(&fixed, Some(&first)));
        assert_eq!(
            fixed["conditions"][0]["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(
            fixed["conditions"][1]["lastTransitionTime"],
            "2026-01-01T00:09:00Z"
        );
        assert_eq!(fixed["conditions"][3]["status"], "True");
        assert!(differs(&fixed, None));
    }
}
