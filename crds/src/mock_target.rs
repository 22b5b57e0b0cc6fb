//! `MockTarget`: canned HTTP responses that an ApiProxy with a `mock` backend serves instead
//! of calling an upstream.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::Status;

/// Desired state of a MockTarget: the routes it answers.
// Each `printcolumn(...)` repeats `type_ = ...`; clippy mistakes that for a duplicate attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kanali.io",
    version = "v2",
    kind = "MockTarget",
    plural = "mocktargets",
    singular = "mocktarget",
    shortname = "mt",
    namespaced,
    status = "Status",
    derive = "PartialEq",
    doc = "A MockTarget holds canned HTTP responses. An ApiProxy in the same namespace whose backend is `mock: {mockTargetName: <name>}` answers from it without calling any upstream; a request for which no route matches gets Kanali error 02 (404).",
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
pub struct MockTargetSpec {
    /// The canned responses, at least one.
    #[schemars(length(min = 1))]
    pub routes: Vec<MockRoute>,
}

/// One canned response. Set at most one of `body` and `bodyBase64`; neither means an empty
/// body.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("not" = {"required": ["body", "bodyBase64"]}))]
pub struct MockRoute {
    /// Path this route answers (e.g. `/v1/orders`), compared segment by segment with the
    /// request path after the ApiProxy's `source.path` to `target.path` rewrite. The most
    /// specific route that allows the request's method wins: `/v1/orders` also answers
    /// `/v1/orders/42` unless a route for `/v1/orders/42` exists; `/` answers every path.
    /// Starts with `/`; percent-escapes are compared as written.
    #[schemars(length(min = 1), regex(pattern = r"^/"))]
    pub path: String,
    /// HTTP status code of the response (200-599; interim 1xx statuses cannot be mocked).
    #[schemars(range(min = 200, max = 599))]
    pub status: i64,
    /// Request methods this route answers (upper case, e.g. `GET`). Empty or omitted: every
    /// method. A request whose path and method no route answers gets error 02 (404).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = {"type": "string", "enum": crate::schema::HTTP_METHODS}))]
    pub methods: Vec<String>,
    /// Response headers, header name to value (e.g. `content-type: application/json`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Response body as plain UTF-8 text (e.g. a JSON document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Response body as standard base64, for binary content. Mutually exclusive with `body`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "byte"))]
    pub body_base64: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::test_support::round_trip;

    #[test]
    fn spec_example_with_plain_text_body() {
        let mock: MockTarget = round_trip(
            r#"
apiVersion: kanali.io/v2
kind: MockTarget
metadata:
  name: orders-mock
  namespace: shop
spec:
  routes:
  - path: /v1/orders
    status: 200
    methods: [GET]
    headers:
      content-type: application/json
    body: '{"orders":[]}'
"#,
        );
        assert_eq!(
            mock.spec.routes,
            vec![MockRoute {
                path: "/v1/orders".into(),
                status: 200,
                methods: vec!["GET".into()],
                headers: BTreeMap::from([("content-type".into(), "application/json".into())]),
                body: Some(r#"{"orders":[]}"#.into()),
                body_base64: None,
            }]
        );
    }

    #[test]
    fn binary_body_and_defaults() {
        let mock: MockTarget = round_trip(
            r#"
apiVersion: kanali.io/v2
kind: MockTarget
metadata:
  name: blobs
  namespace: shop
spec:
  routes:
  - path: /logo.png
    status: 404
    bodyBase64: iVBORw0KGgo=
"#,
        );
        let route = &mock.spec.routes[0];
        assert!(route.methods.is_empty(), "no methods means every method");
        assert!(route.headers.is_empty());
        assert_eq!(route.body, None);
        assert_eq!(route.body_base64.as_deref(), Some("iVBORw0KGgo="));
    }
}
