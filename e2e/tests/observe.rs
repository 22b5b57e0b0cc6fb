//! What the proxy says about its traffic, end to end. `/metrics`: requests through a proxy
//! with two workers (two shards to sum) are counted by method and status, what is in flight
//! and open goes back to zero, and a real Prometheus scrapes and reads it all. The access log:
//! a line per request, with the correlation id the client got and nothing secret. Request
//! heads refused before routing (malformed, too large) are counted and logged too.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kanali_controller::Controller;
use kanali_dataplane::listen::server::ServerConfig;
use kanali_dataplane::workers::Workers;
use kanali_dataplane::{ProxyConfig, RunningProxy};
use kanali_e2e::Echo;
use kanali_e2e::check::eventually;
use kanali_e2e::prometheus::Prometheus;
use kanali_e2e::setup;
use serde_json::Value;

const ANY: &str = "127.0.0.1:0";

/// Sends `head` on a connection of its own and reads the proxy's answer to its end (the
/// proxy closes after refusing a head).
async fn raw(proxy: SocketAddr, head: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
    conn.write_all(head).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A head the proxy refuses with 400: two Content-Lengths that disagree.
const SMUGGLING: &[u8] =
    b"POST /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get_text(http: &HttpClient, url: String) -> String {
    let resp = http.get(url.parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// `/metrics` as a map from each sample's name and labels, as written, to its value.
async fn scrape(http: &HttpClient, admin: SocketAddr) -> HashMap<String, f64> {
    kanali_e2e::check::samples(&get_text(http, format!("http://{admin}/metrics")).await).unwrap()
}

fn latency_count(code: u16, method: &str) -> String {
    format!("kanali_http_request_latency_milliseconds_count{{code=\"{code}\",method=\"{method}\"}}")
}

/// A PromQL query's one result's value, from Prometheus' HTTP API; `None` while it has none.
async fn query(http: &HttpClient, prometheus: SocketAddr, promql: &str) -> Option<f64> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let text = get_text(
        http,
        format!("http://{prometheus}/api/v1/query?query={encoded}"),
    )
    .await;
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["status"], "success", "{promql}: {answer}");
    let result = answer["data"]["result"].as_array()?;
    assert!(result.len() <= 1, "{promql}: {answer}");
    result.first()?["value"][1].as_str()?.parse().ok()
}

struct Env {
    proxy: RunningProxy,
    version: String,
    _controller: Controller,
    _echo: Echo,
    _dir: tempfile::TempDir,
}

/// A controller, an echo upstream behind `/api`, and a proxy with two workers.
async fn start(access_log: bool) -> Env {
    let echo = kanali_e2e::start_echo(ANY.parse().unwrap(), "echo")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.yaml"), setup::api_route(echo.addr)).unwrap();
    let controller = kanali_controller::start_standalone(setup::controller(dir.path()))
        .await
        .unwrap();
    let proxy = kanali_dataplane::start(ProxyConfig {
        server: ServerConfig {
            access_log,
            ..Default::default()
        },
        workers: Workers::PerCore(2),
        ..setup::proxy(controller.grpc_addr, "proxy-a")
    })
    .await
    .unwrap();
    let version = setup::applied(&proxy, &controller).await;
    Env {
        proxy,
        version,
        _controller: controller,
        _echo: echo,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_by_method_and_status_and_prometheus_reads_them() {
    // Every part bound: `..` would drop the upstream and the controller here.
    let Env {
        proxy,
        version,
        _controller,
        _echo,
        _dir,
    } = start(false).await;

    let http = client();
    let admin = proxy.admin_addr;
    let before = scrape(&http, admin).await;
    assert_eq!(
        before[&format!("kanali_snapshot_info{{version=\"{version}\"}}")],
        1.0
    );
    assert!(
        !before
            .keys()
            .any(|k| k.starts_with("kanali_http_request_latency")),
        "no request yet: {before:?}"
    );
    assert!(before["process_resident_memory_bytes"] > 0.0);

    // Several connections, so that both workers are likely to serve some.
    let sent = [
        (Method::GET, "/api/a", 200, 3),
        (Method::POST, "/api/b", 200, 2),
        (Method::GET, "/nowhere", 404, 2),
        (Method::from_bytes(b"PURGE").unwrap(), "/api/c", 200, 1),
    ];
    let clients: Vec<HttpClient> = (0..4).map(|_| client()).collect();
    for (i, (method, path, status, times)) in sent.iter().enumerate() {
        for _ in 0..*times {
            let req = Request::builder()
                .method(method.clone())
                .uri(format!("http://{}{path}", proxy.addr))
                .body(Empty::new())
                .unwrap();
            let resp = clients[i].request(req).await.unwrap();
            assert_eq!(resp.status().as_u16(), *status, "{method} {path}");
            resp.into_body().collect().await.unwrap();
        }
    }
    // A request is counted when its response has been written to the end, which may be just
    // after the client has read it.
    eventually("every request is counted", || async {
        let now = scrape(&http, admin).await;
        now.get(&latency_count(200, "GET")) == Some(&3.0)
            && now.get(&latency_count(200, "POST")) == Some(&2.0)
            && now.get(&latency_count(404, "GET")) == Some(&2.0)
            && now.get(&latency_count(200, "OTHER")) == Some(&1.0)
            && now["kanali_http_request_inflight_count"] == 0.0
    })
    .await;
    // Heads refused before routing: counted apart, not as requests of some method.
    let answer = raw(proxy.addr, SMUGGLING).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let big = format!(
        "GET /api/a HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let answer = raw(proxy.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    // Counted when the connection ends, which can be just after the client read the answer.
    eventually("both refused heads are counted", || async {
        let now = scrape(&http, admin).await;
        now["kanali_http_refused_total{code=\"400\"}"] == 1.0
            && now["kanali_http_refused_total{code=\"431\"}"] == 1.0
    })
    .await;
    let now = scrape(&http, admin).await;
    assert_eq!(now["kanali_errors_total{code=\"00\"}"], 2.0, "{now:?}");
    assert_eq!(now["kanali_errors_total{code=\"14\"}"], 0.0, "{now:?}");
    let bucket = |le: &str| {
        now[&format!(
            "kanali_http_request_latency_milliseconds_bucket{{code=\"200\",method=\"GET\",le=\"{le}\"}}"
        )]
    };
    assert_eq!(bucket("+Inf"), 3.0);
    assert!(bucket("10000") == 3.0, "no request took 10 s: {now:?}");
    let sum = now["kanali_http_request_latency_milliseconds_sum{code=\"200\",method=\"GET\"}"];
    assert!(sum > 0.0 && sum < 30_000.0, "{sum}");
    assert_eq!(
        now.keys()
            .filter(|k| k.ends_with("_count{code=\"200\",method=\"HEAD\"}"))
            .count(),
        0
    );
    assert!(now["kanali_http_connections"] >= 4.0, "{now:?}");

    // A real Prometheus reads the same numbers.
    let prometheus_dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind(ANY)
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prometheus = Prometheus::start(port, prometheus_dir.path(), &[admin]);
    let read = |promql: &'static str| {
        let http = &http;
        let at = prometheus.addr;
        async move { query(http, at, promql).await }
    };
    eventually("prometheus scrapes the proxy", || async {
        read("up{job=\"kanali\"}").await == Some(1.0)
    })
    .await;
    assert_eq!(
        read("kanali_http_request_latency_milliseconds_count{code=\"200\",method=\"POST\"}").await,
        Some(2.0)
    );
    assert_eq!(
        read("sum(kanali_http_request_latency_milliseconds_count)").await,
        Some(8.0)
    );
    // The histogram is one Prometheus can compute with.
    let p50 = read(
        "histogram_quantile(0.5, sum by (le) (kanali_http_request_latency_milliseconds_bucket))",
    )
    .await
    .unwrap();
    assert!(p50 > 0.0 && p50 <= 10_000.0, "{p50}");

    // Connections closed by their clients are no longer counted.
    drop(clients);
    eventually("closed connections are no longer counted", || async {
        scrape(&http, admin).await["kanali_http_connections"] == 0.0
    })
    .await;
    drop(prometheus);
    proxy.shutdown().await;
}

/// Everything the access log wrote, as JSON lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_with_its_correlation_id_and_no_secret() {
    // The proxies run on runtime threads: only a global subscriber sees them. The other
    // tests' proxies log no access lines, and nothing else passes the filter.
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new("kanali::access=info"))
        .with_writer(move || writer.clone())
        .init();
    let Env {
        proxy,
        _controller,
        _echo,
        _dir,
        ..
    } = start(true).await;

    let http = client();
    let mut ids = Vec::new();
    for (path, status) in [("/api/a?apikey=s3cr3t", 200), ("/nowhere", 404)] {
        let resp = http
            .get(format!("http://{}{path}", proxy.addr).parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
        ids.push(
            resp.headers()["x-kanali-correlation-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        resp.into_body().collect().await.unwrap();
    }
    let answer = raw(proxy.addr, SMUGGLING).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    eventually("every request is logged", || async {
        captured.lines().len() == 3
    })
    .await;
    let lines = captured.lines();
    let field = |i: usize, name: &str| lines[i]["fields"][name].clone();
    for (i, (path, status)) in [("/api/a", 200), ("/nowhere", 404)].into_iter().enumerate() {
        assert_eq!(lines[i]["target"], "kanali::access", "{}", lines[i]);
        assert_eq!(field(i, "message"), "request details");
        assert_eq!(field(i, "http.request.correlation_id"), ids[i].as_str());
        assert_eq!(field(i, "http.request.method"), "GET");
        assert_eq!(field(i, "http.request.url.path"), path);
        assert_eq!(field(i, "http.request.url.host"), proxy.addr.to_string());
        assert_eq!(field(i, "http.response.status.code"), status);
        let remote = field(i, "http.request.remote_address");
        assert!(
            remote.as_str().unwrap().starts_with("127.0.0.1:"),
            "{remote}"
        );
        assert!(field(i, "http.request.duration").is_string());
    }
    assert_eq!(field(0, "kanali.error.code"), Value::Null);
    assert_eq!(field(1, "kanali.error.code"), "00");
    // The refused head has no method or path to say: why it was refused instead.
    assert_eq!(field(2, "message"), "request refused");
    assert_eq!(field(2, "http.response.status.code"), 400);
    assert_eq!(field(2, "reason"), "Content-Length values disagree");
    assert_eq!(field(2, "http.request.method"), Value::Null);
    let all = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(!all.contains("s3cr3t"), "the query reached the log: {all}");
    proxy.shutdown().await;
}
