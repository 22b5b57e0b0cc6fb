//! Thread per core (`Workers::PerCore`, what `kanali-proxy` runs by default), with a real
//! proxy and a real echo upstream on 127.0.0.1: every worker serves the connections the
//! kernel hands its socket, keeps upstream connections of its own, and ends with the proxy;
//! an address in use fails start-up, although the workers' sockets share theirs.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "proxy_upstreams/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use harness::{detached_proxy_config, echo, endpoint, material, route, snapshot, tls_echo};
use kanali_dataplane::route::table::RouteTable;
use kanali_dataplane::shutdown::ShutdownConfig;
use kanali_dataplane::upstream::Upstreams;
use kanali_dataplane::workers::Workers;
use kanali_dataplane::{RunningProxy, StartError};
use kanali_e2e::Echo;
use kanali_e2e::check::{DEADLINE, read_until_closed};
use kanali_e2e::tls::Ca;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

/// The tests here count the process's worker threads: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Env {
    proxy: RunningProxy,
    echo: Echo,
    _upstreams: Upstreams,
}

/// A proxy with `workers` workers, routing `/api` to an echo upstream.
async fn start(workers: usize) -> Env {
    let proxy = kanali_dataplane::start(kanali_dataplane::ProxyConfig {
        workers: Workers::PerCore(workers),
        ..detached_proxy_config("workers")
    })
    .await
    .unwrap();
    let echo = echo("echo").await;
    // Pools as the proxy's own registry makes them: one idle queue per worker.
    let upstreams = Upstreams::for_workers(Default::default(), workers).unwrap();
    let routes = vec![route("/api", endpoint("http", &echo.addr.to_string(), ""))];
    let table = RouteTable::apply(
        &(&snapshot("v1", routes, vec![], vec![])).into(),
        &upstreams,
        None,
    )
    .unwrap();
    proxy.tables.store(Some(Arc::new(table)));
    Env {
        proxy,
        echo,
        _upstreams: upstreams,
    }
}

/// `GET path` on a connection of its own, with `headers` (lines ending in CRLF); the answer.
async fn get(addr: SocketAddr, path: String, headers: &'static str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n{headers}\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::timeout(DEADLINE, read_until_closed(&mut s))
        .await
        .expect("the proxy answers and closes")
}

/// Threads of this process named as workers.
fn worker_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("kanali-worker-"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_serves_and_reuses_upstream_connections_of_its_own() {
    let _serial = SERIAL.lock().await;
    let env = start(2).await;
    assert_eq!(worker_threads(), 2);
    // One request per connection, one at a time: the kernel spreads the connections over the
    // two sockets (all 32 on one has odds of 2^-31).
    for i in 0..32 {
        let answer = get(env.proxy.addr, format!("/api/{i}"), "").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    }
    assert_eq!(env.echo.hits.load(Ordering::SeqCst), 32);
    // One upstream connection per worker: each worker took connections (else one), and
    // each reused the connection it opened, kept apart from the other's (else up to 32).
    assert_eq!(env.echo.connections.load(Ordering::SeqCst), 2);
    env.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_multiplexes_over_an_http2_connection_of_its_own() {
    let _serial = SERIAL.lock().await;
    let ca = Ca::new("ca");
    let h2 = tls_echo(&ca, &["127.0.0.1"], None, &["h2"]).await;
    let env = start(2).await;
    let upstreams = Upstreams::for_workers(Default::default(), 2).unwrap();
    let routes = vec![route(
        "/h2",
        endpoint("https", &h2.addr.to_string(), "shop/ca#1"),
    )];
    let materials = vec![material("shop/ca#1", Some(&ca), None)];
    let table = RouteTable::apply(
        &(&snapshot("v2", routes, materials, vec![])).into(),
        &upstreams,
        None,
    )
    .unwrap();
    env.proxy.tables.store(Some(Arc::new(table)));
    for i in 0..32 {
        let answer = get(env.proxy.addr, format!("/h2/{i}"), "").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.contains("HTTP/2.0"), "over HTTP/2: {answer}");
    }
    assert_eq!(h2.hits.load(Ordering::SeqCst), 32);
    // One HTTP/2 connection per worker, each driven by the worker that sends on it (one for
    // all: 1).
    assert_eq!(h2.connections.load(Ordering::SeqCst), 2);
    env.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_workers_finish_their_requests_then_ends_their_threads() {
    let _serial = SERIAL.lock().await;
    let env = start(2).await;
    let addr = env.proxy.addr;
    assert_eq!(worker_threads(), 2);
    // Requests in flight on both workers (most likely) when the listeners close.
    let slow: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(get(
                addr,
                format!("/api/slow/{i}"),
                "x-echo-delay-ms: 1500\r\n",
            ))
        })
        .collect();
    kanali_e2e::check::eventually("the slow requests reach the upstream", || async {
        env.echo.hits.load(Ordering::SeqCst) == 8
    })
    .await;
    let stopping = tokio::spawn(env.proxy.shutdown_gracefully(ShutdownConfig {
        delay: Duration::ZERO,
        drain_timeout: Duration::from_secs(20),
    }));
    kanali_e2e::check::eventually("every worker's listener closes", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    for request in slow {
        let answer = request.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    }
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("shutdown ends once nothing is in flight")
        .unwrap();
    // Joined; the kernel may list a thread for a moment after that.
    kanali_e2e::check::eventually("the worker threads end with the proxy", || async {
        worker_threads() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_fails_start_up_although_workers_share_theirs() {
    let _serial = SERIAL.lock().await;
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = detached_proxy_config("taken");
    config.workers = Workers::PerCore(2);
    config.listen = taken.local_addr().unwrap();
    let failed = kanali_dataplane::start(config.clone()).await;
    assert!(
        matches!(
            failed,
            Err(StartError::Bind {
                what: "traffic",
                ..
            })
        ),
        "a plain listener's port"
    );
    // Another proxy with workers: its sockets allow sharing, this one's first bind does not.
    drop(taken);
    let first = start(2).await;
    config.listen = first.proxy.addr;
    let failed = kanali_dataplane::start(config).await;
    assert!(
        matches!(
            failed,
            Err(StartError::Bind {
                what: "traffic",
                ..
            })
        ),
        "a running proxy's port"
    );
    first.proxy.shutdown().await;
    // A failed start leaves no thread behind.
    kanali_e2e::check::eventually("no worker thread is left", || async {
        worker_threads() == 0
    })
    .await;
}
