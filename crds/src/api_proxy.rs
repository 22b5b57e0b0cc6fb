//! `ApiProxy`: one externally reachable path (optionally per virtual host) and where Kanali
//! sends the requests for it.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Condition;

/// Desired state of an ApiProxy: which requests it matches (`source`), where they go
/// (`target`) and which plugins run on them (`plugins`).
// Each `printcolumn(...)` repeats `type_ = ...`; clippy mistakes that for a duplicate attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kanali.io",
    version = "v2",
    kind = "ApiProxy",
    plural = "apiproxies",
    singular = "apiproxy",
    shortname = "ap",
    namespaced,
    status = "ApiProxyStatus",
    derive = "PartialEq",
    doc = "An ApiProxy publishes one path prefix (optionally for one virtual host) through the Kanali gateway and says where the matching requests go: an external endpoint, a Service in the same namespace, or a MockTarget. Requests that match no ApiProxy get Kanali error 00 (404).",
    printcolumn(
        name = "Path",
        type_ = "string",
        json_path = ".spec.source.path",
        description = "Public path prefix"
    ),
    printcolumn(
        name = "Host",
        type_ = "string",
        json_path = ".spec.source.virtualHost",
        description = "Virtual host (empty: any host)"
    ),
    printcolumn(
        name = "Backend",
        type_ = "string",
        json_path = ".status.backend",
        description = "Where requests go"
    ),
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
pub struct ApiProxySpec {
    /// Which incoming requests this ApiProxy handles.
    pub source: Source,
    /// Where matching requests are sent.
    pub target: Target,
    /// Plugins run on every matching request, in list order, before the request reaches the
    /// backend. Empty or omitted: no plugins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<Plugin>,
}

/// The requests an ApiProxy matches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Public path prefix, in URL-escaped form, starting with `/` (e.g. `/api/orders`).
    /// Repeated and trailing slashes are ignored. It matches whole path segments: `/api/orders`
    /// matches `/api/orders` and `/api/orders/42` but not `/api/ordersx`. When several
    /// ApiProxies match, the longest prefix wins.
    #[schemars(length(min = 1), regex(pattern = r"^/"))]
    pub path: String,
    /// Host the request must be addressed to (e.g. `api.example.org`), compared with the
    /// request's `Host` header (HTTP/2: `:authority`) case-insensitively, including `:port`
    /// when the client sent one: `api.example.org:8443` only matches requests that name that
    /// port. Wildcards are not supported. Omitted or empty: any host. For one path, an
    /// ApiProxy for the request's host wins over one for any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_host: Option<String>,
}

/// Where an ApiProxy sends the requests it matches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Upstream path prefix that replaces `source.path`, starting with `/` (e.g. `/v1/orders`
    /// turns `/api/orders/42` into `/v1/orders/42`). Omitted: `/`, so the source prefix is
    /// simply removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// The backend that answers the requests. Set exactly one of `endpoint`, `service` and
    /// `mock`.
    pub backend: Backend,
    /// TLS settings for the connection to the backend (client certificate and/or CA bundle).
    /// Omitted: a Service backend is reached over plain HTTP, an `https://` endpoint is
    /// verified against the system's root certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl: Option<Ssl>,
    /// How long the backend has to start answering, as a number with the unit `ms`, `s` or
    /// `m` (e.g. `2500ms`, `30s`), from 1 ms to 1 h. When it expires the request gets error 08
    /// (502). Omitted: the proxies' default (`--upstream-timeout-secs`, 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,7}(ms|s|m)$"))]
    pub timeout: Option<String>,
}

/// The backend of an ApiProxy: exactly one of `endpoint`, `service` and `mock`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["endpoint"]},
    {"required": ["service"]},
    {"required": ["mock"]}
]))]
pub struct Backend {
    /// External upstream as an absolute URL `http://host[:port]` or `https://host[:port]`
    /// (e.g. `https://weather.partner.example:9443`). It may not contain a path, query or
    /// user info — the upstream path comes from `target.path` — and an ApiProxy with one is
    /// not accepted. Port omitted: 80 for http, 443 for https. If the upstream cannot be
    /// reached or does not answer, requests get error 08 (502).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), regex(pattern = r"^https?://[^/?#@]+/?$"))]
    pub endpoint: Option<String>,
    /// A Service in the ApiProxy's namespace, chosen by name or by labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceBackend>,
    /// Answer from a MockTarget instead of calling an upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockBackend>,
}

/// A Service backend: set exactly one of `name` (a fixed Service) and `labels` (a Service
/// chosen per request by its labels).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["name"]},
    {"required": ["labels"]}
]))]
pub struct ServiceBackend {
    /// Name of a Service in the ApiProxy's namespace. If it does not exist, requests get
    /// error 10 (500) and the ApiProxy reports `ResolvedRefs=False` with reason
    /// `ServiceNotFound`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
    /// Service port Kanali connects to (1-65535). Used as given; it is not checked against the
    /// Service's ports.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i64,
    /// Labels that select the Service per request (dynamic discovery): a Service in the
    /// ApiProxy's namespace whose labels equal all of these. No matching Service: error 10
    /// (500). Several matches: one is used and the response carries the header
    /// `x-kanali-service-cardinality` with the number of matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1))]
    pub labels: Vec<ServiceLabel>,
}

/// One label a dynamically discovered Service must carry: set exactly one of `value` (fixed)
/// and `header` (taken from the request).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["value"]},
    {"required": ["header"]}
]))]
pub struct ServiceLabel {
    /// Label key on the Service (e.g. `app`).
    #[schemars(length(min = 1))]
    pub name: String,
    /// Fixed label value (e.g. `catalog`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub value: Option<String>,
    /// Name of a request header (case-insensitive) whose value is used as the label value
    /// (e.g. `x-release-track`). If the request lacks the header, the gateway's configured
    /// default for that header is used, else the empty value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub header: Option<String>,
}

/// A mock backend: canned responses from a MockTarget.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MockBackend {
    /// Name of a MockTarget in the ApiProxy's namespace. No upstream is called. If the
    /// MockTarget does not exist or has no route for the request, requests get error 02 (404)
    /// and a missing MockTarget is reported as `ResolvedRefs=False` with reason
    /// `MockTargetNotFound`.
    #[schemars(length(min = 1, max = 253))]
    pub mock_target_name: String,
}

/// TLS material for the connection to the backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ssl {
    /// Name of a Secret in the ApiProxy's namespace. It must carry the annotation
    /// `kanali.io/enabled: "true"` and at least one of the data keys `tls.crt` + `tls.key`
    /// (client certificate and key, PEM) and `tls.ca` (CA bundle, PEM; when present it replaces
    /// the system roots). The annotations `kanali.io/cert`, `kanali.io/key` and `kanali.io/ca`
    /// name other data keys. For a Service backend its presence switches the scheme to https.
    /// Secret missing, not enabled or without data: error 06 (500); certificate and key that do
    /// not match: error 07 (500).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// A plugin run on the requests of an ApiProxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plugin {
    /// Plugin name. `apikey` (any letter case) is the built-in API key check; any other name
    /// is a WebAssembly module loaded from the proxies' plugin directory. A module that cannot
    /// be loaded gives errors 03, 04 or 05 (500); a plugin that fails at run time gives
    /// error 11 (500).
    #[schemars(length(min = 1))]
    pub name: String,
    /// Version of a custom plugin module (e.g. `v1.2.0`), used to pick the module file.
    /// Ignored for the built-in `apikey` plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Settings passed to the plugin, string keys to string values. The `apikey` plugin needs
    /// `apiKeyBindingName`: the ApiKeyBinding in this namespace that lists the allowed keys.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// Observed state of an ApiProxy, written by the Kanali controller only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::structural)]
pub struct ApiProxyStatus {
    /// The `metadata.generation` of the ApiProxy that the conditions describe. When it is lower
    /// than `metadata.generation`, the controller has not processed the latest change yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current conditions, at most one per `type`: `Accepted` (the spec is valid),
    /// `ResolvedRefs` (Services, Secrets and MockTargets it refers to exist and are usable),
    /// `Programmed` (the proxies applied it) and `Ready` (all of these hold). Each carries a
    /// machine-readable `reason` and a human-readable `message`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Short summary of the backend, for display: `endpoint:<url>`, `service:<name>:<port>`
    /// (or `service:<labels>:<port>` for label selection) or `mock:<mockTargetName>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::test_support::round_trip;

    #[test]
    fn static_service_with_tls_and_apikey_plugin() {
        let proxy: ApiProxy = round_trip(
            r#"
apiVersion: kanali.io/v2
kind: ApiProxy
metadata:
  name: orders
  namespace: shop
spec:
  source:
    path: /api/orders
    virtualHost: api.example.org
  target:
    path: /v1/orders
    backend:
      service:
        name: orders-svc
        port: 8443
    ssl:
      secretName: orders-upstream-tls
  plugins:
  - name: apikey
    config:
      apiKeyBindingName: orders-access
"#,
        );
        let spec = &proxy.spec;
        assert_eq!(spec.source.path, "/api/orders");
        assert_eq!(spec.source.virtual_host.as_deref(), Some("api.example.org"));
        assert_eq!(spec.target.path.as_deref(), Some("/v1/orders"));
        let service = spec.target.backend.service.as_ref().unwrap();
        assert_eq!(
            (service.name.as_deref(), service.port),
            (Some("orders-svc"), 8443)
        );
        assert!(service.labels.is_empty());
        assert_eq!(
            spec.target.ssl.as_ref().unwrap().secret_name,
            "orders-upstream-tls"
        );
        assert_eq!(spec.plugins.len(), 1);
        assert_eq!(spec.plugins[0].name, "apikey");
        assert_eq!(spec.plugins[0].version, None);
        assert_eq!(spec.plugins[0].config["apiKeyBindingName"], "orders-access");
        assert_eq!(proxy.status, None);
    }

    #[test]
    fn dynamic_service_selected_by_labels() {
        let proxy: ApiProxy = round_trip(
            r#"
apiVersion: kanali.io/v2
kind: ApiProxy
metadata:
  name: catalog
  namespace: shop
spec:
  source:
    path: /catalog
  target:
    path: /
    backend:
      service:
        port: 8080
        labels:
        - name: app
          value: catalog
        - name: track
          header: x-release-track
"#,
        );
        let service = proxy.spec.target.backend.service.unwrap();
        assert_eq!((service.name, service.port), (None, 8080));
        assert_eq!(
            service.labels,
            vec![
                ServiceLabel {
                    name: "app".into(),
                    value: Some("catalog".into()),
                    header: None
                },
                ServiceLabel {
                    name: "track".into(),
                    value: None,
                    header: Some("x-release-track".into())
                },
            ]
        );
        assert!(proxy.spec.plugins.is_empty());
    }

    #[test]
    fn external_endpoint() {
        let proxy: ApiProxy = round_trip(
            r#"
apiVersion: kanali.io/v2
kind: ApiProxy
metadata:
  name: weather
  namespace: partners
spec:
  source:
    path: /weather
  target:
    backend:
      endpoint: https://weather.partner.example:9443
"#,
        );
        let target = &proxy.spec.target;
        assert_eq!(target.path, None);
        assert_eq!(
            target.backend,
            Backend {
                endpoint: Some("https://weather.partner.example:9443".into()),
                service: None,
                mock: None
            }
        );
        assert_eq!(target.ssl, None);
    }

    #[test]
    fn mock_only_backend_and_status() {
        let proxy: ApiProxy = round_trip(
            r#"
apiVersion: kanali.io/v2
kind: ApiProxy
metadata:
  name: orders-mock
  namespace: shop
spec:
  source:
    path: /api/orders
  target:
    backend:
      mock:
        mockTargetName: orders-mock
status:
  observedGeneration: 3
  backend: mock:orders-mock
  conditions:
  - type: Ready
    status: "True"
    reason: Ready
    message: ""
    lastTransitionTime: "2026-11-25T10:00:00Z"
    observedGeneration: 3
"#,
        );
        assert_eq!(
            proxy.spec.target.backend.mock,
            Some(MockBackend {
                mock_target_name: "orders-mock".into()
            })
        );
        let status = proxy.status.unwrap();
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.backend.as_deref(), Some("mock:orders-mock"));
        assert_eq!(status.conditions[0].type_, crate::READY_CONDITION);
    }

    #[test]
    fn plugin_config_values_must_be_strings() {
        let err = serde_json::from_value::<Plugin>(serde_json::json!({
            "name": "ratelimit", "config": {"limit": 5}
        }));
        assert!(err.is_err());
    }
}
