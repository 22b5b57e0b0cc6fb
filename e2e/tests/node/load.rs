//! Steady load through the gateway's ClusterIP while something happens to the cluster.
//!
//! Open loop: one request every `1 / rate` seconds whatever the previous ones are doing, so
//! a stall shows as latency and failures instead of silently lowering the rate. Every request
//! is a new TCP connection (what kube-proxy balances, and what a proxy that stopped accepting
//! too early refuses). Bounded in count and in time; stops by itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What one load run saw.
#[derive(Debug, Default)]
pub struct Figures {
    /// Requests sent.
    pub sent: usize,
    /// Requests that did not get a 200 (refused, reset, timed out, or another status).
    pub failed: usize,
    /// Latency of each successful request.
    latencies: Vec<Duration>,
    /// The first failures, described.
    pub errors: Vec<String>,
    /// Successful requests by the proxy that forwarded them (the echo's `x-echo-peer`).
    pub by_proxy: BTreeMap<String, usize>,
    /// How long the run lasted.
    pub duration: Duration,
}

impl Figures {
    /// The `q` quantile of the successful requests' latencies (0 when there were none).
    pub fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        // Nearest rank.
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    /// One line for the report.
    pub fn line(&self, event: &str) -> String {
        format!(
            "{event:<36} sent {:>5}  failed {:>3}  p50 {:>6.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  over {:>5.1} s",
            self.sent,
            self.failed,
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            ms(self.quantile(1.0)),
            self.duration.as_secs_f64(),
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A load run in progress.
pub struct Load {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Figures>,
}

impl Load {
    /// Starts sending `GET path` to `target` at `rate` requests per second, for at most
    /// `max_time` (and so at most `rate × max_time` requests).
    pub fn start(target: SocketAddr, path: &str, rate: u32, max_time: Duration) -> Load {
        let (stop, stopped) = watch::channel(false);
        let path = path.to_owned();
        let task = tokio::spawn(run(target, path, rate, max_time, stopped));
        Load { stop, task }
    }

    /// Stops sending, waits for the requests in flight, and returns the figures.
    pub async fn finish(self) -> Figures {
        let _ = self.stop.send(true);
        self.task.await.expect("the load task")
    }
}

type Outcome = Result<(Duration, Option<String>), String>;

async fn run(
    target: SocketAddr,
    path: String,
    rate: u32,
    max_time: Duration,
    mut stopped: watch::Receiver<bool>,
) -> Figures {
    let started = Instant::now();
    let max_count = usize::try_from(u64::from(rate) * max_time.as_secs()).unwrap_or(usize::MAX);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut in_flight = JoinSet::new();
    let mut figures = Figures::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        if figures.sent >= max_count || started.elapsed() >= max_time {
            eprintln!(
                "load: bound reached ({} requests, {:?})",
                figures.sent,
                started.elapsed()
            );
            break;
        }
        figures.sent += 1;
        let path = path.clone();
        in_flight.spawn(async move { one(target, &path).await });
        // Reap what finished, so the set stays small.
        while let Some(done) = in_flight.try_join_next() {
            record(&mut figures, done);
        }
    }
    while let Some(done) = in_flight.join_next().await {
        record(&mut figures, done);
    }
    figures.duration = started.elapsed();
    figures
}

fn record(figures: &mut Figures, done: Result<Outcome, tokio::task::JoinError>) {
    match done {
        Ok(Ok((latency, proxy))) => {
            figures.latencies.push(latency);
            if let Some(proxy) = proxy {
                *figures.by_proxy.entry(proxy).or_default() += 1;
            }
        }
        Ok(Err(error)) => fail(figures, error),
        Err(error) => fail(figures, format!("request task: {error}")),
    }
}

fn fail(figures: &mut Figures, error: String) {
    figures.failed += 1;
    if figures.errors.len() < 20 {
        figures.errors.push(error);
    }
}

/// One request on a new connection: its latency and the proxy that forwarded it.
async fn one(target: SocketAddr, path: &str) -> Outcome {
    let start = Instant::now();
    match tokio::time::timeout(REQUEST_TIMEOUT, get(target, path, "gateway.e2e")).await {
        Ok(Ok((headers, _))) => {
            let proxy = headers
                .get("x-echo-peer")
                .and_then(|v| v.to_str().ok())
                .and_then(|peer| peer.rsplit_once(':'))
                .map(|(ip, _)| ip.to_owned());
            Ok((start.elapsed(), proxy))
        }
        Ok(Err(e)) => Err(format!("after {:?}: {e}", start.elapsed())),
        Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

/// GET `path` from `target` on a new connection: the body of a 200, as text.
pub async fn get_text(target: SocketAddr, path: &str) -> Result<String, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, get(target, path, &target.to_string())).await {
        Ok(Ok((_, body))) => Ok(String::from_utf8_lossy(&body).into_owned()),
        Ok(Err(e)) => Err(format!("{target}{path}: {e}")),
        Err(_) => Err(format!(
            "{target}{path}: no answer within {REQUEST_TIMEOUT:?}"
        )),
    }
}

/// GET `path` with `host` from `target` on a new connection: the headers and body of a 200;
/// any other status is an error that quotes the start of the body.
async fn get(
    target: SocketAddr,
    path: &str,
    host: &str,
) -> Result<(http::HeaderMap, Bytes), String> {
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if parts.status != 200 {
        return Err(format!(
            "status {}: {}",
            parts.status,
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    Ok((parts.headers, body))
}
