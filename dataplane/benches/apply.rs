//! Cost of applying a routing snapshot, as `e2e/bench/swaps.sh` sends them: 1 001 routes, of
//! which one moves to another upstream and one other changes its path between two updates.
//! It runs off the request path (a blocking thread), but on a proxy pinned to one core it
//! takes its CPU from the requests, so its cost shows in their p99.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kanali_dataplane::table::RouteTable;
use kanali_dataplane::upstream::{UpstreamConfig, Upstreams};
use kanali_proto::v1 as pb;
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
    let snapshots: Vec<pb::Snapshot> = (0..2).map(|s| snapshot(s + 1, 1000)).collect();
    let encoded: Vec<Vec<u8>> = snapshots.iter().map(|s| s.encode_to_vec()).collect();
    let mut current =
        RouteTable::apply(&snapshots[0], &upstreams, None).unwrap_or_else(|e| panic!("{e:?}"));
    let mut group = c.benchmark_group("apply/1001_routes");
    group.bench_function("decode", |b| {
        b.iter(|| pb::Snapshot::decode(black_box(&encoded[1][..])).map(|s| s.routes.len()))
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

criterion_group!(benches, bench_apply);
criterion_main!(benches);
