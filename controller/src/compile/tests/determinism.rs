//! The same objects always give the same bytes; any change to a route gives a new version.

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use super::*;

fn sample() -> Objects {
    let mut host = mk_api_proxy("b", "host", "/a", endpoint("http://h"));
    host.spec.source.virtual_host = Some("example.org".to_owned());
    let mut route = mk_mock_route("/m", 200);
    route.headers = BTreeMap::from([
        ("x-b".to_owned(), "2".to_owned()),
        ("x-a".to_owned(), "1".to_owned()),
    ]);
    Objects {
        api_proxies: vec![
            mk_api_proxy("b", "z", "/z", endpoint("http://z")),
            host,
            mk_api_proxy("a", "any", "/a", endpoint("http://a")),
            mk_api_proxy("a", "mock", "/m", mock("m")),
            mk_api_proxy("a", "svc", "/s", service("svc", 80)),
            mk_api_proxy("a", "root", "/", endpoint("http://r")),
            mk_api_proxy_at("a", "late", "/z", endpoint("http://late"), 5),
        ],
        mock_targets: vec![
            mk_mock_target("a", "m", vec![route, mk_mock_route("/n", 201)]),
            mk_mock_target("a", "unused", vec![mk_mock_route("/", 200)]),
        ],
        api_keys: vec![mk_api_key("k2", "YWJj"), mk_api_key("k1", "ZGVm")],
        api_key_bindings: vec![
            mk_binding("a", "b2", vec![mk_key("k1")]),
            mk_binding("a", "b1", vec![mk_key("k2")]),
        ],
        secrets: Vec::new(),
        services: vec![mk_service("a", "svc")],
        undecodable: Vec::new(),
        endpoint_slices: vec![
            super::upstream::mk_slice("a", "svc", &[(None, 80)], &[("10.0.0.9", None)]),
            super::upstream::mk_slice(
                "a",
                "svc",
                &[(None, 80)],
                &[("10.0.0.1", None), ("10.0.0.5", None)],
            ),
        ],
        endpoints: Vec::new(),
        unavailable: Vec::new(),
        decrypted: digests(&["YWJj", "ZGVm"]),
    }
}

fn reversed(mut o: Objects) -> Objects {
    o.api_proxies.reverse();
    o.mock_targets.reverse();
    o.api_keys.reverse();
    o.api_key_bindings.reverse();
    o.services.reverse();
    o.endpoint_slices.reverse();
    for slice in &mut o.endpoint_slices {
        slice.endpoints.reverse();
    }
    o
}

#[test]
fn input_order_does_not_matter() {
    let a = compile(&sample());
    let b = compile(&reversed(sample()));
    assert_eq!(a.snapshot.encode_to_vec(), b.snapshot.encode_to_vec());
    assert_eq!(a.snapshot.version, b.snapshot.version);
    assert_eq!(a.diagnostics, b.diagnostics);
    let mut rotated = sample();
    rotated.api_proxies.rotate_left(3);
    assert_eq!(compile(&rotated).snapshot, a.snapshot);
}

#[test]
fn version_is_the_sha256_of_the_snapshot_without_version() {
    let c = compile(&sample());
    let version = &c.snapshot.version;
    assert_eq!(version.len(), 64);
    assert!(
        version
            .chars()
            .all(|ch| ch.is_ascii_digit() || ('a'..='f').contains(&ch)),
        "{version}"
    );
    let mut unversioned = c.snapshot.clone();
    unversioned.version.clear();
    let hex = |bytes: Vec<u8>| -> String {
        let digest = Sha256::digest(bytes);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    };
    assert_eq!(&hex(unversioned.encode_to_vec()), version);
    // And routes_version is that of the routes and TLS material alone.
    let routing = pb::Snapshot {
        routes: c.snapshot.routes.clone(),
        tls: c.snapshot.tls.clone(),
        ..Default::default()
    };
    assert_eq!(hex(routing.encode_to_vec()), c.snapshot.routes_version);
}

#[test]
fn routes_are_sorted_by_path_then_host() {
    let c = compile(&sample());
    let keys: Vec<(&str, &str)> = c
        .snapshot
        .routes
        .iter()
        .map(|r| (r.path.as_str(), r.virtual_host.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("/", ""),
            ("/a", ""),
            ("/a", "example.org"),
            ("/m", ""),
            ("/s", ""),
            ("/z", ""),
        ]
    );
}

/// One edit of the sample objects.
type Change = fn(&mut Objects);

#[test]
fn any_change_to_a_route_changes_the_version() {
    let base = compile(&sample()).snapshot.version;
    let changes: Vec<(&str, Change)> = vec![
        ("source path", |o| {
            o.api_proxies[0].spec.source.path = "/zz".to_owned()
        }),
        ("virtual host", |o| {
            o.api_proxies[0].spec.source.virtual_host = Some("h".to_owned())
        }),
        ("target path", |o| {
            o.api_proxies[0].spec.target.path = Some("/t".to_owned())
        }),
        ("endpoint", |o| {
            o.api_proxies[0].spec.target.backend = endpoint("http://z:81")
        }),
        ("generation", |o| {
            o.api_proxies[0].metadata.generation = Some(2)
        }),
        ("mock body", |o| {
            o.mock_targets[0].spec.routes[0].body = Some("x".to_owned())
        }),
        ("mock status", |o| {
            o.mock_targets[0].spec.routes[0].status = 500
        }),
        ("service removed", |o| o.services.clear()),
        ("proxy removed", |o| drop(o.api_proxies.remove(0))),
        ("proxy added", |o| {
            o.api_proxies
                .push(mk_api_proxy("c", "new", "/new", endpoint("http://n")))
        }),
    ];
    for (what, change) in changes {
        let mut objects = sample();
        change(&mut objects);
        assert_ne!(compile(&objects).snapshot.version, base, "{what}");
    }
}

#[test]
fn objects_outside_the_routes_do_not_change_the_version() {
    let base = compile(&sample()).snapshot.version;
    let mut objects = sample();
    objects.api_keys.clear();
    objects.api_key_bindings.clear();
    objects.mock_targets.truncate(1); // "unused" is referenced by nothing
    assert_eq!(compile(&objects).snapshot.version, base);
}
