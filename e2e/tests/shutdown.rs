//! Leaving service without losing a request (issue #10), with a real proxy and a real echo
//! upstream on 127.0.0.1: once shutdown starts `/readyz` fails and `/healthz` does not, new
//! connections are still served during the delay, HTTP/1.1 responses say `Connection: close`,
//! an HTTP/2 connection gets a GOAWAY, requests in flight finish after the listeners closed,
//! and the drain timeout bounds how long that takes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "proxy_upstreams/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use harness::{detached_proxy_config, echo, endpoint, install, route};
use http::StatusCode;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kanali_dataplane::RunningProxy;
use kanali_dataplane::shutdown::ShutdownConfig;
use kanali_dataplane::upstream::Upstreams;
use kanali_e2e::Echo;
use kanali_e2e::check::DEADLINE;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Env {
    proxy: RunningProxy,
    _echo: Echo,
    _upstreams: Upstreams,
}

async fn start() -> Env {
    let proxy = kanali_dataplane::start(detached_proxy_config("shutdown"))
        .await
        .unwrap();
    let echo = echo("echo").await;
    let routes = vec![route("/api", endpoint("http", &echo.addr.to_string(), ""))];
    let upstreams = install(&proxy, routes);
    Env {
        proxy,
        _echo: echo,
        _upstreams: upstreams,
    }
}

/// Status of `GET path` on the admin port (one connection per call).
async fn admin(addr: SocketAddr, path: &str) -> u16 {
    let answer = raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    status_of(&answer)
}

/// Sends `bytes` on a new connection and reads until the peer closes it.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut answer))
        .await
        .expect("the peer closes the connection")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {answer:?}"))
}

/// A keep-alive HTTP/1.1 request through the proxy on an open connection; returns the status
/// and whether the response said `Connection: close`.
async fn h1_request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    delay_ms: u64,
) -> (StatusCode, bool) {
    let req = http::Request::get("/api/x")
        .header("host", "gw.example")
        .header("x-echo-delay-ms", delay_ms.to_string())
        .body(Empty::new())
        .unwrap();
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let close = resp
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    (status, close)
}

/// An HTTP/1.1 client connection; the returned task ends when the connection closes.
async fn h1_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_proxy_is_unready_keeps_accepting_and_finishes_what_it_started() {
    let env = start().await;
    let (addr, admin_addr) = (env.proxy.addr, env.proxy.admin_addr);
    assert_eq!(admin(admin_addr, "/readyz").await, 200);
    // A keep-alive client from before the shutdown.
    let (mut before, before_conn) = h1_connect(addr).await;
    assert_eq!(h1_request(&mut before, 0).await, (StatusCode::OK, false));
    // A request that is still in flight when the listeners close (delay 3 s, it takes 4.5 s).
    let (mut slow, _slow_conn) = h1_connect(addr).await;
    let in_flight = tokio::spawn(async move { h1_request(&mut slow, 4500).await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    let delay = Duration::from_secs(3);
    let stopping = tokio::spawn(env.proxy.shutdown_gracefully(ShutdownConfig {
        delay,
        drain_timeout: Duration::from_secs(20),
    }));
    kanali_e2e::check::eventually("readyz fails once shutdown starts", || async {
        admin(admin_addr, "/readyz").await == 503
    })
    .await;
    assert_eq!(admin(admin_addr, "/healthz").await, 200, "still alive");

    // Within the delay: a new connection is served, and told to go.
    let answer = raw(
        addr,
        b"GET /api/new HTTP/1.1\r\nHost: gw.example\r\n\r\n", // keep-alive asked, close given
    )
    .await
    .unwrap();
    assert!(started.elapsed() < delay, "too slow to show the delay");
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // The old keep-alive connection: its next response says close, then the proxy closes it.
    assert_eq!(h1_request(&mut before, 0).await, (StatusCode::OK, true));
    tokio::time::timeout(DEADLINE, before_conn)
        .await
        .expect("the proxy closes a connection after its Connection: close response")
        .unwrap();

    // After the delay: the listener is closed, the slow request still completes.
    kanali_e2e::check::eventually("the listener closes after the delay", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(started.elapsed() >= delay, "closed before the delay");
    let (status, close) = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK, "the in-flight request finished");
    assert!(close, "and was told to close its connection");
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("shutdown finishes once nothing is in flight")
        .unwrap();
    assert!(
        TcpStream::connect(admin_addr).await.is_err(),
        "the admin port ends last"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_gets_a_goaway_when_it_makes_a_request_while_draining() {
    let env = start().await;
    let addr = env.proxy.addr;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let get = || {
        http::Request::get("http://gw.example/api/h2")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = sender.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), 200);

    let stopping = tokio::spawn(env.proxy.shutdown_gracefully(ShutdownConfig {
        delay: Duration::from_secs(3),
        drain_timeout: Duration::from_secs(20),
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Served during the delay, then the connection is sent away: the client's connection
    // ends while the proxy still accepts new ones.
    let resp = sender.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    tokio::time::timeout(DEADLINE, conn)
        .await
        .expect("GOAWAY ends the HTTP/2 connection")
        .unwrap()
        .unwrap();
    assert!(!stopping.is_finished());
    assert!(
        TcpStream::connect(addr).await.is_ok(),
        "new connections are still accepted"
    );
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_bounds_a_request_that_does_not_finish() {
    let env = start().await;
    let (mut slow, _conn) = h1_connect(env.proxy.addr).await;
    let _stuck = tokio::spawn(async move { h1_request(&mut slow, 600_000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(
        DEADLINE,
        env.proxy.shutdown_gracefully(ShutdownConfig {
            delay: Duration::ZERO,
            drain_timeout: Duration::from_millis(500),
        }),
    )
    .await
    .expect("shutdown gives up on the request after the drain timeout");
}
