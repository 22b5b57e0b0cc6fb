//! The objects the scenarios apply, as YAML for `kubectl apply -n <test namespace> -f -`.

use std::net::IpAddr;

/// An ApiProxy on `path` to `endpoint` (`http(s)://host:port`), upstream path `target`.
pub fn endpoint_proxy(name: &str, path: &str, endpoint: &str, target: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: {name}}}
spec:
  source: {{path: "{path}"}}
  target:
    path: {target}
    backend: {{endpoint: "{endpoint}"}}
"#
    )
}

/// An ApiProxy on `path` answered by MockTarget `mock`.
pub fn mock_proxy(name: &str, path: &str, mock: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: {name}}}
spec:
  source: {{path: {path}}}
  target: {{backend: {{mock: {{mockTargetName: {mock}}}}}}}
"#
    )
}

/// A MockTarget answering `GET /users` with `[{"id":1}]` and `x-mock: yes`.
pub fn users_mock(name: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: MockTarget
metadata: {{name: {name}}}
spec:
  routes:
  - path: /users
    status: 200
    methods: [GET]
    headers: {{content-type: application/json, x-mock: "yes"}}
    body: '[{{"id":1}}]'
"#
    )
}

/// An ApiProxy on `path` to `https://host:port` `endpoint` with TLS material from Secret
/// `secret`.
pub fn tls_endpoint_proxy(name: &str, path: &str, endpoint: &str, secret: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: {name}}}
spec:
  source: {{path: "{path}"}}
  target:
    backend: {{endpoint: "{endpoint}"}}
    ssl: {{secretName: {secret}}}
"#
    )
}

/// An ApiProxy on `path` to port `port` of Service `service`, over https with TLS material
/// from Secret `ssl` when given.
pub fn service_proxy(
    name: &str,
    path: &str,
    service: &str,
    port: u16,
    ssl: Option<&str>,
) -> String {
    let ssl = ssl
        .map(|secret| format!("    ssl: {{secretName: {secret}}}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: {name}}}
spec:
  source: {{path: "{path}"}}
  target:
    backend:
      service: {{name: {service}, port: {port}}}
{ssl}"#
    )
}

/// Where a dynamic Service backend takes a label's value from.
pub enum Label<'a> {
    /// This value.
    Value(&'a str),
    /// The request header of this name.
    Header(&'a str),
}

/// An ApiProxy on `path` to port `port` of the Service whose labels equal `labels`, chosen per
/// request.
pub fn dynamic_service_proxy(
    name: &str,
    path: &str,
    labels: &[(&str, Label<'_>)],
    port: u16,
) -> String {
    let labels: String = labels
        .iter()
        .map(|(label, source)| match source {
            Label::Value(v) => format!("        - {{name: {label}, value: \"{v}\"}}\n"),
            Label::Header(h) => format!("        - {{name: {label}, header: {h}}}\n"),
        })
        .collect();
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: {name}}}
spec:
  source: {{path: "{path}"}}
  target:
    backend:
      service:
        port: {port}
        labels:
{labels}"#
    )
}

/// A Service without a selector (so no controller manages its Endpoints), with `labels`, whose
/// port `port` maps to `target_port`.
pub fn service(name: &str, labels: &[(&str, &str)], port: u16, target_port: u16) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  labels: {{{labels}}}
spec:
  ports: [{{port: {port}, targetPort: {target_port}}}]
"#,
        labels = labels.join(", ")
    )
}

/// The core Endpoints of Service `name`: one ready address `ip:port` (the API server refuses
/// loopback addresses here; see [`super::test_host`]).
pub fn endpoints(name: &str, ip: IpAddr, port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Endpoints
metadata: {{name: {name}}}
subsets:
- addresses: [{{ip: "{ip}"}}]
  ports: [{{port: {port}}}]
"#
    )
}

/// A Secret with upstream TLS material (`tls.ca`, `tls.crt`, `tls.key`, PEM), opted in with
/// `kanali.io/enabled: "true"` when `enabled`.
pub fn tls_secret(name: &str, enabled: bool, ca: &str, cert: &str, key: &str) -> String {
    let annotations = if enabled {
        "\n  annotations: {kanali.io/enabled: \"true\"}"
    } else {
        ""
    };
    format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: {name}{annotations}
type: Opaque
data:
  tls.ca: {ca}
  tls.crt: {cert}
  tls.key: {key}
"#,
        ca = base64(ca.as_bytes()),
        cert = base64(cert.as_bytes()),
        key = base64(key.as_bytes()),
    )
}

/// Standard base64 with padding, as Secret `data` wants it.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_the_rfc_4648_vectors() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), encoded);
    }
}
