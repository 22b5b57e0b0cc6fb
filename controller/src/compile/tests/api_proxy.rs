//! ApiProxy: `Accepted=False, Invalid` for specs that cannot work, `ResolvedRefs` for
//! references, and the backend each valid proxy compiles to.

use kanali_crds::{Plugin, ServiceBackend, ServiceLabel};

use super::*;

/// Compiles `ap` alone and checks it is rejected as `Invalid` with a message containing
/// `needle`, without a route and without a `ResolvedRefs` condition.
#[track_caller]
fn assert_invalid(ap: ApiProxy, needle: &str) {
    let c = compile(&proxies(vec![ap]));
    assert!(c.snapshot.routes.is_empty(), "{:#?}", c.snapshot.routes);
    assert_eq!(c.diagnostics.len(), 1);
    let d = &c.diagnostics[0];
    assert_eq!(conditions(d), [(condition::ACCEPTED, false, "Invalid")]);
    let message = &d.conditions[0].message;
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert_eq!(d.ready().reason, "Invalid");
    assert!(!d.is_ok());
}

/// Compiles `objects`, expects a single route that answers `code`, and returns the
/// `ResolvedRefs` condition's message after checking its `reason`.
#[track_caller]
fn assert_failure(objects: &Objects, reason: &str, code: u32) -> String {
    let c = compile(objects);
    let route = only_route(&c);
    assert_eq!(
        route.backend,
        Some(pb::route::Backend::Failure(pb::Failure { code }))
    );
    let ap = &objects.api_proxies[0];
    let ns = ap.metadata.namespace.as_deref();
    let d = diagnostic(&c, Kind::ApiProxy, ns, ap.metadata.name.as_deref().unwrap());
    assert_eq!(
        conditions(d),
        [
            (condition::ACCEPTED, true, "Accepted"),
            (condition::RESOLVED_REFS, false, reason)
        ]
    );
    assert_eq!(d.ready().reason, reason);
    d.conditions[1].message.clone()
}

fn with_source(path: &str, host: Option<&str>) -> ApiProxy {
    let mut ap = mk_api_proxy("ns", "p", path, endpoint("http://up"));
    ap.spec.source.virtual_host = host.map(str::to_owned);
    ap
}

#[test]
fn bad_source_paths_are_invalid() {
    for path in [
        "", "foo", "/a b", "/a%zz", "/a%2", "/a/../b", "/./a", "/a?b",
    ] {
        assert_invalid(with_source(path, None), "spec.source.path");
    }
}

#[test]
fn bad_target_paths_are_invalid() {
    for path in ["foo", "/a b", "/a%g0", "/a/.."] {
        let mut ap = with_source("/p", None);
        ap.spec.target.path = Some(path.to_owned());
        assert_invalid(ap, "spec.target.path");
    }
}

#[test]
fn bad_virtual_hosts_are_invalid() {
    for host in [
        "*.example.org",
        "http://example.org",
        "example.org:99999",
        "example.org:abc",
        "a b",
        "user@example.org",
    ] {
        assert_invalid(with_source("/p", Some(host)), "spec.source.virtualHost");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut ap = with_source("nope", Some("*.x"));
    ap.spec.target.path = Some("also-nope".to_owned());
    ap.spec.target.backend = Backend::default();
    ap.spec.plugins = vec![Plugin::default()];
    let c = compile(&proxies(vec![ap]));
    let message = &c.diagnostics[0].conditions[0].message;
    for needle in [
        "spec.source.path",
        "spec.source.virtualHost",
        "spec.target.path",
        "exactly one of endpoint, service and mock",
        "spec.plugins[0].name",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
}

#[test]
fn backend_must_set_exactly_one_kind() {
    assert_invalid(
        mk_api_proxy("ns", "p", "/p", Backend::default()),
        "exactly one of endpoint, service and mock",
    );
    let two = Backend {
        endpoint: Some("http://up".to_owned()),
        mock: mock("m").mock,
        ..Backend::default()
    };
    assert_invalid(mk_api_proxy("ns", "p", "/p", two), "exactly one of");
    let three = Backend {
        endpoint: Some("http://up".to_owned()),
        service: service("s", 80).service,
        mock: mock("m").mock,
    };
    assert_invalid(mk_api_proxy("ns", "p", "/p", three), "exactly one of");
}

#[test]
fn bad_endpoints_are_invalid() {
    for (url, needle) in [
        ("ftp://up", "scheme \"ftp\" is not supported"),
        ("up.example.org", "needs a scheme"),
        ("http://up/base", "path or query"),
        ("http://up/?q=1", "path or query"),
        ("http://up?q=1", "path or query"),
        ("http://user:pw@up", "user info"),
        ("http://:8080", "no host"),
        ("http://", "spec.target.backend.endpoint"),
        ("not a url", "is not a URL"),
        ("http://up:99999", "port"),
        ("http://up:http", "port"),
        ("http://up:", "port"),
        ("http://up:0", "port"),
        ("http://up#fragment", "fragment"),
    ] {
        assert_invalid(mk_api_proxy("ns", "p", "/p", endpoint(url)), needle);
    }
}

#[test]
fn bad_services_are_invalid() {
    for port in [0, -1, 65536, 70000] {
        assert_invalid(
            mk_api_proxy("ns", "p", "/p", service("s", port)),
            "spec.target.backend.service.port",
        );
    }
    let label = ServiceLabel {
        name: "app".to_owned(),
        value: Some("x".to_owned()),
        header: None,
    };
    let both = Backend {
        service: Some(ServiceBackend {
            name: Some("s".to_owned()),
            port: 80,
            labels: vec![label.clone()],
        }),
        ..Backend::default()
    };
    assert_invalid(
        mk_api_proxy("ns", "p", "/p", both),
        "exactly one of name and labels",
    );
    for name in [None, Some(String::new())] {
        let neither = Backend {
            service: Some(ServiceBackend {
                name,
                port: 80,
                labels: Vec::new(),
            }),
            ..Backend::default()
        };
        assert_invalid(
            mk_api_proxy("ns", "p", "/p", neither),
            "exactly one of name and labels",
        );
    }
    for (value, header) in [(None, None), (Some("v"), Some("x-h"))] {
        let labels = Backend {
            service: Some(ServiceBackend {
                name: None,
                port: 80,
                labels: vec![
                    label.clone(),
                    ServiceLabel {
                        name: "track".to_owned(),
                        value: value.map(str::to_owned),
                        header: header.map(str::to_owned),
                    },
                ],
            }),
            ..Backend::default()
        };
        assert_invalid(
            mk_api_proxy("ns", "p", "/p", labels),
            "service.labels[1] must set exactly one of value and header",
        );
    }
}

#[test]
fn mock_with_empty_name_is_invalid() {
    assert_invalid(
        mk_api_proxy("ns", "p", "/p", mock("")),
        "mockTargetName must not be empty",
    );
}

#[test]
fn empty_plugin_name_is_invalid() {
    for name in ["", "  "] {
        let mut ap = with_source("/p", None);
        ap.spec.plugins = vec![
            Plugin {
                name: "apikey".to_owned(),
                ..Plugin::default()
            },
            Plugin {
                name: name.to_owned(),
                ..Plugin::default()
            },
        ];
        assert_invalid(ap, "spec.plugins[1].name must not be empty");
    }
}

#[test]
fn valid_source_and_target_are_normalised_into_the_route() {
    let mut ap = with_source("//api///v1/", Some("API.Example.org:8443"));
    ap.spec.target.path = Some("/up//stream/".to_owned());
    let c = compile(&proxies(vec![ap]));
    let route = only_route(&c);
    assert_eq!(route.path, "/api/v1");
    assert_eq!(route.virtual_host, "api.example.org:8443");
    assert_eq!(route.target_path, "/up/stream");
}

#[test]
fn target_path_defaults_to_root_and_empty_host_means_every_host() {
    for (target, host) in [(None, None), (Some(""), Some("")), (Some("///"), None)] {
        let mut ap = with_source("/p", host);
        ap.spec.target.path = target.map(str::to_owned);
        let c = compile(&proxies(vec![ap]));
        let route = only_route(&c);
        assert_eq!(route.target_path, "/", "{target:?}");
        assert_eq!(route.virtual_host, "", "{host:?}");
    }
}

#[test]
fn endpoint_backend_keeps_the_scheme_and_lowercases_the_authority() {
    for (url, scheme, authority) in [
        ("http://Up.Example.ORG", "http", "up.example.org"),
        (
            "https://up.example.org:9443/",
            "https",
            "up.example.org:9443",
        ),
        ("HTTP://[::1]:8080", "http", "[::1]:8080"),
    ] {
        let c = compile(&proxies(vec![mk_api_proxy("ns", "p", "/p", endpoint(url))]));
        assert_eq!(
            only_route(&c).backend,
            Some(pb::route::Backend::Endpoint(pb::Endpoint {
                scheme: scheme.to_owned(),
                authority: authority.to_owned(),
                tls: String::new(),
            })),
            "{url}"
        );
        let d = &c.diagnostics[0];
        assert!(d.is_ok(), "{d:#?}");
        assert_eq!(
            d.backend.as_deref(),
            Some(format!("endpoint:{scheme}://{authority}").as_str())
        );
    }
}

#[test]
fn https_endpoint_without_ssl_is_fine() {
    let c = compile(&proxies(vec![mk_api_proxy(
        "ns",
        "p",
        "/p",
        endpoint("https://up"),
    )]));
    assert!(c.diagnostics[0].is_ok());
}

#[test]
fn found_mock_target_is_embedded_in_the_route() {
    let mut mt = mk_mock_target(
        "ns",
        "m",
        vec![mk_mock_route("/a", 200), mk_mock_route("/b/", 404)],
    );
    mt.metadata.generation = Some(3);
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", mock("m"))],
        mock_targets: vec![mt],
        ..Objects::default()
    };
    let c = compile(&objects);
    let Some(pb::route::Backend::Mock(m)) = &only_route(&c).backend else {
        panic!("not a mock: {:#?}", c.snapshot.routes);
    };
    let source = m.mock_target.as_ref().unwrap();
    assert_eq!(
        (
            source.kind.as_str(),
            source.namespace.as_str(),
            source.name.as_str(),
            source.generation
        ),
        ("MockTarget", "ns", "m", 3)
    );
    let got: Vec<(&str, u32, &[u8])> = m
        .responses
        .iter()
        .map(|r| (r.path.as_str(), r.status, r.body.as_slice()))
        .collect();
    assert_eq!(got, [("/a", 200, &b"{}"[..]), ("/b", 404, &b"{}"[..])]);
    let d = diagnostic(&c, Kind::ApiProxy, Some("ns"), "p");
    assert!(d.is_ok());
    assert_eq!(d.backend.as_deref(), Some("mock:m"));
}

#[test]
fn missing_mock_target_still_routes_with_error_02() {
    let mut objects = proxies(vec![mk_api_proxy("ns", "p", "/p", mock("m"))]);
    let message = assert_failure(&objects, "MockTargetNotFound", 2);
    assert!(message.contains("ns/m"), "{message}");
    // A MockTarget of that name in another namespace does not count.
    objects.mock_targets = vec![mk_mock_target("other", "m", vec![mk_mock_route("/", 200)])];
    assert_failure(&objects, "MockTargetNotFound", 2);
}

#[test]
fn invalid_mock_target_routes_with_error_02() {
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", mock("m"))],
        mock_targets: vec![mk_mock_target("ns", "m", vec![mk_mock_route("/", 99)])],
        ..Objects::default()
    };
    assert_failure(&objects, "MockTargetNotAccepted", 2);
}

#[test]
fn found_service_routes_over_http() {
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", service("svc", 8080))],
        services: vec![mk_service("other", "svc"), mk_service("ns", "svc")],
        ..Objects::default()
    };
    let c = compile(&objects);
    assert_eq!(
        only_route(&c).backend,
        Some(pb::route::Backend::Service(pb::ServiceTarget {
            namespace: "ns".to_owned(),
            name: "svc".to_owned(),
            port: 8080,
            scheme: "http".to_owned(),
            tls: String::new(),
        }))
    );
    let d = &c.diagnostics[0];
    assert!(d.is_ok(), "{d:#?}");
    assert_eq!(d.backend.as_deref(), Some("service:svc:8080"));
}

#[test]
fn service_in_default_namespace_is_found_without_a_namespace() {
    let mut svc = mk_service("x", "svc");
    svc.metadata.namespace = None;
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("default", "p", "/p", service("svc", 80))],
        services: vec![svc],
        ..Objects::default()
    };
    assert!(compile(&objects).diagnostics[0].is_ok());
}

#[test]
fn missing_service_routes_with_error_10() {
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", service("svc", 80))],
        services: vec![mk_service("other", "svc"), mk_service("ns", "svc2")],
        ..Objects::default()
    };
    let message = assert_failure(&objects, "ServiceNotFound", 10);
    assert!(message.contains("ns/svc"), "{message}");
}

/// A plugin entry with `config` given as pairs.
fn plugin(name: &str, version: Option<&str>, config: &[(&str, &str)]) -> Plugin {
    Plugin {
        name: name.to_owned(),
        version: version.map(str::to_owned),
        config: config
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

#[test]
fn custom_plugins_become_wasm_plugins_in_list_order_and_keep_the_backend() {
    let mut ap = mk_api_proxy("ns", "p", "/p", endpoint("http://up"));
    ap.spec.plugins = vec![
        plugin(
            "add-header",
            None,
            &[("zeta", "1"), ("alpha", "two \"quoted\"")],
        ),
        plugin("apikey", None, &[("apiKeyBindingName", "b")]),
        plugin("cors", Some("v1.2.0"), &[]),
    ];
    let c = compile(&proxies(vec![ap]));
    let route = only_route(&c);
    assert!(
        matches!(route.backend, Some(pb::route::Backend::Endpoint(_))),
        "{:?}",
        route.backend
    );
    let kinds: Vec<_> = route.plugins.iter().map(|p| p.kind.clone()).collect();
    assert_eq!(
        kinds[0],
        Some(pb::plugin::Kind::Wasm(pb::WasmPlugin {
            name: "add-header".into(),
            version: String::new(),
            // Sorted keys, whatever the order in the manifest.
            config_json: r#"{"alpha":"two \"quoted\"","zeta":"1"}"#.into(),
        }))
    );
    assert!(matches!(kinds[1], Some(pb::plugin::Kind::ApiKey(_))));
    assert_eq!(
        kinds[2],
        Some(pb::plugin::Kind::Wasm(pb::WasmPlugin {
            name: "cors".into(),
            version: "v1.2.0".into(),
            config_json: String::new(),
        }))
    );
}

#[test]
fn plugin_names_and_versions_must_be_safe_file_names() {
    for (name, version) in [
        ("../etc/passwd", None),
        ("a/b", None),
        (".hidden", None),
        ("a..b", None),
        ("sp ace", None),
        ("ok", Some("../x")),
        ("ok", Some("1/2")),
        ("ok", Some(".1")),
    ] {
        let mut ap = with_source("/p", None);
        ap.spec.plugins = vec![plugin(name, version, &[])];
        let field = if version.is_some() { "version" } else { "name" };
        assert_invalid(ap, &format!("spec.plugins[0].{field}"));
    }
    let mut ap = with_source("/p", None);
    ap.spec.plugins = vec![plugin("My_plugin-2.wasm", Some("1.0-rc_1"), &[])];
    assert!(compile(&proxies(vec![ap])).diagnostics[0].is_ok());
}

#[test]
fn a_failing_route_keeps_its_backend_summary() {
    let objects = proxies(vec![mk_api_proxy("ns", "p", "/p", service("svc", 81))]);
    let c = compile(&objects);
    assert_eq!(c.diagnostics[0].backend.as_deref(), Some("service:svc:81"));
}
