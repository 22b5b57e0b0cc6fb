//! Issue #11 end to end in standalone mode: ApiProxies with custom plugins (proxy-wasm modules
//! written in WAT), a controller, a proxy with `--plugins-dir`, a real echo upstream. Plugins
//! change requests and responses, answer locally and read their configuration; each load
//! failure answers its code (03, 04, 05) and shows as `Programmed=False` on the controller's
//! `/status`; traps, endless loops and memory hogs answer 11; plugins run in list order with
//! the built-in `apikey`; and modules change on disk while the proxy serves.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kanali_controller::keys::KeySource;
use kanali_controller::{Controller, StandaloneConfig};
use kanali_dataplane::filter::wasm::WasmConfig;
use kanali_dataplane::filter::wasm::testkit::{Buffer, Map, RET_LEN, RET_PTR, Wat, header_plugin};
use kanali_dataplane::listen::server::ServerConfig;
use kanali_dataplane::{ProxyConfig, RunningProxy};
use kanali_e2e::check::{Answer, eventually};
use kanali_e2e::setup;
use kanali_e2e::{Echo, start_echo};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;

const ANY: &str = "127.0.0.1:0";

struct Env {
    dir: tempfile::TempDir,
    echo: Echo,
    controller: Controller,
    proxy: RunningProxy,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// An ApiProxy on `path` to the echo upstream with `plugins` (YAML flow list items).
fn api_proxy(echo: &Echo, name: &str, path: &str, plugins: &[&str]) -> String {
    let plugins = if plugins.is_empty() {
        String::new()
    } else {
        format!("  plugins:\n  - {}\n", plugins.join("\n  - "))
    };
    format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  source: {{path: {path}}}\n  target:\n    path: /\n    backend: {{endpoint: \"http://{}\"}}\n{plugins}---\n",
        echo.addr
    )
}

impl Env {
    /// A controller on `manifests(echo)` (a decryption key for the `apikey` plugin's keys)
    /// and a proxy whose plugins directory holds `modules` (name → WAT).
    async fn start(
        manifests: impl FnOnce(&Echo, &Path) -> String,
        modules: &[(&str, Vec<u8>)],
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("decryption-key.pem");
        kanali_e2e::openssl::rsa_key(&key_file);
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let echo = start_echo(ANY.parse().unwrap(), "echo").await.unwrap();
        let env_dir = dir.path().to_owned();
        for (name, bytes) in modules {
            write_module(&plugins, name, bytes);
        }
        let manifests_dir = dir.path().join("manifests");
        std::fs::create_dir(&manifests_dir).unwrap();
        std::fs::write(manifests_dir.join("api.yaml"), manifests(&echo, &env_dir)).unwrap();
        let controller = kanali_controller::start_standalone(StandaloneConfig {
            decryption: KeySource::File(key_file),
            ..setup::controller(manifests_dir)
        })
        .await
        .unwrap();
        let proxy = kanali_dataplane::start(ProxyConfig {
            server: ServerConfig {
                request_buffer_bytes: 1024,
                ..ServerConfig::default()
            },
            plugins: WasmConfig {
                dir: Some(plugins),
                poll_interval: Duration::from_millis(50),
                fuel_per_request: 5_000_000,
                call_timeout: Duration::from_millis(500),
                memory_limit: 4 * 1024 * 1024,
                vms_per_plugin: 2,
                ..WasmConfig::default()
            },
            ..setup::proxy(controller.grpc_addr, "proxy-1")
        })
        .await
        .unwrap();
        let env = Env {
            dir,
            echo,
            controller,
            proxy,
            http: Client::builder(TokioExecutor::new()).build_http(),
        };
        eventually("the proxy applies the newest version", || async {
            let want = env.controller.shared.version();
            want.is_some() && env.proxy.version() == want
        })
        .await;
        env
    }

    fn plugins_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("plugins")
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.proxy.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .http
            .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await
            .unwrap();
        Answer::read(resp).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[], "").await
    }

    /// The controller's `/status` JSON.
    async fn status(&self) -> Value {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let resp = client
            .get(
                format!("http://{}/status", self.controller.admin_addr)
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
    }

    /// `(status, reason, message)` of the `Programmed` condition of ApiProxy `name`.
    async fn programmed(&self, name: &str) -> (String, String, String) {
        let status = self.status().await;
        let object = status["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["object"]["name"] == name)
            .unwrap_or_else(|| panic!("no status for {name}"))
            .clone();
        let c = object["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Programmed")
            .unwrap_or_else(|| panic!("no Programmed condition: {object}"))
            .clone();
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        (s("status"), s("reason"), s("message"))
    }

    /// Waits until ApiProxy `name` is `Programmed` = `status` with `reason`; returns the message.
    async fn wait_programmed(&self, name: &str, status: &str, reason: &str) -> String {
        let mut message = String::new();
        let mut last = (String::new(), String::new(), String::new());
        let deadline = tokio::time::Instant::now() + kanali_e2e::check::DEADLINE;
        while tokio::time::Instant::now() < deadline {
            last = self.programmed(name).await;
            if last.0 == status && last.1 == reason {
                message = last.2.clone();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            last.0 == status && last.1 == reason,
            "{name}: wanted Programmed={status} {reason}, last {last:?}"
        );
        message
    }
}

/// Writes a module the way a deployment should: beside, then renamed into place.
fn write_module(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

/// The binary module of `wat`.
fn wasm(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).unwrap_or_else(|e| panic!("{e}\n{wat}"))
}

/// The base64 text of the example module in `manifests/plugins/`'s ConfigMap.
fn example_module_base64() -> String {
    let yaml = std::fs::read_to_string(
        kanali_e2e::repo_root().join("manifests/plugins/plugins-configmap.yaml"),
    )
    .unwrap();
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix("add-header.wasm:"))
        .expect("binaryData add-header.wasm")
        .trim()
        .to_owned()
}

/// The example module, as the ConfigMap carries it.
fn example_module() -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(example_module_base64())
        .unwrap()
}

#[test]
fn the_example_configmap_carries_the_example_module() {
    use base64::Engine as _;
    let source =
        std::fs::read_to_string(kanali_e2e::repo_root().join("manifests/plugins/add-header.wat"))
            .unwrap();
    let built = base64::engine::general_purpose::STANDARD.encode(wasm(&source));
    assert!(
        example_module_base64() == built,
        "manifests/plugins/plugins-configmap.yaml does not carry add-header.wat; its binaryData should be\n  add-header.wasm: {built}"
    );
}

/// A plugin that answers every request locally with `status` and `body`.
fn deny_plugin(status: u16, body: &str) -> String {
    let mut p = Wat::new();
    let deny = p.send_local(
        status,
        body,
        &[("content-type", "text/plain"), ("x-denied-by", "wasm")],
    );
    p.on_request_headers(&format!("{deny} (i32.const 1)"));
    p.build()
}

/// A plugin that puts its configuration in request header `x-config`.
fn config_plugin() -> String {
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
    p.build()
}

/// A plugin that replaces request bodies and appends to response bodies.
fn body_plugin() -> String {
    let mut p = Wat::new();
    let replacement = p.bytes(b"replaced by the plugin");
    let suffix = p.bytes(b" [seen by the plugin]");
    p.on_request_body(&format!(
        "(drop (call $set_buffer (i32.const 0) (i32.const 0) (local.get $size) {})) (i32.const 0)",
        replacement.args()
    ));
    p.on_response_body(&format!(
        "(drop (call $set_buffer (i32.const 1) (local.get $size) (i32.const 0) {})) (i32.const 0)",
        suffix.args()
    ));
    p.build()
}

/// A plugin that wants whole request bodies (pauses until the end).
fn whole_body_plugin() -> String {
    let mut p = Wat::new();
    p.on_request_body(
        "(if (result i32) (local.get $eos) (then (i32.const 0)) (else (i32.const 1)))",
    );
    p.build()
}

/// A plugin that records whether the request still carries an API key (`apikey` header) in
/// request header `x-<name>-saw-key`, and answers 418 to paths with `/deny`.
fn order_plugin(name: &str) -> String {
    let mut p = Wat::new();
    let key = p.get_header(Map::Request, "apikey");
    let present = p.add_header(Map::Request, &format!("x-{name}-saw-key"), "yes");
    let absent = p.add_header(Map::Request, &format!("x-{name}-saw-key"), "no");
    let path = p.get_property("request.url_path");
    let deny_path = p.bytes(b"/ordered/deny");
    let deny = p.send_local(418, &format!("{name} says no"), &[]);
    // memcmp-free: the path is exactly /ordered/deny (13 bytes) and its bytes match.
    p.raw(&format!(
        r#"(func $is_deny (result i32)
    (local $i i32)
    (if (i32.ne {path} (i32.const 0)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load (i32.const {RET_LEN})) (i32.const {len})) (then (return (i32.const 0))))
    (loop $next
      (if (i32.lt_u (local.get $i) (i32.const {len}))
        (then
          (if (i32.ne (i32.load8_u (i32.add (i32.load (i32.const {RET_PTR})) (local.get $i)))
                      (i32.load8_u (i32.add (i32.const {ptr}) (local.get $i))))
            (then (return (i32.const 0))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $next))))
    (i32.const 1))"#,
        len = deny_path.len,
        ptr = deny_path.ptr,
    ));
    p.on_request_headers(&format!(
        "(if (call $is_deny) (then {deny} (return (i32.const 1))))
         (if (i32.eqz {key}) (then {present}) (else {absent}))
         (i32.const 0)"
    ));
    p.build()
}

/// A plugin that reads the upstream's response: copies its `x-echo-version` into
/// `x-plugin-saw` and takes out its `x-echo-peer`.
fn peek_plugin() -> String {
    let mut p = Wat::new();
    let get = p.get_header(Map::Response, "x-echo-version");
    let copy = p.add_header_from_ret(Map::Response, "x-plugin-saw");
    let remove = p.remove_header(Map::Response, "x-echo-peer");
    p.on_response_headers(&format!(
        "(if (i32.eqz {get}) (then {copy})) {remove} (i32.const 0)"
    ));
    p.build()
}

fn trap_plugin() -> String {
    Wat::new().on_request_headers("unreachable").build()
}

fn spin_plugin() -> String {
    Wat::new()
        .on_request_headers("(loop $forever (br $forever)) (i32.const 0)")
        .build()
}

fn greedy_plugin() -> String {
    // 200 pages (12.5 MiB) more, past the 4 MiB limit of these proxies.
    Wat::new()
        .on_request_headers("(drop (memory.grow (i32.const 200))) (i32.const 0)")
        .build()
}

const PLUGIN_OPEN: &str = "Could not open or load plugin.";
const PLUGIN_SYMBOL: &str = "Could not lookup plugin symbol.";
const PLUGIN_INTERFACE: &str = "Plugin does not implement the correct interface.";
const PLUGIN_RUNTIME: &str = "Plugin threw a runtime error.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_change_requests_and_responses_and_answer_locally() {
    let env = Env::start(
        |echo, _| {
            api_proxy(echo, "hello", "/hello", &["{name: hello}"])
                + &api_proxy(echo, "deny", "/deny", &["{name: deny}"])
                + &api_proxy(
                    echo,
                    "configured",
                    "/configured",
                    &["{name: config, version: v2, config: {zeta: last, alpha: \"first \\\"quoted\\\"\"}}"],
                )
                + &api_proxy(echo, "bodies", "/bodies", &["{name: bodies}"])
                + &api_proxy(echo, "whole", "/whole", &["{name: whole}"])
                + &api_proxy(echo, "example", "/example", &["{name: add-header}"])
                + &api_proxy(echo, "plain", "/plain", &[])
                + &api_proxy(echo, "peek", "/peek", &["{name: peek}"])
        },
        &[
            ("hello", wasm(&header_plugin("x-hello", "world"))),
            ("deny", wasm(&deny_plugin(403, "denied by a plugin"))),
            ("config_v2", wasm(&config_plugin())),
            ("bodies", wasm(&body_plugin())),
            ("whole", wasm(&whole_body_plugin())),
            ("add-header", example_module()),
            ("peek", wasm(&peek_plugin())),
        ],
    )
    .await;

    let a = env.get("/hello/x").await;
    assert_eq!(a.upstream(), "echo");
    assert_eq!(
        a.json()["headers"]["x-hello"][0],
        "world",
        "the upstream sees it"
    );
    assert_eq!(a.headers["x-hello"], "world", "the client sees it");
    assert!(a.headers.contains_key("x-kanali-correlation-id"));

    let hits = env.echo.hits.load(std::sync::atomic::Ordering::Relaxed);
    let a = env.get("/deny/x").await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "denied by a plugin");
    assert_eq!(a.headers["x-denied-by"], "wasm");
    assert_eq!(
        env.echo.hits.load(std::sync::atomic::Ordering::Relaxed),
        hits,
        "a local response sends nothing upstream"
    );

    // The config map, as JSON with sorted keys; the module `<name>_<version>.wasm`.
    let a = env.get("/configured").await;
    assert_eq!(
        a.json()["headers"]["x-config"][0],
        r#"{"alpha":"first \"quoted\"","zeta":"last"}"#
    );

    // The upstream gets the plugin's request body; the client the echo's answer with the
    // plugin's suffix.
    let a = env.send(Method::POST, "/bodies", &[], "hello").await;
    let text = String::from_utf8_lossy(&a.body);
    let echoed: Value =
        serde_json::from_str(text.strip_suffix(" [seen by the plugin]").unwrap()).unwrap();
    assert_eq!(echoed["body"], "replaced by the plugin");
    assert_eq!(echoed["headers"]["content-length"][0], "22");
    assert_eq!(
        a.headers["content-length"].to_str().unwrap(),
        a.body.len().to_string()
    );

    // A plugin that needs a whole body: fine within the read-ahead (1 KiB here), 413 past it
    // (a body still arriving: 2000 bytes, and more that never come before the answer).
    let a = env
        .send(Method::POST, "/whole", &[], &"x".repeat(100))
        .await;
    assert_eq!(a.upstream(), "echo");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 2000]))))
        .await
        .unwrap();
    let streaming: Client<HttpConnector, StreamBody<_>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = streaming
        .request(
            Request::post(format!("http://{}/whole", env.proxy.addr))
                .body(StreamBody::new(ReceiverStream::new(rx)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    drop(tx);

    // The example module of manifests/plugins/.
    let a = env.get("/example").await;
    assert_eq!(a.headers["x-kanali-plugin"], "example");
    assert_eq!(a.json()["headers"]["x-kanali-plugin"][0], "example");

    // The response phase sees the upstream's fields, and what it changes is what the client
    // gets.
    let a = env.get("/peek/x").await;
    assert_eq!(a.upstream(), "echo");
    assert_eq!(a.headers["x-plugin-saw"], a.headers["x-echo-version"]);
    assert!(!a.headers.contains_key("x-echo-peer"), "{:?}", a.headers);
    assert!(
        env.get("/plain/x")
            .await
            .headers
            .contains_key("x-echo-peer")
    );

    assert_eq!(env.get("/plain/x").await.upstream(), "echo");
    for name in ["hello", "deny", "configured", "bodies", "plain"] {
        env.wait_programmed(name, "True", "Programmed").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_failures_answer_03_04_05_and_show_as_programmed_false() {
    let env = Env::start(
        |echo, _| {
            api_proxy(echo, "missing", "/missing", &["{name: absent}"])
                + &api_proxy(echo, "garbage", "/garbage", &["{name: garbage}"])
                + &api_proxy(echo, "noexport", "/noexport", &["{name: noexport}"])
                + &api_proxy(echo, "oldabi", "/oldabi", &["{name: oldabi}"])
                + &api_proxy(echo, "ok", "/ok", &["{name: hello}"])
        },
        &[
            ("garbage", b"certainly not WebAssembly".to_vec()),
            (
                "noexport",
                wasm(&Wat::new().omit("proxy_on_request_headers").build()),
            ),
            (
                "oldabi",
                wasm(&Wat::new().abi("proxy_abi_version_0_1_0").build()),
            ),
            ("hello", wasm(&header_plugin("x-hello", "world"))),
        ],
    )
    .await;
    env.get("/missing/x")
        .await
        .assert_error(3, 500, PLUGIN_OPEN);
    env.get("/garbage").await.assert_error(3, 500, PLUGIN_OPEN);
    env.get("/noexport")
        .await
        .assert_error(4, 500, PLUGIN_SYMBOL);
    env.get("/oldabi")
        .await
        .assert_error(5, 500, PLUGIN_INTERFACE);
    assert_eq!(env.get("/ok").await.headers["x-hello"], "world");

    // The snapshot was applied (not NACKed): the failures are problems on its Ack.
    let status = env.status().await;
    assert_eq!(
        status["proxies"]["proxy-1"]["applied_version"],
        status["version"]
    );
    assert!(status["proxies"]["proxy-1"].get("rejected").is_none());

    let m = env
        .wait_programmed("missing", "False", "PluginNotFound")
        .await;
    assert!(
        m.starts_with("proxy proxy-1: plugin \"absent\": module file "),
        "{m}"
    );
    assert!(
        m.contains("absent.wasm does not exist") && m.ends_with("error 03"),
        "{m}"
    );
    let m = env
        .wait_programmed("garbage", "False", "PluginInvalid")
        .await;
    assert!(
        m.contains("plugin \"garbage\"") && m.ends_with("error 03"),
        "{m}"
    );
    let m = env
        .wait_programmed("noexport", "False", "PluginMissingExport")
        .await;
    assert!(
        m.contains("proxy_on_request_headers") && m.ends_with("error 04"),
        "{m}"
    );
    let m = env
        .wait_programmed("oldabi", "False", "PluginAbiMismatch")
        .await;
    assert!(
        m.contains("proxy_abi_version_0_1_0") && m.ends_with("error 05"),
        "{m}"
    );
    env.wait_programmed("ok", "True", "Programmed").await;
    // Ready says so too.
    let status = env.status().await;
    let ready = |name: &str| {
        status["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["object"]["name"] == name)
            .unwrap()["ready"]
            .clone()
    };
    assert_eq!(ready("missing"), false);
    assert_eq!(ready("ok"), true);

    // The missing module appears: picked up without a new snapshot, and reported.
    write_module(
        &env.plugins_dir(),
        "absent",
        &wasm(&header_plugin("x-late", "arrived")),
    );
    eventually("the late module serves", || async {
        env.get("/missing").await.status == 200
    })
    .await;
    assert_eq!(env.get("/missing").await.headers["x-late"], "arrived");
    env.wait_programmed("missing", "True", "Programmed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_failures_answer_11_and_other_routes_keep_serving() {
    let env = Env::start(
        |echo, _| {
            api_proxy(echo, "trap", "/trap", &["{name: trap}"])
                + &api_proxy(echo, "spin", "/spin", &["{name: spin}"])
                + &api_proxy(echo, "greedy", "/greedy", &["{name: greedy}"])
                + &api_proxy(echo, "ok", "/ok", &["{name: hello}"])
        },
        &[
            ("trap", wasm(&trap_plugin())),
            ("spin", wasm(&spin_plugin())),
            ("greedy", wasm(&greedy_plugin())),
            ("hello", wasm(&header_plugin("x-hello", "world"))),
        ],
    )
    .await;
    for _ in 0..3 {
        env.get("/trap").await.assert_error(11, 500, PLUGIN_RUNTIME);
        assert_eq!(env.get("/ok").await.upstream(), "echo");
        env.get("/spin").await.assert_error(11, 500, PLUGIN_RUNTIME);
        env.get("/greedy")
            .await
            .assert_error(11, 500, PLUGIN_RUNTIME);
        assert_eq!(env.get("/ok").await.headers["x-hello"], "world");
    }
    // A plugin that fails per request still loaded: Programmed stays True.
    env.wait_programmed("trap", "True", "Programmed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_run_in_list_order_with_apikey() {
    // The key's plaintext is only in this test: it is encrypted for the controller's key.
    let env = Env::start(
        |echo, dir| {
            let public = kanali_controller::crypto::PublicKey::from_pem(
                &std::fs::read(dir.join("decryption-key.pem")).unwrap(),
            )
            .unwrap();
            let data = public.encrypt(b"ordered-key").unwrap();
            format!(
                "apiVersion: kanali.io/v2\nkind: ApiKey\nmetadata: {{name: orderly}}\nspec:\n  revisions:\n  - {{status: Active, data: {data}}}\n---\n\
                 apiVersion: kanali.io/v2\nkind: ApiKeyBinding\nmetadata: {{name: ordered, namespace: shop}}\nspec:\n  keys:\n  - {{name: orderly, defaultRule: {{global: true}}}}\n---\n"
            ) + &api_proxy(
                echo,
                "ordered",
                "/ordered",
                &[
                    "{name: first}",
                    "{name: apikey, config: {apiKeyBindingName: ordered}}",
                    "{name: third}",
                ],
            )
        },
        &[
            ("first", wasm(&order_plugin("first"))),
            ("third", wasm(&order_plugin("third"))),
        ],
    )
    .await;
    let a = env
        .send(Method::GET, "/ordered/x", &[("apikey", "ordered-key")], "")
        .await;
    let headers = &a.json()["headers"];
    assert_eq!(
        headers["x-first-saw-key"][0], "yes",
        "first runs before apikey"
    );
    assert_eq!(
        headers["x-third-saw-key"][0], "no",
        "third runs after apikey removed it"
    );
    assert!(headers.get("apikey").is_none());
    // The first plugin answers before apikey asks for a key ...
    let a = env.get("/ordered/deny").await;
    assert_eq!(
        (a.status.as_u16(), &a.body[..]),
        (418, &b"first says no"[..])
    );
    // ... and apikey refuses before the third runs.
    env.get("/ordered/x")
        .await
        .assert_error(12, 403, "My lips are sealed.");
    let a = env
        .send(Method::GET, "/ordered/x", &[("apikey", "wrong")], "")
        .await;
    assert_eq!(a.code(), Some(13));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_replaced_while_serving() {
    let env = Env::start(
        |echo, _| {
            api_proxy(echo, "versioned", "/versioned", &["{name: versioned}"])
                + &api_proxy(echo, "plain", "/plain", &[])
        },
        &[("versioned", wasm(&header_plugin("x-version", "1")))],
    )
    .await;
    assert_eq!(env.get("/versioned").await.headers["x-version"], "1");

    // Requests keep flowing while the file is replaced: every one is answered by one version
    // or the other, none fails.
    let load = {
        let http = env.http.clone();
        let addr = env.proxy.addr;
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..400 {
                let resp = http
                    .get(format!("http://{addr}/versioned").parse().unwrap())
                    .await
                    .unwrap();
                let a = Answer::read(resp).await;
                assert_eq!(a.status, 200, "{:?}", a.body);
                seen.push(a.headers["x-version"].to_str().unwrap().to_owned());
                if seen.last().map(String::as_str) == Some("2") && seen.len() > 50 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    write_module(
        &env.plugins_dir(),
        "versioned",
        &wasm(&header_plugin("x-version", "2")),
    );
    let seen = load.await.unwrap();
    assert_eq!(seen.first().map(String::as_str), Some("1"), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("2"), "{seen:?}");
    // Once the new module serves, the old one never answers again.
    let first_new = seen.iter().position(|v| v == "2").unwrap();
    assert!(seen[first_new..].iter().all(|v| v == "2"), "{seen:?}");

    // A broken replacement: 03 on its route only, reported, and fixed by the next one.
    write_module(&env.plugins_dir(), "versioned", b"broken");
    eventually("the broken module answers 03", || async {
        env.get("/versioned").await.code() == Some(3)
    })
    .await;
    assert_eq!(env.get("/plain").await.upstream(), "echo");
    env.wait_programmed("versioned", "False", "PluginInvalid")
        .await;
    write_module(
        &env.plugins_dir(),
        "versioned",
        &wasm(&header_plugin("x-version", "3")),
    );
    eventually("version 3 serves", || async {
        env.get("/versioned")
            .await
            .headers
            .get("x-version")
            .is_some_and(|v| v == "3")
    })
    .await;
    env.wait_programmed("versioned", "True", "Programmed").await;
}
