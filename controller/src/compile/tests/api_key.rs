//! ApiKey and ApiKeyBinding validation, and the binding's references to ApiKeys.

use kanali_crds::{GranularRule, Rate, RateUnit, Subpath};

use super::*;

fn key_diagnostic(key: ApiKey) -> Diagnostic {
    let name = key.metadata.name.clone().unwrap();
    let c = compile(&Objects {
        api_keys: vec![key],
        ..Objects::default()
    });
    diagnostic(&c, Kind::ApiKey, None, &name).clone()
}

/// Compiles `keys` into a binding `ns/b` next to ApiKeys `a`, `b` and `c`.
fn binding_diagnostic(keys: Vec<Key>) -> Diagnostic {
    let c = compile(&Objects {
        api_keys: ["a", "b", "c"].map(|k| mk_api_key(k, "YWJj")).to_vec(),
        api_key_bindings: vec![mk_binding("ns", "b", keys)],
        ..Objects::default()
    });
    diagnostic(&c, Kind::ApiKeyBinding, Some("ns"), "b").clone()
}

#[track_caller]
fn assert_invalid(d: &Diagnostic, needle: &str) {
    assert_eq!(d.conditions[0].type_, condition::ACCEPTED);
    assert!(!d.conditions[0].status, "{d:#?}");
    assert_eq!(d.conditions[0].reason, "Invalid");
    let message = &d.conditions[0].message;
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

fn granular(verbs: &[&str]) -> Rule {
    Rule {
        global: None,
        granular: Some(GranularRule {
            verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        }),
    }
}

#[test]
fn valid_api_key_is_accepted() {
    let d = key_diagnostic(mk_api_key("k", "NjE2MjYzNjQ2NTY2"));
    assert_eq!(
        conditions(&d),
        [
            (condition::ACCEPTED, true, "Accepted"),
            (condition::RESOLVED_REFS, true, "ResolvedRefs")
        ]
    );
    assert_eq!(d.object.namespace, None);
}

#[test]
fn api_key_without_revisions_is_invalid() {
    let mut key = mk_api_key("k", "YWJj");
    key.spec.revisions.clear();
    assert_invalid(&key_diagnostic(key), "at least one revision");
}

#[test]
fn api_key_with_empty_data_is_invalid() {
    assert_invalid(
        &key_diagnostic(mk_api_key("k", "")),
        "revisions[0].data must not be empty",
    );
}

#[test]
fn api_key_with_non_base64_data_is_invalid() {
    for data in ["not base64!", "YWJ", "%%%%"] {
        assert_invalid(
            &key_diagnostic(mk_api_key("k", data)),
            "revisions[0].data is not base64",
        );
    }
    let mut key = mk_api_key("k", "YWJj");
    key.spec.revisions.push(Revision {
        data: "???".to_owned(),
        ..Revision::default()
    });
    assert_invalid(&key_diagnostic(key), "revisions[1].data is not base64");
}

#[test]
fn valid_binding_is_accepted_and_resolved() {
    let mut full = mk_key("a");
    full.default_rule = Some(granular(&["get", "HEAD", "PURGE"]));
    full.subpaths = vec![
        Subpath {
            path: "/v1/orders/[0-9]+/cancel$".to_owned(),
            rule: granular(&["POST"]),
        },
        Subpath {
            path: "/admin".to_owned(),
            rule: Rule {
                global: Some(false),
                granular: None,
            },
        },
    ];
    full.rate = Some(Rate {
        amount: 1,
        unit: RateUnit::Minute,
    });
    let d = binding_diagnostic(vec![full, mk_key("b")]);
    assert!(d.is_ok(), "{d:#?}");
}

#[test]
fn binding_without_keys_is_invalid() {
    assert_invalid(&binding_diagnostic(Vec::new()), "at least one key");
}

#[test]
fn binding_with_an_empty_key_name_is_invalid() {
    assert_invalid(
        &binding_diagnostic(vec![mk_key("")]),
        "keys[0].name must not be empty",
    );
}

#[test]
fn duplicate_key_names_are_invalid() {
    assert_invalid(
        &binding_diagnostic(vec![mk_key("a"), mk_key("b"), mk_key("a")]),
        "spec.keys[2]: key \"a\" is listed more than once",
    );
}

#[test]
fn invalid_subpath_regex_is_invalid() {
    let mut key = mk_key("a");
    key.subpaths = vec![
        Subpath {
            path: "/ok".to_owned(),
            rule: granular(&["GET"]),
        },
        Subpath {
            path: "/foo(".to_owned(),
            rule: granular(&["GET"]),
        },
    ];
    assert_invalid(
        &binding_diagnostic(vec![key]),
        "spec.keys[0].subpaths[1].path \"/foo(\" is not a valid regular expression",
    );
}

#[test]
fn subpath_must_start_with_a_slash() {
    let mut key = mk_key("a");
    key.subpaths = vec![Subpath {
        path: "foo".to_owned(),
        rule: granular(&["GET"]),
    }];
    assert_invalid(&binding_diagnostic(vec![key]), "must start with '/'");
}

#[test]
fn rule_must_set_exactly_one_of_global_and_granular() {
    let both = Rule {
        global: Some(true),
        granular: Some(GranularRule { verbs: Vec::new() }),
    };
    let mut key = mk_key("a");
    key.default_rule = Some(both);
    assert_invalid(
        &binding_diagnostic(vec![key]),
        "spec.keys[0].defaultRule must set either global or granular, not both",
    );

    let mut key = mk_key("a");
    key.subpaths = vec![Subpath {
        path: "/x".to_owned(),
        rule: Rule::default(),
    }];
    assert_invalid(
        &binding_diagnostic(vec![key]),
        "spec.keys[0].subpaths[0].rule must set global or granular",
    );
}

#[test]
fn bad_verbs_are_invalid() {
    for verb in ["", "GE T", "GET\n"] {
        let mut key = mk_key("a");
        key.default_rule = Some(granular(&["GET", verb]));
        assert_invalid(&binding_diagnostic(vec![key]), "defaultRule.granular.verbs");
    }
}

#[test]
fn rate_amount_must_be_positive() {
    for amount in [0, -5] {
        let mut key = mk_key("a");
        key.rate = Some(Rate {
            amount,
            unit: RateUnit::Second,
        });
        assert_invalid(
            &binding_diagnostic(vec![key]),
            "spec.keys[0].rate.amount must be at least 1",
        );
    }
}

#[test]
fn missing_api_keys_are_reported_by_name() {
    let d = binding_diagnostic(vec![mk_key("a"), mk_key("x"), mk_key("y")]);
    assert_eq!(
        conditions(&d),
        [
            (condition::ACCEPTED, true, "Accepted"),
            (condition::RESOLVED_REFS, false, "ApiKeyNotFound")
        ]
    );
    let message = &d.conditions[1].message;
    assert!(message.contains("x, y"), "{message}");
    assert!(!message.contains("a,"), "{message}");
    assert_eq!(d.ready().reason, "ApiKeyNotFound");
}

#[test]
fn an_invalid_binding_reports_invalid_before_missing_keys() {
    let d = binding_diagnostic(vec![mk_key("x"), mk_key("x")]);
    assert_eq!(
        conditions(&d),
        [
            (condition::ACCEPTED, false, "Invalid"),
            (condition::RESOLVED_REFS, false, "ApiKeyNotFound")
        ]
    );
    assert_eq!(d.ready().reason, "Invalid");
}

#[test]
fn an_invalid_api_key_still_exists_for_bindings() {
    let c = compile(&Objects {
        api_keys: vec![mk_api_key("a", "")],
        api_key_bindings: vec![mk_binding("ns", "b", vec![mk_key("a")])],
        ..Objects::default()
    });
    let d = diagnostic(&c, Kind::ApiKeyBinding, Some("ns"), "b");
    assert!(d.is_ok(), "{d:#?}");
}
