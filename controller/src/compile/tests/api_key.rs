//! ApiKey and ApiKeyBinding validation, and the binding's references to ApiKeys.

use kanali_crds::{GranularRule, Rate, RateUnit, Subpath};

use super::*;

fn key_diagnostic(key: ApiKey) -> Diagnostic {
    let name = key.metadata.name.clone().unwrap();
    // Only what is base64 can decrypt.
    let data: Vec<&str> = key
        .spec
        .revisions
        .iter()
        .map(|r| r.data.as_str())
        .filter(|d| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(d.trim())
                .is_ok()
        })
        .collect();
    let decrypted = digests(&data);
    let c = compile(&Objects {
        api_keys: vec![key],
        decrypted,
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

// ---- credentials and the apikey plugin ------------------------------------------------------

use sha2::{Digest as _, Sha256};

fn digest_of(data: &str) -> [u8; 32] {
    Sha256::digest(data.as_bytes()).into()
}

/// The credential of revision `data`, from the shard its digest selects.
fn credential<'a>(c: &'a Compiled, data: &str) -> Option<&'a pb::Credential> {
    let d = digest_of(data);
    let shard = &c.credentials[usize::from(d[0])];
    assert_eq!(shard.index, u32::from(d[0]));
    shard.entries.iter().find(|e| e.digest == d)
}

fn revision(data: &str, status: kanali_crds::RevisionStatus) -> Revision {
    Revision {
        data: data.to_owned(),
        status,
        last_used: None,
    }
}

#[test]
fn revisions_become_digests_with_their_grants_and_never_keys() {
    use kanali_crds::RevisionStatus::{Active, Inactive};
    let mut key = mk_api_key("k", "YWJj");
    key.spec.revisions = vec![revision("YWJj", Inactive), revision("ZGVm", Active)];
    let mut entry = mk_key("k");
    entry.default_rule = Some(granular(&["get", "HEAD"]));
    entry.subpaths = vec![Subpath {
        path: "/admin".to_owned(),
        rule: Rule {
            global: Some(false),
            granular: None,
        },
    }];
    entry.rate = Some(Rate {
        amount: 100,
        unit: RateUnit::Second,
    });
    let c = compile(&Objects {
        api_keys: vec![key],
        api_key_bindings: vec![
            mk_binding("ns", "b", vec![entry]),
            mk_binding("ns", "all", vec![mk_key("k")]),
        ],
        decrypted: digests(&["YWJj", "ZGVm"]),
        ..Objects::default()
    });
    assert_eq!(c.credentials.len(), 256);
    let old = credential(&c, "YWJj").unwrap();
    let new = credential(&c, "ZGVm").unwrap();
    assert!(!old.active && new.active);
    assert_eq!(new.key, "k");
    assert_eq!(new.revision, crate::compile::api_key::revision_id("ZGVm"));
    let grants: Vec<(&str, &str)> = new
        .grants
        .iter()
        .map(|g| (g.namespace.as_str(), g.binding.as_str()))
        .collect();
    assert_eq!(grants, [("ns", "all"), ("ns", "b")], "sorted by binding");
    let b = &new.grants[1];
    assert_eq!(b.default_rule.as_ref().unwrap().methods, ["GET", "HEAD"]);
    assert!(!b.subpaths[0].rule.as_ref().unwrap().all);
    assert_eq!(b.rate.as_ref().unwrap().amount, 100);
    assert!(new.grants[0].default_rule.as_ref().unwrap().all);
    // Nothing in the snapshot or the shards is the ciphertext (let alone a plaintext).
    let bytes = format!("{:?}{:?}", c.snapshot, c.credentials);
    assert!(!bytes.contains("YWJj") && !bytes.contains("ZGVm"));
    let d = diagnostic(&c, Kind::ApiKey, None, "k");
    assert_eq!(d.conditions[0].message, "2 revision(s), 1 active");
    assert!(
        d.conditions[1].message.contains("ns/all, ns/b"),
        "{:?}",
        d.conditions[1]
    );
}

#[test]
fn an_undecryptable_revision_is_named_and_the_others_keep_working() {
    let mut key = mk_api_key("k", "YWJj");
    key.spec
        .revisions
        .push(revision("ZGVm", kanali_crds::RevisionStatus::Active));
    let mut decrypted = (*digests(&["YWJj"])).clone();
    decrypted.digests.insert(
        std::sync::Arc::from("ZGVm"),
        crate::compile::api_key::Decryption::new(
            "ZGVm",
            Err("cannot decrypt: encrypted for a different public key".to_owned()),
        ),
    );
    let c = compile(&Objects {
        api_keys: vec![key],
        decrypted: std::sync::Arc::new(decrypted),
        ..Objects::default()
    });
    let d = diagnostic(&c, Kind::ApiKey, None, "k");
    assert_eq!(
        conditions(d)[0],
        (condition::ACCEPTED, false, "DecryptionFailed")
    );
    assert!(
        d.conditions[0]
            .message
            .contains("spec.revisions[1]: cannot decrypt"),
        "{:?}",
        d.conditions[0]
    );
    assert!(
        credential(&c, "YWJj").is_some(),
        "the good revision still works"
    );
    assert!(credential(&c, "ZGVm").is_none());
}

#[test]
fn without_a_decryption_key_every_api_key_says_why() {
    let c = compile(&Objects {
        api_keys: vec![mk_api_key("k", "YWJj")],
        decrypted: std::sync::Arc::new(crate::compile::api_key::Decrypted {
            no_key: Some("the controller has no decryption key".to_owned()),
            digests: Default::default(),
        }),
        ..Objects::default()
    });
    let d = diagnostic(&c, Kind::ApiKey, None, "k");
    assert_eq!(
        conditions(d),
        [(condition::ACCEPTED, false, "NoDecryptionKey")]
    );
    assert!(d.conditions[0].message.contains("error 13"));
    assert!(c.credentials.iter().all(|s| s.entries.is_empty()));
}

#[test]
fn the_same_key_in_two_api_keys_stays_with_the_older() {
    let mut older = mk_api_key("older", "YWJj");
    older.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().unwrap(),
    ));
    let mut younger = mk_api_key("a-younger", "YWJj");
    younger.metadata.creation_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-06-01T00:00:00Z".parse().unwrap(),
        ));
    let c = compile(&Objects {
        api_keys: vec![younger, older],
        decrypted: digests(&["YWJj"]),
        ..Objects::default()
    });
    assert_eq!(credential(&c, "YWJj").unwrap().key, "older");
    let d = diagnostic(&c, Kind::ApiKey, None, "a-younger");
    assert_eq!(
        conditions(d)[0],
        (condition::ACCEPTED, false, "DuplicateKey")
    );
    assert!(d.conditions[0].message.contains("ApiKey older"));
}

#[test]
fn one_changed_key_changes_at_most_two_shards_and_not_the_routes() {
    let keys: Vec<ApiKey> = (0..500)
        .map(|i| mk_api_key(&format!("k{i}"), &format!("ZGF0YS{i}")))
        .collect();
    let data: Vec<String> = keys
        .iter()
        .map(|k| k.spec.revisions[0].data.clone())
        .collect();
    let refs: Vec<&str> = data.iter().map(String::as_str).collect();
    let objects = Objects {
        api_proxies: vec![mk_api_proxy("ns", "p", "/p", endpoint("http://up"))],
        api_keys: keys.clone(),
        decrypted: digests(&refs),
        ..Objects::default()
    };
    let before = compile(&objects);
    let mut changed = objects.clone();
    changed.api_keys[7].spec.revisions[0].data = "bmV3".to_owned();
    let mut refs2 = refs.clone();
    refs2.push("bmV3");
    changed.decrypted = digests(&refs2);
    let after = compile(&changed);
    let differing = before
        .credentials
        .iter()
        .zip(after.credentials.iter())
        .filter(|(a, b)| a.version != b.version)
        .count();
    assert!((1..=2).contains(&differing), "{differing} shards changed");
    assert_eq!(before.snapshot, after.snapshot, "routes untouched");
    assert_ne!(before.version, after.version);
    assert_ne!(before.credentials_version, after.credentials_version);
}

fn apikey_proxy(config: &[(&str, &str)]) -> ApiProxy {
    let mut ap = mk_api_proxy("ns", "p", "/p", endpoint("http://up"));
    ap.spec.plugins = vec![kanali_crds::Plugin {
        name: "ApiKey".to_owned(),
        version: None,
        config: config
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }];
    ap
}

fn plugin_of(c: &Compiled) -> pb::ApiKeyPlugin {
    match &only_route(c).plugins[..] {
        [
            pb::Plugin {
                kind: Some(pb::plugin::Kind::ApiKey(p)),
            },
        ] => p.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_apikey_plugin_names_its_binding_and_says_when_it_is_missing() {
    let with = |ap: ApiProxy, bindings: Vec<ApiKeyBinding>| {
        compile(&Objects {
            api_proxies: vec![ap],
            api_keys: vec![mk_api_key("k", "YWJj")],
            api_key_bindings: bindings,
            decrypted: digests(&["YWJj"]),
            ..Objects::default()
        })
    };
    let ok = with(
        apikey_proxy(&[("apiKeyBindingName", "b")]),
        vec![mk_binding("ns", "b", vec![mk_key("k")])],
    );
    assert_eq!(plugin_of(&ok).binding, "b");
    assert!(matches!(
        only_route(&ok).backend,
        Some(pb::route::Backend::Endpoint(_))
    ));
    let d = diagnostic(&ok, Kind::ApiProxy, Some("ns"), "p");
    assert_eq!(
        conditions(d)[1],
        (condition::RESOLVED_REFS, true, "ResolvedRefs")
    );

    for (ap, bindings, reason) in [
        (
            apikey_proxy(&[("apiKeyBindingName", "b")]),
            vec![],
            "ApiKeyBindingNotFound",
        ),
        (
            apikey_proxy(&[("apiKeyBindingName", "b")]),
            vec![mk_binding("other", "b", vec![mk_key("k")])],
            "ApiKeyBindingNotFound",
        ),
        (
            apikey_proxy(&[("apiKeyBindingName", "b")]),
            vec![mk_binding("ns", "b", vec![])],
            "ApiKeyBindingNotAccepted",
        ),
        (apikey_proxy(&[]), vec![], "NoApiKeyBinding"),
    ] {
        let c = with(ap, bindings);
        let d = diagnostic(&c, Kind::ApiProxy, Some("ns"), "p");
        assert_eq!(conditions(d)[1], (condition::RESOLVED_REFS, false, reason));
        assert!(
            d.conditions[1].message.contains(" 13"),
            "{:?}",
            d.conditions[1]
        );
        // Still routed, and still checked: with no binding every key is refused.
        assert_eq!(plugin_of(&c).binding, "");
    }
}

#[test]
fn apikey_plugin_settings_are_checked() {
    let c = compile(&proxies(vec![apikey_proxy(&[
        ("apiKeyBindingName", "b"),
        ("header", "X-Api-Key"),
        ("checkOptions", "true"),
    ])]));
    let p = plugin_of(&c);
    assert_eq!(p.header, "x-api-key");
    assert!(p.check_options);
    for (config, needle) in [
        (vec![("bindingName", "b")], "has no setting \"bindingName\""),
        (vec![("header", "bad header")], "not an HTTP header name"),
        (vec![("checkOptions", "yes")], "checkOptions must be"),
    ] {
        let c = compile(&proxies(vec![apikey_proxy(&config)]));
        assert_invalid_proxy(&c, needle);
    }
    let mut twice = apikey_proxy(&[]);
    twice.spec.plugins.push(twice.spec.plugins[0].clone());
    assert_invalid_proxy(&compile(&proxies(vec![twice])), "more than once");
}

#[track_caller]
fn assert_invalid_proxy(c: &Compiled, needle: &str) {
    let d = diagnostic(c, Kind::ApiProxy, Some("ns"), "p");
    assert!(!d.conditions[0].status);
    assert!(
        d.conditions[0].message.contains(needle),
        "{needle:?} not in {:?}",
        d.conditions[0].message
    );
    assert!(c.snapshot.routes.is_empty());
}
