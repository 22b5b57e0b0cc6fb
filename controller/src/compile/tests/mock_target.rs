//! MockTarget validation: every route must be answerable as written.

use super::*;

fn compile_one(routes: Vec<MockRoute>) -> Compiled {
    compile(&Objects {
        mock_targets: vec![mk_mock_target("ns", "m", routes)],
        ..Objects::default()
    })
}

/// The compiled responses, via an ApiProxy that uses the MockTarget.
fn responses(routes: Vec<MockRoute>) -> Vec<pb::MockResponse> {
    let c = compile(&Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", mock("m"))],
        mock_targets: vec![mk_mock_target("ns", "m", routes)],
        ..Objects::default()
    });
    let d = diagnostic(&c, Kind::MockTarget, Some("ns"), "m");
    assert!(d.is_ok(), "{d:#?}");
    match &only_route(&c).backend {
        Some(pb::route::Backend::Mock(m)) => m.responses.clone(),
        other => panic!("not a mock: {other:?}"),
    }
}

#[track_caller]
fn assert_invalid(routes: Vec<MockRoute>, needle: &str) {
    let c = compile_one(routes);
    let d = diagnostic(&c, Kind::MockTarget, Some("ns"), "m");
    assert_eq!(
        conditions(d),
        [
            (condition::ACCEPTED, false, "Invalid"),
            (condition::RESOLVED_REFS, true, "ResolvedRefs")
        ]
    );
    let message = &d.conditions[0].message;
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert_eq!(d.ready().reason, "Invalid");
}

fn with(f: impl FnOnce(&mut MockRoute)) -> Vec<MockRoute> {
    let mut r = mk_mock_route("/", 200);
    f(&mut r);
    vec![r]
}

#[test]
fn valid_mock_target_is_accepted() {
    let c = compile_one(vec![mk_mock_route("/a", 200)]);
    let d = diagnostic(&c, Kind::MockTarget, Some("ns"), "m");
    assert!(d.is_ok());
    assert_eq!(d.backend, None);
    // Unreferenced MockTargets produce no route.
    assert!(c.snapshot.routes.is_empty());
}

#[test]
fn zero_routes_is_invalid() {
    assert_invalid(Vec::new(), "at least one route");
}

#[test]
fn bad_paths_are_invalid() {
    for path in ["", "a", "/a b", "/%zz", "/a/../b"] {
        assert_invalid(with(|r| r.path = path.to_owned()), "spec.routes[0]: path");
    }
}

#[test]
fn paths_are_normalised() {
    let got = responses(vec![
        mk_mock_route("//a//b/", 200),
        mk_mock_route("/", 200),
        mk_mock_route("/x%2Fy", 200),
    ]);
    let paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/a/b", "/", "/x%2Fy"]);
}

#[test]
fn status_must_be_a_final_status() {
    for status in [-1, 0, 99, 100, 199, 600, 70000] {
        assert_invalid(with(|r| r.status = status), "status");
    }
    for status in [200, 204, 404, 599] {
        assert_eq!(
            responses(with(|r| r.status = status))[0].status,
            status as u32
        );
    }
}

#[test]
fn methods_are_uppercased_and_deduplicated() {
    let got = responses(with(|r| {
        r.methods = ["get", "GET", "Post", "purge", "post"]
            .map(str::to_owned)
            .to_vec();
    }));
    assert_eq!(got[0].methods, ["GET", "POST", "PURGE"]);
    let every = responses(with(|r| r.methods.clear()));
    assert!(every[0].methods.is_empty());
}

#[test]
fn bad_methods_are_invalid() {
    for method in ["", "GE T", "GET\n", "(GET)"] {
        assert_invalid(with(|r| r.methods = vec![method.to_owned()]), "method");
    }
}

#[test]
fn headers_are_kept_with_lowercase_names() {
    let got = responses(with(|r| {
        r.headers = BTreeMap::from([
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("x-mock".to_owned(), "yes".to_owned()),
        ]);
    }));
    let headers: Vec<(&str, &str)> = got[0]
        .headers
        .iter()
        .map(|h| (h.name.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        headers,
        [("content-type", "application/json"), ("x-mock", "yes")]
    );
}

#[test]
fn framing_headers_cannot_be_mocked() {
    for name in [
        "content-length",
        "Content-Length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
    ] {
        assert_invalid(
            with(|r| r.headers = BTreeMap::from([(name.to_owned(), "1".to_owned())])),
            "set by the proxy",
        );
    }
}

#[test]
fn bad_header_names_and_values_are_invalid() {
    for name in ["", "a b", "x:y", "ä"] {
        assert_invalid(
            with(|r| r.headers = BTreeMap::from([(name.to_owned(), "v".to_owned())])),
            "not a valid HTTP header name",
        );
    }
    for value in ["a\nb", "a\rb", "\0"] {
        assert_invalid(
            with(|r| r.headers = BTreeMap::from([("x-a".to_owned(), value.to_owned())])),
            "value that is not valid",
        );
    }
}

#[test]
fn body_and_body_base64_are_exclusive() {
    assert_invalid(
        with(|r| {
            r.body = Some("a".to_owned());
            r.body_base64 = Some("YQ==".to_owned());
        }),
        "not both",
    );
}

#[test]
fn body_base64_must_be_base64() {
    for bad in ["not base64!", "YQ", "Y"] {
        assert_invalid(
            with(|r| {
                r.body = None;
                r.body_base64 = Some(bad.to_owned());
            }),
            "bodyBase64 is not valid base64",
        );
    }
}

#[test]
fn text_and_base64_bodies_give_the_same_bytes() {
    let text = responses(with(|r| r.body = Some(r#"{"orders":[]}"#.to_owned())));
    let b64 = responses(with(|r| {
        r.body = None;
        r.body_base64 = Some("eyJvcmRlcnMiOltdfQ==\n".to_owned());
    }));
    assert_eq!(text[0].body, br#"{"orders":[]}"#);
    assert_eq!(text[0].body, b64[0].body);
    let empty = responses(with(|r| r.body = None));
    assert!(empty[0].body.is_empty());
}

#[test]
fn every_bad_route_is_named_by_index() {
    let c = compile_one(vec![
        mk_mock_route("/ok", 200),
        mk_mock_route("/bad", 42),
        mk_mock_route("bad", 200),
    ]);
    let d = diagnostic(&c, Kind::MockTarget, Some("ns"), "m");
    let message = &d.conditions[0].message;
    assert!(message.contains("spec.routes[1]: status 42"), "{message}");
    assert!(message.contains("spec.routes[2]: path"), "{message}");
    assert!(!message.contains("spec.routes[0]"), "{message}");
}

#[test]
fn responses_keep_the_mock_targets_order() {
    let got = responses(vec![
        mk_mock_route("/b", 201),
        mk_mock_route("/a", 202),
        mk_mock_route("/b", 203),
    ]);
    let order: Vec<(&str, u32)> = got.iter().map(|r| (r.path.as_str(), r.status)).collect();
    assert_eq!(order, [("/b", 201), ("/a", 202), ("/b", 203)]);
}
