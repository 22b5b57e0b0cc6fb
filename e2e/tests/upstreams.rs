//! Issue #4 end to end in standalone mode: a controller reading a manifests directory with
//! Secrets, Services and EndpointSlices, a proxy subscribed to it, and real upstreams — HTTPS
//! with certificates made in the test, mTLS, HTTP/2, and several endpoint servers.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kanali_controller::Controller;
use kanali_dataplane::upstream::AddressMode;
use kanali_dataplane::upstream::dynamic::HeaderDefaults;
use kanali_dataplane::{ProxyConfig, RunningProxy};
use kanali_e2e::check::{Answer, eventually};
use kanali_e2e::openssl::OpensslPki;
use kanali_e2e::setup;
use kanali_e2e::tls::{Ca, Issued, start_tls_echo};
use kanali_e2e::{Echo, start_echo};

const ANY: &str = "127.0.0.1:0";

struct Env {
    dir: tempfile::TempDir,
    controller: Controller,
    proxy: RunningProxy,
    http: Client<HttpConnector, Empty<Bytes>>,
    h2c: Client<HttpConnector, Empty<Bytes>>,
}

impl Env {
    /// A controller on `manifests` and one proxy, adjusted by `tweak`.
    async fn start(manifests: &str, tweak: impl FnOnce(&mut ProxyConfig)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("api.yaml"), manifests).unwrap();
        let controller = kanali_controller::start_standalone(setup::controller(dir.path()))
            .await
            .unwrap();
        let mut config = setup::proxy(controller.grpc_addr, "proxy");
        tweak(&mut config);
        let proxy = kanali_dataplane::start(config).await.unwrap();
        let env = Env {
            dir,
            controller,
            proxy,
            http: Client::builder(TokioExecutor::new()).build_http(),
            h2c: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        };
        env.wait_applied().await;
        env
    }

    /// Waits until the proxy serves the controller's newest snapshot.
    async fn wait_applied(&self) {
        eventually("the proxy applies the newest snapshot", || async {
            let want = self.controller.shared.version();
            want.is_some() && self.proxy.version() == want
        })
        .await;
    }

    /// Replaces the manifests and waits until the proxy serves the result.
    async fn rewrite(&self, manifests: &str) {
        let before = self.controller.shared.version();
        let tmp = self.dir.path().join(".api.yaml.tmp");
        std::fs::write(&tmp, manifests).unwrap();
        std::fs::rename(tmp, self.dir.path().join("api.yaml")).unwrap();
        eventually("the controller compiles the edit", || async {
            self.controller.shared.version() != before
        })
        .await;
        self.wait_applied().await;
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send(&self.http, path, headers).await
    }

    async fn send(
        &self,
        client: &Client<HttpConnector, Empty<Bytes>>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::get(format!("http://{}{path}", self.proxy.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = client
            .request(req.body(Empty::new()).unwrap())
            .await
            .unwrap();
        Answer::read(resp).await
    }

    /// The `ResolvedRefs` condition of ApiProxy `ns/name`: (status, reason, message).
    fn resolved_refs(&self, name: &str) -> (bool, String, String) {
        let status = self.controller.shared.status();
        let object = status
            .objects
            .iter()
            .find(|o| o.diagnostic.object.name == name)
            .unwrap_or_else(|| panic!("no status for {name}"));
        let c = object
            .diagnostic
            .conditions
            .iter()
            .find(|c| c.type_ == "ResolvedRefs")
            .unwrap_or_else(|| panic!("no ResolvedRefs for {name}: {object:?}"));
        (c.status, c.reason.clone(), c.message.clone())
    }
}

/// YAML block scalar lines for a PEM, indented for `data`-less `stringData` values.
fn indent(pem: &str) -> String {
    pem.lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>()
}

/// A Secret in namespace `shop` with `stringData` entries; `enabled` adds the opt-in.
fn secret(name: &str, enabled: bool, data: &[(&str, &str)]) -> String {
    let annotations = if enabled {
        "\n  annotations: {kanali.io/enabled: \"true\"}"
    } else {
        ""
    };
    let mut out = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: shop{annotations}\nstringData:\n"
    );
    for (k, v) in data {
        out.push_str(&format!("  {k}: |\n{}", indent(v)));
    }
    out.push_str("---\n");
    out
}

fn https_proxy(name: &str, path: &str, upstream: SocketAddr, secret: Option<&str>) -> String {
    let ssl = secret
        .map(|s| format!("\n    ssl: {{secretName: {s}}}"))
        .unwrap_or_default();
    format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  source: {{path: {path}}}\n  target:\n    backend: {{endpoint: \"https://{upstream}\"}}{ssl}\n---\n"
    )
}

/// An HTTPS upstream whose certificate (for 127.0.0.1) is signed by `ca`.
async fn tls_upstream(ca: &Ca, client_ca: Option<&Ca>, alpn: &[&str]) -> Echo {
    start_tls_echo(
        &ca.issue_server(&["127.0.0.1", "localhost"]),
        client_ca,
        alpn,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_a_private_ca_from_a_secret_is_trusted() {
    let ca = Ca::new("private upstream CA");
    let upstream = tls_upstream(&ca, None, &["http/1.1"]).await;
    let manifests = secret("upstream-ca", true, &[("tls.ca", &ca.cert_pem())])
        + &https_proxy("private", "/private", upstream.addr, Some("upstream-ca"))
        // Without the Secret, the system roots do not know the private CA: 08.
        + &https_proxy("system", "/system", upstream.addr, None);
    let env = Env::start(&manifests, |_| {}).await;
    let answer = env.get("/private/hello", &[]).await;
    assert_eq!(answer.upstream(), "tls-echo");
    assert_eq!(answer.json()["path"], "/hello");
    env.get("/system/hello", &[]).await.assert_code(8, 502);
    assert!(env.resolved_refs("private").0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_needs_the_client_certificate_from_the_secret() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let client = client_ca.issue_client("kanali");
    let upstream = tls_upstream(&server_ca, Some(&client_ca), &["http/1.1"]).await;
    let ca = server_ca.cert_pem();
    let manifests = secret(
        "with-cert",
        true,
        &[
            ("tls.ca", &ca),
            ("tls.crt", &client.cert_pem),
            ("tls.key", &client.key_pem),
        ],
    ) + &secret("ca-only", true, &[("tls.ca", &ca)])
        + &https_proxy("mtls", "/mtls", upstream.addr, Some("with-cert"))
        + &https_proxy("anonymous", "/anonymous", upstream.addr, Some("ca-only"));
    let env = Env::start(&manifests, |_| {}).await;
    let answer = env.get("/mtls/x", &[]).await;
    assert_eq!(answer.upstream(), "tls-echo");
    assert_eq!(answer.headers["x-echo-client-cert"], "present");
    env.get("/anonymous/x", &[]).await.assert_code(8, 502);
}

/// Issue #8: a client certificate as `openssl x509 -req` issues it (X.509 v1, no extensions)
/// was refused as `InvalidKeyPair` and every request got 07, although the upstream accepts it.
/// Here the CA, both certificates and the upstream (`openssl s_server`, which requires and
/// verifies the client certificate) all come from the openssl command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openssl_v1_client_certificate_is_presented_to_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let pki = OpensslPki::new(dir.path());
    assert_eq!(
        pki.version("client.pem"),
        "1 (0x0)",
        "openssl issued a v1 certificate"
    );
    let port = std::net::TcpListener::bind(ANY)
        .unwrap()
        .local_addr()
        .unwrap();
    let server = pki.s_server(port).await;
    let manifests = secret(
        "openssl",
        true,
        &[
            ("tls.ca", &pki.read("ca.pem")),
            ("tls.crt", &pki.read("client.pem")),
            ("tls.key", &pki.read("client.key")),
        ],
    ) + &https_proxy("v1", "/v1", server.addr, Some("openssl"));
    let env = Env::start(&manifests, |_| {}).await;
    let (ok, reason, message) = env.resolved_refs("v1");
    assert!(ok, "{reason}: {message}");
    let answer = env.get("/v1/", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    // s_server -www describes the session, with the certificate the proxy presented.
    let page = String::from_utf8_lossy(&answer.body);
    assert!(page.contains("Client certificate"), "{page}");
    assert!(page.contains("CN=v1-client"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_problems_answer_their_codes_and_show_in_status() {
    let ca = Ca::new("upstream CA");
    let wrong = Ca::new("some other CA");
    let upstream = tls_upstream(&ca, None, &["http/1.1"]).await;
    let a = ca.issue_client("a");
    let b = ca.issue_client("b");
    let manifests = secret("wrong-ca", true, &[("tls.ca", &wrong.cert_pem())])
        + &secret(
            "mismatch",
            true,
            &[("tls.crt", &a.cert_pem), ("tls.key", &b.key_pem)],
        )
        + &secret("not-enabled", false, &[("tls.ca", &ca.cert_pem())])
        + &https_proxy("wrong-ca", "/wrong-ca", upstream.addr, Some("wrong-ca"))
        + &https_proxy("mismatch", "/mismatch", upstream.addr, Some("mismatch"))
        + &https_proxy(
            "not-enabled",
            "/not-enabled",
            upstream.addr,
            Some("not-enabled"),
        )
        + &https_proxy("missing", "/missing", upstream.addr, Some("no-such-secret"));
    let env = Env::start(&manifests, |_| {}).await;

    env.get("/wrong-ca/x", &[]).await.assert_code(8, 502);
    assert_eq!(
        upstream.hits.load(Ordering::SeqCst),
        0,
        "the handshake failed"
    );

    env.get("/mismatch/x", &[]).await.assert_code(7, 500);
    let (ok, reason, message) = env.resolved_refs("mismatch");
    assert!(!ok);
    assert_eq!(reason, "InvalidKeyPair");
    assert!(message.contains("does not belong"), "{message}");

    env.get("/not-enabled/x", &[]).await.assert_code(6, 500);
    assert_eq!(env.resolved_refs("not-enabled").1, "SecretNotEnabled");
    env.get("/missing/x", &[]).await.assert_code(6, 500);
    assert_eq!(env.resolved_refs("missing").1, "SecretNotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_used_for_new_connections_without_a_restart() {
    let ca = Ca::new("upstream CA");
    let other = Ca::new("other CA");
    let upstream = tls_upstream(&ca, None, &["http/1.1"]).await;
    let with = |ca_pem: &str| {
        secret("rotating", true, &[("tls.ca", ca_pem)])
            + &https_proxy("rotating", "/r", upstream.addr, Some("rotating"))
    };
    let env = Env::start(&with(&ca.cert_pem()), |_| {}).await;
    assert_eq!(env.get("/r/1", &[]).await.upstream(), "tls-echo");

    // The pooled connection was verified against the old CA; the new material must not
    // reuse it.
    env.rewrite(&with(&other.cert_pem())).await;
    env.get("/r/2", &[]).await.assert_code(8, 502);

    // A bundle with both CAs, as during a real CA rotation.
    env.rewrite(&with(&(other.cert_pem() + &ca.cert_pem())))
        .await;
    assert_eq!(env.get("/r/3", &[]).await.upstream(), "tls-echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_end_to_end() {
    let ca = Ca::new("upstream CA");
    let h2 = tls_upstream(&ca, None, &["h2", "http/1.1"]).await;
    let h1 = tls_upstream(&ca, None, &["http/1.1"]).await;
    let manifests = secret("ca", true, &[("tls.ca", &ca.cert_pem())])
        + &https_proxy("h2", "/h2", h2.addr, Some("ca"))
        + &https_proxy("h1", "/h1", h1.addr, Some("ca"));
    let env = Env::start(&manifests, |_| {}).await;

    // HTTP/2 from the client (h2c) and HTTP/2 to the upstream that offers it by ALPN.
    let answer = env.send(&env.h2c, "/h2/x?q=1", &[]).await;
    assert_eq!(answer.version, Version::HTTP_2);
    assert_eq!(answer.headers["x-echo-version"], "HTTP/2.0");
    assert_eq!(answer.json()["path"], "/x");
    assert_eq!(answer.json()["query"], "q=1");
    // An upstream that only offers HTTP/1.1 gets HTTP/1.1.
    let answer = env.send(&env.h2c, "/h1/x", &[]).await;
    assert_eq!(answer.headers["x-echo-version"], "HTTP/1.1");

    // Many concurrent requests share the upstream's HTTP/2 connection.
    let mut requests = Vec::new();
    for i in 0..20 {
        let path = format!("/h2/{i}");
        let env = &env;
        requests.push(async move { env.send(&env.h2c, &path, &[]).await });
    }
    for answer in futures_util::future::join_all(requests).await {
        assert_eq!(answer.headers["x-echo-version"], "HTTP/2.0");
    }
    assert!(
        h2.connections.load(Ordering::SeqCst) <= 2,
        "{} connections",
        h2.connections.load(Ordering::SeqCst)
    );
}

/// A selector-less Service in `shop` with labels, and an EndpointSlice with `addresses`.
fn service(name: &str, labels: &[(&str, &str)], port: u16, addresses: &[SocketAddr]) -> String {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let labels = serde_json::to_string(&labels).unwrap();
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, labels: {labels}}}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{{name: http, port: {port}, targetPort: 8080}}]\n---\n"
    );
    // One slice per address port: an EndpointSlice has one port list for all its endpoints.
    let mut by_port: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for a in addresses {
        by_port
            .entry(a.port())
            .or_default()
            .push(a.ip().to_string());
    }
    for (i, (p, ips)) in by_port.iter().enumerate() {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}"))
            .collect();
        out.push_str(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{i}\n  namespace: shop\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: {p}}}]\nendpoints: [{}]\n---\n",
            endpoints.join(", ")
        ));
    }
    out
}

fn service_proxy(name: &str, path: &str, backend: &str) -> String {
    format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  source: {{path: {path}}}\n  target:\n    backend: {{service: {backend}}}\n---\n"
    )
}

async fn echo(name: &str) -> Echo {
    start_echo(ANY.parse().unwrap(), name).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamic_service_is_chosen_by_header_with_default_values() {
    let stable = echo("stable").await;
    let canary = echo("canary").await;
    let beta_a = echo("beta-a").await;
    let beta_b = echo("beta-b").await;
    let manifests = service(
        "catalog-stable",
        &[("app", "catalog"), ("track", "stable")],
        80,
        &[stable.addr],
    ) + &service(
        "catalog-canary",
        &[("app", "catalog"), ("track", "canary")],
        80,
        &[canary.addr],
    ) + &service(
        "catalog-beta-b",
        &[("app", "catalog"), ("track", "beta")],
        80,
        &[beta_b.addr],
    ) + &service(
        "catalog-beta-a",
        &[("app", "catalog"), ("track", "beta")],
        80,
        &[beta_a.addr],
    ) + &service(
        "cart",
        &[("app", "cart"), ("track", "stable")],
        80,
        &[canary.addr],
    ) + &service_proxy(
        "catalog",
        "/catalog",
        "{port: 80, labels: [{name: app, value: catalog}, {name: track, header: X-Track}]}",
    );
    let env = Env::start(&manifests, |c| {
        c.upstream.default_header_values =
            HeaderDefaults::new([("x-track".to_owned(), "stable".to_owned())]);
    })
    .await;
    assert!(env.resolved_refs("catalog").0);

    let canary_answer = env.get("/catalog/items", &[("x-track", "canary")]).await;
    assert_eq!(canary_answer.upstream(), "canary");
    assert!(
        !canary_answer
            .headers
            .contains_key("x-kanali-service-cardinality")
    );
    assert_eq!(env.get("/catalog/items", &[]).await.upstream(), "stable");
    assert_eq!(
        env.get("/catalog/items", &[("x-track", "")])
            .await
            .upstream(),
        "stable",
        "an empty header counts as absent"
    );

    // Two matches: the first by name, and the response says how many matched.
    for _ in 0..5 {
        let beta = env.get("/catalog/items", &[("X-TRACK", "beta")]).await;
        assert_eq!(beta.upstream(), "beta-a");
        assert_eq!(beta.headers["x-kanali-service-cardinality"], "2");
    }

    env.get("/catalog/items", &[("x-track", "nightly")])
        .await
        .assert_code(10, 500);
    // v2 matched every Service when a value was not a valid label value.
    env.get("/catalog/items", &[("x-track", "not a label value")])
        .await
        .assert_code(10, 500);
    assert_eq!(stable.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_spreads_evenly_over_three_endpoints() {
    let echoes = [echo("e0").await, echo("e1").await, echo("e2").await];
    let addresses: Vec<SocketAddr> = echoes.iter().map(|e| e.addr).collect();
    let manifests = service("spread", &[], 80, &addresses)
        + &service_proxy("spread", "/spread", "{name: spread, port: 80}");
    let env = Arc::new(Env::start(&manifests, |_| {}).await);
    const REQUESTS: usize = 1200;
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..REQUESTS / 8 {
                let answer = env.get(&format!("/spread/{worker}/{i}"), &[]).await;
                assert_eq!(answer.status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let expected = REQUESTS / 3;
    for e in &echoes {
        let hits = e.hits.load(Ordering::SeqCst);
        assert!(
            hits.abs_diff(expected) * 100 <= expected * 15,
            "{} got {hits} of {REQUESTS}, expected {expected} ± 15 %",
            e.addr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_refuses_connections_is_skipped() {
    let live = [echo("live-0").await, echo("live-1").await];
    // A port that was just free: nothing listens there, so connections are refused.
    let refused = {
        let l = std::net::TcpListener::bind(ANY).unwrap();
        l.local_addr().unwrap()
    };
    let manifests = service("flaky", &[], 80, &[live[0].addr, refused, live[1].addr])
        + &service_proxy("flaky", "/flaky", "{name: flaky, port: 80}");
    let env = Env::start(&manifests, |_| {}).await;
    for i in 0..60 {
        let answer = env.get(&format!("/flaky/{i}"), &[]).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "request {i}: {:?}",
            answer.body
        );
    }
    let total: usize = live.iter().map(|e| e.hits.load(Ordering::SeqCst)).sum();
    assert_eq!(total, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_reach_the_proxy() {
    let a = echo("a").await;
    let b = echo("b").await;
    let with = |addresses: &[SocketAddr]| {
        service("moving", &[], 80, addresses)
            + &service_proxy("moving", "/moving", "{name: moving, port: 80}")
    };
    let env = Env::start(&with(&[a.addr]), |_| {}).await;
    assert_eq!(env.get("/moving/x", &[]).await.upstream(), "a");
    let routes_version = env
        .controller
        .shared
        .snapshot()
        .unwrap()
        .routes_version
        .clone();
    env.rewrite(&with(&[b.addr])).await;
    assert_eq!(
        env.controller.shared.snapshot().unwrap().routes_version,
        routes_version,
        "only endpoints changed"
    );
    for _ in 0..10 {
        assert_eq!(env.get("/moving/x", &[]).await.upstream(), "b");
    }
    // No ready endpoint at all: the upstream cannot be reached.
    env.rewrite(&with(&[])).await;
    env.get("/moving/x", &[]).await.assert_code(8, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_upstream_over_tls_is_verified_as_its_dns_name() {
    let ca = Ca::new("cluster CA");
    // The certificate names the Service, not the endpoint IP the proxy dials.
    let server: Issued = ca.issue_server(&["secure.shop.svc.cluster.local"]);
    let upstream = start_tls_echo(&server, None, &["h2", "http/1.1"]).await;
    let wrong_name = start_tls_echo(
        &ca.issue_server(&["other.shop.svc.cluster.local"]),
        None,
        &["http/1.1"],
    )
    .await;
    let manifests = secret("cluster-ca", true, &[("ca.crt", &ca.cert_pem())])
        + &service("secure", &[], 443, &[upstream.addr])
        + &service("misnamed", &[], 443, &[wrong_name.addr])
        + &service_proxy("secure", "/secure", "{name: secure, port: 443}").replace(
            "    backend:",
            "    ssl: {secretName: cluster-ca}\n    backend:",
        )
        + &service_proxy("misnamed", "/misnamed", "{name: misnamed, port: 443}").replace(
            "    backend:",
            "    ssl: {secretName: cluster-ca}\n    backend:",
        );
    let env = Env::start(&manifests, |_| {}).await;
    let answer = env.get("/secure/x", &[]).await;
    assert_eq!(answer.upstream(), "tls-echo");
    env.get("/misnamed/x", &[]).await.assert_code(8, 502);
    drop(env);

    // With hostname verification turned off, the chain is still checked but not the name.
    let env = Env::start(&manifests, |c| {
        c.upstream.verify_hostname = false;
    })
    .await;
    assert_eq!(env.get("/misnamed/x", &[]).await.upstream(), "tls-echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_overrides_the_proxy_default() {
    let slow = echo("slow").await;
    let manifests = format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: slow, namespace: shop}}\nspec:\n  source: {{path: /slow}}\n  target:\n    timeout: 300ms\n    backend: {{endpoint: \"http://{}\"}}\n---\n",
        slow.addr
    );
    let env = Env::start(&manifests, |_| {}).await;
    let answer = env.get("/slow/x", &[("x-echo-delay-ms", "3000")]).await;
    answer.assert_code(8, 502);
    let answer = env.get("/slow/x", &[]).await;
    assert_eq!(answer.upstream(), "slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_keeps_its_endpoint_busy_until_the_body_ends() {
    let echoes = [echo("a").await, echo("b").await];
    let manifests = service("pair", &[], 80, &[echoes[0].addr, echoes[1].addr])
        + &service_proxy("pair", "/pair", "{name: pair, port: 80}");
    let env = Env::start(&manifests, |_| {}).await;

    // The echo's /stream sends its first chunk, then waits for `release`.
    let req = Request::get(format!("http://{}/pair/stream", env.proxy.addr))
        .body(Empty::new())
        .unwrap();
    let resp = env.http.request(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first\n");
    let (busy, free) = if echoes[0].hits.load(Ordering::SeqCst) == 1 {
        (&echoes[0], &echoes[1])
    } else {
        (&echoes[1], &echoes[0])
    };

    // Power of two choices over two addresses compares both: while the stream is open, its
    // address has one request in flight and the other none.
    for i in 0..20 {
        env.get(&format!("/pair/{i}"), &[]).await.upstream();
    }
    assert_eq!(busy.hits.load(Ordering::SeqCst), 1);
    assert_eq!(free.hits.load(Ordering::SeqCst), 20);

    busy.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"second\n");
    // Done: both addresses are idle again and share the load.
    for i in 0..40 {
        env.get(&format!("/pair/{i}"), &[]).await.upstream();
    }
    assert!(
        busy.hits.load(Ordering::SeqCst) > 1,
        "the finished stream still counts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_name_service_is_dialled_by_its_name() {
    let partner = echo("partner").await;
    let manifests = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: partner, namespace: shop}}\nspec:\n  type: ExternalName\n  externalName: localhost\n---\n{}",
        service_proxy(
            "partner",
            "/partner",
            &format!("{{name: partner, port: {}}}", partner.addr.port())
        )
    );
    // In every address mode: cluster DNS would answer the Service name with the alias.
    for mode in [
        AddressMode::Endpoints,
        AddressMode::ClusterIp,
        AddressMode::Dns,
    ] {
        let env = Env::start(&manifests, |c| {
            c.upstream.mode = mode;
        })
        .await;
        let answer = env.get("/partner/x", &[]).await;
        assert_eq!(answer.upstream(), "partner", "{mode:?}");
    }
}
