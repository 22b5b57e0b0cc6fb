//! Prometheus metrics, served on the admin port's `/metrics`.
//!
//! The request path only adds to atomics that nothing else on its core writes: each worker
//! (each listener socket) has a [`Shard`] of its own, and a scrape sums the shards. A series
//! (a method and a status) is made the first time it is seen, once, and found again by two
//! array indexes; nothing on the request path takes a lock, hashes or allocates.
//!
//! The names and labels of Kanali v2's metrics are kept, as its Grafana dashboard reads them
//! (`kanali_http_request_latency_milliseconds` by `code` and `method`,
//! `kanali_http_request_inflight_count`, `kanali_log_count` by `level`). Two of its faults
//! are not: v2's latency buckets were the client library's defaults, made for seconds
//! (0.005 … 10), so that nearly every observation in milliseconds fell in `+Inf`; and a panic
//! left its in-flight gauge counted up for good.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use kanali_proto::exposition::{Exposition, Kind};

use crate::errors::ErrorCode;
use crate::filter::rate_limit::RateLimits;
use crate::route::table::RouteTable;

/// The latency buckets' upper bounds, in microseconds (rendered in milliseconds): from a
/// quarter of a millisecond, which a proxied request on one host takes, to ten seconds.
const BOUNDS_US: [u64; 15] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// The methods with a series of their own, by index; any other method counts as `OTHER`,
/// so that a client cannot make series without end.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
];

/// Statuses a response can have (`http` allows 100–999).
const STATUSES: usize = 900;

/// The statuses the HTTP/1 server refuses a request head with, before any route sees it.
const REFUSALS: [StatusCode; 2] = [
    StatusCode::BAD_REQUEST,
    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
];

/// The index of `method` in `METHODS`.
pub fn method_index(method: &Method) -> u8 {
    // Most likely first: each comparison of a standard method is one of a small enum.
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ]
    .iter()
    .position(|m| m == method)
    .map_or(9, |i| i as u8)
}

/// A proxy's metrics: one shard per worker.
#[derive(Debug)]
pub struct Metrics {
    shards: Box<[Shard]>,
}

impl Metrics {
    /// Metrics with `shards` shards (at least one).
    pub fn new(shards: usize) -> Metrics {
        Metrics {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    /// The shard of worker `i` (the first for a worker it was not made for).
    pub fn shard(&self, i: usize) -> &Shard {
        self.shards.get(i).unwrap_or(&self.shards[0])
    }

    /// Requests in flight, over all shards.
    pub fn in_flight(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Responses with Kanali error `code`, over all shards.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.shards
            .iter()
            .map(|s| s.errors[code as usize].load(Ordering::Relaxed))
            .sum()
    }

    /// Request heads refused with `status` before routing, over all shards.
    pub fn refused(&self, status: StatusCode) -> u64 {
        let Some(i) = REFUSALS.iter().position(|&s| s == status) else {
            return 0;
        };
        self.shards
            .iter()
            .map(|s| s.refused[i].load(Ordering::Relaxed))
            .sum()
    }

    /// Open client connections, over all shards.
    pub fn connections(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.connections.load(Ordering::Relaxed))
            .sum()
    }

    /// The latency histogram of `method` (an index into `METHODS`) and `status`, summed over
    /// the shards; `None` if no such response was recorded.
    pub fn latency(&self, method: u8, status: StatusCode) -> Option<Histogram> {
        let slot = usize::from(status.as_u16()).checked_sub(100)?;
        let mut total: Option<Histogram> = None;
        for shard in self.shards.iter() {
            let row = shard.rows.get(usize::from(method))?.get();
            if let Some(series) = row.and_then(|r| r.get(slot)).and_then(OnceLock::get) {
                total.get_or_insert_default().add(series);
            }
        }
        total
    }

    /// Everything, in Prometheus' text format (version 0.0.4).
    pub fn render(&self, limits: &RateLimits, table: Option<&RouteTable>) -> String {
        let mut page = Exposition::new();
        let name = "kanali_http_request_latency_milliseconds";
        page.family(
            name,
            Kind::Histogram,
            "Time from a request's head to the end of its response, by method and status.",
        );
        for (m, method) in METHODS.iter().enumerate() {
            if self.shards.iter().all(|s| s.rows[m].get().is_none()) {
                continue;
            }
            for slot in 0..STATUSES {
                let Some(code) = u16::try_from(slot + 100)
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                else {
                    continue;
                };
                if let Some(h) = self.latency(m as u8, code) {
                    h.render(&mut page, name, code.as_str(), method);
                }
            }
        }
        page.family(
            "kanali_errors_total",
            Kind::Counter,
            "Kanali error responses (codes 00-14), by code.",
        );
        for code in ErrorCode::ALL {
            let nn = format!("{:02}", code.code());
            page.sample("kanali_errors_total", &[("code", &nn)], self.errors(code));
        }
        page.family(
            "kanali_http_refused_total",
            Kind::Counter,
            "Request heads the HTTP/1 server refused before routing (malformed: 400; too large: 431), by status; not in the latency histogram, which counts requests that were routed.",
        );
        for status in REFUSALS {
            page.sample(
                "kanali_http_refused_total",
                &[("code", status.as_str())],
                self.refused(status),
            );
        }
        page.single(
            "kanali_http_request_inflight_count",
            Kind::Gauge,
            "Requests received and not yet answered to the end.",
            self.in_flight(),
        );
        page.single(
            "kanali_http_connections",
            Kind::Gauge,
            "Open client connections (TLS ones once their handshake is done).",
            self.connections(),
        );
        if let Some(shared) = limits.redis_shared() {
            page.single(
                "kanali_rate_limit_redis_shared",
                Kind::Gauge,
                "1 while rate limits are shared with the other proxies through Redis, 0 while each proxy enforces them alone.",
                u8::from(shared),
            );
            page.single(
                "kanali_rate_limit_redis_fallbacks_total",
                Kind::Counter,
                "Times Redis stayed unreachable past the grace and this proxy fell back to enforcing rate limits alone.",
                limits.redis_fallbacks(),
            );
        }
        if let Some(table) = table {
            page.family(
                "kanali_snapshot_info",
                Kind::Gauge,
                "The routing snapshot being served, by version.",
            )
            .sample("kanali_snapshot_info", &[("version", &table.version)], 1);
        }
        page.log_counts();
        page.process();
        page.finish()
    }
}

/// The metrics of one worker. Its connections are served on one thread, so its cache lines
/// stay in that core's cache.
#[derive(Debug)]
pub struct Shard {
    /// By method, each row made on first use.
    rows: [OnceLock<Row>; METHODS.len()],
    in_flight: AtomicI64,
    connections: AtomicI64,
    /// By Kanali error code.
    errors: [AtomicU64; ErrorCode::ALL.len()],
    /// By status, as [`REFUSALS`] lists them.
    refused: [AtomicU64; REFUSALS.len()],
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            rows: std::array::from_fn(|_| OnceLock::new()),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
            in_flight: AtomicI64::new(0),
            connections: AtomicI64::new(0),
        }
    }
}

impl Shard {
    /// A request arrived.
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ended after `took`: answered as `answered` says (`None` if it never was,
    /// its client gone first).
    pub fn end(&self, answered: Option<&Answered>, took: Duration) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(&Answered {
            method,
            status,
            error,
        }) = answered
        else {
            return;
        };
        if let Some(code) = error {
            self.errors[code as usize].fetch_add(1, Ordering::Relaxed);
        }
        let Some(slot) = usize::from(status.as_u16()).checked_sub(100) else {
            return;
        };
        let Some(row) = self.rows.get(usize::from(method)) else {
            return;
        };
        let row = row.get_or_init(|| (0..STATUSES).map(|_| OnceLock::new()).collect());
        if let Some(series) = row.get(slot) {
            series.get_or_init(Box::default).observe(took);
        }
    }

    /// A request head was refused with `status` (one the server refuses with, else the
    /// first: a 400).
    pub fn refuse(&self, status: StatusCode) {
        let i = REFUSALS.iter().position(|&s| s == status).unwrap_or(0);
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection opened.
    pub fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection closed.
    pub fn disconnected(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a request was answered.
#[derive(Clone, Copy, Debug)]
pub struct Answered {
    /// Its method, as [`method_index`] numbers it.
    pub method: u8,
    /// The response's status.
    pub status: StatusCode,
    /// The Kanali error it was, if one.
    pub error: Option<ErrorCode>,
}

/// One method's series, by status − 100, each made on first use.
type Row = Box<[OnceLock<Box<Series>>]>;

/// One series' histogram as recorded: a count per bucket (not cumulative: one add per
/// observation) and the sum.
#[derive(Debug, Default)]
struct Series {
    /// `BOUNDS_US` and `+Inf`.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Series {
    fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US.partition_point(|&bound| bound < us);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// A latency histogram read from the shards.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    pub buckets: [u64; BOUNDS_US.len() + 1],
    /// The sum of the observations, in nanoseconds.
    pub sum_ns: u64,
}

impl Histogram {
    fn add(&mut self, series: &Series) {
        for (total, bucket) in self.buckets.iter_mut().zip(&series.buckets) {
            *total += bucket.load(Ordering::Relaxed);
        }
        self.sum_ns += series.sum_ns.load(Ordering::Relaxed);
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn render(&self, page: &mut Exposition, name: &str, code: &str, method: &str) {
        // The count is the buckets' total, read once: `+Inf` and `_count` always agree.
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n;
            let le = match BOUNDS_US.get(i) {
                Some(us) => (*us as f64 / 1000.0).to_string(),
                None => "+Inf".to_owned(),
            };
            page.sample(
                &bucket,
                &[("code", code), ("method", method), ("le", &le)],
                cumulative,
            );
        }
        let labels = [("code", code), ("method", method)];
        page.sample(&format!("{name}_sum"), &labels, self.sum_ns as f64 / 1e6);
        page.sample(&format!("{name}_count"), &labels, cumulative);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_micros(n * 1000)
    }

    fn answered(method: u8, status: StatusCode) -> Answered {
        Answered {
            method,
            status,
            error: None,
        }
    }

    #[test]
    fn an_observation_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let m = Metrics::new(1);
        let s = m.shard(0);
        let get = method_index(&Method::GET);
        for took in [
            Duration::from_micros(250), // on the bound: `le` includes it
            Duration::from_micros(251),
            ms(1),
            ms(20_000), // past the last bound
        ] {
            s.begin();
            s.end(Some(&answered(get, StatusCode::OK)), took);
        }
        let h = m.latency(get, StatusCode::OK).unwrap();
        let mut want = [0; 16];
        want[0] = 1;
        want[1] = 1;
        want[2] = 1;
        want[15] = 1;
        assert_eq!(h.buckets, want);
        assert_eq!(h.sum_ns, 250_000 + 251_000 + 1_000_000 + 20_000_000_000);
        assert_eq!(m.in_flight(), 0);
    }

    #[test]
    fn shards_are_summed_and_series_kept_apart() {
        let m = Metrics::new(2);
        let (get, post) = (method_index(&Method::GET), method_index(&Method::POST));
        m.shard(0).end(Some(&answered(get, StatusCode::OK)), ms(1));
        m.shard(1).end(Some(&answered(get, StatusCode::OK)), ms(1));
        m.shard(1).end(Some(&answered(post, StatusCode::OK)), ms(1));
        let limited = Answered {
            error: Some(ErrorCode::RateLimited),
            ..answered(get, StatusCode::TOO_MANY_REQUESTS)
        };
        m.shard(1).end(Some(&limited), ms(1));
        m.shard(0).end(Some(&limited), ms(1));
        // Never answered: only the in-flight count moves.
        m.shard(0).begin();
        m.shard(0).begin();
        m.shard(0).end(None, ms(1));
        assert_eq!(m.latency(get, StatusCode::OK).unwrap().count(), 2);
        assert_eq!(m.latency(post, StatusCode::OK).unwrap().count(), 1);
        assert_eq!(
            m.latency(get, StatusCode::TOO_MANY_REQUESTS)
                .unwrap()
                .count(),
            2
        );
        assert_eq!(m.errors(ErrorCode::RateLimited), 2);
        assert_eq!(m.errors(ErrorCode::NoApiProxy), 0);
        assert_eq!(m.latency(post, StatusCode::NOT_FOUND), None);
        // Two begins and six ends, over the shards.
        assert_eq!(m.in_flight(), -4);
    }

    #[test]
    fn unknown_methods_share_one_series() {
        let other = method_index(&Method::from_bytes(b"PURGE").unwrap());
        assert_eq!(METHODS[usize::from(other)], "OTHER");
        assert_eq!(method_index(&Method::from_bytes(b"BREW").unwrap()), other);
        assert_eq!(METHODS[usize::from(method_index(&Method::PATCH))], "PATCH");
    }

    #[test]
    fn the_text_is_cumulative_with_count_equal_to_inf() {
        let m = Metrics::new(1);
        let head = method_index(&Method::HEAD);
        m.shard(0)
            .end(Some(&answered(head, StatusCode::NOT_FOUND)), ms(3));
        m.shard(0)
            .end(Some(&answered(head, StatusCode::NOT_FOUND)), ms(30));
        let limits = RateLimits::new(Default::default()).unwrap();
        let text = m.render(&limits, None);
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let series = r#"kanali_http_request_latency_milliseconds"#;
        let labels = r#"{code="404",method="HEAD""#;
        assert_eq!(line(&format!("{series}_bucket{labels},le=\"2.5\"}}")), "0");
        assert_eq!(line(&format!("{series}_bucket{labels},le=\"5\"}}")), "1");
        assert_eq!(line(&format!("{series}_bucket{labels},le=\"25\"}}")), "1");
        assert_eq!(line(&format!("{series}_bucket{labels},le=\"50\"}}")), "2");
        assert_eq!(line(&format!("{series}_bucket{labels},le=\"+Inf\"}}")), "2");
        assert_eq!(line(&format!("{series}_count{labels}}}")), "2");
        assert_eq!(line(&format!("{series}_sum{labels}}}")), "33");
        // Without Redis there is nothing shared to report.
        assert!(!text.contains("kanali_rate_limit_redis"), "{text}");
        assert_eq!(line("kanali_http_request_inflight_count"), "-2");
    }
}
