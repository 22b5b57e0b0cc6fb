//! Per-object results of a compile: which conditions each resource gets and why.

use std::fmt;

/// The kinds of object that receive status from the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Kind {
    /// `ApiProxy` (namespaced).
    ApiProxy,
    /// `MockTarget` (namespaced).
    MockTarget,
    /// `ApiKey` (cluster-scoped).
    ApiKey,
    /// `ApiKeyBinding` (namespaced).
    ApiKeyBinding,
}

impl Kind {
    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ApiProxy => "ApiProxy",
            Kind::MockTarget => "MockTarget",
            Kind::ApiKey => "ApiKey",
            Kind::ApiKeyBinding => "ApiKeyBinding",
        }
    }
}

/// Identifies one object: kind, namespace (None for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectRef {
    /// Kind of the object.
    pub kind: Kind,
    /// Namespace; `None` for `ApiKey`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind.as_str(), ns, self.name),
            None => write!(f, "{} {}", self.kind.as_str(), self.name),
        }
    }
}

/// Condition types written by the controller.
pub mod condition {
    /// The spec is valid and the object takes part in routing.
    pub const ACCEPTED: &str = "Accepted";
    /// Everything the object references (MockTarget, Service, Secret, ...) resolved.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// Connected proxies applied a snapshot containing this generation.
    pub const PROGRAMMED: &str = "Programmed";
    /// Summary of the others, for the printer column.
    pub const READY: &str = "Ready";
}

/// One condition as compile decided it (timestamps are added by whoever writes status).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Condition {
    /// `Accepted`, `ResolvedRefs`, ...
    #[serde(rename = "type")]
    pub type_: &'static str,
    /// True or False (serialised as `"True"`/`"False"`, as in Kubernetes).
    #[serde(serialize_with = "true_false")]
    pub status: bool,
    /// CamelCase machine-readable reason.
    pub reason: String,
    /// Human-readable explanation; names the error code requests get when False.
    pub message: String,
}

fn true_false<S: serde::Serializer>(status: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *status { "True" } else { "False" })
}

impl Condition {
    /// A condition with status True.
    pub fn ok(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            type_,
            status: true,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// A condition with status False.
    pub fn failed(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            type_,
            status: false,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// The `Ready` condition for a set of conditions: the first False one decides the reason.
pub fn summarize<'a>(conditions: impl IntoIterator<Item = &'a Condition>) -> Condition {
    match conditions.into_iter().find(|c| !c.status) {
        Some(bad) => Condition::failed(condition::READY, &bad.reason, bad.message.clone()),
        None => Condition::ok(
            condition::READY,
            "Ready",
            "accepted and all references resolved",
        ),
    }
}

/// Everything compile has to say about one object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Diagnostic {
    /// The object.
    pub object: ObjectRef,
    /// `metadata.generation` that was compiled, when known.
    #[serde(rename = "observedGeneration", skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// `Accepted` and `ResolvedRefs`, in that order.
    pub conditions: Vec<Condition>,
    /// Short backend summary for ApiProxies (`mock:name`, `endpoint:url`, `service:name:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

impl Diagnostic {
    /// Whether every condition compile produced is True.
    pub fn is_ok(&self) -> bool {
        self.conditions.iter().all(|c| c.status)
    }

    /// The `Ready` condition summarising the others: the first False condition decides the
    /// reason, so `kubectl get` shows the most fundamental problem.
    pub fn ready(&self) -> Condition {
        summarize(&self.conditions)
    }

    /// The condition of the given type, if compile produced it.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn mk_diagnostic(conditions: Vec<Condition>) -> Diagnostic {
        Diagnostic {
            object: ObjectRef {
                kind: Kind::ApiProxy,
                namespace: Some("ns".to_owned()),
                name: "p".to_owned(),
            },
            generation: Some(2),
            conditions,
            backend: Some("mock:m".to_owned()),
        }
    }

    #[test]
    fn ready_is_true_when_every_condition_is() {
        let d = mk_diagnostic(vec![
            Condition::ok(condition::ACCEPTED, "Accepted", "fine"),
            Condition::ok(condition::RESOLVED_REFS, "ResolvedRefs", "fine"),
        ]);
        assert!(d.is_ok());
        let ready = d.ready();
        assert_eq!(
            (ready.type_, ready.status, ready.reason.as_str()),
            (condition::READY, true, "Ready")
        );
    }

    #[test]
    fn ready_takes_the_first_false_condition() {
        let d = mk_diagnostic(vec![
            Condition::ok(condition::ACCEPTED, "Accepted", "fine"),
            Condition::failed(
                condition::RESOLVED_REFS,
                "ServiceNotFound",
                "no svc; error 10",
            ),
            Condition::failed(condition::PROGRAMMED, "PluginLoadFailed", "later"),
        ]);
        assert!(!d.is_ok());
        assert_eq!(
            d.ready(),
            Condition::failed(condition::READY, "ServiceNotFound", "no svc; error 10")
        );
        let first = mk_diagnostic(vec![
            Condition::failed(condition::ACCEPTED, "Invalid", "bad path"),
            Condition::failed(condition::RESOLVED_REFS, "MockTargetNotFound", "x"),
        ]);
        assert_eq!(first.ready().reason, "Invalid");
    }

    #[test]
    fn condition_finds_by_type() {
        let d = mk_diagnostic(vec![
            Condition::ok(condition::ACCEPTED, "Accepted", "a"),
            Condition::failed(condition::RESOLVED_REFS, "X", "b"),
        ]);
        assert_eq!(d.condition(condition::RESOLVED_REFS).unwrap().reason, "X");
        assert!(d.condition(condition::PROGRAMMED).is_none());
    }

    #[test]
    fn object_refs_display_and_sort_by_kind_namespace_name() {
        let r = |kind, ns: Option<&str>, name: &str| ObjectRef {
            kind,
            namespace: ns.map(str::to_owned),
            name: name.to_owned(),
        };
        assert_eq!(r(Kind::ApiKey, None, "k").to_string(), "ApiKey k");
        assert_eq!(
            r(Kind::MockTarget, Some("ns"), "m").to_string(),
            "MockTarget ns/m"
        );
        let mut refs = [
            r(Kind::ApiKeyBinding, Some("a"), "a"),
            r(Kind::ApiKey, None, "a"),
            r(Kind::MockTarget, Some("a"), "a"),
            r(Kind::ApiProxy, Some("b"), "a"),
            r(Kind::ApiProxy, Some("a"), "b"),
        ];
        refs.sort();
        let shown: Vec<String> = refs.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "ApiProxy a/b",
                "ApiProxy b/a",
                "MockTarget a/a",
                "ApiKey a",
                "ApiKeyBinding a/a"
            ]
        );
    }

    #[test]
    fn serialises_like_kubernetes_status() {
        let d = mk_diagnostic(vec![Condition::failed(
            condition::ACCEPTED,
            "Invalid",
            "bad",
        )]);
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({
                "object": {"kind": "ApiProxy", "namespace": "ns", "name": "p"},
                "observedGeneration": 2,
                "conditions": [
                    {"type": "Accepted", "status": "False", "reason": "Invalid", "message": "bad"}
                ],
                "backend": "mock:m",
            })
        );
        let key = Diagnostic {
            object: ObjectRef {
                kind: Kind::ApiKey,
                namespace: None,
                name: "k".to_owned(),
            },
            generation: None,
            conditions: vec![Condition::ok(condition::ACCEPTED, "Accepted", "ok")],
            backend: None,
        };
        assert_eq!(
            serde_json::to_value(&key).unwrap(),
            serde_json::json!({
                "object": {"kind": "ApiKey", "name": "k"},
                "conditions": [
                    {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "ok"}
                ],
            })
        );
    }
}
