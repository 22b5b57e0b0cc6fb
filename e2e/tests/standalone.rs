//! Standalone mode end to end: a controller reading a manifests directory, two proxies
//! subscribed to it, and real HTTP upstreams, all on 127.0.0.1 with ephemeral ports.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kanali_controller::source::watch::Debounce;
use kanali_controller::{Controller, StandaloneConfig};
use kanali_dataplane::RunningProxy;
use kanali_e2e::check::{Answer, DEADLINE, eventually};
use kanali_e2e::setup;
use kanali_e2e::{Echo, start_echo};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ANY: &str = "127.0.0.1:0";

fn debounce() -> Debounce {
    Debounce {
        quiet: Duration::from_millis(50),
        max_delay: Duration::from_millis(300),
        resync: Duration::from_secs(5),
    }
}

async fn controller(dir: &Path, grpc: SocketAddr) -> Controller {
    kanali_controller::start_standalone(StandaloneConfig {
        grpc_listen: grpc,
        debounce: debounce(),
        ..setup::controller(dir)
    })
    .await
    .unwrap()
}

async fn proxy(grpc: SocketAddr, id: &str) -> RunningProxy {
    kanali_dataplane::start(setup::proxy(grpc, id))
        .await
        .unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    echo: Echo,
    controller: Option<Controller>,
    grpc: SocketAddr,
    proxies: Vec<RunningProxy>,
}

fn manifests(echo: SocketAddr, api_path: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: api, namespace: shop}}
spec:
  source: {{path: {api_path}}}
  target:
    path: /
    backend: {{endpoint: "http://{echo}"}}
---
apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: v1, namespace: shop}}
spec:
  source: {{path: /svc/v1}}
  target:
    path: /internal
    backend: {{endpoint: "http://{echo}"}}
---
apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: users, namespace: shop}}
spec:
  source: {{path: /mock}}
  target: {{backend: {{mock: {{mockTargetName: users}}}}}}
---
apiVersion: kanali.io/v2
kind: MockTarget
metadata: {{name: users, namespace: shop}}
spec:
  routes:
  - path: /users
    status: 200
    methods: [GET]
    headers: {{content-type: application/json, x-mock: "yes"}}
    body: '[{{"id":1}}]'
---
apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: orders, namespace: shop}}
spec:
  source: {{path: /orders}}
  target: {{backend: {{mock: {{mockTargetName: missing}}}}}}
"#
    )
}

impl Env {
    async fn start() -> Env {
        let echo = start_echo(ANY.parse().unwrap(), "echo").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.yaml"), manifests(echo.addr, "/api")).unwrap();
        let controller = controller(dir.path(), ANY.parse().unwrap()).await;
        let grpc = controller.grpc_addr;
        let proxies = vec![proxy(grpc, "proxy-a").await, proxy(grpc, "proxy-b").await];
        let env = Env {
            dir,
            echo,
            controller: Some(controller),
            grpc,
            proxies,
        };
        let version = env.controller().shared.version().unwrap();
        env.wait_for_version(&version).await;
        env
    }

    fn controller(&self) -> &Controller {
        self.controller.as_ref().unwrap()
    }

    async fn wait_for_version(&self, version: &str) {
        eventually("every proxy applies the version", || async {
            self.proxies
                .iter()
                .all(|p| p.version().as_deref() == Some(version))
        })
        .await;
    }

    fn write(&self, file: &str, content: &str) {
        // Write-then-rename, like editors do, so the controller never reads a half file.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(tmp, self.dir.path().join(file)).unwrap();
    }
}

async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    send_with(
        Client::builder(TokioExecutor::new()).build_http(),
        addr,
        req,
    )
    .await
}

async fn send_with(
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    mut req: Request<Full<Bytes>>,
) -> Answer {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = format!("http://{addr}{pq}").parse().unwrap();
    let resp = client.request(req).await.unwrap();
    assert!(
        resp.headers().contains_key("x-kanali-correlation-id"),
        "every response has a correlation id"
    );
    Answer::read(resp).await
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    send(addr, Request::get(path).body(Full::default()).unwrap()).await
}

const NO_PROXY: &str = "No ApiProxy resource was not found that matches the request.";
const NO_MOCK: &str = "No MockTarget resource was not found that matches the request.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_proxies_serve_endpoints_mocks_and_errors() {
    let env = Env::start().await;
    for p in &env.proxies {
        // Endpoint: prefix replaced, query forwarded exactly once (v2 doubled it).
        let a = get(p.addr, "/api/hello/world?a=1&b=2&a=3").await;
        assert_eq!(a.status, 200);
        let echo = a.json();
        assert_eq!(echo["path"], "/hello/world");
        assert_eq!(echo["query"], "a=1&b=2&a=3");
        assert_eq!(echo["method"], "GET");
        assert_eq!(echo["headers"]["x-forwarded-for"][0], "127.0.0.1");
        assert_eq!(echo["headers"]["x-forwarded-proto"][0], "http");
        assert_eq!(echo["headers"]["x-forwarded-host"][0], p.addr.to_string());
        assert_eq!(
            echo["headers"]["host"][0],
            p.addr.to_string(),
            "the client's Host is kept"
        );
        assert_eq!(
            echo["headers"]["x-kanali-correlation-id"][0],
            a.headers["x-kanali-correlation-id"].to_str().unwrap(),
            "the correlation id is forwarded"
        );

        // Target path rewrite.
        assert_eq!(
            get(p.addr, "/svc/v1/items/7").await.json()["path"],
            "/internal/items/7"
        );
        assert_eq!(get(p.addr, "/svc/v1").await.json()["path"], "/internal");

        // Mock: answered by the proxy, no upstream call.
        let hits = env.echo.hits.load(std::sync::atomic::Ordering::Relaxed);
        let m = get(p.addr, "/mock/users").await;
        assert_eq!(
            (m.status.as_u16(), &m.body[..]),
            (200, &br#"[{"id":1}]"#[..])
        );
        assert_eq!(m.headers["x-mock"], "yes");
        assert_eq!(m.headers["content-type"], "application/json");
        assert_eq!(
            env.echo.hits.load(std::sync::atomic::Ordering::Relaxed),
            hits,
            "a mock never calls an upstream"
        );
        let wrong_method = send(
            p.addr,
            Request::post("/mock/users").body(Full::default()).unwrap(),
        )
        .await;
        wrong_method.assert_error(2, 404, NO_MOCK);
        get(p.addr, "/mock/nothing")
            .await
            .assert_error(2, 404, NO_MOCK);

        // Dangling MockTarget reference: the route exists and answers 02.
        get(p.addr, "/orders/1").await.assert_error(2, 404, NO_MOCK);
        // No route.
        get(p.addr, "/nothing").await.assert_error(0, 404, NO_PROXY);
        get(p.addr, "/apis").await.assert_error(0, 404, NO_PROXY);
    }

    // Diagnostics on the admin port say why /orders is broken.
    let status = admin_status(env.controller().admin_addr).await;
    let orders = status["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["object"]["name"] == "orders")
        .unwrap();
    assert_eq!(orders["ready"], false);
    assert_eq!(orders["conditions"][1]["reason"], "MockTargetNotFound");
    for id in ["proxy-a", "proxy-b"] {
        assert_eq!(
            status["proxies"][id]["applied_version"], status["version"],
            "{id} ACKed the snapshot"
        );
    }
}

/// The controller's `/metrics`, by sample (name and labels as written).
async fn controller_metrics(addr: SocketAddr) -> std::collections::HashMap<String, f64> {
    let text = String::from_utf8(get_admin(addr, "/metrics").await.to_vec()).unwrap();
    kanali_e2e::check::samples(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_metrics_count_resources_proxies_and_broken_files() {
    let env = Env::start().await;
    let admin = env.controller().admin_addr;
    eventually("both proxies are current", || async {
        controller_metrics(admin).await["kanali_controller_proxies{state=\"current\"}"] == 2.0
    })
    .await;
    let m = controller_metrics(admin).await;
    let resources = |kind: &str, ready: bool| {
        m[&format!("kanali_controller_resources{{kind=\"{kind}\",ready=\"{ready}\"}}")]
    };
    // `orders` names a MockTarget that does not exist; the other three ApiProxies are fine.
    assert_eq!(resources("ApiProxy", true), 3.0, "{m:?}");
    assert_eq!(resources("ApiProxy", false), 1.0, "{m:?}");
    assert_eq!(resources("MockTarget", true), 1.0, "{m:?}");
    assert_eq!(resources("ApiKey", true) + resources("ApiKey", false), 0.0);
    assert_eq!(m["kanali_controller_proxies{state=\"behind\"}"], 0.0);
    assert_eq!(m["kanali_controller_proxies{state=\"rejecting\"}"], 0.0);
    assert_eq!(m["kanali_controller_source_errors"], 0.0);
    assert!(m["kanali_controller_compiles_total"] >= 1.0);
    let status = admin_status(admin).await;
    let version = status["version"].as_str().unwrap();
    assert_eq!(
        m[&format!("kanali_controller_snapshot_info{{version=\"{version}\"}}")],
        1.0
    );
    assert_eq!(
        m["kanali_controller_snapshot_routes"],
        status["routes"].as_u64().unwrap() as f64
    );
    // No Lease in standalone mode, so no leader to report.
    assert!(!m.contains_key("kanali_controller_leader"), "{m:?}");
    assert!(m["process_open_fds"] > 0.0);

    env.write("routes.yaml", "apiVersion: kanali.io/v2\nkind: [\n");
    eventually("the broken file is counted", || async {
        controller_metrics(admin).await["kanali_controller_source_errors"] == 1.0
    })
    .await;
}

async fn admin_status(addr: SocketAddr) -> Value {
    let a = get_admin(addr, "/status").await;
    serde_json::from_slice(&a).unwrap()
}

async fn get_admin(addr: SocketAddr, path: &str) -> Bytes {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    resp.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_paths_trailing_slashes_and_bodies_are_forwarded_as_sent() {
    let env = Env::start().await;
    let p = env.proxies[0].addr;
    // Spec §2.7.1: escapes preserved, not decoded (v2 e2e case).
    assert_eq!(get(p, "/api/%47%6f%2f").await.json()["path"], "/%47%6f%2f");
    assert_eq!(get(p, "/api/foo/").await.json()["path"], "/foo/");
    assert_eq!(get(p, "/api").await.json()["path"], "/");
    // (Built as an absolute URI: "//api//x" alone would parse as authority "api".)
    let req = Request::get(format!("http://{p}//api//x?y"))
        .body(Full::default())
        .unwrap();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let echo = client
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let echo: Value = serde_json::from_slice(&echo).unwrap();
    assert_eq!(
        (echo["path"].as_str(), echo["query"].as_str()),
        (Some("/x"), Some("y"))
    );
    let req = Request::put("/api/upload?x")
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from("hello body")))
        .unwrap();
    let echo = send(p, req).await.json();
    assert_eq!(
        (
            echo["method"].as_str(),
            echo["body"].as_str(),
            echo["query"].as_str()
        ),
        (Some("PUT"), Some("hello body"), Some("x"))
    );
    // Upstream errors pass through untouched (no Kanali JSON for an upstream's own 503).
    let req = Request::get("/api/x")
        .header("x-echo-status", "503")
        .body(Full::default())
        .unwrap();
    let a = send(p, req).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["upstream"], "echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let env = Env::start().await;
    let req = Request::get("/api/h")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-public", "kept")
        .body(Full::default())
        .unwrap();
    let headers = send(env.proxies[0].addr, req).await.json()["headers"].clone();
    for gone in ["connection", "x-private", "proxy-authorization", "te"] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} was forwarded: {headers}"
        );
    }
    assert_eq!(headers["x-public"][0], "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_streamed_not_buffered() {
    let env = Env::start().await;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("http://{}/api/stream", env.proxies[0].addr)
        .parse()
        .unwrap();
    let mut body = client.get(uri).await.unwrap().into_body();
    // The upstream sends "second" only after we release it, so receiving "first" proves the
    // proxy passed the first chunk on without waiting for the whole body.
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first\n");
    env.echo.release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_clients_are_served() {
    let env = Env::start().await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let a = send_with(
        client,
        env.proxies[0].addr,
        Request::get("/api/h2?q=1").body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(a.status, 200);
    let echo = a.json();
    assert_eq!(
        (echo["path"].as_str(), echo["query"].as_str()),
        (Some("/h2"), Some("q=1"))
    );
    // HTTP/1.1 upstream; the client's :authority became its Host header.
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["headers"]["host"][0], env.proxies[0].addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_reaches_both_proxies_and_a_broken_file_keeps_the_last_good_routes() {
    let env = Env::start().await;
    let before = env.controller().shared.version().unwrap();

    // Move /api to /v2.
    env.write("routes.yaml", &manifests(env.echo.addr, "/v2"));
    eventually("the controller compiles the move", || async {
        env.controller().shared.version().unwrap() != before
    })
    .await;
    let after = env.controller().shared.version().unwrap();
    env.wait_for_version(&after).await;
    for p in &env.proxies {
        assert_eq!(get(p.addr, "/v2/x").await.json()["path"], "/x");
        get(p.addr, "/api/x").await.assert_error(0, 404, NO_PROXY);
    }

    // Break the file: the routes it held stay, and the error names file and line.
    env.write(
        "routes.yaml",
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {name: x\n  bad: [\n",
    );
    eventually("the controller reports the source error", || async {
        !admin_status(env.controller().admin_addr).await["source_errors"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    let status = admin_status(env.controller().admin_addr).await;
    let error = &status["source_errors"][0];
    assert_eq!(error["file"], "routes.yaml");
    assert!(error["line"].as_u64().unwrap() >= 3, "{error}");
    assert_eq!(
        status["version"],
        after.as_str(),
        "a broken file does not change the snapshot"
    );
    assert_eq!(get(env.proxies[1].addr, "/v2/y").await.status, 200);

    // A second file adds a route; deleting it removes the route again.
    let extra = format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: extra, namespace: shop}}\nspec:\n  source: {{path: /extra}}\n  target: {{backend: {{endpoint: \"http://{}\"}}}}\n",
        env.echo.addr
    );
    env.write("extra.yml", &extra);
    eventually("every proxy serves /extra", || async {
        let mut ok = true;
        for p in &env.proxies {
            ok &= get(p.addr, "/extra/1").await.status == 200;
        }
        ok
    })
    .await;
    std::fs::remove_file(env.dir.path().join("extra.yml")).unwrap();
    eventually("no proxy serves /extra any more", || async {
        let mut gone = true;
        for p in &env.proxies {
            gone &= get(p.addr, "/extra/1").await.status == 404;
        }
        gone
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_without_the_controller_and_resubscribe_to_a_new_one() {
    let mut env = Env::start().await;
    let before = env.proxies[0].version().unwrap();
    env.controller.take().unwrap().shutdown().await;

    // Controller gone: both proxies keep serving the last snapshot.
    for _ in 0..20 {
        for p in &env.proxies {
            assert_eq!(get(p.addr, "/api/still").await.status, 200);
            get(p.addr, "/orders/x").await.assert_error(2, 404, NO_MOCK);
        }
    }
    // Readiness stays: they have a good snapshot.
    assert_eq!(
        &get_admin(env.proxies[0].admin_addr, "/readyz").await[..],
        b"ok\n"
    );

    // A new controller on the same address with changed manifests: both proxies resubscribe.
    std::fs::write(
        env.dir.path().join("routes.yaml"),
        manifests(env.echo.addr, "/moved"),
    )
    .unwrap();
    let controller = controller(env.dir.path(), env.grpc).await;
    let version = controller.shared.version().unwrap();
    assert_ne!(version, before);
    env.controller = Some(controller);
    env.wait_for_version(&version).await;
    for p in &env.proxies {
        assert_eq!(get(p.addr, "/moved/x").await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_not_ready_until_it_has_a_snapshot() {
    // Nothing listens at this controller address (bound, then dropped).
    let grpc = std::net::TcpListener::bind(ANY)
        .unwrap()
        .local_addr()
        .unwrap();
    let p = proxy(grpc, "lonely").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .get(format!("http://{}/readyz", p.admin_addr).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    get(p.addr, "/api").await.assert_error(0, 404, NO_PROXY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_answers_08() {
    let env = Env::start().await;
    let closed = std::net::TcpListener::bind(ANY)
        .unwrap()
        .local_addr()
        .unwrap();
    env.write("down.yaml", &format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: down, namespace: shop}}\nspec:\n  source: {{path: /down}}\n  target: {{backend: {{endpoint: \"http://{closed}\"}}}}\n"
    ));
    eventually("the proxy serves /down", || async {
        get(env.proxies[0].addr, "/down").await.status != 404
    })
    .await;
    get(env.proxies[0].addr, "/down/x").await.assert_error(
        8,
        502,
        "Could not get a valid or any response from the upstream server.",
    );
}

/// Sends raw bytes and returns the status line.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_request_without_host_reaches_the_upstream_with_one() {
    let env = Env::start().await;
    let mut s = tokio::net::TcpStream::connect(env.proxies[0].addr)
        .await
        .unwrap();
    s.write_all(b"GET /api/old HTTP/1.0\r\n\r\n").await.unwrap();
    let answer = kanali_e2e::check::read_until_closed(&mut s).await;
    // The proxy answers in the version it speaks (RFC 9110 section 6.2), as nginx does.
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let echo: Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["path"], "/old");
    assert_eq!(echo["headers"]["host"][0], env.echo.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_400_and_431() {
    let env = Env::start().await;
    let p = env.proxies[0].addr;
    assert!(
        raw(p, b"THIS IS NOT HTTP\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400")
    );
    let huge = format!(
        "GET /api/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    assert!(raw(p, huge.as_bytes()).await.starts_with("HTTP/1.1 431"));
    // The proxy is still fine afterwards.
    assert_eq!(get(p, "/api/ok").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_reused() {
    let env = Env::start().await;
    let p = env.proxies[0].addr;
    let before = env
        .echo
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    for i in 0..30 {
        assert_eq!(get(p, &format!("/api/seq/{i}")).await.status, 200);
    }
    let used = env
        .echo
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert!(
        used <= 1,
        "30 sequential requests opened {used} upstream connections"
    );

    // An upstream that closes its connection after a response: the next request gets a
    // fresh connection and still succeeds.
    let close = Request::get("/api/bye")
        .header("x-echo-close", "1")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(p, close).await.status, 200);
    let closed_at = env
        .echo
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..3 {
        assert_eq!(get(p, "/api/after").await.status, 200);
    }
    let reopened = env
        .echo
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
        - closed_at;
    assert_eq!(
        reopened, 1,
        "one new connection after the upstream closed the old one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_connection_the_upstream_closes_is_closed_by_the_proxy() {
    // An upstream that answers one request, then half-closes the idle connection (its
    // keep-alive timeout, a pod shutting down) and reads on: the proxy must close its side
    // with no request to find it out. A proxy that does not holds the socket in CLOSE-WAIT;
    // once the upstream's pod is gone, closing it later retransmits the FIN into nowhere.
    let listener = tokio::net::TcpListener::bind(ANY).await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
                // Once the connection waits in the proxy's pool, not while it reads the answer.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if s.shutdown().await.is_err() {
                    return;
                }
                // Far longer than the proxy's sweep interval (1 s).
                let eof = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk));
                let _ = closed_tx.send(matches!(eof.await, Ok(Ok(0) | Err(_))));
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.yaml"), manifests(upstream, "/api")).unwrap();
    let c = controller(dir.path(), ANY.parse().unwrap()).await;
    let p = proxy(c.grpc_addr, "sweeper").await;
    let version = c.shared.version().unwrap();
    eventually("the proxy applies the version", || async {
        p.version().as_deref() == Some(version.as_str())
    })
    .await;
    let answer = get(p.addr, "/api/once").await;
    assert_eq!(
        (answer.status.as_u16(), &answer.body[..]),
        (200, &b"ok"[..])
    );
    assert_eq!(
        closed.recv().await,
        Some(true),
        "the proxy closes the connection the upstream half-closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_fails_over_between_controller_replicas() {
    let echo = start_echo(ANY.parse().unwrap(), "echo").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.yaml"), manifests(echo.addr, "/api")).unwrap();
    let a = controller(dir.path(), ANY.parse().unwrap()).await;
    let b = controller(dir.path(), ANY.parse().unwrap()).await;
    let version = a.shared.version().unwrap();
    assert_eq!(
        b.shared.version().unwrap(),
        version,
        "replicas compile the same version"
    );

    let mut config = setup::proxy(a.grpc_addr, "roamer");
    config
        .client
        .controllers
        .push(format!("http://{}", b.grpc_addr));
    let p = kanali_dataplane::start(config).await.unwrap();
    eventually("the proxy applies the version", || async {
        p.version().as_deref() == Some(version.as_str())
    })
    .await;
    let connected = |c: &Controller| {
        c.shared
            .status()
            .proxies
            .get("roamer")
            .is_some_and(|s| s.connected)
    };
    eventually("the proxy connects to a controller", || async {
        connected(&a) || connected(&b)
    })
    .await;
    let (dead, survivor) = if connected(&a) { (a, b) } else { (b, a) };

    dead.shutdown().await;
    eventually("the proxy reconnects to the survivor", || async {
        connected(&survivor)
    })
    .await;
    // The survivor's edits reach the proxy.
    std::fs::write(
        dir.path().join("routes.yaml"),
        manifests(echo.addr, "/after"),
    )
    .unwrap();
    eventually("the survivor's edit reaches the proxy", || async {
        get(p.addr, "/after/x").await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_manifests_directory_is_not_recompiled() {
    let env = Env::start().await;
    // An edit the way editors and `sed -i` make it (write a new file, rename it over the old).
    // Scanning then reads the new file; the watcher must not mistake those reads (access and
    // atime events) for changes, or it rescans forever.
    let before = env.controller().shared.compiles();
    env.write(
        "extra.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    eventually("the controller compiles the new file", || async {
        env.controller().shared.compiles() > before
    })
    .await;
    // Then wait several debounce periods (quiet 50 ms, max 300 ms) with no change.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = env.controller().shared.compiles();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = env.controller().shared.compiles();
    assert_eq!(
        after,
        settled,
        "{} compiles without any change",
        after - settled
    );
}
