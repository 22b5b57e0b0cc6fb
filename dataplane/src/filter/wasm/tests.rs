//! The loader's classification (03/04/05), the host functions, the budgets and the memory
//! limit, with modules written in WAT ([`super::testkit`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt as _;
use kanali_proto::v1 as pb;

use super::abi::Call;
use super::testkit::{Buffer, Map, RET_LEN, RET_PTR, Wat, header_plugin};
use super::vm::HttpCallback;
use super::*;
use crate::body::{ProxyBody, RequestBody};
use crate::filter::credentials::{Credentials, UsageLog};
use crate::filter::{self, Filter, Passed, RequestInfo, Stop};

struct Fixture {
    dir: tempfile::TempDir,
    plugins: Plugins,
}

fn fixture_with(config: impl FnOnce(&mut WasmConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut c = WasmConfig {
        dir: Some(dir.path().to_owned()),
        vms_per_plugin: 2,
        ..WasmConfig::default()
    };
    config(&mut c);
    let plugins = Plugins::new(&c).unwrap();
    Fixture { dir, plugins }
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

impl Fixture {
    fn write_wat(&self, name: &str, wat: &str) {
        let wasm = wat::parse_str(wat).unwrap_or_else(|e| panic!("{e}\n{wat}"));
        self.write(name, &wasm);
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        // Written beside and renamed, as a deployment should: never seen half-written.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(tmp, self.dir.path().join(format!("{name}.wasm"))).unwrap();
    }

    fn slot(&self, name: &str, config: &str) -> Arc<Slot> {
        self.plugins.slot(&pb::WasmPlugin {
            name: name.into(),
            version: String::new(),
            config_json: config.into(),
        })
    }

    fn filter(&self, name: &str, config: &str) -> Filter {
        Filter::Wasm(WasmFilter {
            slot: self.slot(name, config),
        })
    }

    fn error(&self, name: &str) -> LoadError {
        self.slot(name, "").load_error().expect("a load error")
    }
}

/// Runs the request phases of `filters` on a GET of `path` with `headers`.
fn request(filters: &[Filter], path: &str, headers: &mut HeaderMap) -> Result<Passed, Stop> {
    let uri: Uri = path.parse().unwrap();
    let id = HeaderValue::from_static("0000-test");
    let info = RequestInfo {
        method: &Method::GET,
        upstream_path: uri.path(),
        uri: &uri,
        host: "api.example:8080",
        peer: "192.0.2.7:40000".parse().unwrap(),
        version: Version::HTTP_11,
        https: false,
        correlation_id: &id,
        end_of_stream: true,
    };
    filter::run(
        filters,
        &info,
        headers,
        &Credentials::default(),
        &UsageLog::default(),
    )
}

fn code(stop: Stop) -> u32 {
    match stop {
        Stop::Refused(r) => r.code.code(),
        Stop::Local(r) => panic!("a local response: {r:?}"),
    }
}

async fn body(resp: Response<ProxyBody>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

fn plugin_of(slot: &Slot) -> Arc<vm::Plugin> {
    match &**slot.state.load() {
        SlotState::Ready(p) => p.clone(),
        SlotState::Failed(e) => panic!("not loaded: {e}"),
    }
}

// ---- loading: 03, 04, 05 ------------------------------------------------------------------

#[test]
fn load_failures_are_classified_by_code() {
    let f = fixture();
    let e = f.error("absent");
    assert_eq!((e.code().code(), e.reason()), (3, "PluginNotFound"));
    assert!(e.to_string().contains("absent.wasm does not exist"), "{e}");

    f.write("garbage", b"this is not WebAssembly");
    let e = f.error("garbage");
    assert_eq!((e.code().code(), e.reason()), (3, "PluginInvalid"));
    // Text is not a module either: only binaries load.
    f.write("text", Wat::new().build().as_bytes());
    assert_eq!(f.error("text").reason(), "PluginInvalid");

    for (name, omit) in [
        ("no-headers", "proxy_on_request_headers"),
        ("no-context", "proxy_on_context_create"),
        ("no-memory", "memory"),
        ("no-alloc", "proxy_on_memory_allocate"),
    ] {
        f.write_wat(name, &Wat::new().omit(omit).build());
        let e = f.error(name);
        assert_eq!((e.code().code(), e.reason()), (4, "PluginMissingExport"));
        let expected = omit.split(" (").next().unwrap();
        assert!(e.to_string().contains(expected), "{e}");
    }

    f.write_wat(
        "old-abi",
        &Wat::new().abi("proxy_abi_version_0_1_0").build(),
    );
    let e = f.error("old-abi");
    assert_eq!((e.code().code(), e.reason()), (5, "PluginAbiMismatch"));
    assert!(e.to_string().contains("proxy_abi_version_0_1_0"), "{e}");
    f.write_wat("no-abi", &Wat::new().abi("").build());
    assert_eq!(f.error("no-abi").code().code(), 5);
    // 0.2.0 is fine.
    f.write_wat(
        "abi-020",
        &Wat::new().abi("proxy_abi_version_0_2_0").build(),
    );
    assert_eq!(f.slot("abi-020", "").load_error(), None);

    // The 0.1.0 signature of proxy_on_request_headers (no end_of_stream).
    let wrong = Wat::new()
        .omit("proxy_on_request_headers")
        .raw(r#"(func (export "proxy_on_request_headers") (param i32 i32) (result i32) (i32.const 0))"#)
        .build();
    f.write_wat("wrong-signature", &wrong);
    let e = f.error("wrong-signature");
    assert_eq!(e.code().code(), 5);
    assert!(
        e.to_string()
            .contains("proxy_on_request_headers has type (i32, i32) -> (i32)"),
        "{e}"
    );

    // A host function imported with another type, an import from elsewhere, a memory import.
    for (name, import) in [
        (
            "bad-import-type",
            r#"(import "env" "proxy_log" (func $bad (param i32) (result i32)))"#,
        ),
        (
            "foreign-import",
            r#"(import "custom" "thing" (func $thing))"#,
        ),
        (
            "memory-import",
            r#"(import "env" "shared" (global $g i32))"#,
        ),
    ] {
        f.write_wat(name, &Wat::new().import(import).build());
        let e = f.error(name);
        assert_eq!(
            (e.code().code(), e.reason()),
            (5, "PluginAbiMismatch"),
            "{name}: {e}"
        );
    }
}

#[test]
fn start_failures_are_load_errors_too() {
    let f = fixture_with(|c| c.memory_limit = 1024 * 1024);
    f.write_wat("rejects", &Wat::new().on_configure("(i32.const 0)").build());
    let e = f.error("rejects");
    assert_eq!((e.code().code(), e.reason()), (3, "PluginConfigRejected"));
    f.write_wat("traps", &Wat::new().on_vm_start("unreachable").build());
    let e = f.error("traps");
    assert_eq!((e.code().code(), e.reason()), (11, "PluginStartFailed"));
    // Its initial memory alone (2 MiB) is over the limit.
    f.write_wat("too-big", &Wat::new().memory_pages(32).build());
    let e = f.error("too-big");
    assert_eq!(e.code().code(), 11);
    assert!(e.to_string().contains("memory"), "{e}");
}

#[test]
fn a_route_with_a_plugin_that_does_not_load_answers_its_code() {
    let f = fixture();
    f.write_wat(
        "no-headers",
        &Wat::new().omit("proxy_on_request_headers").build(),
    );
    let filters = [f.filter("no-headers", "")];
    let stop = request(&filters, "/x", &mut HeaderMap::new()).unwrap_err();
    assert_eq!(code(stop), 4);
    let filters = [f.filter("absent", "")];
    assert_eq!(
        code(request(&filters, "/x", &mut HeaderMap::new()).unwrap_err()),
        3
    );
}

// ---- the ABI ------------------------------------------------------------------------------

#[tokio::test]
async fn a_plugin_adds_a_request_and_a_response_header() {
    let f = fixture();
    f.write_wat("hello", &header_plugin("x-hello", "world"));
    let filters = [f.filter("hello", "")];
    let mut headers = HeaderMap::new();
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let passed = request(&filters, "/x", &mut headers).unwrap();
    assert_eq!(headers["x-hello"], "world");
    assert_eq!(headers["accept"], "*/*");
    let resp = passed
        .respond(Response::new(ProxyBody::from(Bytes::from_static(b"ok"))))
        .await;
    assert_eq!(resp.headers()["x-hello"], "world");
    assert_eq!(body(resp).await, "ok");
}

#[tokio::test]
async fn a_plugin_denies_with_a_local_response() {
    let f = fixture();
    let mut p = Wat::new();
    let deny = p.send_local(
        403,
        "denied by policy",
        &[("x-denied-by", "wat"), ("content-type", "text/plain")],
    );
    p.on_request_headers(&format!("{deny} (i32.const 1)"));
    f.write_wat("deny", &p.build());
    let filters = [f.filter("deny", ""), f.filter("absent", "")];
    let Err(Stop::Local(resp)) = request(&filters, "/x", &mut HeaderMap::new()) else {
        panic!("expected a local response")
    };
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["x-denied-by"], "wat");
    assert_eq!(body(*resp).await, "denied by policy");
}

#[test]
fn a_plugin_reads_its_configuration() {
    let f = fixture();
    let mut p = Wat::new();
    p.raw("(global $cfg_ptr (mut i32) (i32.const 0))")
        .raw("(global $cfg_len (mut i32) (i32.const 0))");
    p.on_configure(&format!(
        "(drop (call $get_buffer (i32.const {}) (i32.const 0) (local.get $size) (i32.const {RET_PTR}) (i32.const {RET_LEN})))
         (global.set $cfg_ptr (i32.load (i32.const {RET_PTR})))
         (global.set $cfg_len (i32.load (i32.const {RET_LEN})))
         (i32.const 1)",
        Buffer::Configuration as i32
    ));
    let name = p.bytes(b"x-config");
    p.on_request_headers(&format!(
        "(drop (call $add_header (i32.const 0) {} (global.get $cfg_ptr) (global.get $cfg_len))) (i32.const 0)",
        name.args()
    ));
    f.write_wat("config", &p.build());
    let config = r#"{"greeting":"hi","to":"you"}"#;
    let mut headers = HeaderMap::new();
    request(&[f.filter("config", config)], "/", &mut headers).unwrap();
    assert_eq!(headers["x-config"], config);
    // Another configuration of the same module is another slot, with its own VMs.
    let mut headers = HeaderMap::new();
    request(&[f.filter("config", r#"{"a":"b"}"#)], "/", &mut headers).unwrap();
    assert_eq!(headers["x-config"], r#"{"a":"b"}"#);
}

#[tokio::test]
async fn properties_and_pseudo_headers() {
    let f = fixture();
    let mut p = Wat::new();
    let mut on_request = String::new();
    for (property, header) in [
        ("request.path", "x-path"),
        ("request.method", "x-method"),
        ("request.host", "x-host"),
        ("source.address", "x-source"),
        ("request.id", "x-id"),
        ("plugin_name", "x-plugin"),
    ] {
        let get = p.get_property(property);
        let add = p.add_header_from_ret(Map::Request, header);
        on_request.push_str(&format!("(if (i32.eqz {get}) (then {add}))\n"));
    }
    for (pseudo, header) in [
        (":path", "x-pseudo-path"),
        (":authority", "x-authority"),
        (":method", "x-pseudo-method"),
    ] {
        let get = p.get_header(Map::Request, pseudo);
        let add = p.add_header_from_ret(Map::Request, header);
        on_request.push_str(&format!("(if (i32.eqz {get}) (then {add}))\n"));
    }
    let missing = p.get_property("no.such.thing");
    let flag = p.add_header(Map::Request, "x-unknown-property", "not-found");
    on_request.push_str(&format!(
        "(if (i32.eq {missing} (i32.const 1)) (then {flag}))\n"
    ));
    p.on_request_headers(&format!("{on_request} (i32.const 0)"));
    // The response callback reads :status and a request header.
    let status = p.get_header(Map::Response, ":status");
    let add_status = p.add_header_from_ret(Map::Response, "x-status-seen");
    let host = p.get_header(Map::Request, "x-host");
    let add_host = p.add_header_from_ret(Map::Response, "x-request-host");
    let set_status = p.replace_header(Map::Response, ":status", "201");
    p.on_response_headers(&format!(
        "(if (i32.eqz {status}) (then {add_status})) (if (i32.eqz {host}) (then {add_host})) {set_status} (i32.const 0)"
    ));
    f.write_wat("props", &p.build());
    let mut headers = HeaderMap::new();
    let passed = request(&[f.filter("props", "")], "/a/b?c=d", &mut headers).unwrap();
    for (name, value) in [
        ("x-path", "/a/b?c=d"),
        ("x-method", "GET"),
        ("x-host", "api.example:8080"),
        ("x-source", "192.0.2.7:40000"),
        ("x-id", "0000-test"),
        ("x-plugin", "props"),
        ("x-pseudo-path", "/a/b?c=d"),
        ("x-authority", "api.example:8080"),
        ("x-pseudo-method", "GET"),
        ("x-unknown-property", "not-found"),
    ] {
        assert_eq!(
            headers.get(name).map(|v| v.to_str().unwrap()),
            Some(value),
            "{name}: {headers:?}"
        );
    }
    let resp = passed
        .respond(Response::new(ProxyBody::from(Bytes::new())))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["x-status-seen"], "200");
    assert_eq!(resp.headers()["x-request-host"], "api.example:8080");
}

#[test]
fn header_maps_are_got_set_replaced_and_removed() {
    let f = fixture();
    let mut p = Wat::new();
    let remove = p.remove_header(Map::Request, "x-drop");
    let replace = p.replace_header(Map::Request, "x-one", "replaced");
    let add = p.add_header(Map::Request, "x-multi", "second");
    // Read every pair and write them back: pseudo-headers come back and are ignored.
    p.on_request_headers(&format!(
        "{remove} {replace} {add}
         (drop (call $get_pairs (i32.const 0) (i32.const {RET_PTR}) (i32.const {RET_LEN})))
         (drop (call $set_pairs (i32.const 0) (i32.load (i32.const {RET_PTR})) (i32.load (i32.const {RET_LEN}))))
         (i32.const 0)"
    ));
    f.write_wat("maps", &p.build());
    let mut headers = HeaderMap::new();
    headers.insert("x-drop", HeaderValue::from_static("gone"));
    headers.insert("x-one", HeaderValue::from_static("original"));
    headers.insert("x-multi", HeaderValue::from_static("first"));
    request(&[f.filter("maps", "")], "/", &mut headers).unwrap();
    assert!(!headers.contains_key("x-drop"));
    assert_eq!(headers["x-one"], "replaced");
    let multi: Vec<_> = headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["first", "second"]);
    assert!(!headers.keys().any(|k| k.as_str().starts_with(':')));
}

#[test]
fn unsupported_and_bad_host_calls_answer_a_status_without_trapping() {
    let f = fixture();
    let mut p = Wat::new();
    p.import(r#"(import "env" "proxy_not_in_the_abi" (func $future (param i32) (result i32)))"#);
    let unimplemented = p.add_header(Map::Request, "x-http-call", "unimplemented");
    let stubbed = p.add_header(Map::Request, "x-unknown-import", "unimplemented");
    let invalid = p.add_header(Map::Request, "x-bad-pointer", "invalid-memory-access");
    let bad_status = p.add_header(Map::Request, "x-bad-status", "bad-argument");
    p.on_request_headers(&format!(
        "(if (i32.eq (call $http_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const {RET_PTR})) (i32.const 12)) (then {unimplemented}))
         (if (i32.eq (call $future (i32.const 1)) (i32.const 12)) (then {stubbed}))
         (if (i32.eq (call $add_header (i32.const 0) (i32.const 0x7ffffff0) (i32.const 64) (i32.const 0) (i32.const 1)) (i32.const 6)) (then {invalid}))
         (if (i32.eq (call $send_local (i32.const 99999) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)) (i32.const 2)) (then {bad_status}))
         (i32.const 0)"
    ));
    f.write_wat("odd", &p.build());
    let mut headers = HeaderMap::new();
    request(&[f.filter("odd", "")], "/", &mut headers).unwrap();
    assert_eq!(headers["x-http-call"], "unimplemented");
    assert_eq!(headers["x-unknown-import"], "unimplemented");
    assert_eq!(headers["x-bad-pointer"], "invalid-memory-access");
    assert_eq!(headers["x-bad-status"], "bad-argument");
}

#[tokio::test]
async fn body_phases_see_and_replace_small_bodies() {
    let f = fixture();
    let mut p = Wat::new();
    let replacement = p.bytes(b"replaced!");
    let suffix = p.bytes(b" [filtered]");
    p.on_request_body(&format!(
        "(drop (call $set_buffer (i32.const 0) (i32.const 0) (local.get $size) {})) (i32.const 0)",
        replacement.args()
    ));
    p.on_response_body(&format!(
        "(drop (call $set_buffer (i32.const 1) (local.get $size) (i32.const 0) {})) (i32.const 0)",
        suffix.args()
    ));
    f.write_wat("bodies", &p.build());
    let filters = [f.filter("bodies", "")];
    let mut headers = HeaderMap::new();
    headers.insert("content-length", HeaderValue::from_static("5"));
    let mut passed = request(&filters, "/", &mut headers).unwrap();
    let exchange = passed.wasm.as_mut().unwrap();
    let body_in = RequestBody::ReadAhead {
        data: Some(Bytes::from_static(b"hello")),
        trailers: None,
        rest: None,
    };
    let RequestBody::ReadAhead { data, .. } = exchange.request_body(&mut headers, body_in).unwrap()
    else {
        panic!("a read-ahead body")
    };
    assert_eq!(data.unwrap(), "replaced!");
    assert_eq!(headers["content-length"], "9");
    let resp = passed
        .respond(Response::new(ProxyBody::from(Bytes::from_static(b"abc"))))
        .await;
    assert_eq!(resp.headers()["content-length"], "14");
    assert_eq!(body(resp).await, "abc [filtered]");
}

// ---- budgets ------------------------------------------------------------------------------

fn run_once(slot: &Slot) -> Result<(), RunError> {
    let plugin = plugin_of(slot);
    let mut stream = plugin.open()?;
    stream.run(HttpCallback::RequestHeaders, &mut Call::default(), 0, true)?;
    Ok(())
}

#[test]
fn a_trap_answers_11_and_the_next_request_gets_a_fresh_vm() {
    let f = fixture_with(|c| c.vms_per_plugin = 1);
    let mut p = Wat::new();
    let boom = p.get_header(Map::Request, "x-boom");
    let count = p.add_header(Map::Request, "x-count", "1");
    // Counts requests in the root... well, in memory: the state a VM keeps between requests.
    p.raw("(global $requests (mut i32) (i32.const 0))");
    p.on_request_headers(&format!(
        "(global.set $requests (i32.add (global.get $requests) (i32.const 1)))
         (if (i32.eqz {boom}) (then unreachable))
         (if (i32.eq (global.get $requests) (i32.const 1)) (then {count}))
         (i32.const 0)"
    ));
    f.write_wat("boom", &p.build());
    let filters = [f.filter("boom", "")];
    // The VM keeps its state: only the first request is counted 1.
    let mut h = HeaderMap::new();
    request(&filters, "/", &mut h).unwrap();
    assert_eq!(h["x-count"], "1");
    let mut h = HeaderMap::new();
    request(&filters, "/", &mut h).unwrap();
    assert!(!h.contains_key("x-count"));
    // A trap: 11, and the VM is gone.
    let mut h = HeaderMap::new();
    h.insert("x-boom", HeaderValue::from_static("1"));
    assert_eq!(code(request(&filters, "/", &mut h).unwrap_err()), 11);
    // The next request runs in a fresh VM: counted 1 again.
    let mut h = HeaderMap::new();
    request(&filters, "/", &mut h).unwrap();
    assert_eq!(h["x-count"], "1");
    // The plugin still counts as loaded: a trap is a request's failure, not a load failure.
    assert_eq!(f.slot("boom", "").load_error(), None);
}

#[test]
fn a_context_in_a_discarded_vm_answers_11() {
    let f = fixture_with(|c| c.vms_per_plugin = 1);
    let mut p = Wat::new();
    let boom = p.get_header(Map::Request, "x-boom");
    p.on_request_headers(&format!(
        "(if (i32.eqz {boom}) (then unreachable)) (i32.const 0)"
    ));
    f.write_wat("boom", &p.build());
    let slot = f.slot("boom", "");
    let plugin = plugin_of(&slot);
    let mut in_flight = plugin.open().unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-boom", HeaderValue::from_static("1"));
    assert_eq!(
        code(request(&[f.filter("boom", "")], "/", &mut h).unwrap_err()),
        11
    );
    let err = in_flight
        .run(HttpCallback::ResponseHeaders, &mut Call::default(), 0, true)
        .unwrap_err();
    assert_eq!(err, RunError::Discarded);
}

#[test]
fn an_endless_loop_uses_up_the_fuel_budget() {
    let f = fixture_with(|c| {
        c.fuel_per_request = 1_000_000;
        c.call_timeout = Duration::from_secs(30);
    });
    f.write_wat(
        "spin",
        &Wat::new()
            .on_request_headers("(loop $forever (br $forever)) (i32.const 0)")
            .build(),
    );
    assert_eq!(
        run_once(&f.slot("spin", "")),
        Err(RunError::OutOfFuel(1_000_000))
    );
}

#[test]
fn an_endless_loop_hits_the_time_limit() {
    let f = fixture_with(|c| {
        c.fuel_per_request = u64::MAX / 2;
        c.call_timeout = Duration::from_millis(30);
    });
    f.write_wat(
        "spin",
        &Wat::new()
            .on_request_headers("(loop $forever (br $forever)) (i32.const 0)")
            .build(),
    );
    assert_eq!(
        run_once(&f.slot("spin", "")),
        Err(RunError::Timeout(Duration::from_millis(30)))
    );
}

#[test]
fn growing_memory_past_the_limit_is_a_runtime_error() {
    let f = fixture_with(|c| c.memory_limit = 4 * 1024 * 1024);
    // 100 pages more (6.25 MiB) than the 2 it has.
    f.write_wat(
        "greedy",
        &Wat::new()
            .on_request_headers("(drop (memory.grow (i32.const 100))) (i32.const 0)")
            .build(),
    );
    assert_eq!(
        run_once(&f.slot("greedy", "")),
        Err(RunError::Memory(4 * 1024 * 1024))
    );
    // Within the limit is fine.
    f.write_wat(
        "modest",
        &Wat::new()
            .on_request_headers("(drop (memory.grow (i32.const 10))) (i32.const 0)")
            .build(),
    );
    assert_eq!(run_once(&f.slot("modest", "")), Ok(()));
}

// ---- files changing -----------------------------------------------------------------------

#[test]
fn a_module_replaced_on_disk_is_picked_up_and_reported() {
    let f = fixture();
    f.write_wat("versioned", &header_plugin("x-version", "1"));
    let filters = [f.filter("versioned", "")];
    let mut h = HeaderMap::new();
    request(&filters, "/", &mut h).unwrap();
    assert_eq!(h["x-version"], "1");
    let mut changes = f.plugins.changes();
    changes.borrow_and_update();

    f.write_wat("versioned", &header_plugin("x-version", "2"));
    f.plugins.scan(&BTreeSet::new());
    assert!(changes.has_changed().unwrap());
    let mut h = HeaderMap::new();
    request(&filters, "/", &mut h).unwrap();
    assert_eq!(h["x-version"], "2");

    // Broken: the route answers 04 and the problem is reported.
    f.write_wat(
        "versioned",
        &Wat::new().omit("proxy_on_request_headers").build(),
    );
    f.plugins.scan(&BTreeSet::new());
    assert_eq!(
        code(request(&filters, "/", &mut HeaderMap::new()).unwrap_err()),
        4
    );
    let Filter::Wasm(w) = &filters[0] else {
        unreachable!()
    };
    let uses = [WasmUse {
        source: Some(pb::ResourceRef {
            kind: "ApiProxy".into(),
            namespace: "shop".into(),
            name: "orders".into(),
            generation: 2,
        }),
        slot: w.slot.clone(),
    }];
    let problems = problems(&uses);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].reason, "PluginMissingExport");
    assert_eq!(problems[0].resource.as_ref().unwrap().name, "orders");
    assert!(
        problems[0].message.starts_with("plugin \"versioned\": ")
            && problems[0].message.ends_with("requests get error 04"),
        "{}",
        problems[0].message
    );

    // Gone: 03. Back: fine again.
    std::fs::remove_file(f.dir.path().join("versioned.wasm")).unwrap();
    f.plugins.scan(&BTreeSet::new());
    assert_eq!(
        code(request(&filters, "/", &mut HeaderMap::new()).unwrap_err()),
        3
    );
    f.write_wat("versioned", &header_plugin("x-version", "3"));
    f.plugins.scan(&BTreeSet::new());
    let mut h = HeaderMap::new();
    request(&filters, "/", &mut h).unwrap();
    assert_eq!(h["x-version"], "3");
    assert!(crate::filter::wasm::problems(&uses).is_empty());
}

#[test]
fn equal_contents_compile_once_and_an_unchanged_file_keeps_its_vms() {
    let f = fixture();
    f.write_wat("a", &header_plugin("x-a", "1"));
    f.write_wat("b", &header_plugin("x-a", "1"));
    let (a, b) = (f.slot("a", ""), f.slot("b", ""));
    let (pa, pb) = (plugin_of(&a), plugin_of(&b));
    assert!(Arc::ptr_eq(
        &pa.compiled_for_tests(),
        &pb.compiled_for_tests()
    ));
    // Touched, same bytes: the slot keeps its running plugin.
    f.write_wat("a", &header_plugin("x-a", "1"));
    f.plugins.scan(&BTreeSet::new());
    assert!(Arc::ptr_eq(&pa, &plugin_of(&a)));
}

#[test]
fn without_a_plugins_directory_every_plugin_answers_03() {
    let plugins = Plugins::new(&WasmConfig::default()).unwrap();
    let slot = plugins.slot(&pb::WasmPlugin {
        name: "x".into(),
        ..Default::default()
    });
    assert_eq!(slot.load_error(), Some(LoadError::NoPluginsDir));
    assert_eq!(file_name("../x", ""), None);
    assert_eq!(file_name("x", "1/2"), None);
    assert_eq!(file_name("x", "1.0").as_deref(), Some("x_1.0.wasm"));
}
