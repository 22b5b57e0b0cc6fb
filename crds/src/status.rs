//! The status shared by `MockTarget`, `ApiKey` and `ApiKeyBinding` (`ApiProxy` has its own
//! [`ApiProxyStatus`](crate::ApiProxyStatus), which adds a backend summary).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Condition type summarising whether a resource is fully in effect. The `Ready` and `Reason`
/// printer columns of every Kanali kind read this condition.
pub const READY_CONDITION: &str = "Ready";

/// Observed state of a Kanali resource, written by the Kanali controller only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::structural)]
pub struct Status {
    /// The `metadata.generation` of the resource that the conditions describe. When it is lower
    /// than `metadata.generation`, the controller has not processed the latest change yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions, at most one per `type`. `Ready` summarises the others; `Accepted`
    /// (the spec is valid), `ResolvedRefs` (referenced objects exist and are usable) and
    /// `Programmed` (the proxies applied it) say what is wrong, with a machine-readable
    /// `reason` and a human-readable `message`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
