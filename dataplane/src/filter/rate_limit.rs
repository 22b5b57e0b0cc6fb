//! Rate limits per (ApiKeyBinding, ApiKey): Kanali error 14.
//!
//! A binding may grant a key `rate: {amount, unit}`. The limit belongs to the (binding, key)
//! pair: every proxy, every ApiProxy using the binding and every revision of the key share one
//! count. [`RateLimits`] (one per proxy process) hands out a [`Limiter`] per [`LimiterId`];
//! [`Limiter::check`] answers each request and [`Decision::write_headers`] renders
//! `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (IETF draft) and, when denied,
//! `Retry-After`.
//!
//! # Windows
//!
//! Fixed windows aligned to the Unix clock: a `SECOND` limit counts from one whole second to
//! the next, `MINUTE` and `HOUR` likewise. `RateLimit-Reset` is the time to the next boundary
//! (rounded up to whole seconds, so at least 1), and every proxy agrees on the windows without
//! talking to the others. Clock skew between proxies only shifts their boundaries by the skew
//! (milliseconds under NTP): a request near a boundary may count in the window before or after.
//! A fixed window lets a client send `amount` at the end of one window and `amount` more at the
//! start of the next; that is the documented meaning of "N per unit", and what Kanali v1 did.
//!
//! # Without Redis: per proxy, exact
//!
//! Each limiter packs (window number, count) into one `AtomicU64` updated by a CAS loop: at
//! most `amount` requests are allowed per window on this proxy, the next one is denied. No lock,
//! allocation or syscall besides reading the wall clock.
//!
//! # With Redis: shared, without a round trip per request
//!
//! Requests are still answered from local atomics; a background task ([`RateLimits::run`])
//! synchronises every `sync_interval` (50 ms) the limiters that saw traffic, found through a
//! bounded lock-free queue they put themselves on (no scan of all limiters). For each, one Lua
//! script call (pipelined with the others) does, for the current window:
//!
//! 1. `INCRBY` the window's count by what this proxy accepted since its last report;
//! 2. replace this proxy's *reservation* in the window's hash of reservations: the share of the
//!    remaining capacity it may use until its next sync. It asks for what its recent demand
//!    (accepted + denied) needs for two intervals (less near the window's end) and gets
//!    `min(want, amount − count − others' reservations, ceil((amount − count) / holders))`,
//!    where holders are the proxies listed in the hash: those that asked for some.
//!
//! So count plus reservations never exceeds `amount`. The suggested alternative, handing every
//! proxy `ceil((amount − count) / proxies)` whatever the others hold, was simulated first (ms
//! steps, Poisson arrivals, staggered syncs): +6 to +15 % per window with 80/10/10 skew, +35 %
//! with three busy proxies. On top of its reservation a proxy may borrow
//! `min(amount / (4·holders), unreserved / holders)` requests, charged at its next report: it
//! absorbs bursts far from the limit and vanishes near it. Simulated for a limit of 100/s with
//! 80/10/10 and uniform loads from 1× to 90× the limit: 100–106 accepted per window (10 for a
//! limit of 10); windows offered less than the limit see under 0.4 % of requests refused. Very
//! small amounts with sparse traffic on many proxies can overshoot by a few requests (each
//! proxy may borrow 1 before its first report).
//!
//! A limiter idle for one interval leaves the hash (releasing its reservation); near a window's
//! end a busy one also reserves its share of the next window, leaving room for the current
//! window's holders, so the first requests of a window are answered from a real reservation. A
//! limiter that reserved nothing for the window (it was idle) starts with `amount /
//! (4·holders)` (holders as last seen, at least 1), reported at its first sync: small enough
//! that all proxies starting at once stay near the limit, large enough that a sparse client is
//! never refused while far under it. A proxy that dies stays listed until the keys expire.
//!
//! Redis keys are `{prefix}{<128-bit SHA-256 of namespace, binding, key name>}:<unit>:<window>:
//! {n|r}` (hashed: bounded length, one Cluster slot per limiter; names are not secrets, and
//! nothing derived from a key's value is used); they expire two windows and a minute after
//! their last write. The amount is not part of the key, so a changed rate keeps the window's
//! count. Redis load: one script call per busy (limiter, proxy) per interval, pipelined.
//!
//! When Redis is unreachable, slow (each call has a timeout) or failing for longer than
//! `max(2 × call_timeout, 5 × sync_interval)` (250 ms by default; shorter blips are bridged by
//! the reservations already held), every proxy enforces the full `amount` on its own until it
//! is back: a warning is logged once per outage and recovery at info; reconnection retries with
//! backoff (100 ms doubling to 2 s). A request is never failed or delayed because of Redis.
//! Counts of the window in progress are reported when Redis returns; if Redis itself
//! restarted, that window's earlier counts are lost and it may overshoot once.

mod sync;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// `RateLimit-Limit`: the amount per window.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`: requests left in the window (across proxies, as last synchronised).
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`: seconds until the window resets.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Dirty limiters waiting for the sync task; past this the task scans every limiter instead.
const DIRTY_QUEUE: usize = 16 * 1024;

/// The unit of a rate, and so the length of its window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
}

impl Unit {
    /// The window length in milliseconds.
    pub const fn window_ms(self) -> u64 {
        match self {
            Unit::Second => 1_000,
            Unit::Minute => 60_000,
            Unit::Hour => 3_600_000,
        }
    }

    /// One letter for Redis keys.
    const fn tag(self) -> &'static str {
        match self {
            Unit::Second => "s",
            Unit::Minute => "m",
            Unit::Hour => "h",
        }
    }
}

/// `amount` requests per `unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Requests allowed per window (the CRD requires ≥ 1; 0 denies everything).
    pub amount: u64,
    /// The window.
    pub unit: Unit,
}

impl Rate {
    /// `amount` per `unit`.
    pub const fn new(amount: u64, unit: Unit) -> Self {
        Rate { amount, unit }
    }
}

/// Whose limit: the binding (namespace and name) and the key's NAME, never its value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LimiterId {
    /// The ApiKeyBinding's namespace.
    pub namespace: Arc<str>,
    /// The ApiKeyBinding's name.
    pub binding: Arc<str>,
    /// The ApiKey's name.
    pub key: Arc<str>,
}

impl LimiterId {
    /// The limiter of `key` under the binding `namespace/binding`.
    pub fn new(
        namespace: impl Into<Arc<str>>,
        binding: impl Into<Arc<str>>,
        key: impl Into<Arc<str>>,
    ) -> Self {
        LimiterId {
            namespace: namespace.into(),
            binding: binding.into(),
            key: key.into(),
        }
    }

    /// 32 hex digits naming this id in Redis. Every proxy version must compute the same, so it
    /// is SHA-256 (not `std`'s hasher), over length-prefixed fields so no two ids collide by
    /// shifting characters between fields.
    fn digest(&self) -> String {
        let mut hash = Sha256::new();
        for field in [&self.namespace, &self.binding, &self.key] {
            hash.update((field.len() as u64).to_be_bytes());
            hash.update(field.as_bytes());
        }
        hash.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Display for LimiterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.binding, self.key)
    }
}

/// Rate limiting settings for one proxy.
#[derive(Clone, Debug, Default)]
pub struct RateLimitConfig {
    /// Share limits across proxies through Redis; `None`: each proxy limits on its own.
    pub redis: Option<RedisConfig>,
}

/// Where and how to share limits.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host[:port][/db]` (plain TCP; no TLS in this build).
    pub url: String,
    /// Prepended to every key.
    pub key_prefix: String,
    /// How often limiters that saw traffic are synchronised.
    pub sync_interval: Duration,
    /// Timeout of each Redis call (connect, script load, one pipeline).
    pub call_timeout: Duration,
    /// This proxy in the reservation hashes; unique per proxy process (the pod name does).
    pub proxy_id: String,
}

impl RedisConfig {
    /// Default [`RedisConfig::key_prefix`].
    pub const DEFAULT_KEY_PREFIX: &str = "kanali:rl:";
    /// Default [`RedisConfig::sync_interval`].
    pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(50);
    /// Default [`RedisConfig::call_timeout`].
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(100);

    /// Defaults for `url`, with a random proxy id (set the pod name instead where known).
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            key_prefix: Self::DEFAULT_KEY_PREFIX.to_owned(),
            sync_interval: Self::DEFAULT_SYNC_INTERVAL,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
            proxy_id: format!("proxy-{:016x}", fastrand::u64(..)),
        }
    }
}

impl fmt::Debug for RedisConfig {
    /// The URL may carry a password: only what follows its `@` is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match self.url.rsplit_once('@') {
            Some((scheme_and_user, host)) => {
                let scheme = scheme_and_user.split_once("://").map_or("", |(s, _)| s);
                format!("{scheme}://***@{host}")
            }
            None => self.url.clone(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &url)
            .field("key_prefix", &self.key_prefix)
            .field("sync_interval", &self.sync_interval)
            .field("call_timeout", &self.call_timeout)
            .field("proxy_id", &self.proxy_id)
            .finish()
    }
}

/// Why a [`RateLimitConfig`] is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// The Redis URL does not parse or asks for something this build lacks (TLS).
    #[error("invalid rate limit Redis URL: {reason}")]
    RedisUrl {
        /// What is wrong (never the URL itself: it may hold a password).
        reason: String,
    },
    /// A duration that must be positive is zero.
    #[error("rate limit Redis {what} must be greater than zero")]
    ZeroDuration {
        /// Which setting.
        what: &'static str,
    },
    /// The proxy id is empty.
    #[error("rate limit Redis proxy id must not be empty")]
    EmptyProxyId,
}

/// The answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed; otherwise answer Kanali error 14 (HTTP 429).
    pub allowed: bool,
    /// The amount per window.
    pub limit: u64,
    /// Requests left in this window (0 when denied).
    pub remaining: u64,
    /// Seconds until the window resets (at least 1).
    pub reset_secs: u64,
    /// When denied: seconds after which a retry may succeed.
    pub retry_after_secs: Option<u64>,
}

impl Decision {
    /// Sets `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` and, when denied,
    /// `Retry-After`. The only allocation is each integer's header value.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RATELIMIT_RESET, HeaderValue::from(self.reset_secs));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

/// Milliseconds since the Unix epoch: the clock windows are aligned to.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// State every limiter of one [`RateLimits`] shares with it and with the sync task.
struct Shared {
    /// Redis is configured (limiters report themselves dirty).
    redis: bool,
    /// Redis answered the last call: limiters use their reservations, not the full amount.
    healthy: AtomicBool,
    /// Limiters with traffic since their last sync, each at most once (see `Limiter::dirty`).
    dirty: ArrayQueue<Weak<Limiter>>,
    /// The queue was full: the sync task must scan every limiter for dirty ones.
    overflow: AtomicBool,
    /// Most reservation holders seen on any limiter: the guess for limiters never synced.
    fleet: AtomicU32,
    /// Numbers limiter instances, so two live limiters of one id keep separate reservations.
    serial: AtomicU64,
    /// Times Redis stayed unreachable past the grace and the limiters fell back to the full
    /// amount on this proxy.
    fallbacks: AtomicU64,
}

/// All limiters of one proxy process.
pub struct RateLimits {
    shared: Arc<Shared>,
    limiters: Mutex<HashMap<LimiterId, Weak<Limiter>>>,
    redis: Option<sync::Redis>,
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimits")
            .field("limiters", &self.len())
            .field("redis", &self.redis.as_ref().map(|r| &r.config))
            .field("shared", &self.is_shared())
            .finish()
    }
}

impl RateLimits {
    /// Checks the configuration; nothing connects until [`RateLimits::run`].
    pub fn new(config: RateLimitConfig) -> Result<Self, RateLimitError> {
        let redis = config.redis.map(sync::Redis::new).transpose()?;
        let shared = Arc::new(Shared {
            redis: redis.is_some(),
            healthy: AtomicBool::new(false),
            // Without Redis nothing is ever queued; `ArrayQueue` needs a capacity of at least 1.
            dirty: ArrayQueue::new(if redis.is_some() { DIRTY_QUEUE } else { 1 }),
            overflow: AtomicBool::new(false),
            fleet: AtomicU32::new(0),
            serial: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        });
        Ok(RateLimits {
            shared,
            limiters: Mutex::new(HashMap::new()),
            redis,
        })
    }

    /// The live limiter of `id`: the same `Arc` while one with the same rate is held anywhere
    /// (so counts survive snapshots), a fresh one when the rate changed. Off the request path.
    pub fn limiter(&self, id: LimiterId, rate: Rate) -> Arc<Limiter> {
        let mut limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(live) = limiters.get(&id).and_then(Weak::upgrade)
            && live.rate == rate
        {
            return live;
        }
        let serial = self.shared.serial.fetch_add(1, Ordering::Relaxed);
        let redis = self
            .redis
            .as_ref()
            .map(|r| r.limiter_keys(&id, rate.unit, serial));
        let limiter = Arc::new_cyclic(|this| Limiter {
            id: id.clone(),
            rate,
            max: u32::try_from(rate.amount).unwrap_or(u32::MAX),
            shared: self.shared.clone(),
            this: this.clone(),
            state: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            grants: [AtomicU64::new(0), AtomicU64::new(0)],
            elsewhere: AtomicU64::new(0),
            holders: AtomicU32::new(0),
            dirty: AtomicBool::new(false),
            redis,
        });
        limiters.insert(id, Arc::downgrade(&limiter));
        limiter
    }

    /// Forgets limiters no table holds any more; returns how many. Call after swapping tables.
    pub fn prune(&self) -> usize {
        let mut limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        let before = limiters.len();
        limiters.retain(|_, l| l.strong_count() > 0);
        before - limiters.len()
    }

    /// Limiters known (live, or dead and not yet pruned).
    pub fn len(&self) -> usize {
        self.limiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// No limiter is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Limits are currently shared through Redis (false without Redis or while it is down).
    pub fn is_shared(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// With Redis configured, whether limits are shared through it now; `None` without.
    pub fn redis_shared(&self) -> Option<bool> {
        self.shared.redis.then(|| self.is_shared())
    }

    /// Times this proxy fell back to enforcing its limits alone, Redis unreachable past the
    /// grace (0 without Redis).
    pub fn redis_fallbacks(&self) -> u64 {
        self.shared.fallbacks.load(Ordering::Relaxed)
    }

    /// Synchronises with Redis until `shutdown` turns true, then releases this proxy's
    /// reservations (best effort). Without Redis it only waits for `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        match &self.redis {
            None => crate::stopped(&mut shutdown).await,
            Some(redis) => sync::run(redis, &self, shutdown).await,
        }
    }

    /// Every live limiter, for the sync task's scan when the dirty queue overflowed.
    fn live(&self) -> Vec<Arc<Limiter>> {
        let limiters = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        limiters.values().filter_map(Weak::upgrade).collect()
    }
}

/// One (binding, key) limit on this proxy. Request path: [`Limiter::check`].
pub struct Limiter {
    id: LimiterId,
    rate: Rate,
    /// `amount`, as enforced: counts are 32-bit (4 billion per window is unlimited in practice).
    max: u32,
    shared: Arc<Shared>,
    /// Itself, so `check(&self)` can queue itself for the sync task without allocating.
    this: Weak<Limiter>,
    /// (window, requests accepted here in it).
    state: AtomicU64,
    /// Requests denied here, ever: with the accepted count, the demand the sync task reserves for.
    denied: AtomicU64,
    /// (window, cap on `state`'s count) set by the sync task, indexed by window parity so the
    /// next window's reservation never overwrites the current one.
    grants: [AtomicU64; 2],
    /// (window, requests used or reserved by the other proxies at the last sync): for
    /// `RateLimit-Remaining`.
    elsewhere: AtomicU64,
    /// Reservation holders at the last sync (0: never synced).
    holders: AtomicU32,
    /// Queued for the sync task (or, after an overflow, waiting for its scan).
    dirty: AtomicBool,
    /// Redis names and the sync task's bookkeeping; `None` without Redis.
    redis: Option<sync::LimiterKeys>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("id", &self.id)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

/// `(window, value)` in one word; windows are compared modulo 2³² (136 years of seconds).
const fn pack(window: u64, value: u32) -> u64 {
    (window << 32) | value as u64
}

const fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// Requests a limiter may accept before it knows more: `amount / (4·holders)`, at least 1.
fn borrow(max: u32, holders: u32) -> u32 {
    let share = u64::from(max) / (4 * u64::from(holders.max(1)));
    u32::try_from(share).unwrap_or(u32::MAX).max(1).min(max)
}

impl Limiter {
    /// Whose limit this is.
    pub fn id(&self) -> &LimiterId {
        &self.id
    }

    /// The rate enforced.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Counts one request now. Lock-free: atomics only, no allocation, no syscall but the
    /// wall clock (a vDSO call).
    pub fn check(&self) -> Decision {
        self.check_at(now_ms())
    }

    /// [`Limiter::check`] at `now_ms` (milliseconds since the Unix epoch).
    pub fn check_at(&self, now_ms: u64) -> Decision {
        let window_ms = self.rate.unit.window_ms();
        let now_window = now_ms / window_ms;
        let shared_view = self.shared.redis && self.shared.healthy.load(Ordering::Relaxed);
        let mut current = self.state.load(Ordering::Acquire);
        let (window, count, allowed) = loop {
            let (state_window, state_count) = unpack(current);
            // A thread that read the clock just before a boundary must not reset the count
            // another thread already started for the next window: it counts in that one.
            let ahead = state_window.wrapping_sub(now_window as u32);
            let (window, count) = match ahead {
                0 => (now_window, state_count),
                1..0x8000_0000 => (now_window + u64::from(ahead), state_count),
                _ => (now_window, 0),
            };
            let cap = if shared_view {
                self.cap(window)
            } else {
                self.max
            };
            if count >= cap {
                break (window, count, false);
            }
            match self.state.compare_exchange_weak(
                current,
                pack(window, count + 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break (window, count + 1, true),
                Err(actual) => current = actual,
            }
        };
        if allowed {
            self.mark_dirty();
        } else {
            self.denied.fetch_add(1, Ordering::Relaxed);
            self.mark_dirty();
        }

        let reset_ms = (window + 1) * window_ms - now_ms;
        let reset_secs = reset_ms.div_ceil(1000);
        let limit = self.rate.amount;
        let elsewhere = if shared_view {
            match unpack(self.elsewhere.load(Ordering::Relaxed)) {
                (w, n) if w == window as u32 => u64::from(n),
                _ => 0,
            }
        } else {
            0
        };
        let used = elsewhere + u64::from(count);
        Decision {
            allowed,
            limit,
            remaining: if allowed {
                limit.saturating_sub(used)
            } else {
                0
            },
            reset_secs,
            // Denied while the shared count has room: this proxy used its reservation and gets
            // more at its next sync (50 ms), so a retry in a second is likely to succeed.
            retry_after_secs: match (allowed, shared_view && used < limit) {
                (true, _) => None,
                (false, true) => Some(1),
                (false, false) => Some(reset_secs),
            },
        }
    }

    /// How many requests this proxy may accept in `window` (Redis reachable).
    fn cap(&self, window: u64) -> u32 {
        let (w, cap) = unpack(self.grants[(window & 1) as usize].load(Ordering::Acquire));
        if w == window as u32 {
            return cap.min(self.max);
        }
        // Nothing reserved for this window yet.
        let holders = match self.holders.load(Ordering::Relaxed) {
            0 => self.shared.fleet.load(Ordering::Relaxed),
            n => n,
        };
        borrow(self.max, holders)
    }

    /// Queues this limiter for the sync task once per sync: one load when already queued.
    fn mark_dirty(&self) {
        if !self.shared.redis
            || self.dirty.load(Ordering::Relaxed)
            || self.dirty.swap(true, Ordering::AcqRel)
        {
            return;
        }
        // Cloning a `Weak` is a counter increment, and the queue is preallocated.
        if self.shared.dirty.push(self.this.clone()).is_err() {
            self.shared.overflow.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests;
