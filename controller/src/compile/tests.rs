//! Tests of what `compile` promises, fed with plain fixtures. The builders here are shared by
//! the submodules, one per concern.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod api_key;
mod api_proxy;
mod conflicts;
mod determinism;
mod memo;
mod mock_target;
mod upstream;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kanali_crds::{
    ApiKey, ApiKeyBinding, ApiKeyBindingSpec, ApiKeySpec, ApiProxy, ApiProxySpec, Backend, Key,
    MockBackend, MockRoute, MockTarget, MockTargetSpec, Revision, Rule, ServiceBackend, Source,
    Target,
};
use kanali_proto::v1 as pb;

use super::{Compiled, Diagnostic, Kind, Objects, compile, condition};

/// An ApiProxy `ns/name` serving `path` (every host) from `backend`.
fn mk_api_proxy(ns: &str, name: &str, path: &str, backend: Backend) -> ApiProxy {
    let mut ap = ApiProxy::new(
        name,
        ApiProxySpec {
            source: Source {
                path: path.to_owned(),
                virtual_host: None,
            },
            target: Target {
                path: None,
                backend,
                ssl: None,
                timeout: None,
            },
            plugins: Vec::new(),
        },
    );
    ap.metadata.namespace = Some(ns.to_owned());
    ap
}

/// Same as [`mk_api_proxy`], created `secs` seconds after the epoch.
fn mk_api_proxy_at(ns: &str, name: &str, path: &str, backend: Backend, secs: i64) -> ApiProxy {
    let mut ap = mk_api_proxy(ns, name, path, backend);
    ap.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(secs).unwrap(),
    ));
    ap
}

fn endpoint(url: &str) -> Backend {
    Backend {
        endpoint: Some(url.to_owned()),
        ..Backend::default()
    }
}

fn service(name: &str, port: i64) -> Backend {
    Backend {
        service: Some(ServiceBackend {
            name: Some(name.to_owned()),
            port,
            labels: Vec::new(),
        }),
        ..Backend::default()
    }
}

fn mock(name: &str) -> Backend {
    Backend {
        mock: Some(MockBackend {
            mock_target_name: name.to_owned(),
        }),
        ..Backend::default()
    }
}

/// A MockTarget `ns/name` with the given routes.
fn mk_mock_target(ns: &str, name: &str, routes: Vec<MockRoute>) -> MockTarget {
    let mut mt = MockTarget::new(name, MockTargetSpec { routes });
    mt.metadata.namespace = Some(ns.to_owned());
    mt
}

/// A mock route answering GET on `path` with `status` and a text body.
fn mk_mock_route(path: &str, status: i64) -> MockRoute {
    MockRoute {
        path: path.to_owned(),
        status,
        methods: vec!["GET".to_owned()],
        headers: BTreeMap::new(),
        body: Some("{}".to_owned()),
        body_base64: None,
    }
}

fn mk_service(ns: &str, name: &str) -> Service {
    let mut svc = Service::default();
    svc.metadata.namespace = Some(ns.to_owned());
    svc.metadata.name = Some(name.to_owned());
    svc
}

/// An ApiKey with one active revision holding `data`.
fn mk_api_key(name: &str, data: &str) -> ApiKey {
    ApiKey::new(
        name,
        ApiKeySpec {
            revisions: vec![Revision {
                data: data.to_owned(),
                ..Revision::default()
            }],
        },
    )
}

/// What the vault would give for these revision `data`: a digest each (SHA-256 of the data
/// itself, as if that were the plaintext).
fn digests(data: &[&str]) -> std::sync::Arc<crate::compile::api_key::Decrypted> {
    use sha2::{Digest as _, Sha256};
    std::sync::Arc::new(crate::compile::api_key::Decrypted {
        no_key: None,
        digests: data
            .iter()
            .map(|d| {
                (
                    std::sync::Arc::from(*d),
                    crate::compile::api_key::Decryption::new(
                        d,
                        Ok(Sha256::digest(d.as_bytes()).into()),
                    ),
                )
            })
            .collect(),
    })
}

/// A binding entry granting `name` every method.
fn mk_key(name: &str) -> Key {
    Key {
        name: name.to_owned(),
        default_rule: Some(Rule {
            global: Some(true),
            granular: None,
        }),
        subpaths: Vec::new(),
        rate: None,
    }
}

fn mk_binding(ns: &str, name: &str, keys: Vec<Key>) -> ApiKeyBinding {
    let mut b = ApiKeyBinding::new(name, ApiKeyBindingSpec { keys });
    b.metadata.namespace = Some(ns.to_owned());
    b
}

fn proxies(api_proxies: Vec<ApiProxy>) -> Objects {
    Objects {
        api_proxies,
        ..Objects::default()
    }
}

/// The diagnostic of one object; panics unless there is exactly one.
fn diagnostic<'a>(c: &'a Compiled, kind: Kind, ns: Option<&str>, name: &str) -> &'a Diagnostic {
    let found: Vec<&Diagnostic> = c
        .diagnostics
        .iter()
        .filter(|d| {
            d.object.kind == kind && d.object.namespace.as_deref() == ns && d.object.name == name
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "diagnostics for {kind:?} {ns:?}/{name}: {found:#?}"
    );
    found[0]
}

/// `(type, status, reason)` of every condition, in order.
fn conditions(d: &Diagnostic) -> Vec<(&str, bool, &str)> {
    d.conditions
        .iter()
        .map(|c| (c.type_, c.status, c.reason.as_str()))
        .collect()
}

fn only_route(c: &Compiled) -> &pb::Route {
    assert_eq!(c.snapshot.routes.len(), 1, "{:#?}", c.snapshot.routes);
    &c.snapshot.routes[0]
}

#[test]
fn empty_input_gives_an_empty_snapshot_with_a_version() {
    let c = compile(&Objects::default());
    assert!(c.snapshot.routes.is_empty());
    assert!(c.diagnostics.is_empty());
    assert_eq!(c.snapshot.version.len(), 64);
}

#[test]
fn every_object_gets_exactly_one_diagnostic_sorted() {
    let objects = Objects {
        api_proxies: vec![
            mk_api_proxy("b", "z", "/z", endpoint("http://z")),
            mk_api_proxy("a", "y", "/y", mock("m")),
            mk_api_proxy("a", "bad", "no-slash", endpoint("http://x")),
        ],
        mock_targets: vec![
            mk_mock_target("a", "m", vec![mk_mock_route("/", 200)]),
            mk_mock_target("a", "empty", vec![]),
        ],
        api_keys: vec![mk_api_key("k2", "YWJj"), mk_api_key("k1", "")],
        api_key_bindings: vec![mk_binding("a", "b", vec![mk_key("k1")])],
        ..Objects::default()
    };
    let c = compile(&objects);
    let got: Vec<String> = c.diagnostics.iter().map(|d| d.object.to_string()).collect();
    assert_eq!(
        got,
        [
            "ApiProxy a/bad",
            "ApiProxy a/y",
            "ApiProxy b/z",
            "MockTarget a/empty",
            "MockTarget a/m",
            "ApiKey k1",
            "ApiKey k2",
            "ApiKeyBinding a/b",
        ]
    );
    let mut sorted = c.diagnostics.clone();
    sorted.sort_by(|a, b| a.object.cmp(&b.object));
    assert_eq!(sorted, c.diagnostics);
}

#[test]
fn accepted_objects_get_accepted_then_resolved_refs() {
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", endpoint("http://up"))],
        mock_targets: vec![mk_mock_target("ns", "m", vec![mk_mock_route("/", 200)])],
        api_keys: vec![mk_api_key("k", "YWJj")],
        api_key_bindings: vec![mk_binding("ns", "b", vec![mk_key("k")])],
        decrypted: digests(&["YWJj"]),
        ..Objects::default()
    };
    let c = compile(&objects);
    assert_eq!(c.diagnostics.len(), 4);
    for d in &c.diagnostics {
        assert_eq!(
            conditions(d),
            [
                (condition::ACCEPTED, true, "Accepted"),
                (condition::RESOLVED_REFS, true, "ResolvedRefs")
            ],
            "{}",
            d.object
        );
        assert!(d.is_ok());
        assert_eq!(d.ready().reason, "Ready");
        assert!(d.ready().status);
    }
}

#[test]
fn objects_without_namespace_are_in_default_and_api_keys_have_none() {
    let mut ap = mk_api_proxy("x", "p", "/p", endpoint("http://up"));
    ap.metadata.namespace = None;
    let mut key = mk_api_key("k", "YWJj");
    key.metadata.namespace = Some("ignored".to_owned());
    let c = compile(&Objects {
        api_proxies: vec![ap],
        api_keys: vec![key],
        ..Objects::default()
    });
    diagnostic(&c, Kind::ApiProxy, Some("default"), "p");
    diagnostic(&c, Kind::ApiKey, None, "k");
    let source = only_route(&c).source.as_ref().unwrap();
    assert_eq!(
        (
            source.kind.as_str(),
            source.namespace.as_str(),
            source.name.as_str()
        ),
        ("ApiProxy", "default", "p")
    );
}

#[test]
fn generation_is_carried_to_the_diagnostic_and_the_route() {
    let mut ap = mk_api_proxy("ns", "p", "/p", endpoint("http://up"));
    ap.metadata.generation = Some(7);
    let c = compile(&proxies(vec![ap]));
    assert_eq!(
        diagnostic(&c, Kind::ApiProxy, Some("ns"), "p").generation,
        Some(7)
    );
    assert_eq!(only_route(&c).source.as_ref().unwrap().generation, 7);
}

#[test]
fn one_bad_object_never_affects_another() {
    let good = mk_api_proxy("ns", "good", "/good", endpoint("http://up"));
    let bad = mk_api_proxy("ns", "bad", "/good", endpoint("ftp://up"));
    let alone = compile(&proxies(vec![good.clone()]));
    let both = compile(&proxies(vec![bad, good]));
    assert_eq!(both.snapshot.routes, alone.snapshot.routes);
    assert_eq!(both.snapshot.version, alone.snapshot.version);
    assert_eq!(
        diagnostic(&both, Kind::ApiProxy, Some("ns"), "good"),
        diagnostic(&alone, Kind::ApiProxy, Some("ns"), "good")
    );
    let bad = diagnostic(&both, Kind::ApiProxy, Some("ns"), "bad");
    assert_eq!(conditions(bad), [(condition::ACCEPTED, false, "Invalid")]);
}

#[test]
fn an_invalid_mock_target_does_not_affect_another_one() {
    let good = mk_mock_target("ns", "good", vec![mk_mock_route("/", 200)]);
    let bad = mk_mock_target("ns", "bad", vec![mk_mock_route("/", 42)]);
    let ap = mk_api_proxy("ns", "p", "/p", mock("good"));
    let alone = compile(&Objects {
        api_proxies: vec![ap.clone()],
        mock_targets: vec![good.clone()],
        ..Objects::default()
    });
    let both = compile(&Objects {
        api_proxies: vec![ap],
        mock_targets: vec![bad, good],
        ..Objects::default()
    });
    assert_eq!(both.snapshot, alone.snapshot);
    for (kind, name) in [(Kind::ApiProxy, "p"), (Kind::MockTarget, "good")] {
        assert_eq!(
            diagnostic(&both, kind, Some("ns"), name),
            diagnostic(&alone, kind, Some("ns"), name)
        );
    }
}
