//! Upstream TLS material from Secrets (codes 06, 07, 08), Service endpoints, dynamic Services
//! and per-route timeouts.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Secret, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kanali_crds::{ServiceLabel, Ssl};

use super::*;

pub(super) fn pem_pair(name: &str) -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

pub(super) fn mk_secret(ns: &str, name: &str, enabled: bool, data: &[(&str, &str)]) -> Secret {
    let mut s = Secret::default();
    s.metadata.namespace = Some(ns.to_owned());
    s.metadata.name = Some(name.to_owned());
    if enabled {
        s.metadata.annotations = Some(BTreeMap::from([(
            "kanali.io/enabled".to_owned(),
            "true".to_owned(),
        )]));
    }
    s.data = Some(
        data.iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
            .collect(),
    );
    s
}

pub(super) fn with_ssl(mut ap: ApiProxy, secret: &str) -> ApiProxy {
    ap.spec.target.ssl = Some(Ssl {
        secret_name: secret.to_owned(),
    });
    ap
}

fn https_proxy(secret: &str) -> ApiProxy {
    with_ssl(
        mk_api_proxy("ns", "p", "/p", endpoint("https://up.example:8443")),
        secret,
    )
}

fn objects_with(ap: ApiProxy, secrets: Vec<Secret>) -> Objects {
    Objects {
        api_proxies: vec![ap],
        secrets,
        ..Objects::default()
    }
}

/// Compiles and returns (route backend, ResolvedRefs (status, reason, message)).
fn resolved(objects: &Objects) -> (Compiled, (bool, String, String)) {
    let c = compile(objects);
    let d = diagnostic(&c, Kind::ApiProxy, Some("ns"), "p");
    let refs = d
        .conditions
        .iter()
        .find(|c| c.type_ == condition::RESOLVED_REFS)
        .unwrap();
    let out = (refs.status, refs.reason.clone(), refs.message.clone());
    (c, out)
}

#[track_caller]
fn assert_fails(objects: &Objects, code: u32, reason: &str, needle: &str) {
    let (c, (ok, r, message)) = resolved(objects);
    assert!(!ok);
    assert_eq!(r, reason, "{message}");
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert_eq!(
        only_route(&c).backend,
        Some(pb::route::Backend::Failure(pb::Failure { code }))
    );
    assert!(c.snapshot.tls.is_empty(), "no material for a failed route");
}

#[test]
fn a_ca_and_client_pair_reach_the_snapshot_once_by_id() {
    let (ca, _) = pem_pair("ca.example");
    let (cert, key) = pem_pair("client");
    let secret = mk_secret(
        "ns",
        "tls",
        true,
        &[("tls.ca", &ca), ("tls.crt", &cert), ("tls.key", &key)],
    );
    let mut second = https_proxy("tls");
    second.metadata.name = Some("q".to_owned());
    second.spec.source.path = "/q".to_owned();
    let objects = Objects {
        api_proxies: vec![https_proxy("tls"), second],
        secrets: vec![secret],
        ..Objects::default()
    };
    let (c, (ok, reason, message)) = resolved(&objects);
    assert!(ok, "{reason}: {message}");
    assert!(message.contains("TLS from Secret ns/tls"), "{message}");
    assert_eq!(c.snapshot.tls.len(), 1, "shared material is shipped once");
    let material = &c.snapshot.tls[0];
    assert!(material.id.starts_with("ns/tls#"), "{}", material.id);
    assert_eq!(material.cert_pem, cert.as_bytes());
    assert_eq!(material.key_pem, key.as_bytes());
    assert!(String::from_utf8_lossy(&material.ca_pem).contains("BEGIN CERTIFICATE"));
    for route in &c.snapshot.routes {
        match &route.backend {
            Some(pb::route::Backend::Endpoint(e)) => assert_eq!(e.tls, material.id),
            other => panic!("{other:?}"),
        }
    }
}

/// `openssl x509 -req` without extensions issues v1 certificates; upstreams accept them as
/// client certificates, and a v1 CA as a trust anchor (issue #8: they were InvalidKeyPair).
#[test]
fn openssl_v1_certificates_are_a_usable_pair_and_ca() {
    let ca = include_str!("../../../../proto/testdata/v1-ca.pem");
    let cert = include_str!("../../../../proto/testdata/v1-client.pem");
    let key = include_str!("../../../../proto/testdata/v1-client.key");
    let secret = mk_secret(
        "ns",
        "tls",
        true,
        &[("tls.ca", ca), ("tls.crt", cert), ("tls.key", key)],
    );
    let (c, (ok, reason, message)) = resolved(&objects_with(https_proxy("tls"), vec![secret]));
    assert!(ok, "{reason}: {message}");
    assert_eq!(c.snapshot.tls[0].cert_pem, cert.as_bytes());
    // The pair check still works on v1: another key is refused.
    let (_, other_key) = pem_pair("other");
    assert_fails(
        &objects_with(
            https_proxy("tls"),
            vec![mk_secret(
                "ns",
                "tls",
                true,
                &[("tls.crt", cert), ("tls.key", &other_key)],
            )],
        ),
        7,
        "InvalidKeyPair",
        "does not belong to the certificate",
    );
}

#[test]
fn rotated_material_gets_a_new_id_and_version() {
    let (ca1, _) = pem_pair("one");
    let (ca2, _) = pem_pair("two");
    let before = compile(&objects_with(
        https_proxy("tls"),
        vec![mk_secret("ns", "tls", true, &[("tls.ca", &ca1)])],
    ));
    let after = compile(&objects_with(
        https_proxy("tls"),
        vec![mk_secret("ns", "tls", true, &[("tls.ca", &ca2)])],
    ));
    assert_ne!(before.snapshot.tls[0].id, after.snapshot.tls[0].id);
    assert_ne!(before.snapshot.version, after.snapshot.version);
    assert_ne!(
        before.snapshot.routes_version,
        after.snapshot.routes_version
    );
}

#[test]
fn a_ca_alone_is_enough_and_a_pair_alone_keeps_system_roots() {
    let (ca, _) = pem_pair("ca");
    let (c, (ok, ..)) = resolved(&objects_with(
        https_proxy("tls"),
        vec![mk_secret("ns", "tls", true, &[("tls.ca", &ca)])],
    ));
    assert!(ok);
    assert!(c.snapshot.tls[0].cert_pem.is_empty() && c.snapshot.tls[0].key_pem.is_empty());

    // v2 trusted nothing when the Secret had no CA; here the system roots stay in effect.
    let (cert, key) = pem_pair("client");
    let (c, (ok, ..)) = resolved(&objects_with(
        https_proxy("tls"),
        vec![mk_secret(
            "ns",
            "tls",
            true,
            &[("tls.crt", &cert), ("tls.key", &key)],
        )],
    ));
    assert!(ok);
    assert!(c.snapshot.tls[0].ca_pem.is_empty());
}

#[test]
fn cert_manager_layout_and_renamed_keys_are_read() {
    let (ca, _) = pem_pair("ca");
    let (cert, key) = pem_pair("client");
    let (c, (ok, ..)) = resolved(&objects_with(
        https_proxy("tls"),
        vec![mk_secret(
            "ns",
            "tls",
            true,
            &[("ca.crt", &ca), ("tls.crt", &cert), ("tls.key", &key)],
        )],
    ));
    assert!(ok);
    assert!(!c.snapshot.tls[0].ca_pem.is_empty());

    let mut renamed = mk_secret(
        "ns",
        "tls",
        true,
        &[("bundle.pem", &ca), ("me.pem", &cert), ("me.key", &key)],
    );
    let a = renamed.metadata.annotations.as_mut().unwrap();
    a.insert("kanali.io/ca".into(), "bundle.pem".into());
    a.insert("kanali.io/cert".into(), "me.pem".into());
    a.insert("kanali.io/key".into(), "me.key".into());
    let (c, (ok, ..)) = resolved(&objects_with(https_proxy("tls"), vec![renamed]));
    assert!(ok);
    let m = &c.snapshot.tls[0];
    assert!(!m.ca_pem.is_empty() && !m.cert_pem.is_empty() && !m.key_pem.is_empty());
}

#[test]
fn secret_problems_answer_06_07_or_08() {
    let (ca, _) = pem_pair("ca");
    let (cert, _) = pem_pair("client");
    let (_, other_key) = pem_pair("other");
    assert_fails(
        &objects_with(https_proxy("tls"), vec![]),
        6,
        "SecretNotFound",
        "Secret ns/tls does not exist",
    );
    assert_fails(
        &objects_with(
            https_proxy("tls"),
            vec![mk_secret("other", "tls", true, &[("tls.ca", &ca)])],
        ),
        6,
        "SecretNotFound",
        "ns/tls",
    );
    assert_fails(
        &objects_with(
            https_proxy("tls"),
            vec![mk_secret("ns", "tls", false, &[("tls.ca", &ca)])],
        ),
        6,
        "SecretNotEnabled",
        "kanali.io/enabled",
    );
    assert_fails(
        &objects_with(
            https_proxy("tls"),
            vec![mk_secret("ns", "tls", true, &[("other", "x")])],
        ),
        6,
        "SecretMissingData",
        "tls.crt",
    );
    assert_fails(
        &objects_with(
            https_proxy("tls"),
            vec![mk_secret(
                "ns",
                "tls",
                true,
                &[("tls.crt", &cert), ("tls.key", &other_key)],
            )],
        ),
        7,
        "InvalidKeyPair",
        "does not belong to the certificate",
    );
    assert_fails(
        &objects_with(
            https_proxy("tls"),
            vec![mk_secret("ns", "tls", true, &[("tls.crt", &cert)])],
        ),
        7,
        "InvalidKeyPair",
        "has tls.crt but no tls.key",
    );
    assert_fails(
        &objects_with(
            https_proxy("tls"),
            vec![mk_secret("ns", "tls", true, &[("tls.ca", "not pem")])],
        ),
        8,
        "InvalidCACertificate",
        "tls.ca",
    );
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned();
    assert_fails(
        &objects_with(
            https_proxy("tls"),
            vec![mk_secret("ns", "tls", true, &[("tls.ca", &garbage)])],
        ),
        8,
        "InvalidCACertificate",
        "certificate 1",
    );
}

#[test]
fn ssl_on_a_plain_http_endpoint_is_reported_and_ignored() {
    let ap = with_ssl(mk_api_proxy("ns", "p", "/p", endpoint("http://up")), "tls");
    let (c, (ok, _, message)) = resolved(&objects_with(ap, vec![]));
    assert!(ok);
    assert!(message.contains("is not used"), "{message}");
    assert!(c.snapshot.tls.is_empty());
}

fn mk_service_with(ns: &str, name: &str, ports: &[(Option<&str>, i32, i32)]) -> Service {
    let mut svc = mk_service(ns, name);
    svc.spec = Some(ServiceSpec {
        cluster_ip: Some("10.96.0.10".to_owned()),
        ports: Some(
            ports
                .iter()
                .map(|(n, port, target)| ServicePort {
                    name: n.map(str::to_owned),
                    port: *port,
                    target_port: Some(IntOrString::Int(*target)),
                    ..ServicePort::default()
                })
                .collect(),
        ),
        ..ServiceSpec::default()
    });
    svc
}

pub(super) fn mk_slice(
    ns: &str,
    service: &str,
    ports: &[(Option<&str>, i32)],
    eps: &[(&str, Option<bool>)],
) -> EndpointSlice {
    let mut s = EndpointSlice {
        address_type: if eps.iter().any(|(ip, _)| ip.contains(':')) {
            "IPv6".to_owned()
        } else {
            "IPv4".to_owned()
        },
        ..EndpointSlice::default()
    };
    s.metadata.namespace = Some(ns.to_owned());
    s.metadata.name = Some(format!("{service}-{}", eps.len()));
    s.metadata.labels = Some(BTreeMap::from([(
        "kubernetes.io/service-name".to_owned(),
        service.to_owned(),
    )]));
    s.ports = Some(
        ports
            .iter()
            .map(|(n, p)| SlicePort {
                name: n.map(str::to_owned),
                port: Some(*p),
                ..SlicePort::default()
            })
            .collect(),
    );
    s.endpoints = eps
        .iter()
        .map(|(ip, ready)| Endpoint {
            addresses: vec![(*ip).to_owned()],
            conditions: Some(EndpointConditions {
                ready: *ready,
                ..EndpointConditions::default()
            }),
            ..Endpoint::default()
        })
        .collect();
    s
}

#[test]
fn a_service_ships_its_ready_endpoints_on_the_target_port() {
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", service("svc", 80))],
        services: vec![mk_service_with(
            "ns",
            "svc",
            &[(Some("http"), 80, 8080), (Some("admin"), 9000, 9001)],
        )],
        endpoint_slices: vec![
            mk_slice(
                "ns",
                "svc",
                &[(Some("http"), 8080), (Some("admin"), 9001)],
                &[
                    ("10.0.0.2", Some(true)),
                    ("10.0.0.1", None),
                    ("10.0.0.3", Some(false)),
                ],
            ),
            mk_slice("ns", "svc", &[(Some("http"), 8080)], &[("fd00::1", None)]),
            // Another Service's slice, and the same name in another namespace.
            mk_slice(
                "ns",
                "other",
                &[(Some("http"), 8080)],
                &[("10.9.9.9", None)],
            ),
            mk_slice(
                "elsewhere",
                "svc",
                &[(Some("http"), 8080)],
                &[("10.8.8.8", None)],
            ),
        ],
        ..Objects::default()
    };
    let c = compile(&objects);
    assert_eq!(
        c.snapshot.services,
        [pb::ServiceEndpoints {
            namespace: "ns".into(),
            name: "svc".into(),
            port: 80,
            cluster_ip: "10.96.0.10".into(),
            addresses: vec![
                "10.0.0.1:8080".into(),
                "10.0.0.2:8080".into(),
                "[fd00::1]:8080".into()
            ],
            external_name: String::new(),
        }]
    );
}

#[test]
fn core_endpoints_are_read_when_there_are_no_slices() {
    let mut ep = Endpoints::default();
    ep.metadata.namespace = Some("ns".into());
    ep.metadata.name = Some("svc".into());
    ep.subsets = Some(vec![EndpointSubset {
        addresses: Some(vec![EndpointAddress {
            ip: "10.1.0.1".into(),
            ..EndpointAddress::default()
        }]),
        not_ready_addresses: Some(vec![EndpointAddress {
            ip: "10.1.0.2".into(),
            ..EndpointAddress::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: None,
            port: 8443,
            ..EndpointPort::default()
        }]),
    }]);
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", service("svc", 443))],
        services: vec![mk_service_with("ns", "svc", &[(None, 443, 8443)])],
        endpoints: vec![ep],
        ..Objects::default()
    };
    let c = compile(&objects);
    assert_eq!(c.snapshot.services[0].addresses, ["10.1.0.1:8443"]);
}

#[test]
fn an_endpoint_only_change_keeps_the_routes_version() {
    let objects = |ips: &[(&str, Option<bool>)]| Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", service("svc", 80))],
        services: vec![mk_service_with("ns", "svc", &[(None, 80, 8080)])],
        endpoint_slices: vec![mk_slice("ns", "svc", &[(None, 8080)], ips)],
        ..Objects::default()
    };
    let a = compile(&objects(&[("10.0.0.1", None)]));
    let b = compile(&objects(&[("10.0.0.1", None), ("10.0.0.2", None)]));
    assert_eq!(a.snapshot.routes_version, b.snapshot.routes_version);
    assert_ne!(a.snapshot.version, b.snapshot.version);
    assert_eq!(b.snapshot.services[0].addresses.len(), 2);
}

#[test]
fn a_service_with_ssl_is_https_with_its_material() {
    let (ca, _) = pem_pair("ca");
    let objects = Objects {
        api_proxies: vec![with_ssl(
            mk_api_proxy("ns", "p", "/p", service("svc", 443)),
            "tls",
        )],
        services: vec![mk_service("ns", "svc")],
        secrets: vec![mk_secret("ns", "tls", true, &[("tls.ca", &ca)])],
        ..Objects::default()
    };
    let c = compile(&objects);
    match &only_route(&c).backend {
        Some(pb::route::Backend::Service(s)) => {
            assert_eq!(s.scheme, "https");
            assert_eq!(s.tls, c.snapshot.tls[0].id);
        }
        other => panic!("{other:?}"),
    }
    // The Service has no ports: the number is used as given, with no endpoints known.
    assert_eq!(c.snapshot.services[0].port, 443);
    assert!(c.snapshot.services[0].addresses.is_empty());
}

fn dynamic(labels: Vec<ServiceLabel>) -> ApiProxy {
    mk_api_proxy(
        "ns",
        "p",
        "/p",
        Backend {
            service: Some(ServiceBackend {
                name: None,
                port: 8080,
                labels,
            }),
            ..Backend::default()
        },
    )
}

fn label(name: &str, value: Option<&str>, header: Option<&str>) -> ServiceLabel {
    ServiceLabel {
        name: name.to_owned(),
        value: value.map(str::to_owned),
        header: header.map(str::to_owned),
    }
}

fn labelled(name: &str, labels: &[(&str, &str)]) -> Service {
    let mut s = mk_service("ns", name);
    s.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    s
}

#[test]
fn a_dynamic_backend_lists_the_services_that_can_match() {
    let ap = dynamic(vec![
        label("app", Some("catalog"), None),
        label("track", None, Some("X-Release-Track")),
    ]);
    let objects = Objects {
        api_proxies: vec![ap],
        services: vec![
            labelled("z-canary", &[("app", "catalog"), ("track", "canary")]),
            labelled("a-stable", &[("app", "catalog"), ("track", "stable")]),
            labelled("no-track", &[("app", "catalog")]),
            labelled("other-app", &[("app", "cart"), ("track", "stable")]),
        ],
        ..Objects::default()
    };
    let (c, (ok, _, message)) = resolved(&objects);
    assert!(ok, "{message}");
    let Some(pb::route::Backend::DynamicService(d)) = &only_route(&c).backend else {
        panic!("{:?}", only_route(&c).backend)
    };
    let names: Vec<&str> = d.candidates.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a-stable", "z-canary"]);
    assert_eq!(
        d.labels[1].source,
        Some(pb::label_match::Source::Header("x-release-track".into())),
        "header names are lowercased"
    );
    let shipped: Vec<&str> = c
        .snapshot
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(shipped, ["a-stable", "z-canary"]);
    assert_eq!(
        diagnostic(&c, Kind::ApiProxy, Some("ns"), "p")
            .backend
            .as_deref(),
        Some("service:{app=catalog,track=<x-release-track>}:8080")
    );
}

#[test]
fn a_dynamic_backend_without_candidates_answers_10_and_says_so() {
    let objects = Objects {
        api_proxies: vec![dynamic(vec![label("app", Some("nothing"), None)])],
        services: vec![labelled("a", &[("app", "catalog")])],
        ..Objects::default()
    };
    let (c, (ok, reason, _)) = resolved(&objects);
    assert!(!ok);
    assert_eq!(reason, "NoMatchingService");
    assert!(matches!(
        only_route(&c).backend,
        Some(pb::route::Backend::DynamicService(_))
    ));
}

#[test]
fn invalid_dynamic_labels_are_rejected() {
    for (l, needle) in [
        (
            label("app", Some("has space"), None),
            "not a Kubernetes label value",
        ),
        (
            label("bad key!", Some("x"), None),
            "not a Kubernetes label key",
        ),
        (
            label("app", None, Some("bad header")),
            "not an HTTP header name",
        ),
        (
            label("app", Some("x"), Some("h")),
            "exactly one of value and header",
        ),
    ] {
        let c = compile(&proxies(vec![dynamic(vec![l])]));
        let d = diagnostic(&c, Kind::ApiProxy, Some("ns"), "p");
        assert!(!d.conditions[0].status);
        assert!(
            d.conditions[0].message.contains(needle),
            "{}",
            d.conditions[0].message
        );
    }
}

#[test]
fn services_that_cannot_be_listed_answer_09() {
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", service("svc", 80))],
        unavailable: vec!["Service".to_owned()],
        ..Objects::default()
    };
    let (c, (ok, reason, _)) = resolved(&objects);
    assert!(!ok);
    assert_eq!(reason, "ServicesUnavailable");
    assert_eq!(
        only_route(&c).backend,
        Some(pb::route::Backend::Failure(pb::Failure { code: 9 }))
    );
}

#[test]
fn target_timeout_is_compiled_in_milliseconds() {
    for (t, ms) in [
        ("2500ms", 2500),
        ("30s", 30_000),
        ("2m", 120_000),
        ("60m", 3_600_000),
    ] {
        let mut ap = mk_api_proxy("ns", "p", "/p", endpoint("http://up"));
        ap.spec.target.timeout = Some(t.to_owned());
        let c = compile(&proxies(vec![ap]));
        assert_eq!(only_route(&c).timeout_ms, ms, "{t}");
    }
    for t in ["0s", "61m", "5h", "s", "1.5s", "99999999999999999999ms"] {
        let mut ap = mk_api_proxy("ns", "p", "/p", endpoint("http://up"));
        ap.spec.target.timeout = Some(t.to_owned());
        let c = compile(&proxies(vec![ap]));
        assert!(c.snapshot.routes.is_empty(), "{t}");
        let d = diagnostic(&c, Kind::ApiProxy, Some("ns"), "p");
        assert!(
            d.conditions[0].message.contains("spec.target.timeout"),
            "{t}"
        );
    }
}

#[test]
fn an_external_name_service_ships_its_name() {
    let mut svc = mk_service_with("ns", "partner", &[]);
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some("ExternalName".to_owned());
    spec.external_name = Some("API.Partner.example.".to_owned());
    spec.cluster_ip = None;
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", service("partner", 443))],
        services: vec![svc],
        ..Objects::default()
    };
    let c = compile(&objects);
    let shipped = &c.snapshot.services[0];
    assert_eq!(shipped.external_name, "api.partner.example");
    assert!(shipped.addresses.is_empty() && shipped.cluster_ip.is_empty());
}
