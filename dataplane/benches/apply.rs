//! Cost of applying a routing snapshot, as `e2e/bench/swaps.sh` sends them: 1 001 routes, of
//! which one moves to another upstream and one other changes its path between two updates.
//! It runs off the request path (a blocking thread), but on a proxy pinned to one core it
//! takes its CPU from the requests, so its cost shows in their p99.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kanali_dataplane::route::table::RouteTable;
use kanali_dataplane::upstream::{UpstreamConfig, Upstreams};
use kanali_proto::v1 as pb;
use kanali_proto::view;
use prost::Message as _;

fn route(name: &str, path: &str, port: u16) -> pb::Route {
    pb::Route {
        source: Some(pb::ResourceRef {
            kind: "ApiProxy".into(),
            namespace: "bench".into(),
            name: name.into(),
            ..Default::default()
        }),
        path: path.into(),
        target_path: "/".into(),
        backend: Some(pb::route::Backend::Endpoint(pb::Endpoint {
            scheme: "http".into(),
            authority: format!("127.0.0.1:{port}"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The snapshot of swap `step`, as the controller would send it.
fn snapshot(step: usize, extra: usize) -> pb::Snapshot {
    let changed = step % extra;
    let mut routes: Vec<pb::Route> = (0..extra)
        .map(|i| {
            let path = if i == changed {
                format!("/r{i}-{step}")
            } else {
                format!("/r{i}")
            };
            route(&format!("r{i}"), &path, 18080)
        })
        .collect();
    routes.push(route(
        "api",
        "/api",
        if step.is_multiple_of(2) { 18080 } else { 18090 },
    ));
    routes.sort_by(|a, b| (&a.path, &a.virtual_host).cmp(&(&b.path, &b.virtual_host)));
    pb::Snapshot {
        version: format!("v{step}"),
        routes_version: format!("r{step}"),
        routes,
        ..Default::default()
    }
}

fn bench_apply(c: &mut Criterion) {
    let upstreams = Upstreams::new(UpstreamConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let sent: Vec<pb::Snapshot> = (0..2).map(|s| snapshot(s + 1, 1000)).collect();
    let encoded: Vec<Vec<u8>> = sent.iter().map(|s| s.encode_to_vec()).collect();
    let snapshots: Vec<view::Snapshot> = sent.iter().map(Into::into).collect();
    let mut current =
        RouteTable::apply(&snapshots[0], &upstreams, None).unwrap_or_else(|e| panic!("{e:?}"));
    let mut group = c.benchmark_group("apply/1001_routes");
    // What the proxy decodes when it arrives: the routes stay encoded (`kanali_proto::view`).
    group.bench_function("decode", |b| {
        b.iter(|| view::Snapshot::decode(black_box(&encoded[1][..])).map(|s| s.routes.len()))
    });
    // What it decoded before, every route.
    group.bench_function("decode_every_route", |b| {
        b.iter(|| pb::Snapshot::decode(black_box(&encoded[1][..])).map(|s| s.routes.len()))
    });
    // A proxy's first snapshot: nothing to reuse.
    group.bench_function("apply_first", |b| {
        b.iter(|| RouteTable::apply(&snapshots[0], &upstreams, None).map(|t| t.router.len()))
    });
    let mut step = 0;
    group.bench_function("apply_one_route_changed", |b| {
        b.iter(|| {
            step += 1;
            let next = RouteTable::apply(&snapshots[step % 2], &upstreams, Some(&current))
                .unwrap_or_else(|e| panic!("{e:?}"));
            // The old table is dropped here too, as when the proxy swaps.
            current = next;
        })
    });
    group.finish();
}

/// The proxy's once-a-second upkeep of its upstream pools, on a blocking thread:
/// `Upstreams::prune` (every 10th second, and at each update) over many pools, and
/// `Upstreams::sweep` over one pool holding its 256 idle connections (real ones, on
/// loopback) — it visits only the pools with idle connections.
fn bench_sweep(c: &mut Criterion) {
    let mut group = c.benchmark_group("upkeep");
    for pools in [10_000, 50_000] {
        let upstreams = Upstreams::new(UpstreamConfig::default()).unwrap_or_else(|e| panic!("{e}"));
        let held: Vec<_> = (0..pools)
            .map(|i| {
                let authority = format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255);
                upstreams
                    .endpoint(false, &authority, None)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        group.bench_function(format!("prune_{pools}_pools"), |b| {
            b.iter(|| upstreams.prune())
        });
        group.bench_function(format!("sweep_{pools}_pools_none_idle"), |b| {
            b.iter(|| upstreams.sweep())
        });
        drop(held);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let upstreams = Upstreams::new(UpstreamConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let pool = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let mut buf = [0u8; 1024];
                    // One request per read is enough for these GETs.
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let pool = upstreams
            .endpoint(false, &addr.to_string(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        // 256 at once: each takes its own connection, and all go back idle.
        let sends = (0..256).map(|_| {
            let req = http::Request::get("/")
                .header("host", "bench")
                .body(kanali_dataplane::body::RequestBody::complete(None))
                .unwrap_or_else(|e| panic!("{e}"));
            let sent = pool.send(req, None, None);
            async move {
                use http_body_util::BodyExt as _;
                let (resp, _) = sent.await.unwrap_or_else(|e| panic!("{e}"));
                resp.into_body().collect().await.map(|_| ())
            }
        });
        for done in futures_util::future::join_all(sends).await {
            done.unwrap_or_else(|e| panic!("{e}"));
        }
        pool
    });
    let _inside = rt.enter();
    group.bench_function("sweep_one_pool_256_idle", |b| {
        b.iter(|| assert_eq!(upstreams.sweep(), 0))
    });
    group.finish();
    drop(pool);
}

criterion_group!(benches, bench_apply, bench_sweep);
criterion_main!(benches);
