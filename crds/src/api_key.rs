//! `ApiKey`: an API key (cluster-scoped), stored encrypted, with all its revisions.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Condition;

/// Desired state of an ApiKey: its revisions.
// Each `printcolumn(...)` repeats `type_ = ...`; clippy mistakes that for a duplicate attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kanali.io",
    version = "v2",
    kind = "ApiKey",
    plural = "apikeys",
    singular = "apikey",
    shortname = "ak",
    status = "ApiKeyStatus",
    derive = "PartialEq",
    doc = "An ApiKey is one API key, identified by its name. The key itself is stored only encrypted with the Kanali controller's RSA public key. ApiKeyBindings grant a key access to ApiProxies by naming it; clients send the plaintext key in the `apikey` request header.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Last Used",
        type_ = "date",
        json_path = ".status.lastUsed",
        description = "When a request last presented any revision of this key"
    ),
    printcolumn(
        name = "Older Used",
        type_ = "date",
        json_path = ".status.olderRevisionsLastUsed",
        description = "When a request last presented a revision other than the newest Active one: once stale after a rotation, the older revisions can go"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::structural)]
pub struct ApiKeySpec {
    /// Revisions of the key, at least one. Keeping the old revision `Active` while clients
    /// move to a new one allows rotation without downtime.
    #[schemars(length(min = 1))]
    pub revisions: Vec<Revision>,
}

/// One revision (value) of an API key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// The encrypted key: base64 (standard) of the lowercase hex of the RSA-OAEP (SHA-256,
    /// label `kanali`) ciphertext of the plaintext key, as printed by `kanalictl apikey
    /// generate`. A revision that cannot be decrypted makes the ApiKey not Ready.
    #[schemars(length(min = 1))]
    pub data: String,
    /// Whether this revision is accepted: `Active` or `Inactive`. Requests with an `Inactive`
    /// revision get error 13 (401).
    pub status: RevisionStatus,
    /// Kanali v2's field, kept for compatibility and never written: the controller reports
    /// use in `status.revisions[].lastUsed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
}

/// Observed state of an ApiKey, written by the Kanali controller only: conditions, and when
/// each revision was last used, so a rotation can be finished safely (rotate, watch the older
/// revisions' use stop, remove them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::structural)]
pub struct ApiKeyStatus {
    /// The `metadata.generation` of the ApiKey that the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions, at most one per `type`: `Accepted` (every revision decrypts with
    /// the controller's key; `DecryptionFailed` names the revisions that do not), `ResolvedRefs`,
    /// `Programmed` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Per revision, in `spec.revisions` order: when requests last presented it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<RevisionUsage>,
    /// When a request last presented any revision (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    /// When a request last presented a revision other than the newest (last listed) Active
    /// one (RFC 3339). After a rotation, clients still on an older revision keep this recent;
    /// once it is stale, the older revisions can be removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_revisions_last_used: Option<String>,
}

/// The use of one revision, as the proxies report it (at most once a minute per key).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionUsage {
    /// Index in `spec.revisions`.
    pub index: u32,
    /// Identifies the revision whatever its position: the first 16 hex digits of SHA-256 of
    /// its `data`.
    pub id: String,
    /// `Active` or `Inactive`, as in the spec (a request with an Inactive revision is refused
    /// but still counts as a use: a client that has not switched yet).
    pub status: RevisionStatus,
    /// When a request last presented this revision (RFC 3339); absent: not since the
    /// controller started watching usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
}

/// Whether an ApiKey revision is accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RevisionStatus {
    /// The revision authenticates requests.
    #[default]
    Active,
    /// The revision is kept for reference but no longer authenticates requests.
    Inactive,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::test_support::round_trip;

    #[test]
    fn spec_example() {
        let key: ApiKey = round_trip(
            r#"
apiVersion: kanali.io/v2
kind: ApiKey
metadata:
  name: mobile-app
spec:
  revisions:
  - status: Active
    data: NjE2MjYzNjQ2NTY2
  - status: Inactive
    data: NjY2NTY0NjM2MjYx
    lastUsed: "2026-11-01T12:00:00Z"
"#,
        );
        assert_eq!(key.metadata.namespace, None);
        let revisions = &key.spec.revisions;
        assert_eq!(revisions.len(), 2);
        assert_eq!(revisions[0].status, RevisionStatus::Active);
        assert_eq!(revisions[0].last_used, None);
        assert_eq!(revisions[1].status, RevisionStatus::Inactive);
        assert_eq!(
            revisions[1].last_used.as_deref(),
            Some("2026-11-01T12:00:00Z")
        );
    }

    #[test]
    fn revision_status_is_case_sensitive() {
        assert_eq!(
            serde_json::to_value(RevisionStatus::Inactive).unwrap(),
            "Inactive"
        );
        assert!(serde_json::from_value::<RevisionStatus>("active".into()).is_err());
    }
}
