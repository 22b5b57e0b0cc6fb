//! `ApiKeyBinding`: which ApiKeys may call the ApiProxies that name this binding, with which
//! methods, on which paths, and how often.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Status;

/// Desired state of an ApiKeyBinding: one entry per ApiKey it grants access to.
// Each `printcolumn(...)` repeats `type_ = ...`; clippy mistakes that for a duplicate attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kanali.io",
    version = "v2",
    kind = "ApiKeyBinding",
    plural = "apikeybindings",
    singular = "apikeybinding",
    shortname = "akb",
    namespaced,
    status = "Status",
    derive = "PartialEq",
    doc = "An ApiKeyBinding grants ApiKeys access to the ApiProxies in its namespace whose `apikey` plugin names it (plugin config `apiKeyBindingName`). A request without an `apikey` header gets Kanali error 12 (403); an unknown key, a missing binding, a key not listed here or a method not allowed gets error 13 (401); a key over its rate limit gets error 14 (429).",
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
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::structural)]
pub struct ApiKeyBindingSpec {
    /// The ApiKeys granted access, at least one.
    #[schemars(length(min = 1))]
    pub keys: Vec<Key>,
}

/// The access one ApiKey gets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    /// Name of the ApiKey (ApiKeys are cluster-scoped).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Rule for requests whose upstream path matches none of `subpaths`. Omitted: such
    /// requests are denied (error 13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_rule: Option<Rule>,
    /// Rules for particular upstream paths, tried in list order; the first whose `path`
    /// matches decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subpaths: Vec<Subpath>,
    /// Rate limit for this key on the ApiProxies using this binding. Omitted: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

/// Which methods a rule allows: set exactly one of `global` and `granular`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["global"]},
    {"required": ["granular"]}
]))]
pub struct Rule {
    /// `true`: every method is allowed. `false`: nothing is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<bool>,
    /// Only the listed methods are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granular: Option<GranularRule>,
}

/// A rule that allows a list of methods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GranularRule {
    /// Allowed request methods, at least one (upper case, e.g. `GET`). `OPTIONS` requests
    /// (CORS preflight) are always let through by the `apikey` plugin.
    #[schemars(length(min = 1))]
    #[schemars(extend("items" = {"type": "string", "enum": crate::schema::HTTP_METHODS}))]
    pub verbs: Vec<String>,
}

/// A rule for part of the upstream path space.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Subpath {
    /// Regular expression (RE2 syntax) matched against the start of the upstream path, i.e.
    /// the request path after the ApiProxy's `source.path` to `target.path` rewrite. It is
    /// anchored at the start only: `/v1/orders` also matches `/v1/orders/42` and
    /// `/v1/ordersx`; end it with `$` for an exact match.
    #[schemars(length(min = 1), regex(pattern = r"^/"))]
    pub path: String,
    /// The rule applied when `path` matches.
    pub rule: Rule,
}

/// A rate limit: at most `amount` requests per `unit`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    /// Number of requests allowed per `unit` (at least 1). Requests over the limit get
    /// error 14 (429).
    #[schemars(range(min = 1))]
    pub amount: i64,
    /// Time window of the limit: `SECOND`, `MINUTE` or `HOUR`.
    pub unit: RateUnit,
}

/// Time window of a rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RateUnit {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::test_support::round_trip;

    #[test]
    fn spec_example() {
        let binding: ApiKeyBinding = round_trip(
            r#"
apiVersion: kanali.io/v2
kind: ApiKeyBinding
metadata:
  name: orders-access
  namespace: shop
spec:
  keys:
  - name: mobile-app
    defaultRule:
      granular:
        verbs: [GET, HEAD]
    subpaths:
    - path: /v1/orders/[0-9]+/cancel$
      rule:
        granular:
          verbs: [POST]
    - path: /v1/orders/admin
      rule:
        global: false
  - name: backoffice
    defaultRule:
      global: true
    rate:
      amount: 100
      unit: MINUTE
"#,
        );
        let keys = &binding.spec.keys;
        assert_eq!(keys.len(), 2);
        let mobile = &keys[0];
        assert_eq!(mobile.name, "mobile-app");
        assert_eq!(
            mobile.default_rule,
            Some(Rule {
                global: None,
                granular: Some(GranularRule {
                    verbs: vec!["GET".into(), "HEAD".into()]
                })
            })
        );
        assert_eq!(mobile.subpaths.len(), 2);
        assert_eq!(mobile.subpaths[0].path, "/v1/orders/[0-9]+/cancel$");
        assert_eq!(
            mobile.subpaths[1].rule,
            Rule {
                global: Some(false),
                granular: None
            }
        );
        assert_eq!(mobile.rate, None);
        let backoffice = &keys[1];
        assert_eq!(backoffice.default_rule.as_ref().unwrap().global, Some(true));
        assert!(backoffice.subpaths.is_empty());
        assert_eq!(
            backoffice.rate,
            Some(Rate {
                amount: 100,
                unit: RateUnit::Minute
            })
        );
    }

    #[test]
    fn rate_units_are_upper_case() {
        for (unit, text) in [
            (RateUnit::Second, "SECOND"),
            (RateUnit::Minute, "MINUTE"),
            (RateUnit::Hour, "HOUR"),
        ] {
            assert_eq!(serde_json::to_value(unit).unwrap(), text);
            assert_eq!(
                serde_json::from_value::<RateUnit>(text.into()).unwrap(),
                unit
            );
        }
        // The v2 docs used lower case, which the v2 schema (and this one) rejects.
        assert!(serde_json::from_value::<RateUnit>("second".into()).is_err());
    }
}
