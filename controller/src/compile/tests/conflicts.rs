//! Two ApiProxies claiming the same normalised path on the same host: the older one wins.

use super::*;

fn with_host(mut ap: ApiProxy, host: &str) -> ApiProxy {
    ap.spec.source.virtual_host = Some(host.to_owned());
    ap
}

fn route_owner(route: &pb::Route) -> String {
    let s = route.source.as_ref().unwrap();
    format!("{}/{}", s.namespace, s.name)
}

#[track_caller]
fn assert_conflict(c: &Compiled, winner: (&str, &str), loser: (&str, &str)) {
    assert_eq!(
        route_owner(only_route(c)),
        format!("{}/{}", winner.0, winner.1)
    );
    let w = diagnostic(c, Kind::ApiProxy, Some(winner.0), winner.1);
    let l = diagnostic(c, Kind::ApiProxy, Some(loser.0), loser.1);
    assert_eq!(
        conditions(w),
        [
            (condition::ACCEPTED, true, "Accepted"),
            (condition::RESOLVED_REFS, true, "ResolvedRefs")
        ]
    );
    let loser_text = format!("ApiProxy {}/{}", loser.0, loser.1);
    let winner_text = format!("ApiProxy {}/{}", winner.0, winner.1);
    assert!(
        w.conditions[0].message.contains(&loser_text),
        "{:?}",
        w.conditions[0].message
    );
    assert_eq!(
        conditions(l),
        [(condition::ACCEPTED, false, "PathConflict")]
    );
    assert!(
        l.conditions[0].message.contains(&winner_text),
        "{:?}",
        l.conditions[0].message
    );
    assert_eq!(l.ready().reason, "PathConflict");
}

#[test]
fn older_proxy_wins_whatever_the_names() {
    let old = mk_api_proxy_at("z", "z", "/p", endpoint("http://old"), 100);
    let new = mk_api_proxy_at("a", "a", "/p", endpoint("http://new"), 200);
    for order in [vec![old.clone(), new.clone()], vec![new, old]] {
        assert_conflict(&compile(&proxies(order)), ("z", "z"), ("a", "a"));
    }
}

#[test]
fn same_age_falls_back_to_namespace_then_name() {
    let b_a = mk_api_proxy_at("b", "a", "/p", endpoint("http://x"), 100);
    let a_z = mk_api_proxy_at("a", "z", "/p", endpoint("http://y"), 100);
    let a_y = mk_api_proxy_at("a", "y", "/p", endpoint("http://y"), 100);
    let c = compile(&proxies(vec![b_a.clone(), a_z.clone()]));
    assert_conflict(&c, ("a", "z"), ("b", "a"));
    let c = compile(&proxies(vec![a_z, a_y]));
    assert_conflict(&c, ("a", "y"), ("a", "z"));
    // No timestamps at all (manifest files): namespace/name decides.
    let c = compile(&proxies(vec![
        mk_api_proxy("b", "a", "/p", endpoint("http://x")),
        mk_api_proxy("a", "b", "/p", endpoint("http://x")),
    ]));
    assert_conflict(&c, ("a", "b"), ("b", "a"));
}

#[test]
fn conflicts_use_the_normalised_path() {
    let a = mk_api_proxy("ns", "a", "/foo", endpoint("http://a"));
    let b = mk_api_proxy("ns", "b", "//foo/", endpoint("http://b"));
    assert_conflict(&compile(&proxies(vec![b, a])), ("ns", "a"), ("ns", "b"));
}

#[test]
fn hosts_are_compared_case_insensitively() {
    let a = with_host(
        mk_api_proxy("ns", "a", "/p", endpoint("http://a")),
        "API.example.org",
    );
    let b = with_host(
        mk_api_proxy("ns", "b", "/p", endpoint("http://b")),
        "api.EXAMPLE.org",
    );
    assert_conflict(&compile(&proxies(vec![b, a])), ("ns", "a"), ("ns", "b"));
}

#[test]
fn different_host_or_path_is_not_a_conflict() {
    let c = compile(&proxies(vec![
        mk_api_proxy("ns", "any-host", "/p", endpoint("http://a")),
        with_host(
            mk_api_proxy("ns", "host-a", "/p", endpoint("http://a")),
            "a",
        ),
        with_host(
            mk_api_proxy("ns", "host-b", "/p", endpoint("http://a")),
            "b",
        ),
        with_host(
            mk_api_proxy("ns", "port", "/p", endpoint("http://a")),
            "a:8080",
        ),
        mk_api_proxy("ns", "other-path", "/p/q", endpoint("http://a")),
        mk_api_proxy("ns", "escaped", "/p%2Fq", endpoint("http://a")),
    ]));
    assert_eq!(c.snapshot.routes.len(), 6);
    for d in &c.diagnostics {
        assert!(d.is_ok(), "{d:#?}");
        assert!(!d.conditions[0].message.contains("also claims"));
    }
}

#[test]
fn every_loser_is_named_in_the_winners_message() {
    let c = compile(&proxies(vec![
        mk_api_proxy_at("ns", "c", "/p", endpoint("http://c"), 3),
        mk_api_proxy_at("ns", "a", "/p", endpoint("http://a"), 1),
        mk_api_proxy_at("ns", "b", "/p/", endpoint("http://b"), 2),
    ]));
    assert_eq!(route_owner(only_route(&c)), "ns/a");
    let winner = &diagnostic(&c, Kind::ApiProxy, Some("ns"), "a").conditions[0];
    assert!(winner.status);
    for loser in ["ns/b", "ns/c"] {
        assert!(winner.message.contains(loser), "{:?}", winner.message);
        let d = diagnostic(&c, Kind::ApiProxy, Some("ns"), &loser[3..]);
        assert_eq!(d.conditions[0].reason, "PathConflict");
        assert!(d.conditions[0].message.contains("ApiProxy ns/a"));
    }
}

#[test]
fn an_invalid_proxy_claims_nothing() {
    let mut invalid = mk_api_proxy_at("ns", "old", "/p", endpoint("http://a"), 1);
    invalid.spec.plugins = vec![kanali_crds::Plugin::default()];
    let valid = mk_api_proxy_at("ns", "new", "/p", endpoint("http://b"), 2);
    let c = compile(&proxies(vec![invalid, valid.clone()]));
    assert_eq!(route_owner(only_route(&c)), "ns/new");
    let alone = compile(&proxies(vec![valid]));
    assert_eq!(
        diagnostic(&c, Kind::ApiProxy, Some("ns"), "new"),
        diagnostic(&alone, Kind::ApiProxy, Some("ns"), "new")
    );
}

#[test]
fn a_proxy_with_a_dangling_reference_still_claims_its_path() {
    let broken = mk_api_proxy_at("ns", "old", "/p", mock("missing"), 1);
    let fine = mk_api_proxy_at("ns", "new", "/p", endpoint("http://b"), 2);
    let c = compile(&proxies(vec![fine, broken]));
    assert_eq!(route_owner(only_route(&c)), "ns/old");
    assert_eq!(
        diagnostic(&c, Kind::ApiProxy, Some("ns"), "new").conditions[0].reason,
        "PathConflict"
    );
}
