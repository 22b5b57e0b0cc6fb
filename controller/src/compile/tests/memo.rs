//! A [`Compiler`] that kept what it compiled before gives exactly what a fresh compile gives,
//! whatever changed in between, and reuses what it can.

use super::upstream::{mk_secret, pem_pair, with_ssl};
use super::*;
use crate::compile::Compiler;

/// The vault's digests for the revisions the states use: one `Arc`, as the vault hands out
/// while nothing changed, so that states which only differ elsewhere share it.
fn vault() -> std::sync::Arc<crate::compile::api_key::Decrypted> {
    use std::sync::{Arc, OnceLock};
    static VAULT: OnceLock<Arc<crate::compile::api_key::Decrypted>> = OnceLock::new();
    VAULT
        .get_or_init(|| digests(&["ZGVm", "YWJj", "bmV3"]))
        .clone()
}

/// A CA certificate for `name`, made once per name (each is a new key).
fn ca(name: &str) -> String {
    use std::sync::{Mutex, OnceLock};
    static MADE: OnceLock<Mutex<BTreeMap<String, String>>> = OnceLock::new();
    let made = MADE.get_or_init(Default::default);
    let mut made = made.lock().unwrap();
    made.entry(name.to_owned())
        .or_insert_with(|| pem_pair(name).0)
        .clone()
}

fn keyed(ns: &str, name: &str, path: &str, binding: &str) -> ApiProxy {
    let mut ap = mk_api_proxy(ns, name, path, endpoint("http://keyed"));
    ap.spec.plugins = vec![kanali_crds::Plugin {
        name: "apikey".to_owned(),
        version: None,
        config: BTreeMap::from([("apiKeyBindingName".to_owned(), binding.to_owned())]),
    }];
    ap
}

fn base() -> Objects {
    let mut host = mk_api_proxy("b", "host", "/a", endpoint("http://h"));
    host.spec.source.virtual_host = Some("example.org".to_owned());
    host.metadata.generation = Some(3);
    Objects {
        api_proxies: vec![
            mk_api_proxy("a", "any", "/a", endpoint("http://a")),
            host,
            mk_api_proxy("a", "mock", "/m", mock("m")),
            mk_api_proxy("a", "svc", "/s", service("svc", 80)),
            mk_api_proxy_at("a", "late", "/a", endpoint("http://late"), 5),
            keyed("a", "keyed", "/k", "b1"),
            with_ssl(mk_api_proxy("a", "tls", "/t", endpoint("https://t")), "tls"),
        ],
        secrets: vec![
            mk_secret("a", "tls", true, &[("tls.ca", &ca("one"))]),
            mk_secret("a", "unnamed", true, &[("tls.ca", &ca("two"))]),
        ],
        mock_targets: vec![mk_mock_target("a", "m", vec![mk_mock_route("/", 200)])],
        api_keys: vec![mk_api_key("k1", "ZGVm"), mk_api_key("k2", "YWJj")],
        api_key_bindings: vec![mk_binding("a", "b1", vec![mk_key("k1"), mk_key("k2")])],
        services: vec![mk_service("a", "svc")],
        endpoint_slices: vec![super::upstream::mk_slice(
            "a",
            "svc",
            &[(None, 80)],
            &[("10.0.0.1", None)],
        )],
        decrypted: vault(),
        ..Objects::default()
    }
}

/// The inputs a controller could see one after another, each a change of one kind.
fn states() -> Vec<(&'static str, Objects)> {
    let edit = |f: &dyn Fn(&mut Objects)| {
        let mut o = base();
        f(&mut o);
        o
    };
    vec![
        ("base", base()),
        (
            "a path edited",
            edit(&|o| o.api_proxies[0].spec.source.path = "/edited".to_owned()),
        ),
        ("a proxy deleted", edit(&|o| drop(o.api_proxies.remove(0)))),
        (
            "an older proxy takes a path over",
            edit(&|o| {
                o.api_proxies.push(mk_api_proxy_at(
                    "c",
                    "older",
                    "/a",
                    endpoint("http://o"),
                    -5,
                ))
            }),
        ),
        (
            "a generation bumped",
            edit(&|o| o.api_proxies[1].metadata.generation = Some(4)),
        ),
        (
            "a proxy made invalid",
            edit(&|o| o.api_proxies[2].spec.source.path = String::new()),
        ),
        (
            "a MockTarget's responses edited",
            edit(&|o| o.mock_targets[0].spec.routes[0].status = 201),
        ),
        ("the MockTarget deleted", edit(&|o| o.mock_targets.clear())),
        ("the Service deleted", edit(&|o| o.services.clear())),
        (
            "the named Secret's CA replaced",
            edit(&|o| o.secrets[0] = mk_secret("a", "tls", true, &[("tls.ca", &ca("three"))])),
        ),
        (
            "the named Secret deleted",
            edit(&|o| drop(o.secrets.remove(0))),
        ),
        (
            "a Secret nobody names replaced",
            edit(&|o| o.secrets[1] = mk_secret("a", "unnamed", true, &[("tls.ca", &ca("four"))])),
        ),
        (
            "an ApiProxy names the other Secret",
            edit(&|o| o.api_proxies[0] = with_ssl(o.api_proxies[0].clone(), "unnamed")),
        ),
        ("the binding deleted", edit(&|o| o.api_key_bindings.clear())),
        (
            "a key's revision replaced",
            edit(&|o| o.api_keys[0].spec.revisions[0].data = "bmV3".to_owned()),
        ),
        (
            "a key's revision made inactive",
            edit(&|o| {
                o.api_keys[1].spec.revisions[0].status = kanali_crds::RevisionStatus::Inactive
            }),
        ),
        ("a key deleted", edit(&|o| drop(o.api_keys.remove(1)))),
        (
            "a binding lists one key fewer",
            edit(&|o| drop(o.api_key_bindings[0].spec.keys.remove(1))),
        ),
        (
            "a key's status written",
            edit(&|o| {
                o.api_keys[0].metadata.resource_version = Some("9".to_owned());
                o.api_keys[0].status = Some(Default::default());
            }),
        ),
        (
            "no decryption key",
            edit(&|o| {
                o.decrypted = std::sync::Arc::new(crate::compile::api_key::Decrypted {
                    no_key: Some("no decryption key is configured".to_owned()),
                    ..Default::default()
                })
            }),
        ),
        (
            "Services unavailable",
            edit(&|o| o.unavailable = vec!["Service".to_owned()]),
        ),
        (
            "only endpoints changed",
            edit(&|o| {
                o.endpoint_slices = vec![super::upstream::mk_slice(
                    "a",
                    "svc",
                    &[(None, 80)],
                    &[("10.0.0.2", None)],
                )]
            }),
        ),
        (
            "two objects with one name",
            edit(&|o| {
                let mut twin = o.api_proxies[0].clone();
                twin.spec.source.path = "/twin".to_owned();
                o.api_proxies.push(twin);
            }),
        ),
        (
            "status written",
            edit(&|o| {
                for ap in &mut o.api_proxies {
                    ap.metadata.resource_version = Some("2".to_owned());
                    ap.status = Some(Default::default());
                }
            }),
        ),
        ("nothing", Objects::default()),
    ]
}

#[test]
fn a_compiler_that_kept_any_earlier_state_gives_what_a_fresh_compile_gives() {
    let states = states();
    for (before, from) in &states {
        for (now, to) in &states {
            let mut compiler = Compiler::default();
            compiler.compile(from);
            assert_eq!(compiler.compile(to), compile(to), "{before} -> {now}");
            // And once more, now with everything kept.
            assert_eq!(
                compiler.compile(to),
                compile(to),
                "{before} -> {now}, again"
            );
        }
    }
}

#[test]
fn only_the_proxies_that_changed_are_compiled_again() {
    let mut compiler = Compiler::default();
    let objects = base();
    let n = objects.api_proxies.len();
    // The fixture's TLS route resolves: its Secret's content is in the snapshot.
    assert_eq!(compiler.compile(&objects).snapshot.tls.len(), 1);
    assert_eq!(compiler.reused(), 0);
    compiler.compile(&objects);
    assert_eq!(compiler.reused(), n);
    let mut edited = base();
    edited.api_proxies[0].spec.source.path = "/edited".to_owned();
    compiler.compile(&edited);
    assert_eq!(compiler.reused(), n - 1);
    // Its status written, an ApiProxy compiles to what it did.
    let mut written = edited.clone();
    for ap in &mut written.api_proxies {
        ap.metadata.resource_version = Some("7".to_owned());
        ap.status = Some(Default::default());
    }
    compiler.compile(&written);
    assert_eq!(compiler.reused(), n);
    // Nothing is kept for an ApiProxy that is gone.
    let mut fewer = edited.clone();
    fewer.api_proxies.truncate(2);
    compiler.compile(&fewer);
    assert_eq!((compiler.reused(), compiler.kept()), (2, 2));
    compiler.compile(&edited);
    assert_eq!(compiler.reused(), 2);
    // Endpoints are not something an ApiProxy's outcome depends on.
    edited.endpoint_slices.clear();
    compiler.compile(&edited);
    assert_eq!((compiler.reused(), compiler.kept()), (n, n));
    // Keys are compiled once while no key, binding or digest changes.
    assert!(compiler.keys_reused());
    let mut rekeyed = edited.clone();
    rekeyed.api_keys[0].spec.revisions[0].data = "bmV3".to_owned();
    compiler.compile(&rekeyed);
    assert!(!compiler.keys_reused());
    compiler.compile(&rekeyed);
    assert!(compiler.keys_reused());
    // Nor are Secrets that no ApiProxy names; the ones they name are.
    edited.secrets[1] = mk_secret("a", "unnamed", true, &[("tls.ca", &ca("four"))]);
    compiler.compile(&edited);
    assert_eq!(compiler.reused(), n);
    edited.secrets[0] = mk_secret("a", "tls", true, &[("tls.ca", &ca("three"))]);
    compiler.compile(&edited);
    assert_eq!(compiler.reused(), 0);
    // A MockTarget is: every outcome is made again.
    edited.mock_targets[0].spec.routes[0].status = 201;
    compiler.compile(&edited);
    assert_eq!(compiler.reused(), 0);
}

#[test]
fn a_secret_an_edited_proxy_starts_naming_is_watched_from_then_on() {
    let mut compiler = Compiler::default();
    let mut objects = base();
    compiler.compile(&objects);
    // An unchanged context, so the outcomes are kept; the edited proxy now names "unnamed".
    objects.api_proxies[0] = with_ssl(objects.api_proxies[0].clone(), "unnamed");
    compiler.compile(&objects);
    assert_eq!(compiler.reused(), objects.api_proxies.len() - 1);
    // Then that Secret changes: the proxy's kept outcome must not hold.
    objects.secrets[1] = mk_secret("a", "unnamed", true, &[("tls.ca", &ca("four"))]);
    assert_eq!(compiler.compile(&objects), compile(&objects));
    assert_eq!(compiler.reused(), 0);
}
