//! Rate limits shared through a real `redis-server` (Debian's package) on 127.0.0.1.
//!
//! Three `RateLimits` with their own proxy ids stand for three proxies sharing one key's
//! limit of 100/second; 80 % of the offered 1 500 req/s go to the first. The run covers:
//! sharing (10 windows), Redis killed (each proxy enforces 100/s alone, no check ever waits),
//! and Redis restarted on the same port (sharing resumes). About 25 s.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a failed expect is a failed test

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kanali_dataplane::filter::rate_limit::{
    Limiter, LimiterId, Rate, RateLimitConfig, RateLimits, RedisConfig, Unit, now_ms,
};
use kanali_e2e::redis::RedisServer;
use tokio::sync::watch;

const LIMIT: u64 = 100;
/// Requests per second offered to each proxy: 80 / 10 / 10 % of 1 500.
const OFFERED: [u64; 3] = [1_200, 150, 150];

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Accepted requests per window, per proxy.
#[derive(Default)]
struct Tally {
    accepted: BTreeMap<u64, [u64; 3]>,
    slowest_check: Duration,
}

impl Tally {
    fn windows(&self, from: u64, count: u64) -> Vec<[u64; 3]> {
        (from..from + count)
            .map(|w| self.accepted.get(&w).copied().unwrap_or_default())
            .collect()
    }
}

/// Offers `OFFERED` to the three limiters until `until_ms` (wall clock) in small batches.
async fn drive(limiters: &[Arc<Limiter>; 3], until_ms: u64, tally: &mut Tally) {
    let start = Instant::now();
    let mut sent = [0u64; 3];
    while now_ms() < until_ms {
        let elapsed = start.elapsed().as_micros() as u64;
        for (i, limiter) in limiters.iter().enumerate() {
            let due = OFFERED[i] * elapsed / 1_000_000;
            while sent[i] < due {
                sent[i] += 1;
                let window = now_ms() / 1_000;
                let t = Instant::now();
                let decision = limiter.check();
                tally.slowest_check = tally.slowest_check.max(t.elapsed());
                if decision.allowed {
                    tally.accepted.entry(window).or_default()[i] += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn wait_shared(proxies: &[Arc<RateLimits>], shared: bool, within: Duration) {
    let deadline = Instant::now() + within;
    while proxies.iter().any(|p| p.is_shared() != shared) {
        assert!(
            Instant::now() < deadline,
            "proxies never became shared={shared}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sleeps until `ms` past the next whole second; returns that second's window number.
async fn next_window(ms: u64) -> u64 {
    let now = now_ms();
    let window = now / 1_000 + 1;
    tokio::time::sleep(Duration::from_millis(window * 1_000 + ms - now)).await;
    window
}

/// Collects log lines so the test can count the outage messages.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf)?;
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn count(&self, needle: &str) -> usize {
        let logs = self.0.lock().expect("log buffer");
        String::from_utf8_lossy(&logs).matches(needle).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_share_a_limit_through_redis() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().expect("temporary directory");
    let port = free_port();
    let mut redis = Some(RedisServer::start(port, dir.path()));
    let url = format!("redis://127.0.0.1:{port}/0");

    let (stop, stopped) = watch::channel(false);
    let mut proxies = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut config = RedisConfig::new(url.clone());
        config.proxy_id = format!("proxy-{i}");
        let limits = RateLimits::new(RateLimitConfig {
            redis: Some(config),
        })
        .expect("valid configuration");
        let limits = Arc::new(limits);
        tasks.push(tokio::spawn(limits.clone().run(stopped.clone())));
        proxies.push(limits);
    }
    let rate = Rate::new(LIMIT, Unit::Second);
    let limiter = |i: usize| proxies[i].limiter(LimiterId::new("team-a", "gold", "alice"), rate);
    let limiters = [limiter(0), limiter(1), limiter(2)];
    wait_shared(&proxies, true, Duration::from_secs(5)).await;

    // 1. Shared: ten whole windows with skewed load.
    let mut tally = Tally::default();
    let first = next_window(0).await;
    drive(&limiters, (first + 10) * 1_000, &mut tally).await;
    let windows = tally.windows(first, 10);
    let total: u64 = windows.iter().flatten().sum();
    eprintln!("shared: accepted {total} in 10 s (limit 1000); per window {windows:?}");
    assert!(
        (900..=1_100).contains(&total),
        "accepted {total}, want 1000 ± 10 %"
    );

    // 2. Redis killed: every proxy enforces the limit alone, and no check waits for Redis.
    drop(redis.take());
    let killed = now_ms();
    let mut tally = Tally::default();
    // Proxies bridge the first 250 ms with their reservations, then fall back.
    let first = (killed + 600) / 1_000 + 1;
    drive(&limiters, (first + 3) * 1_000, &mut tally).await;
    assert!(proxies.iter().all(|p| !p.is_shared()));
    let windows = tally.windows(first, 3);
    eprintln!(
        "Redis down: per window and proxy {windows:?}; slowest check() {:?}",
        tally.slowest_check
    );
    for window in &windows {
        for &accepted in window {
            assert!((90..=LIMIT).contains(&accepted), "{windows:?}");
        }
    }
    // check() is synchronous; anything near the 100 ms Redis timeout would be a stall.
    assert!(
        tally.slowest_check < Duration::from_millis(50),
        "check() took {:?}",
        tally.slowest_check
    );

    // 3. Redis back on the same port: sharing resumes.
    let restarted = Instant::now();
    redis = Some(RedisServer::start(port, dir.path()));
    wait_shared(&proxies, true, Duration::from_secs(5)).await;
    eprintln!("shared again {:?} after the restart", restarted.elapsed());
    let mut tally = Tally::default();
    let first = next_window(0).await;
    drive(&limiters, (first + 3) * 1_000, &mut tally).await;
    let windows = tally.windows(first, 3);
    let total: u64 = windows.iter().flatten().sum();
    eprintln!("shared again: accepted {total} in 3 s; per window {windows:?}");
    assert!(
        (270..=330).contains(&total),
        "accepted {total}, want 300 ± 10 %"
    );

    let _ = stop.send(true);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("sync task stops on shutdown")
            .expect("sync task did not panic");
    }
    drop(redis);

    // One warning per proxy for the whole outage, one recovery notice each.
    assert_eq!(
        logs.count("rate limits are per proxy until Redis is back"),
        3
    );
    assert_eq!(logs.count("Redis is back: rate limits are shared"), 3);
}
