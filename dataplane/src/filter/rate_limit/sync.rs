//! The Redis side of [`super`]: the task that reports each busy limiter's count and renews its
//! reservation, one pipelined script call per limiter per sync interval, and falls back to
//! per-proxy limits while Redis cannot be reached.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior, timeout};

use super::{
    Limiter, LimiterId, RateLimitError, RateLimits, RedisConfig, Shared, Unit, borrow, now_ms,
    pack, unpack,
};

/// Reports a limiter's count and replaces its reservations (see the module doc of [`super`]).
///
/// KEYS: count and reservations of the window, then of the next window.
/// ARGV: member, count to add, want, want for the next window (-1: none), amount, TTL (s).
/// Returns: count, grant, others' reservations, holders (proxies listed as wanting some, the
/// caller included), unreserved after the grant, next window's grant (-1: not asked).
const SCRIPT: &str = r"
local function reserve(res_key, used, member, want, amount, ttl, min_holders)
  redis.call('HDEL', res_key, member)
  local held = redis.call('HVALS', res_key)
  local others = 0
  for i = 1, #held do others = others + tonumber(held[i]) end
  local holders = math.max(#held + 1, min_holders)
  local capacity = math.max(amount - used, 0)
  local free = math.max(capacity - others, 0)
  local grant = math.max(math.min(want, free, math.ceil(capacity / holders)), 0)
  -- A proxy that wants something stays listed, even with nothing granted, so it counts as a
  -- holder in everyone's fair share; one that wants nothing leaves.
  if want > 0 then
    redis.call('HSET', res_key, member, grant)
    redis.call('EXPIRE', res_key, ttl)
  end
  return grant, others, holders, free - grant
end
local amount, ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local used = redis.call('INCRBY', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ttl)
local grant, others, holders, free = reserve(KEYS[2], used, ARGV[1], tonumber(ARGV[3]), amount, ttl, 1)
local next_grant = -1
if tonumber(ARGV[4]) >= 0 then
  local next_used = tonumber(redis.call('GET', KEYS[3]) or '0')
  -- Whoever reserves first for the next window must leave room for this window's holders.
  next_grant = reserve(KEYS[4], next_used, ARGV[1], tonumber(ARGV[4]), amount, ttl, holders)
end
return {used, grant, others, holders, free, next_grant}
";

/// Script calls per pipeline (each pipeline has the call timeout).
const PIPELINE: usize = 256;
/// Reconnection backoff bounds.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A checked Redis configuration.
pub(super) struct Redis {
    pub(super) config: RedisConfig,
    client: redis::Client,
}

impl Redis {
    pub(super) fn new(config: RedisConfig) -> Result<Self, RateLimitError> {
        if config.sync_interval.is_zero() {
            return Err(RateLimitError::ZeroDuration {
                what: "sync interval",
            });
        }
        if config.call_timeout.is_zero() {
            return Err(RateLimitError::ZeroDuration {
                what: "call timeout",
            });
        }
        if config.proxy_id.is_empty() {
            return Err(RateLimitError::EmptyProxyId);
        }
        // redis-rs' parse errors name the problem, never the URL's password.
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| RateLimitError::RedisUrl {
                reason: e.to_string(),
            })?;
        Ok(Redis { config, client })
    }

    pub(super) fn limiter_keys(&self, id: &LimiterId, unit: Unit, serial: u64) -> LimiterKeys {
        LimiterKeys {
            base: format!(
                "{}{{{}}}:{}:",
                self.config.key_prefix,
                id.digest(),
                unit.tag()
            )
            .into(),
            member: format!("{}/{serial}", self.config.proxy_id).into(),
            book: Mutex::new(Book::default()),
        }
    }
}

/// A limiter's Redis names and the sync task's notes about it.
pub(super) struct LimiterKeys {
    /// `{prefix}{<digest>}:<unit>:`; the window number and `n` or `r` follow.
    base: Box<str>,
    /// This limiter instance in reservation hashes.
    member: Box<str>,
    /// Only the sync task locks it, never the request path.
    book: Mutex<Book>,
}

impl LimiterKeys {
    #[cfg(test)]
    pub(super) fn base(&self) -> &str {
        &self.base
    }
}

/// What the last successful sync of a limiter reported and reserved.
#[derive(Default)]
struct Book {
    window: u64,
    /// Requests of `window` already added to its Redis count.
    reported: u32,
    /// `Limiter::denied` then.
    denied: u64,
    /// When (ms since the epoch); 0: never.
    at_ms: u64,
    /// Listed in the reservations of `window + 1` too (asked for some of it).
    next: bool,
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected script reply")]
    Reply,
}

/// Runs rounds every sync interval until shutdown, then releases what this proxy reserved.
pub(super) async fn run(redis: &Redis, limits: &RateLimits, mut shutdown: watch::Receiver<bool>) {
    let mut syncer = Syncer {
        redis,
        limits,
        conn: None,
        retry_at: Instant::now(),
        backoff: FIRST_BACKOFF,
        grace: (2 * redis.config.call_timeout).max(5 * redis.config.sync_interval),
        connected: false,
        failing_since: None,
        last_error: String::new(),
        fallen_back: false,
        rescan: false,
        revisit: Vec::new(),
    };
    let mut tick = tokio::time::interval(redis.config.sync_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = crate::stopped(&mut shutdown) => break,
            _ = tick.tick() => {}
        }
        syncer.round(now_ms(), false).await;
    }
    // Hand this proxy's reservations back so the other proxies can use them at once.
    if syncer.conn.is_some() {
        syncer.round(now_ms(), true).await;
    }
}

struct Syncer<'a> {
    redis: &'a Redis,
    limits: &'a RateLimits,
    /// The connection and the script's SHA1 on it.
    conn: Option<(MultiplexedConnection, String)>,
    retry_at: Instant,
    backoff: Duration,
    /// How long failures are bridged with the reservations held before falling back.
    grace: Duration,
    /// Redis answered at least once.
    connected: bool,
    /// First failure of the current streak.
    failing_since: Option<Instant>,
    last_error: String,
    /// Per-proxy limits are in force (and the warning was logged) for the current outage.
    fallen_back: bool,
    /// Dirty limiters were dropped from the queue: scan for them once Redis answers.
    rescan: bool,
    /// Limiters holding a reservation: synced next round even without traffic, to release it.
    revisit: Vec<Weak<Limiter>>,
}

impl Syncer<'_> {
    fn shared(&self) -> &Shared {
        &self.limits.shared
    }

    async fn round(&mut self, now_ms: u64, releasing: bool) {
        if self.conn.is_none() {
            if Instant::now() < self.retry_at {
                self.fall_back_after_grace();
                self.drop_queue();
                return;
            }
            match self.connect().await {
                Ok(conn) => {
                    self.conn = Some(conn);
                    self.up();
                }
                Err(error) => {
                    self.down(&error);
                    self.drop_queue();
                    return;
                }
            }
        }

        let interval_ms = u64::try_from(self.redis.config.sync_interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let requests: Vec<Request> = self
            .collect()
            .into_iter()
            .filter_map(|l| Request::new(l, now_ms, interval_ms, releasing))
            .collect();
        let call_timeout = self.redis.config.call_timeout;
        let shared = &self.limits.shared;
        let mut failed = None;
        for (i, chunk) in requests.chunks(PIPELINE).enumerate() {
            let Some((conn, sha)) = self.conn.as_mut() else {
                break;
            };
            let mut pipe = redis::pipe();
            for request in chunk {
                request.add_to(&mut pipe, sha);
            }
            let reply = timeout(call_timeout, pipe.query_async::<Vec<Vec<i64>>>(conn)).await;
            let applied = match reply {
                Err(_) => Err(SyncError::Timeout(call_timeout)),
                Ok(Err(e)) => Err(SyncError::Redis(e)),
                Ok(Ok(replies)) => (replies.len() == chunk.len()
                    && chunk
                        .iter()
                        .zip(&replies)
                        .all(|(request, reply)| request.apply(reply, shared, &mut self.revisit)))
                .then_some(())
                .ok_or(SyncError::Reply),
            };
            if let Err(error) = applied {
                failed = Some((i, error));
                break;
            }
        }
        if let Some((chunk, error)) = failed {
            // Unreported traffic is found again by the scan after reconnecting.
            for request in &requests[chunk * PIPELINE..] {
                request.limiter.dirty.store(true, Ordering::SeqCst);
            }
            self.conn = None;
            self.down(&error);
        }
    }

    async fn connect(&self) -> Result<(MultiplexedConnection, String), SyncError> {
        let t = self.redis.config.call_timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(t))
            .set_response_timeout(Some(t));
        let connecting = self
            .redis
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let mut conn = timeout(t, connecting)
            .await
            .map_err(|_| SyncError::Timeout(t))??;
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(SCRIPT);
        let sha = timeout(t, load.query_async::<String>(&mut conn))
            .await
            .map_err(|_| SyncError::Timeout(t))??;
        Ok((conn, sha))
    }

    fn up(&mut self) {
        self.shared().healthy.store(true, Ordering::Relaxed);
        self.backoff = FIRST_BACKOFF;
        self.rescan = true;
        let down_for = self
            .failing_since
            .take()
            .map_or(Duration::ZERO, |s| s.elapsed());
        if !self.connected {
            tracing::info!("connected to Redis: rate limits are shared across proxies");
        } else if self.fallen_back {
            tracing::info!(
                ?down_for,
                "Redis is back: rate limits are shared across proxies again"
            );
        } else {
            tracing::debug!(?down_for, "Redis answers again");
        }
        self.connected = true;
        self.fallen_back = false;
    }

    fn down(&mut self, error: &SyncError) {
        self.failing_since.get_or_insert_with(Instant::now);
        self.last_error = error.to_string();
        tracing::debug!(%error, "Redis call failed");
        // ±20 % jitter keeps a fleet of proxies from reconnecting in lockstep.
        let jitter = 0.8 + 0.4 * fastrand::f64();
        self.retry_at = Instant::now() + self.backoff.mul_f64(jitter);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.fall_back_after_grace();
    }

    /// A failure streak longer than the grace (or before Redis ever answered) switches every
    /// limiter to the full amount on this proxy: shorter blips (a slow call, a reconnect) are
    /// bridged by the reservations already held, which stay valid in Redis meanwhile.
    fn fall_back_after_grace(&mut self) {
        let Some(since) = self.failing_since else {
            return;
        };
        if self.fallen_back || (self.connected && since.elapsed() < self.grace) {
            return;
        }
        self.fallen_back = true;
        self.shared().healthy.store(false, Ordering::Relaxed);
        self.shared().fallbacks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %self.last_error,
            "Redis is unreachable: rate limits are per proxy until Redis is back"
        );
    }

    /// While Redis is down the queue is emptied but the limiters stay marked dirty.
    fn drop_queue(&mut self) {
        while self.shared().dirty.pop().is_some() {}
        self.rescan = true;
    }

    /// Limiters to sync this round, each once, unmarked dirty before their state is read.
    fn collect(&mut self) -> Vec<Arc<Limiter>> {
        let shared = &self.limits.shared;
        let mut batch: Vec<Arc<Limiter>> = Vec::new();
        while let Some(limiter) = shared.dirty.pop() {
            batch.extend(limiter.upgrade());
        }
        if shared.overflow.swap(false, Ordering::AcqRel) | std::mem::take(&mut self.rescan) {
            let live = self.limits.live().into_iter();
            batch.extend(live.filter(|l| l.dirty.load(Ordering::SeqCst)));
        }
        batch.extend(self.revisit.drain(..).filter_map(|l| l.upgrade()));
        batch.sort_unstable_by_key(|l| Arc::as_ptr(l) as usize);
        batch.dedup_by_key(|l| Arc::as_ptr(l) as usize);
        for limiter in &batch {
            // SeqCst pairs with the request path's CAS and `dirty` load: either this round
            // reads its count, or the request queues the limiter again.
            limiter.dirty.store(false, Ordering::SeqCst);
        }
        batch
    }
}

/// One limiter's script call.
pub(super) struct Request {
    limiter: Arc<Limiter>,
    window: u64,
    /// Accepted here in `window`; after this call, all of it is reported.
    count: u32,
    delta: u32,
    want: u32,
    /// For the next window; `Some(0)` releases what was reserved there.
    want_next: Option<u32>,
    denied: u64,
    now_ms: u64,
}

impl Request {
    pub(super) fn new(
        limiter: Arc<Limiter>,
        now_ms: u64,
        interval_ms: u64,
        releasing: bool,
    ) -> Option<Self> {
        let keys = limiter.redis.as_ref()?;
        let book = keys.book.lock().unwrap_or_else(PoisonError::into_inner);
        let window_ms = limiter.rate.unit.window_ms();
        let now_window = now_ms / window_ms;
        let (state_window, state_count) = unpack(limiter.state.load(Ordering::SeqCst));
        let (window, count) = match state_window.wrapping_sub(now_window as u32) {
            0 => (now_window, state_count),
            ahead @ 1..0x8000_0000 => (now_window + u64::from(ahead), state_count),
            _ => (now_window, 0),
        };
        let reported = if book.window == window {
            book.reported
        } else {
            0
        };
        let delta = count.saturating_sub(reported);
        let denied = limiter.denied.load(Ordering::Relaxed);
        // Demand since the last sync, accepted or not, scaled to what the reservation must
        // cover: two intervals (one may be late), or what is left of the window.
        let demand = u64::from(delta) + denied.wrapping_sub(book.denied);
        let elapsed = now_ms
            .saturating_sub(book.at_ms)
            .clamp(interval_ms, 2 * interval_ms);
        let left = ((window + 1) * window_ms).saturating_sub(now_ms);
        let max = limiter.max;
        let need = |horizon: u64| -> u32 {
            let n = (demand * horizon).div_ceil(elapsed).max(1);
            u32::try_from(n).unwrap_or(u32::MAX).min(max)
        };
        let busy = demand > 0 && !releasing;
        let want = if busy {
            need(left.min(2 * interval_ms))
        } else {
            0
        };
        let want_next = if busy && left <= interval_ms * 3 / 2 {
            Some(need(2 * interval_ms))
        } else if book.next && book.window == window {
            Some(0)
        } else {
            None
        };
        Some(Request {
            window,
            count,
            delta,
            want,
            want_next,
            denied,
            now_ms,
            limiter: limiter.clone(),
        })
    }

    /// What this call asks for: this window, and the next.
    #[cfg(test)]
    pub(super) fn wants(&self) -> (u32, Option<u32>) {
        (self.want, self.want_next)
    }

    fn add_to(&self, pipe: &mut redis::Pipeline, sha: &str) {
        let Some(keys) = self.limiter.redis.as_ref() else {
            return;
        };
        let (w, base) = (self.window, &keys.base);
        // Keys outlive their window by one more window and a minute of clock skew, so the
        // next window's reservations, written during this one, are still there when it starts.
        let ttl = 2 * self.limiter.rate.unit.window_ms() / 1000 + 60;
        pipe.cmd("EVALSHA")
            .arg(sha)
            .arg(4)
            .arg(format!("{base}{w}:n"))
            .arg(format!("{base}{w}:r"))
            .arg(format!("{base}{}:n", w + 1))
            .arg(format!("{base}{}:r", w + 1))
            .arg(&*keys.member)
            .arg(self.delta)
            .arg(self.want)
            .arg(self.want_next.map_or(-1, i64::from))
            .arg(self.limiter.max)
            .arg(ttl);
    }

    /// Installs the new reservations; false if the reply has the wrong shape.
    pub(super) fn apply(
        &self,
        reply: &[i64],
        shared: &Shared,
        revisit: &mut Vec<Weak<Limiter>>,
    ) -> bool {
        let &[used, grant, others, holders, free, next_grant] = reply else {
            return false;
        };
        let l = &self.limiter;
        let clamp = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        let (grant, free, holders) = (clamp(grant), clamp(free), clamp(holders).max(1));
        l.holders.store(holders, Ordering::Relaxed);
        shared.fleet.fetch_max(holders, Ordering::Relaxed);
        // The optimistic part: a share of what nobody reserved, charged at the next report.
        let extra = borrow(l.max, holders).min(free / holders);
        let cap = self.count.saturating_add(grant).saturating_add(extra);
        l.grants[(self.window & 1) as usize].store(pack(self.window, cap), Ordering::Release);
        let elsewhere = clamp(used.saturating_add(others) - i64::from(self.count));
        l.elsewhere
            .store(pack(self.window, elsewhere), Ordering::Relaxed);
        let next = self.want_next.is_some_and(|w| w > 0);
        let slot = &l.grants[((self.window + 1) & 1) as usize];
        if next && next_grant >= 0 {
            slot.store(pack(self.window + 1, clamp(next_grant)), Ordering::Release);
        } else if self.want_next == Some(0) {
            // Released: the next window starts like any unreserved one.
            slot.store(0, Ordering::Release);
        }
        if let Some(keys) = &l.redis {
            let mut book = keys.book.lock().unwrap_or_else(PoisonError::into_inner);
            *book = Book {
                window: self.window,
                reported: self.count,
                denied: self.denied,
                at_ms: self.now_ms,
                next,
            };
        }
        // Listed in a reservation hash: come back next round to leave it if idle by then.
        if self.want > 0 || next {
            revisit.push(Arc::downgrade(l));
        }
        true
    }
}
