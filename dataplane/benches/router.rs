//! Cost of the per-request route lookup and upstream path rewrite.
//!
//! Route tables look like a real cluster's: `/api/v{1..4}/service-{i}/resource`, every tenth
//! route bound to a virtual host, plus a host-agnostic `/api` that backtracking falls back to.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use kanali_dataplane::route::path::upstream_path;
use kanali_dataplane::route::router::{Router, RouterBuilder};

const VHOST: &str = "api.example.org";
const OTHER_HOST: &str = "gateway.example.org";

fn service_path(i: usize) -> String {
    format!("/api/v{}/service-{i}/resource", i % 4 + 1)
}

/// `n` routes: `/api` and `n - 1` service routes; route `i` is vhost-bound when `i % 10 == 7`.
fn mk_router(n: usize) -> Router<usize> {
    let mut builder = RouterBuilder::new();
    builder.insert("/api", None, 0).ok();
    for i in 1..n {
        let host = (i % 10 == 7).then_some(VHOST);
        builder.insert(&service_path(i), host, i).ok();
    }
    let router = builder.build();
    assert_eq!(router.len(), n);
    router
}

fn bench_lookup(c: &mut Criterion) {
    for n in [10, 10_000] {
        let router = mk_router(n);
        // Pick routes from the middle of the table.
        let base = (n / 10 - 1) / 2 * 10;
        let hit = service_path(base + 5);
        let vhost_hit = service_path(base + 7);
        let backtrack = format!("{}/other/deeper", hit.trim_end_matches("/resource"));
        let vhost_backtrack = format!("{vhost_hit}/x");
        let miss = hit.replacen("/api/", "/apis/", 1);
        let cases: [(&str, &str, &str, Option<usize>); 5] = [
            ("hit_depth4", OTHER_HOST, &hit, Some(base + 5)),
            ("hit_depth4_vhost", VHOST, &vhost_hit, Some(base + 7)),
            ("backtrack_to_depth1", OTHER_HOST, &backtrack, Some(0)),
            (
                "backtrack_past_other_vhost",
                OTHER_HOST,
                &vhost_backtrack,
                Some(0),
            ),
            ("miss", OTHER_HOST, &miss, None),
        ];
        let mut group = c.benchmark_group(format!("lookup/{n}_routes"));
        for (name, host, path, want) in cases {
            assert_eq!(router.lookup(Some(host), path).copied(), want, "{path}");
            group.bench_function(name, |b| {
                b.iter(|| router.lookup(black_box(Some(host)), black_box(path)))
            });
        }
        group.finish();
    }
}

fn bench_upstream_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("upstream_path");
    for (name, source, target, raw) in [
        (
            "strip_prefix",
            "/api/v2/service-5",
            "/",
            "/api/v2/service-5/resource/42",
        ),
        (
            "replace_prefix",
            "/api/v2",
            "/internal/v2",
            "/api/v2/service-5/resource/42",
        ),
        ("root_source", "/", "/car", "/api/v2/service-5/resource/42"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| upstream_path(black_box(source), black_box(target), black_box(raw), 0))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_lookup, bench_upstream_path);
criterion_main!(benches);
