//! The proxy's upstream side against real sockets: TLS upstreams with certificates made in the
//! test (private CA, wrong CA, mTLS, HTTP/2, hostname checks), Service backends balanced over
//! several local servers, dynamic Services, timeouts and endpoint updates. Requests go through
//! [`kanali_dataplane::listen::server::Proxy::handle`] on a local listener, with tables built straight
//! from snapshots (no controller needed). The upstreams are `kanali_e2e`'s echo servers.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a failed unwrap is a failed test

#[path = "proxy_upstreams/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::*;
use http::StatusCode;
use kanali_dataplane::route::table::Action;
use kanali_dataplane::upstream::dynamic::{HeaderDefaults, X_KANALI_SERVICE_CARDINALITY};
use kanali_dataplane::upstream::tls::{TlsContext, server_name};
use kanali_dataplane::upstream::{Upstream, UpstreamConfig};
use kanali_e2e::check::Answer;
use kanali_e2e::tls::Ca;
use kanali_proto::v1 as pb;
use pb::route::Backend;
use tokio::net::TcpStream;

/// Makes the echo upstream wait this long before answering.
const DELAY_50_MS: (&str, &str) = ("x-echo-delay-ms", "50");

// ---- tests --------------------------------------------------------------------------------

#[tokio::test]
async fn private_ca_is_trusted_and_a_wrong_ca_fails_with_08() {
    let ca = Ca::new("private");
    let other = Ca::new("other");
    let up = tls_echo(&ca, &["127.0.0.1"], None, &["http/1.1"]).await;
    let h = Harness::start(UpstreamConfig::default()).await;
    let authority = up.addr.to_string();
    h.apply(&snapshot(
        "v1",
        vec![
            route("/right", endpoint("https", &authority, "shop/right#1")),
            route("/wrong", endpoint("https", &authority, "shop/wrong#1")),
            route("/system", endpoint("https", &authority, "")),
        ],
        vec![
            material("shop/right#1", Some(&ca), None),
            material("shop/wrong#1", Some(&other), None),
        ],
        vec![],
    ));
    let ok = h.get("/right/x", &[]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(summary(&ok).starts_with("tls-echo HTTP/1.1"), "{ok:?}");
    for path in ["/wrong", "/system"] {
        let failed = h.get(path, &[]).await;
        assert_eq!(
            (failed.status, failed.code()),
            (StatusCode::BAD_GATEWAY, Some(8)),
            "{path}: {failed:?}"
        );
    }
}

#[tokio::test]
async fn mtls_upstream_gets_the_client_certificate_and_refuses_without_it() {
    let ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let up = tls_echo(&ca, &["127.0.0.1"], Some(&client_ca), &["http/1.1"]).await;
    let h = Harness::start(UpstreamConfig::default()).await;
    let authority = up.addr.to_string();
    let client = client_ca.issue_client("kanali");
    h.apply(&snapshot(
        "v1",
        vec![
            route("/with", endpoint("https", &authority, "shop/with#1")),
            route("/without", endpoint("https", &authority, "shop/without#1")),
        ],
        vec![
            material("shop/with#1", Some(&ca), Some(&client)),
            material("shop/without#1", Some(&ca), None),
        ],
        vec![],
    ));
    let ok = h.get("/with", &[]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(summary(&ok).ends_with("cert=true"), "{ok:?}");
    let refused = h.get("/without", &[]).await;
    assert_eq!(refused.code(), Some(8), "{refused:?}");
}

#[tokio::test]
async fn h2_upstream_shares_one_connection_and_gets_the_host_as_authority() {
    let ca = Ca::new("ca");
    let h2 = tls_echo(&ca, &["127.0.0.1"], None, &["h2", "http/1.1"]).await;
    let h1 = tls_echo(&ca, &["127.0.0.1"], None, &["http/1.1"]).await;
    let h = Harness::start(UpstreamConfig::default()).await;
    h.apply(&snapshot(
        "v1",
        vec![
            route("/h2", endpoint("https", &h2.addr.to_string(), "shop/ca#1")),
            route("/h1", endpoint("https", &h1.addr.to_string(), "shop/ca#1")),
        ],
        vec![material("shop/ca#1", Some(&ca), None)],
        vec![],
    ));
    // The first request finds out the upstream speaks h2; then concurrent requests (each
    // held 50 ms by the upstream) multiplex.
    let first = h.get("/h2", &[DELAY_50_MS]).await;
    assert_eq!(
        summary(&first),
        "tls-echo HTTP/2.0 authority=api.example.org host=- cert=false",
        "{first:?}"
    );
    let answers =
        futures_util::future::join_all((0..20).map(|_| h.get("/h2/x", &[DELAY_50_MS]))).await;
    for a in &answers {
        assert_eq!(a.status, 200, "{a:?}");
        assert!(
            summary(a).starts_with("tls-echo HTTP/2.0 authority=api.example.org"),
            "{a:?}"
        );
    }
    assert_eq!(h2.connections.load(Ordering::SeqCst), 1);
    assert_eq!(h2.hits.load(Ordering::SeqCst), 21);

    // An upstream without h2 gets HTTP/1.1 with the Host header, and its idle connection is
    // reused (at most one more if a request beat the previous connection back to the pool).
    for _ in 0..5 {
        let a = h.get("/h1", &[]).await;
        assert_eq!(
            summary(&a),
            "tls-echo HTTP/1.1 authority=- host=api.example.org cert=false",
            "{a:?}"
        );
    }
    assert_eq!(h1.hits.load(Ordering::SeqCst), 5);
    assert!(h1.connections.load(Ordering::SeqCst) <= 2);
}

/// The client's `X-Forwarded-*` and correlation id, which the proxy sets itself.
const SPOOFED: [(&str, &str); 5] = [
    ("x-forwarded-for", "10.0.0.1"),
    ("x-forwarded-for", "10.0.0.2"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.example"),
    ("x-kanali-correlation-id", "spoofed"),
];

#[tokio::test]
async fn the_headers_the_proxy_sets_replace_the_clients_over_http1_and_http2() {
    // Over HTTP/1.1 the proxy writes them beside the head's map; for HTTP/2 they go into it.
    let ca = Ca::new("ca");
    let h2 = tls_echo(&ca, &["127.0.0.1"], None, &["h2", "http/1.1"]).await;
    let h1 = echo("plain").await;
    let h = Harness::start(UpstreamConfig::default()).await;
    h.apply(&snapshot(
        "v1",
        vec![
            route("/h2", endpoint("https", &h2.addr.to_string(), "shop/ca#1")),
            route("/h1", endpoint("http", &h1.addr.to_string(), "")),
        ],
        vec![material("shop/ca#1", Some(&ca), None)],
        vec![],
    ));
    for path in ["/h1", "/h2"] {
        for (sent, chain) in [
            (&SPOOFED[..], "10.0.0.1, 10.0.0.2, 127.0.0.1"),
            (&[][..], "127.0.0.1"),
        ] {
            let a = h.get(path, sent).await;
            let headers = &a.json()["headers"];
            let id = a.headers["x-kanali-correlation-id"].to_str().unwrap();
            let case = format!("{path} {sent:?}: {headers}");
            assert_eq!(
                headers["x-forwarded-for"],
                serde_json::json!([chain]),
                "{case}"
            );
            assert_eq!(
                headers["x-forwarded-proto"],
                serde_json::json!(["http"]),
                "{case}"
            );
            let host = serde_json::json!(["api.example.org"]);
            assert_eq!(headers["x-forwarded-host"], host, "{case}");
            assert_eq!(
                headers["x-kanali-correlation-id"],
                serde_json::json!([id]),
                "{case}"
            );
            assert_ne!(id, "spoofed");
        }
    }
    assert_eq!(h2.hits.load(Ordering::SeqCst), 2);
    assert_eq!(h1.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn hostname_mismatch_fails_unless_the_proxy_opts_out() {
    let ca = Ca::new("ca");
    let other = Ca::new("other");
    let up = tls_echo(&ca, &["elsewhere.example"], None, &["http/1.1"]).await;
    let s = snapshot(
        "v1",
        vec![
            route("/a", endpoint("https", &up.addr.to_string(), "shop/ca#1")),
            route(
                "/b",
                endpoint("https", &up.addr.to_string(), "shop/other#1"),
            ),
        ],
        vec![
            material("shop/ca#1", Some(&ca), None),
            material("shop/other#1", Some(&other), None),
        ],
        vec![],
    );
    let strict = Harness::start(UpstreamConfig::default()).await;
    strict.apply(&s);
    assert_eq!(strict.get("/a", &[]).await.code(), Some(8));
    let lax = Harness::start(UpstreamConfig {
        verify_hostname: false,
        ..Default::default()
    })
    .await;
    lax.apply(&s);
    assert_eq!(lax.get("/a", &[]).await.status, 200);
    // The opt-out forgives the name, not the chain.
    assert_eq!(lax.get("/b", &[]).await.code(), Some(8));
}

#[tokio::test]
async fn a_service_is_verified_by_its_dns_name_while_its_endpoint_ip_is_dialled() {
    let ca = Ca::new("ca");
    let up = tls_echo(
        &ca,
        &["orders.shop.svc.cluster.local"],
        None,
        &["h2", "http/1.1"],
    )
    .await;
    let h = Harness::start(UpstreamConfig::default()).await;
    h.apply(&snapshot(
        "v1",
        vec![route("/orders", service("orders", "https", "shop/ca#1"))],
        vec![material("shop/ca#1", Some(&ca), None)],
        vec![endpoints("orders", &[up.addr])],
    ));
    let a = h.get("/orders", &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(summary(&a).starts_with("tls-echo HTTP/2.0"), "{a:?}");
}

#[tokio::test]
async fn load_spreads_over_three_endpoints_and_a_refusing_one_is_skipped() {
    let servers = [echo("a").await, echo("b").await, echo("c").await];
    let refused = refused_addr().await;
    let mut addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    addrs.push(refused);
    let h = Harness::start(UpstreamConfig::default()).await;
    h.apply(&snapshot(
        "v1",
        vec![route("/orders", service("orders", "http", ""))],
        vec![],
        vec![endpoints("orders", &addrs)],
    ));
    let rounds = 1500;
    let mut client = h.client().await;
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for _ in 0..rounds {
        let a = client.get("/orders", &[]).await;
        assert_eq!(a.status, 200, "{a:?}");
        let name = a.upstream();
        *by_name.entry(name).or_default() += 1;
    }
    let expected = rounds / 3;
    for name in ["a", "b", "c"] {
        let n = by_name.get(name).copied().unwrap_or_default();
        assert!(n.abs_diff(expected) * 100 <= expected * 15, "{by_name:?}");
    }
    // The refusing address was tried (and the request retried elsewhere), then skipped.
    let table = h.tables.load_full().unwrap();
    let Action::Proxy(Upstream::Service(backend)) =
        &table.router.lookup(None, "/orders").unwrap().action
    else {
        panic!("not a Service route");
    };
    let tried: Vec<_> = backend
        .addresses()
        .iter()
        .filter(|p| p.last_connect_failed())
        .map(|p| p.key().dial.to_string())
        .collect();
    assert_eq!(tried, [refused.to_string()]);
    // Pooled, not one connection per request.
    for s in &servers {
        assert!(s.connections.load(Ordering::SeqCst) < 10);
    }
}

#[tokio::test]
async fn endpoint_changes_reach_requests_without_a_route_rebuild() {
    let first = echo("first").await;
    let second = echo("second").await;
    let h = Harness::start(UpstreamConfig::default()).await;
    let mut s = snapshot(
        "v1",
        vec![route("/orders", service("orders", "http", ""))],
        vec![],
        vec![endpoints("orders", &[first.addr])],
    );
    h.apply(&s);
    let router = h.tables.load_full().unwrap().router.clone();
    assert_eq!(h.get("/orders", &[]).await.upstream(), "first");
    s.version = "v2".into();
    s.services = vec![endpoints("orders", &[second.addr])];
    h.apply(&s);
    assert!(Arc::ptr_eq(&router, &h.tables.load_full().unwrap().router));
    assert_eq!(h.get("/orders", &[]).await.upstream(), "second");
    // No ready endpoint at all: 08.
    s.version = "v3".into();
    s.services = vec![endpoints("orders", &[])];
    h.apply(&s);
    let none = h.get("/orders", &[]).await;
    assert_eq!(
        (none.status, none.code()),
        (StatusCode::BAD_GATEWAY, Some(8)),
        "{none:?}"
    );
}

#[tokio::test]
async fn dynamic_service_by_header_with_defaults_and_cardinality() {
    use pb::label_match::Source;
    let stable = echo("stable").await;
    let canary_a = echo("canary-a").await;
    let canary_b = echo("canary-b").await;
    let candidate = |name: &str, track: &str| pb::ServiceCandidate {
        name: name.into(),
        labels: vec![
            pb::Header {
                name: "app".into(),
                value: "catalog".into(),
            },
            pb::Header {
                name: "track".into(),
                value: track.into(),
            },
        ],
    };
    let s = snapshot(
        "v1",
        vec![route(
            "/catalog",
            Backend::DynamicService(pb::DynamicService {
                namespace: "shop".into(),
                port: 80,
                scheme: "http".into(),
                tls: String::new(),
                labels: vec![
                    pb::LabelMatch {
                        name: "app".into(),
                        source: Some(Source::Value("catalog".into())),
                    },
                    pb::LabelMatch {
                        name: "track".into(),
                        source: Some(Source::Header("x-release-track".into())),
                    },
                ],
                candidates: vec![
                    candidate("catalog-canary-a", "canary"),
                    candidate("catalog-canary-b", "canary"),
                    candidate("catalog-stable", "stable"),
                ],
            }),
        )],
        vec![],
        vec![
            endpoints("catalog-canary-a", &[canary_a.addr]),
            endpoints("catalog-canary-b", &[canary_b.addr]),
            endpoints("catalog-stable", &[stable.addr]),
        ],
    );
    let h = Harness::start(UpstreamConfig {
        default_header_values: HeaderDefaults::new([(
            "X-Release-Track".to_owned(),
            "canary".to_owned(),
        )]),
        ..Default::default()
    })
    .await;
    h.apply(&s);

    let a = h.get("/catalog", &[("x-release-track", "stable")]).await;
    assert_eq!(a.upstream(), "stable", "{a:?}");
    assert!(!a.headers.contains_key(&X_KANALI_SERVICE_CARDINALITY));

    // No header: the proxy's default, which matches two; the first by name answers.
    let a = h.get("/catalog", &[]).await;
    assert_eq!(a.upstream(), "canary-a", "{a:?}");
    assert_eq!(a.headers[&X_KANALI_SERVICE_CARDINALITY], "2");

    for value in ["beta", "not a label value"] {
        let a = h.get("/catalog", &[("x-release-track", value)]).await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (500, Some(10)),
            "{value}: {a:?}"
        );
    }
    assert_eq!(canary_b.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_route_timeout_overrides_the_default_and_answers_08() {
    let slow = echo("slow").await;
    let h = Harness::start(UpstreamConfig::default()).await;
    let mut r = route("/slow", endpoint("http", &slow.addr.to_string(), ""));
    r.timeout_ms = 200;
    h.apply(&snapshot("v1", vec![r], vec![], vec![]));
    let started = Instant::now();
    // The upstream would answer after 5 s.
    let a = h.get("/slow", &[("x-echo-delay-ms", "5000")]).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::BAD_GATEWAY, Some(8)),
        "{a:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_exchange_due_before_its_connections_timer_would_fire_still_times_out() {
    // An HTTP/1.1 request is watched by its connection's timer, which a stream of requests
    // with the same timeout leaves set for the first of them. A request with a nearer
    // deadline on the same connection has to move it.
    let slow = echo("slow").await;
    let h = Harness::start(UpstreamConfig::default()).await;
    let mut short = route("/slow", endpoint("http", &slow.addr.to_string(), ""));
    short.timeout_ms = 200;
    let long = route("/fast", endpoint("http", &slow.addr.to_string(), ""));
    h.apply(&snapshot("v1", vec![short, long], vec![], vec![]));
    let mut client = h.client().await;
    for _ in 0..3 {
        assert_eq!(client.get("/fast", &[]).await.status, StatusCode::OK);
    }
    /// The answer is error 08, within 5 s (the connection's idle check, every 10 s here,
    /// would wake it too).
    async fn timed_out(answer: impl Future<Output = Answer>, what: &str) {
        let a = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .expect(what);
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::BAD_GATEWAY, Some(8)),
            "{a:?}"
        );
    }
    let slow_answer = [("x-echo-delay-ms", "30000")];
    timed_out(
        client.get("/slow", &slow_answer),
        "the 200 ms deadline is kept, not the 60 s one",
    )
    .await;
    // The connection goes on, with its timer set for the next one.
    assert_eq!(client.get("/fast", &[]).await.status, StatusCode::OK);

    // HTTP/2: each stream has a timer of its own.
    timed_out(
        h.h2_get("/slow", &slow_answer),
        "HTTP/2 keeps the 200 ms deadline",
    )
    .await;
    assert_eq!(h.h2_get("/fast", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn rotated_material_opens_new_connections() {
    let ca = Ca::new("ca");
    let up = tls_echo(&ca, &["127.0.0.1"], None, &["http/1.1"]).await;
    let h = Harness::start(UpstreamConfig::default()).await;
    let mk = |version: &str, id: &str| {
        snapshot(
            version,
            vec![route("/r", endpoint("https", &up.addr.to_string(), id))],
            vec![material(id, Some(&ca), None)],
            vec![],
        )
    };
    h.apply(&mk("v1", "shop/tls#1"));
    assert_eq!(h.get("/r", &[]).await.status, 200);
    // (That the same material keeps its pool is checked on pool identity in table.rs.)
    let before = up.connections.load(Ordering::SeqCst);
    h.apply(&mk("v2", "shop/tls#2"));
    assert_eq!(h.get("/r", &[]).await.status, 200);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        before + 1,
        "new material, new connection"
    );
}

// ---- TLS configuration with real certificates ---------------------------------------------

#[test]
fn material_without_a_ca_uses_the_system_roots_and_a_mismatched_pair_is_rejected() {
    let ca = Ca::new("ca");
    let a = ca.issue_client("a");
    let b = ca.issue_client("b");
    let ctx = TlsContext::new(true);
    let config = ctx.config(&material("x", None, Some(&a))).unwrap();
    assert!(config.client_auth_cert_resolver.has_certs());
    let mismatched = pb::TlsMaterial {
        key_pem: b.key_pem.into_bytes(),
        ..material("y", None, Some(&a))
    };
    assert!(ctx.config(&mismatched).is_err());
}

#[tokio::test]
async fn skipping_hostname_verification_still_checks_the_chain() {
    let ca = Ca::new("ca");
    let other = Ca::new("other");
    let up = tls_echo(&ca, &["api.example"], None, &["http/1.1"]).await;
    let addr = up.addr;
    let handshake = |verify_hostname: bool, trusted: &Ca, name: &str| {
        let config = TlsContext::new(verify_hostname)
            .config(&material("m", Some(trusted), None))
            .unwrap();
        let name = server_name(name).unwrap();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .is_ok()
        }
    };
    assert!(handshake(true, &ca, "api.example").await);
    assert!(!handshake(true, &ca, "other.example").await);
    assert!(!handshake(true, &ca, "127.0.0.1").await);
    assert!(handshake(false, &ca, "other.example").await);
    assert!(handshake(false, &ca, "127.0.0.1").await);
    assert!(!handshake(true, &other, "api.example").await);
    assert!(!handshake(false, &other, "api.example").await);
}
