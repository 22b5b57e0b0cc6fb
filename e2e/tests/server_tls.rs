//! The proxy's HTTPS listener and connection limits, end to end: a standalone controller, one
//! proxy with certificates generated in the test and written to files, and an echo upstream,
//! all on 127.0.0.1 with ephemeral ports.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kanali_controller::Controller;
use kanali_dataplane::listen::server::ServerConfig;
use kanali_dataplane::listen::tls::{TlsConfig, TlsError};
use kanali_dataplane::workers::Workers;
use kanali_dataplane::{ProxyConfig, RunningProxy, StartError};
use kanali_e2e::check::{Answer, DEADLINE, eventually};
use kanali_e2e::setup;
use kanali_e2e::tls::{Ca, Issued, https_request, tls_connect};
use kanali_e2e::{Echo, start_echo};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

const ANY: &str = "127.0.0.1:0";

/// The name the proxy's certificates are issued for and clients ask for.
const NAME: &str = "localhost";

fn server_config(dir: &Path, client_ca: bool) -> ServerConfig {
    ServerConfig {
        tls: Some(TlsConfig {
            listen: ANY.parse().unwrap(),
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            client_ca_file: client_ca.then(|| dir.join("client-ca.crt")),
            reload_interval: Duration::from_millis(100),
        }),
        ..ServerConfig::default()
    }
}

fn proxy_config(grpc: SocketAddr, server: ServerConfig) -> ProxyConfig {
    ProxyConfig {
        server,
        ..setup::proxy(grpc, "tls-proxy")
    }
}

/// Writes `content` to `path` by write-then-rename, the way an atomic writer (or a Secret
/// update's symlink swap) replaces a file.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

struct Env {
    dir: tempfile::TempDir,
    echo: Echo,
    /// Issued the proxy's current serving certificate.
    ca: Ca,
    _controller: Controller,
    proxy: RunningProxy,
}

impl Env {
    /// Everything running, with a route `/api` to the echo upstream; `tune` adjusts the
    /// proxy's server settings (its TLS file paths are already set); `client_ca`, if given,
    /// is written as the client CA file.
    async fn start(tune: impl FnOnce(&mut ServerConfig), client_ca: Option<&Ca>) -> Env {
        Env::start_on(Workers::Caller, tune, client_ca).await
    }

    /// [`Env::start`], the proxy's connections served by `workers`.
    async fn start_on(
        workers: Workers,
        tune: impl FnOnce(&mut ServerConfig),
        client_ca: Option<&Ca>,
    ) -> Env {
        let echo = start_echo(ANY.parse().unwrap(), "echo").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests).unwrap();
        std::fs::write(manifests.join("routes.yaml"), setup::api_route(echo.addr)).unwrap();
        let controller = kanali_controller::start_standalone(setup::controller(manifests))
            .await
            .unwrap();

        let ca = Ca::new("proxy CA");
        write_pair(dir.path(), &ca.issue_server(&[NAME, "127.0.0.1"]));
        if let Some(client_ca) = client_ca {
            std::fs::write(dir.path().join("client-ca.crt"), client_ca.cert_pem()).unwrap();
        }
        let mut server = server_config(dir.path(), client_ca.is_some());
        tune(&mut server);
        let proxy = kanali_dataplane::start(ProxyConfig {
            workers,
            ..proxy_config(controller.grpc_addr, server)
        })
        .await
        .unwrap();
        setup::applied(&proxy, &controller).await;
        Env {
            dir,
            echo,
            ca,
            _controller: controller,
            proxy,
        }
    }

    fn tls_addr(&self) -> SocketAddr {
        self.proxy.tls_addr.unwrap()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `GET path` over HTTPS, trusting the proxy's CA, without a client certificate.
    async fn get(&self, path: &str, h2: bool) -> Answer {
        let (status, version, headers, body) =
            https_request(self.tls_addr(), NAME, &self.ca.cert_pem(), None, h2, path)
                .await
                .unwrap();
        Answer {
            status,
            version,
            headers,
            body,
        }
    }
}

fn write_pair(dir: &Path, issued: &Issued) {
    replace(&dir.join("tls.crt"), &issued.cert_pem);
    replace(&dir.join("tls.key"), &issued.key_pem);
}

/// Whether the peer closes the connection within [`DEADLINE`] (reading and discarding
/// anything it sends first, e.g. an error response).
async fn closed_by_peer(stream: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_clients_reach_the_upstream_over_http_1_1_and_http_2() {
    let env = Env::start(|_| {}, None).await;

    let answer = env.get("/api/hello?x=1", false).await;
    let echo = answer.json();
    assert_eq!(
        (answer.status, answer.version),
        (StatusCode::OK, Version::HTTP_11)
    );
    assert_eq!(echo["path"], "/hello");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["headers"]["host"][0], NAME);
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");

    // ALPN h2: HTTP/2 to the proxy; the upstream still gets HTTP/1.1, with :authority as Host.
    let answer = env.get("/api/two", true).await;
    let echo = answer.json();
    assert_eq!(
        (answer.status, answer.version),
        (StatusCode::OK, Version::HTTP_2)
    );
    assert_eq!(echo["path"], "/two");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["headers"]["host"][0], NAME);
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");

    // The cleartext listener still serves, next to the HTTPS one.
    let mut s = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    s.write_all(b"GET /api/plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = kanali_e2e::check::read_until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"));
    assert!(text.contains(r#""x-forwarded-proto":["http"]"#), "{text}");
    assert_eq!(env.echo.hits.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_workers_every_one_serves_https_too() {
    let env = Env::start_on(Workers::PerCore(2), |_| {}, None).await;
    // Each request on a connection of its own: the kernel spreads them over the workers'
    // sockets (all 24 on one has odds of 2^-23), and one a worker did not serve would hang.
    for i in 0..24 {
        let answer = env.get(&format!("/api/{i}"), i % 2 == 0).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["path"], format!("/{i}"));
    }
    env.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_requires_a_client_certificate_it_issued() {
    let clients = Ca::new("client CA");
    let env = Env::start(|_| {}, Some(&clients)).await;
    let (addr, ca) = (env.tls_addr(), env.ca.cert_pem());

    for h2 in [false, true] {
        let none = https_request(addr, NAME, &ca, None, h2, "/api/x").await;
        assert!(none.is_err(), "no client certificate: {none:?}");

        let good = clients.issue_client("good");
        let (status, ..) = https_request(addr, NAME, &ca, Some(&good), h2, "/api/x")
            .await
            .unwrap();
        assert_eq!(status, 200);

        let stranger = Ca::new("another CA").issue_client("stranger");
        let other = https_request(addr, NAME, &ca, Some(&stranger), h2, "/api/x").await;
        assert!(other.is_err(), "certificate of another CA: {other:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_restart_and_a_broken_one_is_ignored() {
    let env = Env::start(|_| {}, None).await;
    let addr = env.tls_addr();
    let serves = |ca: String| async move {
        https_request(addr, NAME, &ca, None, false, "/api/x")
            .await
            .is_ok()
    };
    assert!(serves(env.ca.cert_pem()).await);

    // Rotation to a certificate of another CA: clients that trust only it get through.
    let next = Ca::new("next CA");
    write_pair(env.dir.path(), &next.issue_server(&[NAME]));
    eventually("the proxy serves the next certificate", || {
        serves(next.cert_pem())
    })
    .await;
    assert!(!serves(env.ca.cert_pem()).await);

    // A broken certificate file: the last good certificate keeps serving. (A negative check
    // can only wait: many reload intervals, then look.)
    replace(
        &env.file("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(serves(next.cert_pem()).await);
    // A key that does not match the certificate: same.
    replace(&env.file("tls.crt"), &next.issue_server(&[NAME]).cert_pem);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(serves(next.cert_pem()).await);

    // And the reloader is still at work: the next good pair is picked up.
    let last = Ca::new("last CA");
    write_pair(env.dir.path(), &last.issue_server(&[NAME]));
    eventually("the proxy serves the last certificate", || {
        serves(last.cert_pem())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_with_bad_tls_files_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let (a, b) = (ca.issue_server(&[NAME]), ca.issue_server(&[NAME]));
    replace(&dir.path().join("tls.crt"), &a.cert_pem);
    replace(&dir.path().join("tls.key"), &b.key_pem);
    let grpc: SocketAddr = "127.0.0.1:1".parse().unwrap();

    let err = kanali_dataplane::start(proxy_config(grpc, server_config(dir.path(), false)))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, StartError::Tls(TlsError::KeyMismatch { .. })),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("does not match"), "{message}");
    assert!(
        message.contains("tls.key") && message.contains("tls.crt"),
        "{message}"
    );

    // A missing client CA file names the file.
    replace(&dir.path().join("tls.key"), &a.key_pem);
    let err = kanali_dataplane::start(proxy_config(grpc, server_config(dir.path(), true)))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("client-ca.crt"), "{err}");

    // The same files, matching: starts.
    let proxy = kanali_dataplane::start(proxy_config(grpc, server_config(dir.path(), false)))
        .await
        .unwrap();
    assert!(proxy.tls_addr.is_some());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_silent_clients_are_disconnected_after_the_header_read_timeout() {
    let env = Env::start(
        |s| {
            s.header_read_timeout = Duration::from_secs(1);
            s.idle_timeout = Duration::from_secs(600);
        },
        None,
    )
    .await;

    // Cleartext, part of a request head (hyper's own timeout).
    let mut s = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_by_peer(&mut s).await, "partial head, cleartext");

    // Cleartext, nothing at all (the auto builder waits for the first bytes to choose
    // HTTP/1 or HTTP/2, with no timeout of its own).
    let mut s = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    assert!(closed_by_peer(&mut s).await, "silent, cleartext");

    // Cleartext, a partial HTTP/2 preface.
    let mut s = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(
        closed_by_peer(&mut s).await,
        "partial h2 preface, cleartext"
    );

    // TLS, no handshake.
    let mut s = tokio::net::TcpStream::connect(env.tls_addr())
        .await
        .unwrap();
    assert!(closed_by_peer(&mut s).await, "no TLS handshake");

    // TLS, handshake done, part of a request head.
    let mut s = tls_connect(env.tls_addr(), NAME, &env.ca.cert_pem(), None, false)
        .await
        .unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    s.flush().await.unwrap();
    assert!(closed_by_peer(&mut s).await, "partial head, TLS");

    // The listener is fine afterwards.
    assert_eq!(env.get("/api/ok", false).await.status, 200);
}

/// Sends two requests on one HTTPS connection, then returns the connection's task, which
/// ends when the server closes it, and the request sender, which must be kept (dropping it
/// closes the connection from the client's side).
async fn keep_alive_connection(
    env: &Env,
    h2: bool,
) -> (tokio::task::JoinHandle<()>, Box<dyn Send>) {
    let tls = tls_connect(env.tls_addr(), NAME, &env.ca.cert_pem(), None, h2)
        .await
        .unwrap();
    let io = TokioIo::new(tls);
    let request = || {
        let uri = if h2 {
            "https://localhost/api/ka"
        } else {
            "/api/ka"
        };
        Request::get(uri)
            .header("host", NAME)
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        for _ in 0..2 {
            let resp = sender.send_request(request()).await.unwrap();
            assert_eq!(resp.version(), Version::HTTP_2);
            resp.into_body().collect().await.unwrap();
        }
        (task, Box::new(sender))
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        for _ in 0..2 {
            sender.ready().await.unwrap();
            let resp = sender.send_request(request()).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
        }
        (task, Box::new(sender))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    // The idle timeout, for HTTP/1.1 and HTTP/2.
    let env = Env::start(
        |s| {
            s.header_read_timeout = Duration::from_secs(60);
            s.idle_timeout = Duration::from_secs(1);
        },
        None,
    )
    .await;
    for h2 in [false, true] {
        let (conn, _sender) = keep_alive_connection(&env, h2).await;
        assert!(
            !conn.is_finished(),
            "h2={h2}: kept alive after the requests"
        );
        tokio::time::timeout(DEADLINE, conn)
            .await
            .unwrap_or_else(|_| panic!("h2={h2}: idle connection still open"))
            .unwrap();
    }

    // HTTP/1.1 with a long idle timeout: hyper's header read timeout restarts when a response
    // is done, so it is what closes a keep-alive connection that sends nothing more.
    let env = Env::start(
        |s| {
            s.header_read_timeout = Duration::from_secs(1);
            s.idle_timeout = Duration::from_secs(600);
        },
        None,
    )
    .await;
    let (conn, _sender) = keep_alive_connection(&env, false).await;
    assert!(!conn.is_finished(), "kept alive after the requests");
    tokio::time::timeout(DEADLINE, conn)
        .await
        .expect("idle HTTP/1.1 connection still open")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_still_streaming_is_not_idle() {
    let env = Env::start(|s| s.idle_timeout = Duration::from_millis(500), None).await;
    for h2 in [false, true] {
        let tls = tls_connect(env.tls_addr(), NAME, &env.ca.cert_pem(), None, h2)
            .await
            .unwrap();
        let io = TokioIo::new(tls);
        let req = Request::get(if h2 {
            "https://localhost/api/stream"
        } else {
            "/api/stream"
        })
        .header("host", NAME)
        .body(Empty::<Bytes>::new())
        .unwrap();
        let mut body = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap().into_body()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap().into_body()
        };
        let first = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.into_data().unwrap(), "first\n");
        // Several idle timeouts with the response still open: the connection stays.
        tokio::time::sleep(Duration::from_secs(2)).await;
        env.echo.release.notify_one();
        let rest = tokio::time::timeout(DEADLINE, body.collect())
            .await
            .unwrap()
            .unwrap()
            .to_bytes();
        assert_eq!(rest, "second\n", "h2={h2}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_https_requests_in_flight_finish() {
    let env = Env::start(|_| {}, None).await;
    let Env {
        dir: _dir,
        echo,
        ca,
        _controller,
        proxy,
    } = env;
    let addr = proxy.tls_addr.unwrap();
    let tls = tls_connect(addr, NAME, &ca.cert_pem(), None, true)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://localhost/api/stream")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first\n");

    let stopping = tokio::spawn(proxy.shutdown());
    // New connections are refused once the listener is closed.
    eventually("the listener closes", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(
        !stopping.is_finished(),
        "shutdown waits for the request in flight"
    );
    echo.release.notify_one();
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "second\n");
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .unwrap()
        .unwrap();
}
