//! Cost of `Limiter::check()` on the request path, one thread: allowed, denied, with the Redis
//! bookkeeping (the sync task not running, so the limiter stays queued as between two syncs),
//! and `check_at` without reading the clock. Plus rendering the headers.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use kanali_dataplane::filter::rate_limit::{
    LimiterId, Rate, RateLimitConfig, RateLimits, RedisConfig, Unit, now_ms,
};

fn bench_check(c: &mut Criterion) {
    let id = || LimiterId::new("team-a", "gold", "alice");
    let Ok(local) = RateLimits::new(RateLimitConfig::default()) else {
        return;
    };
    let redis = RateLimitConfig {
        redis: Some(RedisConfig::new("redis://127.0.0.1:6379/0")),
    };
    let Ok(shared) = RateLimits::new(redis) else {
        return;
    };

    let mut group = c.benchmark_group("rate_limit");
    // Never reaches its amount within a second of benchmarking.
    let open = local.limiter(id(), Rate::new(u64::from(u32::MAX), Unit::Second));
    group.bench_function("check_allowed", |b| b.iter(|| black_box(open.check())));
    let now = now_ms();
    group.bench_function("check_at_allowed", |b| {
        b.iter(|| black_box(open.check_at(black_box(now))))
    });

    let closed = local.limiter(
        LimiterId::new("team-a", "gold", "bob"),
        Rate::new(1, Unit::Hour),
    );
    group.bench_function("check_denied", |b| b.iter(|| black_box(closed.check())));

    let queued = shared.limiter(id(), Rate::new(u64::from(u32::MAX), Unit::Second));
    group.bench_function("check_redis_configured", |b| {
        b.iter(|| black_box(queued.check()))
    });

    let decision = closed.check();
    group.bench_function("write_headers_denied", |b| {
        b.iter(|| {
            let mut headers = HeaderMap::new();
            black_box(&decision).write_headers(&mut headers);
            headers
        })
    });
    group.finish();
}

criterion_group!(benches, bench_check);
criterion_main!(benches);
