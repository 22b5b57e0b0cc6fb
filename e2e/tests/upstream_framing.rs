//! How the proxy reads HTTP/1.1 responses from upstreams (its own client, `h1.rs`), end to
//! end: a client talks to a real proxy listener, the proxy to a scripted upstream on loopback
//! that writes exact bytes. Chunked bodies with trailers, HEAD, close-delimited bodies, reuse
//! of keep-alive connections, responses that must not be trusted (conflicting lengths,
//! more bytes than framed), and which of a response's header fields reach HTTP/1.1 and
//! HTTP/2 clients.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a failed unwrap is a failed test

#[path = "proxy_upstreams/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use harness::{Harness, endpoint, route, snapshot};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that answers each request by its path with fixed bytes, counting connections.
/// `/eof` answers without framing and closes; `/short` promises more than it sends and closes.
async fn scripted() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let conn = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = next_head(&mut s, &mut buf).await {
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let answer: Vec<u8> = match path.as_str() {
                        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                            content-length: 999\r\ntrailer: x-sum\r\n\r\n4\r\nwiki\r\n\
                            5;x=1\r\npedia\r\n0\r\nx-sum: 9\r\n\r\n"
                            .to_vec(),
                        "/head" => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-conn: {conn}\r\n\r\n"
                        )
                        .into_bytes(),
                        // The fields a proxy passes on, the ones it replaces, the ones of
                        // this hop; `/fields-hop` has one the parse leaves for the
                        // hop-by-hop pass (so its fields go through a map).
                        "/fields" | "/fields-hop" => format!(
                            "HTTP/1.1 200 OK\r\nServer: scripted\r\n\
                             Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nSet-Cookie: a=1\r\n\
                             X-Kanali-Correlation-Id: from-upstream\r\nconnection: {}\r\n\
                             Keep-Alive: timeout=5\r\nx-secret: s\r\nset-cookie: b=2\r\n\
                             Content-Length: 4\r\nX-Empty:\r\n\r\nbody",
                            if path == "/fields" {
                                "keep-alive"
                            } else {
                                "keep-alive, x-secret"
                            }
                        )
                        .into_bytes(),
                        "/conflict" => {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nab"
                                .to_vec()
                        }
                        "/extra" => {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"
                                .to_vec()
                        }
                        "/eof" | "/short" => {
                            let bytes: &[u8] = if path == "/eof" {
                                b"HTTP/1.1 200 OK\r\n\r\nuntil the end"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nnot 100"
                            };
                            let _ = s.write_all(bytes).await;
                            return;
                        }
                        _ => format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{conn}")
                            .into_bytes(),
                    };
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// The next request head on `s` (requests here have no body); `None` at EOF.
async fn next_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut more = [0u8; 4096];
        let n = s.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&more[..n]);
    }
}

async fn proxy() -> (Harness, Arc<AtomicUsize>) {
    let (upstream, accepted) = scripted().await;
    let proxy = Harness::start(Default::default()).await;
    let routes = vec![route("/", endpoint("http", &upstream.to_string(), ""))];
    proxy.apply(&snapshot("v1", routes, vec![], vec![]));
    (proxy, accepted)
}

/// Sends raw `request` bytes on a new connection and reads until the proxy closes it.
async fn raw(proxy: &Harness, request: &str) -> String {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the proxy closes the connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_and_declared_trailers_are_reframed_for_the_client() {
    let (proxy, _) = proxy().await;
    let answer = raw(
        &proxy,
        "GET /chunked HTTP/1.1\r\nhost: a\r\nte: trailers\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    // Transfer-Encoding won over the stale Content-Length, which is not passed on.
    assert!(
        !head.to_ascii_lowercase().contains("content-length"),
        "{answer}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{answer}"
    );
    assert!(
        body.starts_with("4\r\nwiki\r\n5\r\npedia\r\n0\r\n"),
        "{answer}"
    );
    // Trailers the upstream declared reach a client that accepts them.
    assert!(body.contains("x-sum: 9"), "{answer}");
    // An HTTP/1.0 client gets the same body, unframed.
    let answer = raw(&proxy, "GET /chunked HTTP/1.0\r\nhost: a\r\n\r\n").await;
    assert!(answer.ends_with("\r\n\r\nwikipedia"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_upstream_connections_are_reused_across_clients() {
    let (proxy, accepted) = proxy().await;
    for _ in 0..5 {
        let a = proxy.get("/plain", &[]).await;
        assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"0"[..]));
    }
    // HEAD: no body whatever Content-Length says, which the client still sees.
    let answer = raw(
        &proxy,
        "HEAD /head HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.to_ascii_lowercase().contains("content-length: 10"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\n"), "no body: {answer}");
    assert!(answer.contains("x-conn: 0"), "{answer}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrustworthy_responses_get_error_08_or_end_the_connection() {
    let (proxy, accepted) = proxy().await;
    // Two lengths: the response is refused whole (response splitting would start here).
    proxy.get("/conflict", &[]).await.assert_code(8, 502);
    // More bytes than framed: the client gets exactly the framed body, and the connection
    // that carried the extra bytes is not used again.
    let a = proxy.get("/extra", &[]).await;
    assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"ok"[..]));
    let before = accepted.load(Ordering::SeqCst);
    let a = proxy.get("/plain", &[]).await;
    assert_eq!(a.body, format!("{before}"), "a new connection");
    // Close-delimited: read to the end; cut short: the client's response is cut short too.
    let answer = raw(
        &proxy,
        "GET /eof HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("until the end"), "{answer}");
    let answer = raw(
        &proxy,
        "GET /short HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(
        body.len() < 100,
        "the client does not get a complete-looking body: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_the_upstreams_fields_less_this_hops_with_the_proxys_own_in_place() {
    let (proxy, _) = proxy().await;
    for path in ["/fields", "/fields-hop"] {
        // HTTP/1.1, as the client reads it off the wire.
        let answer = raw(
            &proxy,
            &format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"),
        )
        .await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "body", "{answer}");
        let fields: Vec<(String, String)> = head
            .split("\r\n")
            .skip(1)
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let values = |name: &str| -> Vec<&str> {
            fields
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(values("server"), ["scripted"], "{answer}");
        assert_eq!(
            values("date"),
            ["Mon, 01 Jan 2024 00:00:00 GMT"],
            "one Date, the upstream's: {answer}"
        );
        assert_eq!(
            values("set-cookie"),
            ["a=1", "b=2"],
            "both, in order: {answer}"
        );
        assert_eq!(values("content-length"), ["4"], "{answer}");
        assert_eq!(values("x-empty"), [""], "{answer}");
        let id = values("x-kanali-correlation-id");
        assert!(
            id.len() == 1 && id[0] != "from-upstream",
            "the proxy's id replaces the upstream's: {answer}"
        );
        assert_eq!(values("keep-alive"), Vec::<&str>::new(), "{answer}");
        assert_eq!(
            values("connection"),
            ["close"],
            "the client asked to close: {answer}"
        );
        let secret = values("x-secret");
        if path == "/fields-hop" {
            assert!(
                secret.is_empty(),
                "a field Connection names stays on its hop: {answer}"
            );
        } else {
            assert_eq!(secret, ["s"], "{answer}");
        }

        // HTTP/2: the same fields, through the map hyper writes.
        let a = proxy.h2_get(path, &[]).await;
        assert_eq!((a.status.as_u16(), &a.body[..]), (200, &b"body"[..]));
        let values = |name: &str| -> Vec<&[u8]> {
            a.headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect()
        };
        assert_eq!(values("server"), [b"scripted"]);
        assert_eq!(values("date"), [b"Mon, 01 Jan 2024 00:00:00 GMT"]);
        assert_eq!(values("set-cookie"), [&b"a=1"[..], &b"b=2"[..]]);
        assert_eq!(values("x-empty"), [b""]);
        let id = values("x-kanali-correlation-id");
        assert!(
            id.len() == 1 && id[0] != b"from-upstream",
            "{:?}",
            a.headers
        );
        assert!(!a.headers.contains_key("keep-alive") && !a.headers.contains_key("connection"));
        assert_eq!(
            a.headers.contains_key("x-secret"),
            path == "/fields",
            "{:?}",
            a.headers
        );
    }
}
