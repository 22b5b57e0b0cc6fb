//! Test support: a real HTTP echo upstream (also the upstream of the `make run` demo).
//!
//! The echo server answers every request with a JSON description of what it received —
//! method, authority, raw path, query, headers and body — the same idea as the v2 e2e
//! suite's `tester` image, so tests can assert on exactly what a proxy forwarded. [`tls`]
//! adds certificates generated in the test, an HTTPS echo upstream and a small HTTPS client;
//! [`check`] the waiting and answer assertions the tests share; [`netns`] test hosts in network
//! namespaces, for peers that must not be on loopback; [`setup`] the configurations the suites
//! start controllers and proxies with.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

pub mod check;
pub mod kubectl;
pub mod netns;
pub mod openssl;
pub mod prometheus;
pub mod redis;
pub mod setup;
pub mod tls;

/// A running echo upstream.
pub struct Echo {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests answered so far.
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted so far (to prove a proxy reuses them).
    pub connections: Arc<AtomicUsize>,
    /// `GET /stream` sends its first chunk, then waits for this before sending the second.
    pub release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts an echo server (HTTP/1.1 and h2c) on `addr` (use port 0 in tests). `name` is
/// returned in every answer, to tell several upstreams apart.
pub async fn start_echo(addr: SocketAddr, name: &str) -> std::io::Result<Echo> {
    spawn_echo(TcpListener::bind(addr).await?, name, None)
}

/// The repository's root, from the `CARGO_MANIFEST_DIR` cargo sets when it runs a test
/// (the one fixed at compile time is a fallback only: cargo reuses a build moved to another
/// checkout — CI's cache — without rebuilding it, so that path may be somebody else's).
pub fn repo_root() -> std::path::PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or(dir)
}

/// Starts an echo server on a listener the caller made (e.g. in a [`netns::TestHost`]).
pub fn start_echo_on(listener: TcpListener, name: &str) -> std::io::Result<Echo> {
    spawn_echo(listener, name, None)
}

/// Serves the echo service on `listener`; with `tls`, each connection is a TLS handshake
/// first (done in the connection's task, so a slow client never stalls the accept loop).
pub(crate) fn spawn_echo(
    listener: TcpListener,
    name: &str,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<Echo> {
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let name: Arc<str> = Arc::from(name);
    let (h, r, c) = (hits.clone(), release.clone(), connections.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::Relaxed);
            let conn = EchoConn {
                hits: h.clone(),
                release: r.clone(),
                name: name.clone(),
                client_cert: false,
                peer,
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => conn.serve(stream).await,
                    Some(acceptor) => {
                        // A failed handshake (e.g. no client certificate) just ends the
                        // connection, which is what the client under test should observe.
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let client_cert = stream.get_ref().1.peer_certificates().is_some();
                        EchoConn {
                            client_cert,
                            ..conn
                        }
                        .serve(stream)
                        .await
                    }
                }
            });
        }
    });
    Ok(Echo {
        addr,
        hits,
        connections,
        release,
        task,
    })
}

/// What one echo connection needs to answer.
struct EchoConn {
    hits: Arc<AtomicUsize>,
    release: Arc<Notify>,
    name: Arc<str>,
    /// Whether the client presented a (verified) TLS client certificate.
    client_cert: bool,
    /// Who connected (for a proxied request: which proxy).
    peer: SocketAddr,
}

impl EchoConn {
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let EchoConn {
            hits,
            release,
            name,
            client_cert,
            peer,
        } = self;
        let service = hyper::service::service_fn(move |req| {
            hits.fetch_add(1, Ordering::Relaxed);
            answer(req, name.clone(), release.clone(), client_cert, peer)
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), service)
            .await;
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    name: Arc<str>,
    release: Arc<Notify>,
    client_cert: bool,
    peer: SocketAddr,
) -> Result<Response<EchoBody>, Infallible> {
    let version = req.version();
    let mut resp = answer_body(req, name, release).await;
    // Headers rather than JSON fields, so they are also on `/stream` and non-JSON answers.
    if let Ok(v) = http::HeaderValue::from_str(&format!("{version:?}")) {
        resp.headers_mut().insert("x-echo-version", v);
    }
    // The connection's peer: behind several proxies, says which one forwarded the request.
    if let Ok(v) = http::HeaderValue::from_str(&peer.to_string()) {
        resp.headers_mut().insert("x-echo-peer", v);
    }
    if client_cert {
        resp.headers_mut().insert(
            "x-echo-client-cert",
            http::HeaderValue::from_static("present"),
        );
    }
    Ok(resp)
}

async fn answer_body(
    req: Request<Incoming>,
    name: Arc<str>,
    release: Arc<Notify>,
) -> Response<EchoBody> {
    if req.uri().path() == "/stream" {
        // Two chunks with a wait in between: proves a proxy streams rather than buffers.
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"first\n"))))
                .await;
            release.notified().await;
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"second\n"))))
                .await;
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        return Response::new(body.boxed());
    }
    let (parts, body) = req.into_parts();
    // A slow upstream, for timeout tests: the head is sent only after this delay.
    if let Some(ms) = parts
        .headers
        .get("x-echo-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut headers = BTreeMap::<String, Vec<String>>::new();
    for (k, v) in &parts.headers {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let json = serde_json::json!({
        "upstream": &*name,
        "method": parts.method.as_str(),
        // HTTP/2's `:authority` (HTTP/1.1 has only a Host header): null if none.
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())).boxed());
    resp.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    if parts.headers.contains_key("x-echo-close") {
        // Ends the connection after this response, like a server whose keep-alive expired.
        resp.headers_mut()
            .insert("connection", http::HeaderValue::from_static("close"));
    }
    if let Some(status) = parts
        .headers
        .get("x-echo-status")
        .and_then(|s| s.to_str().ok()?.parse().ok())
    {
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    }
    resp
}
