//! Tests of the manifests-directory source.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test
use super::*;

const PROXY: &str = "\
apiVersion: kanali.io/v2
kind: ApiProxy
metadata:
  name: p
  namespace: shop
spec:
  source:
    path: /p
  target:
    backend:
      endpoint: http://up
";

fn mk_proxy_yaml(name: &str, path: &str) -> String {
    format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata:\n  name: {name}\nspec:\n  source:\n    path: {path}\n  target:\n    backend:\n      endpoint: http://up\n"
    )
}

fn names(objects: &[AnyObject]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            let (kind, ns, name) = o.key();
            format!("{kind} {ns}/{name}")
        })
        .collect()
}

#[test]
fn reads_one_object() {
    let parsed = parse_file("a.yaml", PROXY).unwrap();
    assert_eq!(names(&parsed.objects), ["ApiProxy shop/p"]);
    assert!(parsed.ignored.is_empty());
    let AnyObject::ApiProxy(p) = &parsed.objects[0] else {
        panic!()
    };
    assert_eq!(p.spec.source.path, "/p");
    assert_eq!(p.spec.target.backend.endpoint.as_deref(), Some("http://up"));
}

#[test]
fn reads_every_document_and_skips_empty_ones() {
    let text = format!(
        "---\n{}---\n---\n# only a comment\n---\n{}\n---\n",
        mk_proxy_yaml("a", "/a"),
        mk_proxy_yaml("b", "/b")
    );
    let parsed = parse_file("a.yaml", &text).unwrap();
    assert_eq!(
        names(&parsed.objects),
        ["ApiProxy default/a", "ApiProxy default/b"]
    );
    assert!(parsed.ignored.is_empty());
    assert!(parse_file("empty.yaml", "").unwrap().objects.is_empty());
    assert!(
        parse_file("empty.yaml", "---\n")
            .unwrap()
            .objects
            .is_empty()
    );
}

#[test]
fn reads_lists() {
    let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: kanali.io/v2
  kind: MockTarget
  metadata: {name: m, namespace: x}
  spec:
    routes: [{path: /, status: 200}]
- apiVersion: v1
  kind: Service
  metadata: {name: s}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d}
";
    let parsed = parse_file("list.yaml", text).unwrap();
    assert_eq!(
        names(&parsed.objects),
        ["MockTarget x/m", "Service default/s"]
    );
    assert_eq!(parsed.ignored, ["apps/v1 Deployment is not read by Kanali"]);
    let err = parse_file("list.yaml", "apiVersion: v1\nkind: List\n").unwrap_err();
    assert!(err.message.contains("no items"), "{err}");
    let bad_item =
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: kanali.io/v1\n  kind: ApiProxy\n";
    let err = parse_file("list.yaml", bad_item).unwrap_err();
    assert!(err.message.starts_with("items[0]: kanali.io/v1"), "{err}");
}

#[test]
fn unknown_kinds_are_ignored_not_errors() {
    let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
---
apiVersion: kanali.io/v2
kind: Gateway
metadata: {name: g}
";
    let parsed = parse_file("x.yaml", text).unwrap();
    assert!(parsed.objects.is_empty());
    assert_eq!(
        parsed.ignored,
        [
            "apps/v1 Deployment is not read by Kanali",
            "v1 ConfigMap is not read by Kanali",
            "kanali.io/v2 Gateway is not read by Kanali",
        ]
    );
}

#[test]
fn other_kanali_versions_are_errors() {
    for (version, kind) in [
        ("kanali.io/v1", "ApiProxy"),
        ("kanali.io/v1", "ApiKey"),
        ("kanali.io/v3", "MockTarget"),
        ("kanali.io/v1", "ApiKeyBinding"),
    ] {
        let text = format!("apiVersion: {version}\nkind: {kind}\nmetadata: {{name: x}}\n");
        let err = parse_file("old.yaml", &text).unwrap_err();
        assert_eq!(err.file, "old.yaml");
        assert_eq!(err.line, Some(1));
        assert!(
            err.message.contains(&format!("{version} is not supported")),
            "{err}"
        );
        assert!(
            err.message.contains(&format!("kanali.io/v2 {kind}")),
            "{err}"
        );
    }
}

#[test]
fn documents_need_api_version_kind_and_name() {
    for text in [
        "kind: ApiProxy\n",
        "apiVersion: v1\n",
        "just a string\n",
        "[1, 2]\n",
    ] {
        let err = parse_file("x.yaml", text).unwrap_err();
        assert!(
            err.message.contains("no apiVersion or kind"),
            "{text}: {err}"
        );
    }
    let err = parse_file("x.yaml", "apiVersion: v1\nkind: Service\nmetadata: {}\n").unwrap_err();
    assert!(
        err.message.contains("Service has no metadata.name"),
        "{err}"
    );
}

#[test]
fn namespaces_default_and_api_keys_have_none() {
    let text = "\
apiVersion: kanali.io/v2
kind: ApiKey
metadata: {name: k, namespace: shop}
spec:
  revisions: [{data: YWJj, status: Active}]
---
apiVersion: kanali.io/v2
kind: ApiKeyBinding
metadata: {name: b, namespace: \"\"}
spec:
  keys: [{name: k}]
---
apiVersion: v1
kind: Secret
metadata: {name: s}
";
    let parsed = parse_file("x.yaml", text).unwrap();
    assert_eq!(
        names(&parsed.objects),
        ["ApiKey /k", "ApiKeyBinding default/b", "Secret default/s"]
    );
    let AnyObject::ApiKey(k) = &parsed.objects[0] else {
        panic!()
    };
    assert_eq!(k.metadata.namespace, None);
}

#[test]
fn secret_string_data_is_merged_into_data() {
    let text = "\
apiVersion: v1
kind: Secret
metadata: {name: s, namespace: shop}
data:
  a: YWFh
  b: YmJi
stringData:
  b: from-string
  c: ccc
";
    let parsed = parse_file("s.yaml", text).unwrap();
    let AnyObject::Secret(s) = &parsed.objects[0] else {
        panic!()
    };
    assert_eq!(s.string_data, None);
    let data: Vec<(&str, &[u8])> = s
        .data
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.0.as_slice()))
        .collect();
    assert_eq!(
        data,
        [("a", &b"aaa"[..]), ("b", b"from-string"), ("c", b"ccc")]
    );
    let only_strings = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {x: why}\n";
    let AnyObject::Secret(s) = &parse_file("s.yaml", only_strings).unwrap().objects[0] else {
        panic!()
    };
    assert_eq!(s.data.as_ref().unwrap()["x"].0, b"why");
}

#[test]
fn invalid_yaml_names_the_file_and_line() {
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n  namespace: x\n";
    let err = parse_file("broken.yaml", text).unwrap_err();
    assert_eq!(err.file, "broken.yaml");
    assert!(err.message.starts_with("not valid YAML"), "{err}");
    assert!(!err.message.contains('\n'), "{err}");
    let line = err.line.expect("a line");
    assert!((4..=5).contains(&line), "{err}");

    // In the second document, after 11 + 1 + 3 lines.
    let second = format!("{PROXY}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: a: b\n");
    let err = parse_file("second.yaml", &second).unwrap_err();
    assert_eq!(err.line, Some(16), "{err}");
    assert!(
        err.to_string()
            .starts_with("second.yaml:16: not valid YAML"),
        "{err}"
    );
}

#[test]
fn type_errors_name_the_field_and_the_document_line() {
    let text = format!(
        "{PROXY}---\n# comment\n\n{}",
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata:\n  name: svc\nspec:\n  source:\n    path: /s\n  target:\n    backend:\n      service:\n        name: s\n        port: \"abc\"\n"
    );
    let err = parse_file("svc.yaml", &text).unwrap_err();
    assert_eq!(err.file, "svc.yaml");
    assert_eq!(err.line, Some(15), "{err}");
    assert!(
        err.message
            .contains("ApiProxy svc: spec.target.backend.service.port:"),
        "{err}"
    );
    let missing = "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {name: p}\nspec: {}\n";
    let err = parse_file("m.yaml", missing).unwrap_err();
    assert!(err.message.contains("ApiProxy p: spec"), "{err}");
    assert!(err.message.contains("source"), "{err}");
}

#[test]
fn the_whole_file_fails_with_one_bad_document() {
    let text = format!("{PROXY}---\napiVersion: kanali.io/v1\nkind: ApiProxy\n");
    let err = parse_file("x.yaml", &text).unwrap_err();
    assert_eq!(err.line, Some(13), "{err}");
}

// --- FileSource ---

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn proxy_names(scan: &Scan) -> Vec<String> {
    scan.objects
        .api_proxies
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect()
}

#[test]
fn scans_yaml_files_only() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &mk_proxy_yaml("a", "/a"));
    write(dir.path(), "b.yml", &mk_proxy_yaml("b", "/b"));
    write(dir.path(), "c.json", &mk_proxy_yaml("c", "/c"));
    write(dir.path(), "d.yaml.bak", &mk_proxy_yaml("d", "/d"));
    write(dir.path(), "README", "not yaml: [");
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    write(
        &dir.path().join("sub.yaml"),
        "e.yaml",
        &mk_proxy_yaml("e", "/e"),
    );
    let mut source = FileSource::new(dir.path());
    assert_eq!(source.dir(), dir.path());
    let scan = source.scan().unwrap();
    assert_eq!(proxy_names(&scan), ["a", "b"]);
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
}

#[test]
fn collects_every_kind_and_the_ignored_documents() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\
apiVersion: kanali.io/v2
kind: MockTarget
metadata: {name: m}
spec: {routes: [{path: /, status: 200}]}
---
apiVersion: kanali.io/v2
kind: ApiKey
metadata: {name: k}
spec: {revisions: [{data: YWJj, status: Active}]}
---
apiVersion: kanali.io/v2
kind: ApiKeyBinding
metadata: {name: b}
spec: {keys: [{name: k}]}
---
apiVersion: v1
kind: Secret
metadata: {name: s}
---
apiVersion: v1
kind: Service
metadata: {name: s}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
";
    write(dir.path(), "all.yaml", text);
    write(dir.path(), "p.yaml", PROXY);
    let scan = FileSource::new(dir.path()).scan().unwrap();
    let o = &scan.objects;
    assert_eq!(
        [
            o.api_proxies.len(),
            o.mock_targets.len(),
            o.api_keys.len(),
            o.api_key_bindings.len(),
            o.secrets.len(),
            o.services.len()
        ],
        [1; 6]
    );
    assert_eq!(
        scan.ignored,
        ["all.yaml: apps/v1 Deployment is not read by Kanali"]
    );
    assert!(scan.errors.is_empty());
}

#[test]
fn a_broken_file_keeps_its_last_good_objects_until_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = FileSource::new(dir.path());
    write(dir.path(), "a.yaml", &mk_proxy_yaml("a", "/a"));
    write(dir.path(), "b.yaml", &mk_proxy_yaml("b", "/b"));
    assert_eq!(proxy_names(&source.scan().unwrap()), ["a", "b"]);

    write(dir.path(), "a.yaml", "apiVersion: [\n");
    let scan = source.scan().unwrap();
    assert_eq!(proxy_names(&scan), ["a", "b"]);
    assert_eq!(scan.errors.len(), 1, "{:?}", scan.errors);
    assert_eq!(scan.errors[0].file, "a.yaml");
    assert!(scan.errors[0].message.contains("not valid YAML"));

    // Unchanged and still broken: same objects, same error.
    let again = source.scan().unwrap();
    assert_eq!(proxy_names(&again), ["a", "b"]);
    assert_eq!(again.errors, scan.errors);

    // Broken differently (a type error): still the last good objects.
    let port =
        mk_proxy_yaml("a", "/a").replace("endpoint: http://up", "service: {name: s, port: abc}");
    write(dir.path(), "a.yaml", &port);
    let scan = source.scan().unwrap();
    assert_eq!(proxy_names(&scan), ["a", "b"]);
    assert_eq!(scan.objects.api_proxies[0].spec.source.path, "/a");
    assert!(
        scan.errors[0]
            .message
            .contains("spec.target.backend.service.port"),
        "{:?}",
        scan.errors
    );

    write(dir.path(), "a.yaml", &mk_proxy_yaml("a", "/a2"));
    let scan = source.scan().unwrap();
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
    assert_eq!(scan.objects.api_proxies[0].spec.source.path, "/a2");
}

#[test]
fn a_file_broken_from_the_start_contributes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", "kind: [\n");
    write(dir.path(), "b.yaml", &mk_proxy_yaml("b", "/b"));
    let scan = FileSource::new(dir.path()).scan().unwrap();
    assert_eq!(proxy_names(&scan), ["b"]);
    assert_eq!(scan.errors.len(), 1);
    assert_eq!(scan.errors[0].file, "a.yaml");
    assert_eq!(scan.errors[0].line, Some(1));
}

#[test]
fn deleting_a_file_drops_its_objects_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = FileSource::new(dir.path());
    write(dir.path(), "a.yaml", &mk_proxy_yaml("a", "/a"));
    write(dir.path(), "b.yaml", &mk_proxy_yaml("b", "/b"));
    source.scan().unwrap();
    write(dir.path(), "b.yaml", "x: [");
    assert_eq!(source.scan().unwrap().errors.len(), 1);
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    let scan = source.scan().unwrap();
    assert!(scan.objects.api_proxies.is_empty());
    assert!(scan.errors.is_empty());
}

#[test]
fn emptying_a_file_drops_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = FileSource::new(dir.path());
    write(dir.path(), "a.yaml", &mk_proxy_yaml("a", "/a"));
    source.scan().unwrap();
    write(dir.path(), "a.yaml", "");
    let scan = source.scan().unwrap();
    assert!(scan.objects.api_proxies.is_empty());
    assert!(scan.errors.is_empty());
}

#[test]
fn non_utf8_file_is_an_error_that_keeps_the_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = FileSource::new(dir.path());
    write(dir.path(), "a.yaml", &mk_proxy_yaml("a", "/a"));
    source.scan().unwrap();
    std::fs::write(dir.path().join("a.yaml"), b"kind: \xff\xfe\n").unwrap();
    let scan = source.scan().unwrap();
    assert_eq!(proxy_names(&scan), ["a"]);
    assert_eq!(scan.errors.len(), 1);
    assert_eq!(scan.errors[0].file, "a.yaml");
    assert!(scan.errors[0].message.contains("UTF-8"));

    // Then truncated to nothing: the file is now empty and holds no objects.
    write(dir.path(), "a.yaml", "");
    let scan = source.scan().unwrap();
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
    assert!(scan.objects.api_proxies.is_empty());
}

#[test]
fn the_same_object_in_two_files_is_an_error_and_the_first_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.yaml", &mk_proxy_yaml("p", "/from-b"));
    write(dir.path(), "a.yaml", &mk_proxy_yaml("p", "/from-a"));
    write(dir.path(), "c.yaml", &mk_proxy_yaml("other", "/c"));
    let mut source = FileSource::new(dir.path());
    let scan = source.scan().unwrap();
    assert_eq!(proxy_names(&scan), ["p", "other"]);
    assert_eq!(scan.objects.api_proxies[0].spec.source.path, "/from-a");
    assert_eq!(scan.errors.len(), 1, "{:?}", scan.errors);
    let err = &scan.errors[0];
    assert_eq!(err.file, "b.yaml");
    assert!(err.message.contains("ApiProxy default/p"), "{err}");
    assert!(err.message.contains("a.yaml"), "{err}");

    // Same name in another namespace or of another kind is a different object.
    write(
        dir.path(),
        "b.yaml",
        &mk_proxy_yaml("p", "/b").replace("  name: p\n", "  name: p\n  namespace: other\n"),
    );
    let scan = source.scan().unwrap();
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
    assert_eq!(scan.objects.api_proxies.len(), 3);
}

#[test]
fn the_same_object_twice_in_one_file_keeps_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}---\n{}",
        mk_proxy_yaml("p", "/first"),
        mk_proxy_yaml("p", "/second")
    );
    write(dir.path(), "a.yaml", &text);
    let scan = FileSource::new(dir.path()).scan().unwrap();
    assert_eq!(scan.objects.api_proxies.len(), 1);
    assert_eq!(scan.objects.api_proxies[0].spec.source.path, "/first");
    assert_eq!(scan.errors.len(), 1, "{:?}", scan.errors);
    assert_eq!(scan.errors[0].file, "a.yaml");
}

#[test]
fn missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = FileSource::new(dir.path().join("nope"));
    assert!(source.scan().is_err());
}

#[test]
fn file_errors_display_with_and_without_a_line() {
    let with = FileError {
        file: "a.yaml".to_owned(),
        line: Some(3),
        message: "bad".to_owned(),
    };
    assert_eq!(with.to_string(), "a.yaml:3: bad");
    let without = FileError { line: None, ..with };
    assert_eq!(without.to_string(), "a.yaml: bad");
}

#[test]
fn reads_endpoint_slices_and_endpoints() {
    let text = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orders-abc, namespace: shop, labels: {kubernetes.io/service-name: orders}}
addressType: IPv4
endpoints: [{addresses: [127.0.0.1], conditions: {ready: true}}]
ports: [{port: 8080}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: orders}
subsets: [{addresses: [{ip: 127.0.0.1}], ports: [{port: 8080}]}]
";
    let parsed = parse_file("e.yaml", text).unwrap();
    assert_eq!(
        names(&parsed.objects),
        ["EndpointSlice shop/orders-abc", "Endpoints default/orders"]
    );
}

// --- Reading a file document by document ---

#[test]
fn files_split_at_document_start_lines_only() {
    let split = |t| split_documents(t).unwrap();
    assert_eq!(split(""), [""]);
    assert_eq!(split("a: 1\n"), ["a: 1\n"]);
    assert_eq!(split("---\na: 1\n"), ["---\na: 1\n"]);
    assert_eq!(
        split("# head\na: 1\n--- \nb: 2\n---\t# c\n---\r\nd: 4\n---"),
        [
            "# head\na: 1\n",
            "--- \nb: 2\n",
            "---\t# c\n",
            "---\r\nd: 4\n",
            "---"
        ]
    );
    // Not markers: more dashes, text after, indented, inside a block scalar.
    let text = "a: |\n  ---\n  x\n----\n---x\n ---\nb: 1\n";
    assert_eq!(split(text), [text]);
    // A document of its own content on the marker line.
    assert_eq!(split("--- a\n--- |\n  b\n"), ["--- a\n", "--- |\n  b\n"]);
    // Directives and document-end markers tie documents together: the file is read whole.
    assert_eq!(split_documents("%YAML 1.2\n---\na: 1\n"), None);
    assert_eq!(split_documents("a: 1\n...\n---\nb: 2\n"), None);
    assert_eq!(split_documents("a: 1\n..."), None);
    // So is a file with more documents than the parser reads in one.
    assert_eq!(
        split_documents(&"---\n".repeat(1024)).map(|d| d.len()),
        Some(1024)
    );
    assert_eq!(split_documents(&"---\n".repeat(1025)), None);
}

/// Objects and ignored documents, as text, for comparing two readings of a file.
fn reading(parsed: &[Arc<ParsedFile>]) -> (Vec<String>, Vec<String>) {
    let objects = parsed.iter().flat_map(|p| &p.objects);
    let ignored = parsed.iter().flat_map(|p| p.ignored.iter().cloned());
    (
        objects.map(|o| format!("{o:?}")).collect(),
        ignored.collect(),
    )
}

#[test]
fn documents_read_one_by_one_give_what_the_file_read_whole_gives() {
    let texts = [
        PROXY.to_owned(),
        format!(
            "---\n{}---\n---\n# only a comment\n---\n{}\n---\n",
            mk_proxy_yaml("a", "/a"),
            mk_proxy_yaml("b", "/b")
        ),
        format!(
            "# a list, then an object the parser must not split inside\napiVersion: v1\nkind: List\nitems:\n- {}\n---\n{}",
            mk_proxy_yaml("c", "/c").replace('\n', "\n  "),
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData:\n  key: |\n    ---\n    not a document\n"
        ),
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n--- {{apiVersion: kanali.io/v2, kind: ApiProxy, metadata: {{name: e}}, spec: {{source: {{path: /e}}, target: {{backend: {{endpoint: 'http://up'}}}}}}}}\n---\r\n{}",
            mk_proxy_yaml("f", "/f").replace('\n', "\r\n")
        ),
        format!(
            "{}---\n{}",
            mk_proxy_yaml("g", "/g"),
            mk_proxy_yaml("g", "/g")
        ),
    ];
    for text in &texts {
        let whole = parse_file("x.yaml", text).unwrap();
        let pieces = parse_documents(text, &Pieces::default()).0.expect(text);
        assert_eq!(reading(&pieces), reading(&[Arc::new(whole)]), "{text}");
    }
}

#[test]
fn a_document_that_does_not_read_alone_sends_the_file_to_be_read_whole() {
    // Bad YAML, a type error, an unknown version: the whole file's reading says where.
    for bad in [
        "apiVersion: [\n",
        "apiVersion: kanali.io/v1\nkind: ApiProxy\n",
    ] {
        let text = format!("{PROXY}---\n{bad}");
        assert!(
            parse_documents(&text, &Pieces::default()).0.is_none(),
            "{text}"
        );
    }
    // A big document among many small ones is read on its own: each gets the whole file's
    // budget, and only their sum is held to it.
    let big = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big}}\ndata: [{}]\n",
        vec!["x"; 300].join(", ")
    );
    let text = format!("{big}{}", "---\n".repeat(1023));
    let pieces = parse_documents(&text, &Pieces::default()).0.unwrap();
    let whole = parse_file("big.yaml", &text).unwrap();
    assert_eq!(reading(&pieces), reading(&[Arc::new(whole)]));
}

#[test]
fn documents_that_each_fit_but_together_go_over_the_budget_are_read_whole() {
    // 26 000 anchors each, under the parser's 50 000 for a file; 52 000 together.
    let half = |name: &str| {
        let anchors: Vec<String> = (0..26_000).map(|i| format!("&a{i} 1")).collect();
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata: [{}]\n",
            anchors.join(",")
        )
    };
    let (a, b) = (half("a"), half("b"));
    let (read, known) = parse_documents(&a, &Pieces::default());
    assert!(read.is_some());
    let text = format!("{a}---\n{b}");
    let (read, pieces) = parse_documents(&text, &Pieces::default());
    assert!(read.is_none());
    // What was read comes back, to be taken next time instead of read again.
    assert_eq!(pieces.len(), 2);
    // A document taken from an earlier reading counts as if read again.
    assert!(parse_documents(&format!("{a}---\n{a}"), &known).0.is_none());
    // The file read whole is over the budget: that is the answer a user gets.
    let err = parse_file("x.yaml", &text).unwrap_err();
    assert!(err.message.contains("budget breached: Anchors"), "{err}");
}

#[test]
fn a_changed_document_is_read_again_and_the_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut source = FileSource::new(dir.path());
    let file = |b: &str| {
        [("a", "/a"), ("b", b), ("c", "/c")]
            .map(|(n, p)| mk_proxy_yaml(n, p))
            .join("---\n")
    };
    let pieces = |source: &FileSource| {
        source
            .files
            .values()
            .next()
            .unwrap()
            .parsed
            .clone()
            .unwrap()
    };
    write(dir.path(), "m.yaml", &file("/b"));
    source.scan().unwrap();
    let before = pieces(&source);
    assert_eq!(before.len(), 3);

    write(dir.path(), "m.yaml", &file("/b2"));
    let scan = source.scan().unwrap();
    let paths: Vec<_> = scan
        .objects
        .api_proxies
        .iter()
        .map(|p| p.spec.source.path.as_str())
        .collect();
    assert_eq!(paths, ["/a", "/b2", "/c"]);
    let after = pieces(&source);
    assert!(Arc::ptr_eq(&before[0], &after[0]) && Arc::ptr_eq(&before[2], &after[2]));
    assert!(!Arc::ptr_eq(&before[1], &after[1]));

    // Broken, the file keeps its last good objects; mended, only the mended document is read.
    // (The error's line is the file's: where the parser gave up, two lines below the `[`.)
    write(dir.path(), "m.yaml", &file("["));
    let scan = source.scan().unwrap();
    assert_eq!(scan.errors.len(), 1, "{:?}", scan.errors);
    assert_eq!(scan.errors[0].line, Some(20), "{}", scan.errors[0]);
    assert_eq!(scan.objects.api_proxies[1].spec.source.path, "/b2");
    write(dir.path(), "m.yaml", &file("/b3"));
    let scan = source.scan().unwrap();
    assert!(scan.errors.is_empty(), "{:?}", scan.errors);
    assert_eq!(scan.objects.api_proxies[1].spec.source.path, "/b3");
    let mended = pieces(&source);
    assert!(Arc::ptr_eq(&before[0], &mended[0]) && Arc::ptr_eq(&before[2], &mended[2]));

    // A document that moves keeps its reading, and so does every document of the last
    // version when the file grows.
    write(
        dir.path(),
        "m.yaml",
        &format!(
            "---\n{}---\n{}",
            mk_proxy_yaml("c", "/c"),
            mk_proxy_yaml("b", "/b3")
        ),
    );
    source.scan().unwrap();
    let moved = pieces(&source);
    assert!(Arc::ptr_eq(&before[2], &moved[0]) && Arc::ptr_eq(&mended[1], &moved[1]));
    let grown = format!("{}---\n{}", file("/b3"), mk_proxy_yaml("d", "/d"));
    write(dir.path(), "m.yaml", &grown);
    let scan = source.scan().unwrap();
    assert_eq!(scan.objects.api_proxies.len(), 4);
    let after_growing = pieces(&source);
    assert!(Arc::ptr_eq(&moved[1], &after_growing[1]));
    assert!(Arc::ptr_eq(&moved[0], &after_growing[2]));
}

#[test]
fn an_object_defined_twice_is_used_from_the_first_file_and_the_second_named() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", PROXY);
    write(
        dir.path(),
        "b.yaml",
        &PROXY.replace("path: /p", "path: /other"),
    );
    // The same name in another namespace, or of another kind, is another object.
    write(
        dir.path(),
        "c.yaml",
        &PROXY.replace("namespace: shop", "namespace: ops"),
    );
    let scan = FileSource::new(dir.path()).scan().unwrap();
    let paths: Vec<_> = scan
        .objects
        .api_proxies
        .iter()
        .map(|p| p.spec.source.path.clone())
        .collect();
    assert_eq!(paths, ["/p", "/p"]);
    let errors: Vec<_> = scan
        .errors
        .iter()
        .map(|e| format!("{}: {}", e.file, e.message))
        .collect();
    assert_eq!(
        errors,
        ["b.yaml: ApiProxy shop/p is also defined in a.yaml; the copy in a.yaml is used"]
    );
}
