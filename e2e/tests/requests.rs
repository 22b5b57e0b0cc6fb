//! What the proxy refuses before routing or forwarding (issue #8), sent as raw bytes to a real
//! proxy listener, with real echo upstreams that count what reached them: an absolute-form
//! target names the host everywhere, Host must be there exactly once, CONNECT is refused and
//! ends the connection, and a malformed or truncated body never reaches the upstream. A client
//! that goes away while its request waits for the upstream takes the upstream exchange with it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "proxy_upstreams/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use harness::{detached_proxy_config, echo, endpoint, install, route};
use kanali_dataplane::RunningProxy;
use kanali_dataplane::upstream::Upstreams;
use kanali_e2e::Echo;
use kanali_e2e::check::{DEADLINE, read_until_closed};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

struct Env {
    proxy: RunningProxy,
    /// Serves `/vh` for host `a.example` and everything else.
    plain: Echo,
    /// Serves `/vh` for host `evil.example`.
    evil: Echo,
    _upstreams: Upstreams,
}

impl Env {
    async fn start() -> Env {
        let proxy = kanali_dataplane::start(detached_proxy_config("requests"))
            .await
            .unwrap();
        let (plain, evil) = (echo("plain").await, echo("evil").await);
        let to = |e: &Echo| endpoint("http", &e.addr.to_string(), "");
        let mut evil_route = route("/vh", to(&evil));
        evil_route.virtual_host = "evil.example".to_owned();
        let mut plain_route = route("/vh", to(&plain));
        plain_route.virtual_host = "a.example".to_owned();
        let routes = vec![route("/api", to(&plain)), evil_route, plain_route];
        let upstreams = install(&proxy, routes);
        Env {
            proxy,
            plain,
            evil,
            _upstreams: upstreams,
        }
    }

    fn forwarded(&self) -> usize {
        self.plain.hits.load(Ordering::Relaxed) + self.evil.hits.load(Ordering::Relaxed)
    }

    fn dialled(&self) -> usize {
        self.plain.connections.load(Ordering::Relaxed)
            + self.evil.connections.load(Ordering::Relaxed)
    }

    /// Sends `bytes` (then, with `half_close`, ends the sending side) and reads until the
    /// proxy closes the connection.
    async fn exchange(&self, bytes: &[u8], half_close: bool) -> String {
        exchange(self.proxy.addr, bytes, half_close).await
    }
}

async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut answer))
        .await
        .expect("the proxy closes the connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The JSON the echo upstream answered with, from a raw response.
fn echoed(answer: &str) -> Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// How many responses a raw exchange holds.
fn responses(answer: &str) -> usize {
    answer.lines().filter(|l| l.starts_with("HTTP/1.")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_names_the_host_for_routing_and_upstream_alike() {
    let env = Env::start().await;
    let answer = env
        .exchange(
            b"GET http://evil.example/vh/x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let echo = echoed(&answer);
    assert_eq!(echo["upstream"], "evil", "routed by the target's host");
    assert_eq!(echo["headers"]["host"], serde_json::json!(["evil.example"]));
    assert_eq!(
        echo["headers"]["x-forwarded-host"],
        serde_json::json!(["evil.example"])
    );
    assert_eq!(echo["path"], "/x");

    // The origin form with the same Host goes to the other route, with that name.
    let answer = env
        .exchange(
            b"GET /vh/x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            false,
        )
        .await;
    let echo = echoed(&answer);
    assert_eq!(echo["upstream"], "plain");
    assert_eq!(echo["headers"]["host"], serde_json::json!(["a.example"]));
    assert_eq!(
        echo["headers"]["x-forwarded-host"],
        serde_json::json!(["a.example"])
    );

    // A Connection header that names Host takes the client's off, not the upstream's.
    let answer = env
        .exchange(
            b"GET /vh/x HTTP/1.1\r\nHost: a.example\r\nConnection: host, close\r\n\r\n",
            false,
        )
        .await;
    let echo = echoed(&answer);
    assert_eq!(echo["upstream"], "plain");
    assert_eq!(echo["headers"]["host"], serde_json::json!(["a.example"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_gets_the_headers_the_proxy_sets_and_not_the_clients() {
    // A body is read ahead before the request goes (another way through the proxy than a
    // bodyless GET's).
    let env = Env::start().await;
    let answer = env
        .exchange(
            b"POST /api/x HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 10.0.0.1\r\n\
              X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\
              X-Kanali-Correlation-Id: spoofed\r\nContent-Length: 5\r\n\
              Connection: close\r\n\r\nhello",
            false,
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let echo = echoed(&answer);
    let headers = &echo["headers"];
    let json = |v: &str| serde_json::json!([v]);
    assert_eq!(headers["x-forwarded-for"], json("10.0.0.1, 127.0.0.1"));
    assert_eq!(headers["x-forwarded-proto"], json("http"));
    assert_eq!(headers["x-forwarded-host"], json("a.example"));
    let id = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-kanali-correlation-id: "))
        .unwrap_or_else(|| panic!("no correlation id: {answer}"));
    assert_eq!(headers["x-kanali-correlation-id"], json(id));
    assert_eq!(echo["body"], "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_go_upstream_as_sent_each_request_its_own() {
    // Fields the proxy neither reads nor changes go as they arrived: each exactly once,
    // repeats in order, empty values kept, `Connection` (this hop's) dropped, and the proxy's
    // own fields beside them. Two requests on one connection: the second must not see the
    // first's (the scratch maps and field lists are reused).
    let env = Env::start().await;
    let answer = env
        .exchange(
            b"GET /api/one HTTP/1.1\r\nHost: a.example\r\nUser-Agent: t/1 (x; y)\r\n\
              X-Dup: 1\r\nConnection: Keep-Alive\r\nx-dup: 2\r\nX-Empty:\r\n\
              Content-Length: 0\r\n\r\n\
              GET /api/two HTTP/1.1\r\nhost: a.example\r\nX-Other: 3\r\n\
              Connection: close\r\n\r\n",
            false,
        )
        .await;
    // (The second status line follows the first JSON body on its line.)
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    let mut bodies = answer
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| echoed(&format!("HTTP/1.1 {r}")));
    let json = |v: &[&str]| serde_json::json!(v);
    let first = bodies.next().unwrap();
    let headers = first["headers"].as_object().unwrap();
    assert_eq!(first["path"], "/one", "{first}");
    assert_eq!(headers["host"], json(&["a.example"]));
    assert_eq!(headers["user-agent"], json(&["t/1 (x; y)"]));
    assert_eq!(headers["x-dup"], json(&["1", "2"]));
    assert_eq!(headers["x-empty"], json(&[""]));
    assert_eq!(headers["content-length"], json(&["0"]));
    assert_eq!(headers["x-forwarded-for"], json(&["127.0.0.1"]));
    assert_eq!(headers["x-forwarded-host"], json(&["a.example"]));
    assert!(!headers.contains_key("connection"), "{first}");
    let second = bodies.next().unwrap();
    let headers = second["headers"].as_object().unwrap();
    assert_eq!(second["path"], "/two", "{second}");
    assert_eq!(headers["host"], json(&["a.example"]));
    assert_eq!(headers["x-other"], json(&["3"]));
    for gone in [
        "x-dup",
        "user-agent",
        "x-empty",
        "content-length",
        "connection",
    ] {
        assert!(!headers.contains_key(gone), "{gone}: {second}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_must_be_there_exactly_once_and_valid() {
    let env = Env::start().await;
    for (what, request) in [
        (
            "two Host headers",
            &b"GET /api/x HTTP/1.1\r\nHost: a.example\r\nHost: evil.example\r\n\r\n"[..],
        ),
        ("no Host in HTTP/1.1", b"GET /api/x HTTP/1.1\r\n\r\n"),
        (
            "a Host with user information",
            b"GET /api/x HTTP/1.1\r\nHost: me@a.example\r\n\r\n",
        ),
        (
            "a Host with a port that is not a number",
            b"GET /api/x HTTP/1.1\r\nHost: a.example:http\r\n\r\n",
        ),
        (
            "an absolute-form target with user information",
            b"GET http://me@a.example/api/x HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ),
    ] {
        let answer = env.exchange(request, false).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert!(answer.contains("connection: close"), "{what}: {answer}");
        assert_eq!(responses(&answer), 1, "{what}: {answer}");
    }
    assert_eq!(env.forwarded(), 0, "nothing reached an upstream");
    // HTTP/1.0 may still omit Host. (The answer says 1.1, the version the proxy speaks, as
    // nginx's does: RFC 9110 section 6.2.)
    let answer = env.exchange(b"GET /api/old HTTP/1.0\r\n\r\n", false).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The bytes after a refused CONNECT belong to the tunnel the client wanted, not to the
/// proxy: the connection ends after the 405, so they are never parsed as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_and_its_connection_closed() {
    let env = Env::start().await;
    let answer = env
        .exchange(
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n",
            false,
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(answer.contains("allow: GET"), "{answer}");
    assert_eq!(responses(&answer), 1, "{answer}");
    assert_eq!(env.forwarded(), 0, "the tunnel's bytes were not forwarded");
}

/// A chunk size that overflows, or a body shorter than its Content-Length, is refused before
/// the upstream is even dialled; a valid body of the same shapes goes through whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_truncated_bodies_are_refused_before_anything_is_forwarded() {
    let env = Env::start().await;
    let chunked = "POST /api/x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (what, request, half_close) in [
        (
            "a chunk size that overflows",
            format!("{chunked}5\r\nhello\r\nfffffffffffffffffffff\r\nx\r\n0\r\n\r\n"),
            false,
        ),
        (
            "a chunk size that is not hex",
            format!("{chunked}zz\r\nhello\r\n0\r\n\r\n"),
            false,
        ),
        (
            "a body shorter than its Content-Length",
            "POST /api/x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100\r\n\r\nonly ten b"
                .to_owned(),
            true,
        ),
        ("chunks cut short", format!("{chunked}5\r\nhello\r\n"), true),
    ] {
        let answer = env.exchange(request.as_bytes(), half_close).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert_eq!(env.dialled(), 0, "{what}: the upstream was dialled");
    }

    // (No half-close here: by default that cancels the request.)
    let chunked_close = chunked.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    let answer = env
        .exchange(
            format!("{chunked_close}5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_bytes(),
            false,
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(echoed(&answer)["body"], "hello world");
}

/// Bodies larger than the read-ahead limit still stream through whole, and a client waiting
/// for 100-continue gets it from the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_bodies_stream_and_expect_100_continue_is_answered() {
    let env = Env::start().await;
    let big = "x".repeat(200 * 1024);
    let request = format!(
        "POST /api/big HTTP/1.1\r\nHost: a.example\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{big}",
        big.len()
    );
    let answer = env.exchange(request.as_bytes(), false).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");
    assert_eq!(echoed(&answer)["body"].as_str().unwrap().len(), big.len());

    let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
    s.write_all(b"PUT /api/x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(b"hello").await.unwrap();
    let answer = read_until_closed(&mut s).await;
    let answer = answer.trim_start_matches("\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let echo = echoed(answer);
    assert_eq!(echo["body"], "hello");
    assert!(echo["headers"].get("expect").is_none(), "{echo}");
}

/// An upstream that takes one connection, reads a request head, says so, and then answers
/// `ok` once told to; it reports whether the proxy closed the connection first.
struct Stalling {
    addr: SocketAddr,
    answer: tokio::sync::oneshot::Sender<()>,
    /// True: the proxy closed the connection before the answer was asked for.
    closed_first: tokio::task::JoinHandle<bool>,
}

/// The upstream, and what says it got the request head.
async fn stalling() -> (Stalling, tokio::sync::oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_tx, got_request) = tokio::sync::oneshot::channel();
    let (answer, mut answer_rx) = tokio::sync::oneshot::channel::<()>();
    let closed_first = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the request head");
            head.extend_from_slice(&buf[..n]);
        }
        got_tx.send(()).unwrap();
        tokio::select! {
            n = s.read(&mut buf) => {
                assert_eq!(n.unwrap(), 0, "sent more than one request");
                true
            }
            _ = &mut answer_rx => {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.unwrap();
                false
            }
        }
    });
    let upstream = Stalling {
        addr,
        answer,
        closed_first,
    };
    (upstream, got_request)
}

/// A proxy (`--http1-half-close` or not) whose one route goes to a [`stalling`] upstream,
/// and a client whose `request` that upstream has received and not answered.
async fn stalled(half_close: bool, request: &[u8]) -> (RunningProxy, TcpStream, Stalling) {
    let mut config = detached_proxy_config("client-gone");
    config.server.http1_half_close = half_close;
    let proxy = kanali_dataplane::start(config).await.unwrap();
    let (upstream, got_request) = stalling().await;
    let routes = vec![route(
        "/stall",
        endpoint("http", &upstream.addr.to_string(), ""),
    )];
    let _upstreams = install(&proxy, routes);
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(request).await.unwrap();
    tokio::time::timeout(DEADLINE, got_request)
        .await
        .unwrap()
        .unwrap();
    (proxy, client, upstream)
}

/// A client that closes its connection while the upstream has yet to answer: the proxy
/// closes the upstream connection too, instead of waiting out the upstream timeout (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_takes_its_upstream_exchange_with_it() {
    let (_proxy, client, upstream) =
        stalled(false, b"GET /stall/x HTTP/1.1\r\nHost: a.example\r\n\r\n").await;
    drop(client);
    let closed_first = tokio::time::timeout(DEADLINE, upstream.closed_first)
        .await
        .expect("the proxy closes the upstream connection when the client goes")
        .unwrap();
    assert!(closed_first);
    drop(upstream.answer);
}

/// With `--http1-half-close`, a client that shut down its sending side after the request
/// still gets the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_half_close_a_client_that_stopped_sending_gets_its_answer() {
    let request = b"GET /stall/x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n";
    let (_proxy, mut client, upstream) = stalled(true, request).await;
    client.shutdown().await.unwrap();
    // Whether or not the proxy has seen the end of the client's stream by now, it answers.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    upstream.answer.send(()).unwrap();
    let answer = read_until_closed(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    assert!(!upstream.closed_first.await.unwrap());
}

/// A client that writes a large request whole before reading (as Python's http.client does)
/// gets the error the proxy answered without reading the body (here error 00, no route),
/// not a reset: the proxy reads and drops the rest of the body before it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answered_before_the_body_reaches_a_client_still_sending_it() {
    let env = Env::start().await;
    let size = 32 * 1024 * 1024;
    let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
    let head =
        format!("POST /nowhere/x HTTP/1.1\r\nHost: a.example\r\nContent-Length: {size}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // Far more than the kernel's socket buffers hold: it only goes through if the proxy reads.
    tokio::time::timeout(DEADLINE, s.write_all(&vec![b'x'; size]))
        .await
        .expect("the proxy keeps reading")
        .expect("the proxy did not reset the connection");
    let answer = read_until_closed(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["code"], 0, "{answer}");
    assert_eq!(env.dialled(), 0);
}
