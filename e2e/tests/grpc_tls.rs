//! The snapshot stream over TLS: snapshots carry upstream private keys, so a controller with
//! a certificate and a client CA serves only proxies that verify it and present a certificate
//! from that CA.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use kanali_controller::source::watch::Debounce;
use kanali_controller::{Controller, GrpcTls, StandaloneConfig};
use kanali_dataplane::control::client::ClientConfig;
use kanali_dataplane::{ProxyConfig, RunningProxy};
use kanali_e2e::check::eventually;
use kanali_e2e::setup;
use kanali_e2e::tls::{Ca, Issued};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

const ANY: &str = "127.0.0.1:0";

const MANIFESTS: &str = r#"apiVersion: kanali.io/v2
kind: MockTarget
metadata: {name: m, namespace: shop}
spec:
  routes: [{path: /, status: 200, body: ok}]
---
apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {name: p, namespace: shop}
spec:
  source: {path: /p}
  target: {backend: {mock: {mockTargetName: m}}}
"#;

async fn controller(dir: &std::path::Path, server: &Issued, clients: &Ca) -> Controller {
    kanali_controller::start_standalone(StandaloneConfig {
        manifests: dir.to_owned(),
        grpc_listen: ANY.parse().unwrap(),
        admin_listen: ANY.parse().unwrap(),
        debounce: Debounce {
            quiet: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            resync: Duration::from_secs(5),
        },
        grpc_tls: Some(GrpcTls {
            cert_pem: server.cert_pem.clone().into_bytes(),
            key_pem: server.key_pem.clone().into_bytes(),
            client_ca_pem: Some(clients.cert_pem().into_bytes()),
        }),
        decryption: Default::default(),
    })
    .await
    .unwrap()
}

/// A proxy subscribed to `url` (a host name, to check the name survives resolution).
async fn proxy(url: String, id: &str, trust: &Ca, client: Option<&Issued>) -> RunningProxy {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(trust.cert_pem()));
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    let base = setup::proxy(setup::ANY, id);
    kanali_dataplane::start(ProxyConfig {
        client: ClientConfig {
            controllers: vec![url],
            max_backoff: Duration::from_millis(100),
            tls: Some(tls),
            ..base.client
        },
        ..base
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_verified_proxies_with_a_client_certificate_get_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.yaml"), MANIFESTS).unwrap();
    let server_ca = Ca::new("controller CA");
    let client_ca = Ca::new("proxy CA");
    let ctl = controller(
        dir.path(),
        &server_ca.issue_server(&["localhost"]),
        &client_ca,
    )
    .await;
    let url = format!("https://localhost:{}", ctl.grpc_addr.port());

    let good = proxy(
        url.clone(),
        "good",
        &server_ca,
        Some(&client_ca.issue_client("good")),
    )
    .await;
    let anonymous = proxy(url.clone(), "anonymous", &server_ca, None).await;
    let stranger = proxy(
        url.clone(),
        "stranger",
        &server_ca,
        Some(&Ca::new("other CA").issue_client("stranger")),
    )
    .await;
    let distrustful = proxy(
        url,
        "distrustful",
        &Ca::new("other CA"),
        Some(&client_ca.issue_client("d")),
    )
    .await;

    let want = ctl.shared.version().unwrap();
    eventually("the verified proxy gets the snapshot", || async {
        good.version().as_deref() == Some(want.as_str())
    })
    .await;
    // The others have been retrying all along (20-100 ms backoff); the controller has seen
    // exactly one proxy, and none of the others ever applied anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen: Vec<String> = ctl.shared.status().proxies.keys().cloned().collect();
    assert_eq!(seen, ["good"]);
    for p in [&anonymous, &stranger, &distrustful] {
        assert_eq!(p.version(), None);
    }
}

#[tokio::test]
async fn unusable_grpc_tls_files_are_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("controller CA");
    let a = ca.issue_server(&["localhost"]);
    let b = ca.issue_server(&["localhost"]);
    let start = |cert: &str, key: &str, client_ca: Option<&str>| {
        kanali_controller::start_standalone(StandaloneConfig {
            manifests: dir.path().to_owned(),
            grpc_listen: ANY.parse().unwrap(),
            admin_listen: ANY.parse().unwrap(),
            debounce: Debounce::default(),
            grpc_tls: Some(GrpcTls {
                cert_pem: cert.as_bytes().to_vec(),
                key_pem: key.as_bytes().to_vec(),
                client_ca_pem: client_ca.map(|c| c.as_bytes().to_vec()),
            }),
            decryption: Default::default(),
        })
    };
    let error = |r: Result<Controller, kanali_controller::StartError>| match r {
        Ok(_) => panic!("started with unusable TLS files"),
        Err(e) => e.to_string(),
    };
    let mismatched = error(start(&a.cert_pem, &b.key_pem, None).await);
    assert!(mismatched.contains("does not belong"), "{mismatched}");
    let garbage = error(start("not a certificate", &a.key_pem, None).await);
    assert!(garbage.contains("no CERTIFICATE block"), "{garbage}");
    let bad_ca = error(start(&a.cert_pem, &a.key_pem, Some("nope")).await);
    assert!(bad_ca.contains("client CA"), "{bad_ca}");
}
