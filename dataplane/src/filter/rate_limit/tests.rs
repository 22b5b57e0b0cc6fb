//! Window logic runs on an injected clock (`check_at`), so nothing here sleeps.

use std::sync::Barrier;

use super::sync::Request;
use super::*;

/// A whole hour (so also a whole minute and second) since the epoch, in ms.
const T0: u64 = 1_764_000_000_000;

fn mk_local() -> RateLimits {
    RateLimits::new(RateLimitConfig::default()).unwrap()
}

/// Redis configured (nothing listens there) and marked reachable, to drive the shared-mode
/// logic by hand.
fn mk_shared() -> RateLimits {
    let config = RateLimitConfig {
        redis: Some(RedisConfig::new("redis://127.0.0.1:1/0")),
    };
    let limits = RateLimits::new(config).unwrap();
    limits.shared.healthy.store(true, Ordering::Relaxed);
    limits
}

fn mk_id(key: &str) -> LimiterId {
    LimiterId::new("team-a", "gold", key)
}

fn allowed(limiter: &Limiter, now_ms: u64, n: usize) -> usize {
    (0..n).filter(|_| limiter.check_at(now_ms).allowed).count()
}

#[test]
fn local_mode_allows_exactly_amount_then_denies() {
    let limits = mk_local();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(5, Unit::Second));
    let now = T0 + 250;
    for remaining in (0..5).rev() {
        let d = limiter.check_at(now);
        let expected = Decision {
            allowed: true,
            limit: 5,
            remaining,
            reset_secs: 1,
            retry_after_secs: None,
        };
        assert_eq!(d, expected);
    }
    let denied = limiter.check_at(now);
    assert!(!denied.allowed);
    assert_eq!(denied.remaining, 0);
    assert_eq!(denied.reset_secs, 1);
    assert_eq!(denied.retry_after_secs, Some(1));
}

#[test]
fn reset_and_retry_after_count_to_the_next_boundary() {
    let limits = mk_local();
    let minute = limits.limiter(mk_id("m"), Rate::new(3, Unit::Minute));
    // 10.5 s into the minute: 49.5 s left, rounded up.
    assert_eq!(allowed(&minute, T0 + 10_500, 3), 3);
    let d = minute.check_at(T0 + 10_500);
    assert_eq!(
        (d.allowed, d.reset_secs, d.retry_after_secs),
        (false, 50, Some(50))
    );

    let hour = limits.limiter(mk_id("h"), Rate::new(1, Unit::Hour));
    assert!(hour.check_at(T0 + 3_599_000).allowed);
    let d = hour.check_at(T0 + 3_599_001);
    assert_eq!(
        (d.allowed, d.reset_secs, d.retry_after_secs),
        (false, 1, Some(1))
    );
}

#[test]
fn a_new_window_starts_from_zero() {
    let limits = mk_local();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(2, Unit::Second));
    assert_eq!(allowed(&limiter, T0 + 999, 3), 2);
    let d = limiter.check_at(T0 + 1_000);
    assert_eq!((d.allowed, d.remaining, d.reset_secs), (true, 1, 1));
    assert_eq!(allowed(&limiter, T0 + 1_999, 2), 1);
    // Skipping windows also starts afresh.
    assert_eq!(allowed(&limiter, T0 + 60_000, 3), 2);
}

#[test]
fn a_late_clock_read_counts_in_the_newer_window() {
    let limits = mk_local();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(2, Unit::Second));
    assert_eq!(allowed(&limiter, T0 + 1_000, 2), 2);
    // A thread that read the clock just before the boundary must not reset the new count.
    let d = limiter.check_at(T0 + 999);
    assert!(!d.allowed);
    assert_eq!(d.reset_secs, 2);
}

#[test]
fn same_id_and_rate_give_the_same_limiter() {
    let limits = mk_local();
    let rate = Rate::new(10, Unit::Minute);
    let a = limits.limiter(mk_id("alice"), rate);
    let again = limits.limiter(LimiterId::new("team-a", "gold", "alice"), rate);
    assert!(Arc::ptr_eq(&a, &again));
    assert!(!Arc::ptr_eq(&a, &limits.limiter(mk_id("bob"), rate)));

    // A changed rate is a fresh count; asking for it again finds the new one.
    let faster = limits.limiter(mk_id("alice"), Rate::new(20, Unit::Minute));
    assert!(!Arc::ptr_eq(&a, &faster));
    assert!(Arc::ptr_eq(
        &faster,
        &limits.limiter(mk_id("alice"), faster.rate())
    ));
    assert_eq!(faster.id(), &mk_id("alice"));
}

#[test]
fn limiters_nobody_holds_are_pruned() {
    let limits = mk_local();
    let rate = Rate::new(1, Unit::Second);
    let kept = limits.limiter(mk_id("kept"), rate);
    let dropped = limits.limiter(mk_id("dropped"), rate);
    assert!(kept.check_at(T0).allowed);
    drop(dropped);
    assert_eq!(limits.len(), 2);
    assert_eq!(limits.prune(), 1);
    assert_eq!(limits.len(), 1);
    // The count survived: the same limiter is still denying.
    assert!(!limits.limiter(mk_id("kept"), rate).check_at(T0).allowed);
    drop(kept);
    assert_eq!(limits.prune(), 1);
    assert!(limits.is_empty());
}

#[test]
fn headers_render_the_decision() {
    let limits = mk_local();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(2, Unit::Minute));
    let mut headers = HeaderMap::new();
    limiter.check_at(T0 + 15_000).write_headers(&mut headers);
    assert_eq!(headers["ratelimit-limit"], "2");
    assert_eq!(headers["ratelimit-remaining"], "1");
    assert_eq!(headers["ratelimit-reset"], "45");
    assert!(!headers.contains_key("retry-after"));

    limiter.check_at(T0 + 15_000);
    let mut headers = HeaderMap::new();
    limiter.check_at(T0 + 15_000).write_headers(&mut headers);
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert_eq!(headers["retry-after"], "45");
    assert_eq!(headers.len(), 4);
}

#[test]
fn concurrent_checks_never_exceed_the_amount() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 3_000;
    const WINDOWS: u64 = 4;
    let limits = mk_local();
    let limiter = limits.limiter(mk_id("hammer"), Rate::new(1_000, Unit::Second));
    let barrier = Barrier::new(THREADS);
    let per_window: Vec<Vec<usize>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    (0..WINDOWS)
                        .map(|w| {
                            // All threads race inside one window at a time.
                            barrier.wait();
                            allowed(&limiter, T0 + w * 1_000 + 500, PER_THREAD)
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for w in 0..WINDOWS as usize {
        let total: usize = per_window.iter().map(|t| t[w]).sum();
        assert_eq!(total, 1_000, "window {w}");
    }
}

#[test]
fn concurrent_checks_across_a_boundary_stay_within_the_amount() {
    // Threads straddle the boundary at different speeds: whatever they interleave, no
    // window may accept more than the amount.
    let limits = mk_local();
    let limiter = limits.limiter(mk_id("edge"), Rate::new(500, Unit::Second));
    let total: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let limiter = &limiter;
                s.spawn(move || {
                    (0..4_000u64)
                        .filter(|i| limiter.check_at(T0 + 900 + (i * (t + 1)) / 20).allowed)
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    // The clock runs from T0 + 900 into at most T0 + 1 700: two windows.
    assert!(total <= 1_000, "{total}");
}

#[test]
fn shared_mode_starts_small_and_falls_back_to_the_full_amount() {
    let limits = mk_shared();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(100, Unit::Second));
    // Never synced, no other holders known: a quarter of the amount.
    assert_eq!(allowed(&limiter, T0 + 10, 30), 25);
    let d = limiter.check_at(T0 + 10);
    // The shared count has room: this proxy only needs its next sync.
    assert_eq!(d.retry_after_secs, Some(1));
    // Queued once for the sync task, however many requests.
    assert_eq!(limits.shared.dirty.len(), 1);

    // Redis down: each proxy enforces the whole amount itself.
    limits.shared.healthy.store(false, Ordering::Relaxed);
    assert_eq!(allowed(&limiter, T0 + 10, 100), 75);
    assert_eq!(limiter.check_at(T0 + 10).retry_after_secs, Some(1));
}

#[test]
fn a_sync_reply_sets_the_cap() {
    let limits = mk_shared();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(100, Unit::Second));
    assert_eq!(allowed(&limiter, T0 + 10, 30), 25);
    let request = Request::new(limiter.clone(), T0 + 20, 50, false).unwrap();
    // Redis: 25 counted, 40 granted, 30 reserved by others, 2 holders, 5 unreserved left.
    let mut revisit = Vec::new();
    assert!(request.apply(&[25, 40, 30, 2, 5, -1], &limits.shared, &mut revisit));
    assert_eq!(revisit.len(), 1, "holding a reservation");
    // 25 + 40 granted + min(100 / 8, 5 / 2) borrowed.
    assert_eq!(allowed(&limiter, T0 + 30, 100), 42);
    let d = limiter.check_at(T0 + 30);
    // 30 reserved elsewhere + 67 here: 3 may still be free elsewhere.
    assert_eq!(d.retry_after_secs, Some(1));
    assert_eq!(limiter.holders.load(Ordering::Relaxed), 2);
    assert_eq!(limits.shared.fleet.load(Ordering::Relaxed), 2);
    assert!(!request.apply(&[1, 2, 3], &limits.shared, &mut revisit));
}

#[test]
fn a_reservation_for_the_next_window_is_used_when_it_starts() {
    let limits = mk_shared();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(100, Unit::Second));
    assert_eq!(allowed(&limiter, T0 + 960, 10), 10);
    // 40 ms left: the request asks for the next window as well.
    let request = Request::new(limiter.clone(), T0 + 960, 50, false).unwrap();
    let mut revisit = Vec::new();
    assert!(request.apply(&[10, 20, 0, 1, 70, 7], &limits.shared, &mut revisit));
    assert_eq!(allowed(&limiter, T0 + 1_001, 20), 7);
    let d = limiter.check_at(T0 + 1_001);
    assert_eq!((d.allowed, d.reset_secs), (false, 1));
}

#[test]
fn releasing_the_next_window_leaves_it_unreserved() {
    let limits = mk_shared();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(100, Unit::Second));
    let mut revisit = Vec::new();
    assert_eq!(allowed(&limiter, T0 + 940, 10), 10);
    let busy = Request::new(limiter.clone(), T0 + 950, 50, false).unwrap();
    assert!(busy.wants().1.is_some_and(|n| n > 0));
    assert!(busy.apply(&[10, 20, 0, 1, 70, 9], &limits.shared, &mut revisit));
    // Idle at the next sync: both reservations go back.
    let idle = Request::new(limiter.clone(), T0 + 990, 50, false).unwrap();
    assert_eq!(idle.wants(), (0, Some(0)));
    assert!(idle.apply(&[10, 0, 0, 1, 90, 0], &limits.shared, &mut revisit));
    // The next window starts with the unreserved allowance, not a cap of 0.
    assert_eq!(allowed(&limiter, T0 + 1_010, 100), 25);
}

#[test]
fn an_idle_limiter_asks_for_nothing() {
    let limits = mk_shared();
    let limiter = limits.limiter(mk_id("alice"), Rate::new(100, Unit::Second));
    assert_eq!(allowed(&limiter, T0 + 10, 5), 5);
    let first = Request::new(limiter.clone(), T0 + 20, 50, false).unwrap();
    let mut revisit = Vec::new();
    assert!(first.apply(&[5, 10, 0, 1, 85, -1], &limits.shared, &mut revisit));
    let (want, next) = Request::new(limiter.clone(), T0 + 70, 50, false)
        .unwrap()
        .wants();
    assert_eq!((want, next), (0, None));
    // One request in the 100 ms since the last sync: one for the next 100 ms.
    assert!(limiter.check_at(T0 + 80).allowed);
    let busy = Request::new(limiter.clone(), T0 + 120, 50, false).unwrap();
    assert_eq!(busy.wants(), (1, None));
    let releasing = Request::new(limiter.clone(), T0 + 120, 50, true).unwrap();
    assert_eq!(releasing.wants(), (0, None));
}

#[test]
fn borrow_is_a_quarter_share_and_at_least_one() {
    assert_eq!(borrow(100, 3), 8);
    assert_eq!(borrow(100, 0), 25);
    assert_eq!(borrow(3, 3), 1);
    assert_eq!(borrow(0, 1), 0);
    assert_eq!(borrow(u32::MAX, 1), u32::MAX / 4);
}

#[test]
fn redis_keys_are_stable_and_hide_nothing_secret() {
    // Every proxy version must name a limiter the same: this value may never change.
    let id = LimiterId::new("team-a", "gold", "alice");
    assert_eq!(id.digest(), EXPECTED_DIGEST);
    assert_ne!(
        LimiterId::new("team-a", "goldalice", "").digest(),
        id.digest()
    );
    let limits = mk_shared();
    let limiter = limits.limiter(id, Rate::new(1, Unit::Minute));
    let keys = limiter.redis.as_ref().unwrap();
    assert_eq!(keys.base(), format!("kanali:rl:{{{EXPECTED_DIGEST}}}:m:"));
}

/// SHA-256 of the length-prefixed fields, first 16 bytes (checked with Python's hashlib).
const EXPECTED_DIGEST: &str = "53aa0696ed33d6a506a7f3542d1f79e2";

#[test]
fn bad_configurations_are_rejected() {
    let with = |f: fn(&mut RedisConfig)| {
        let mut redis = RedisConfig::new("redis://127.0.0.1:6379/0");
        f(&mut redis);
        RateLimits::new(RateLimitConfig { redis: Some(redis) })
    };
    assert!(with(|_| ()).is_ok());
    let err = with(|r| r.url = "http://user:hunter2@example.org/".into()).unwrap_err();
    assert!(matches!(err, RateLimitError::RedisUrl { .. }), "{err}");
    assert!(!err.to_string().contains("hunter2"));
    // This build has no TLS.
    let err = with(|r| r.url = "rediss://127.0.0.1:6379".into()).unwrap_err();
    assert!(matches!(err, RateLimitError::RedisUrl { .. }), "{err}");
    let err = with(|r| r.sync_interval = Duration::ZERO).unwrap_err();
    assert!(matches!(err, RateLimitError::ZeroDuration { .. }));
    let err = with(|r| r.call_timeout = Duration::ZERO).unwrap_err();
    assert!(matches!(err, RateLimitError::ZeroDuration { .. }));
    let err = with(|r| r.proxy_id.clear()).unwrap_err();
    assert!(matches!(err, RateLimitError::EmptyProxyId));
}

#[test]
fn debug_output_hides_the_redis_password() {
    let redis = RedisConfig::new("redis://default:hunter2@redis.kanali:6379/0");
    let shown = format!("{redis:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("redis://***@redis.kanali:6379/0"), "{shown}");
}
