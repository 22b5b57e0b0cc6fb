//! Accepting connections, cleartext or TLS, and the limits on each connection.
//!
//! Each accepted connection gets its own task, which does the TLS handshake (so a slow
//! handshake never stalls the accept loop), then serves HTTP/1.x with the proxy's own server
//! ([`crate::h1::server`]); a client that opens with the HTTP/2 preface (prior knowledge, or
//! after ALPN chose `h2`) is handed to hyper's HTTP/2 server. Per connection:
//!
//! - a connection that has not delivered a complete request within `header_read_timeout` of
//!   being accepted (after its TLS handshake) is closed, whatever it sent meanwhile (part of
//!   a head, part of the HTTP/2 preface, nothing);
//! - HTTP/1.x: the next request head on a keep-alive connection has to arrive within the
//!   smaller of `header_read_timeout` and `idle_timeout` of the last response;
//! - HTTP/2: a connection with no request in flight for `idle_timeout` is closed gracefully
//!   (GOAWAY);
//! - once the proxy drains ([`crate::shutdown`]), the connection is asked to go after its next
//!   response: HTTP/1.x responses carry `Connection: close`, and an HTTP/2 connection sends
//!   GOAWAY (its requests in flight finish). New connections are still accepted meanwhile.
//!
//! The bookkeeping per request is a few atomic operations and clock reads; no locks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use futures_util::FutureExt as _;
use futures_util::task::{ArcWake, AtomicWaker, waker_ref};
use http::header::{CONNECTION, HeaderValue};
use http::{Extensions, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::body::{ClientBody, ProxyBody};
use crate::errors::ErrorCode;
use crate::h1::RawFields;
use crate::h1::server::{Ended, ResponseBody};
use crate::listen::server::{Proxy, ServerConfig};
use crate::listen::tls::ServerTls;
use crate::observe::access_log::Access;
use crate::observe::metrics::{Answered, Metrics, Shard};
use crate::shutdown::DrainSignal;

/// Marks a request that arrived over TLS: present in the extensions of every request the
/// HTTPS listener serves, absent on the cleartext listener (absent costs nothing per request;
/// inserting one allocates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsConnection {
    /// Whether the client presented a certificate (verified against the client CA).
    pub client_cert: bool,
}

/// The scheme the client used, for `X-Forwarded-Proto`: `"https"` when the request carries
/// a [`TlsConnection`], else `"http"`.
pub fn forwarded_proto(extensions: &Extensions) -> &'static str {
    if extensions.get::<TlsConnection>().is_some() {
        "https"
    } else {
        "http"
    }
}

/// Accepts connections until `shutdown` turns true, then lets open connections finish their
/// current requests (the caller bounds how long: see [`crate::RunningProxy::shutdown_gracefully`]).
/// From when `drain` fires, connections are asked to close after their next response.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<ServerTls>,
    proxy: Arc<Proxy>,
    worker: usize,
    config: &ServerConfig,
    drain: DrainSignal,
    mut shutdown: watch::Receiver<bool>,
) {
    let http2 = Arc::new(http2(config));
    let limits = Limits {
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        max_header_bytes: config.max_header_bytes,
        half_close: config.http1_half_close,
    };
    // Every connection task holds a receiver; `closed()` resolves when the last one is gone.
    // (hyper-util's GracefulShutdown does the same, but only for hyper's own connection types,
    // and the idle timeout needs to trigger the graceful close itself.)
    let (drained, _) = watch::channel(());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // e.g. EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = crate::stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            peer,
            worker,
            proxy: proxy.clone(),
            http2: http2.clone(),
            limits,
            drain: drain.clone(),
            shutdown: shutdown.clone(),
            _drained: drained.subscribe(),
        };
        match &tls {
            None => {
                tokio::spawn(conn.serve(stream, None));
            }
            Some(tls) => {
                // The configuration current at accept time; a reload never changes a
                // connection's certificate mid-handshake.
                let acceptor = tls.acceptor();
                tokio::spawn(conn.handshake(acceptor, stream));
            }
        }
    }
    drop(listener);
    drained.closed().await;
}

fn http2(config: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        // Finds peers that vanished without closing (their requests would otherwise hold
        // the connection until the idle timeout, or forever while one is in flight).
        .keep_alive_interval(config.http2_keep_alive_interval)
        .keep_alive_timeout(config.http2_keep_alive_timeout);
    builder
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    half_close: bool,
}

/// One accepted connection, owned by its task.
struct Conn {
    peer: SocketAddr,
    /// The worker serving it: its shard of the metrics.
    worker: usize,
    proxy: Arc<Proxy>,
    http2: Arc<http2::Builder<TokioExecutor>>,
    limits: Limits,
    drain: DrainSignal,
    shutdown: watch::Receiver<bool>,
    /// Held until the connection is done, so shutdown can wait for it.
    _drained: watch::Receiver<()>,
}

impl Conn {
    /// A TLS connection's task: the handshake, then [`Conn::serve`]. As there, a plain
    /// function, so that the connection's fields are kept once; and the TLS stream (over a
    /// kilobyte) is boxed once handshaken, so that neither this future nor `serve`'s, which
    /// keeps its argument beside the state it moved it into, holds a copy of it.
    fn handshake(
        self,
        acceptor: tokio_rustls::TlsAcceptor,
        stream: tokio::net::TcpStream,
    ) -> impl Future<Output = ()> + Send {
        let mut conn = self;
        async move {
            let peer = conn.peer;
            let handshake =
                tokio::time::timeout(conn.limits.header_read_timeout, acceptor.accept(stream));
            let stream = tokio::select! {
                done = handshake => match done {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, %peer, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                // Nothing in flight yet: nothing to drain.
                () = crate::stopped(&mut conn.shutdown) => return,
            };
            let info = TlsConnection {
                client_cert: stream.get_ref().1.peer_certificates().is_some(),
            };
            conn.serve(stream, Some(info)).await;
        }
    }

    /// The connection's task. A plain function that returns its future, not an `async fn`:
    /// an `async fn` keeps `self` whole for as long as it runs, beside the locals taken out of
    /// it, and the task cell held every field twice. Built here, each is kept once.
    fn serve<I>(self, io: I, tls: Option<TlsConnection>) -> impl Future<Output = ()> + Send + use<I>
    where
        I: AsyncRead + AsyncWrite + crate::h1::server::Peek + Unpin + Send + 'static,
    {
        let Conn {
            peer,
            worker,
            proxy,
            http2,
            limits,
            drain,
            mut shutdown,
            _drained,
        } = self;
        let activity = Arc::new(Activity::new(drain, proxy.metrics.clone(), worker));
        let proxy_logs = proxy.access_log();
        let handler = Handler {
            proxy,
            client: Arc::new(crate::listen::server::Peer::new(peer)),
            activity: activity.clone(),
            tls,
        };
        let settings = crate::h1::server::Settings {
            max_head: limits.max_header_bytes,
            half_close: limits.half_close,
        };
        async move {
            // Moved in, and so held until the connection is done: shutdown waits for it.
            let _ = &_drained;
            // HTTP/1.x first (a client that sends the HTTP/2 preface is handed over). Between
            // requests the connection is idle, and the next head has to arrive within the
            // header read timeout as well.
            let h1_limits = Limits {
                idle_timeout: limits.idle_timeout.min(limits.header_read_timeout),
                ..limits
            };
            let served = {
                // Pinned where it is made: passed by value, the connection's state would be
                // kept twice, once as `drive`'s argument and once pinned inside it.
                let conn = std::pin::pin!(crate::h1::server::serve(
                    io,
                    settings,
                    &activity.closing,
                    |req| handler.call(req.map(ClientBody::H1))
                ));
                let close = |_: Pin<&mut _>| activity.closing.store(true, Ordering::Relaxed);
                drive(conn, close, &activity, h1_limits, &mut shutdown, peer).await
            };
            let (io, read) = match served {
                Some(Ok(Ended::Http2(io, read))) => (io, read),
                Some(Ok(Ended::Closed)) | None => return,
                Some(Ok(Ended::Refused(status, reason))) => {
                    activity.shard().refuse(status);
                    if proxy_logs {
                        crate::observe::access_log::refused(peer, status, reason);
                    }
                    return;
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, %peer, "connection ended with an error");
                    return;
                }
            };
            // Boxed: HTTP/2's connection state is kilobytes, which every HTTP/1 connection
            // would otherwise carry inside its task.
            Box::pin(serve_h2(
                Prefixed { read, io },
                &http2,
                handler,
                &activity,
                limits,
                &mut shutdown,
                peer,
            ))
            .await;
        }
    }
}

/// Serves an HTTP/2 connection (with prior knowledge, or negotiated by ALPN) with hyper.
async fn serve_h2<I>(
    io: Prefixed<I>,
    http2: &http2::Builder<TokioExecutor>,
    handler: Handler,
    activity: &Activity,
    limits: Limits,
    shutdown: &mut watch::Receiver<bool>,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        handler
            .call(req.map(ClientBody::Hyper))
            .map(Ok::<_, Infallible>)
    });
    let conn = std::pin::pin!(http2.serve_connection(TokioIo::new(io), service));
    let close = |conn: Pin<&mut _>| {
        http2::Connection::graceful_shutdown(conn);
    };
    if let Some(Err(error)) = drive(conn, close, activity, limits, shutdown, peer).await {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// What every request on a connection is handled with.
#[derive(Clone)]
struct Handler {
    proxy: Arc<Proxy>,
    client: Arc<crate::listen::server::Peer>,
    activity: Arc<Activity>,
    tls: Option<TlsConnection>,
}

impl Handler {
    fn call(
        &self,
        mut req: Request<ClientBody>,
    ) -> impl Future<Output = Response<Tracked<ProxyBody>>> + Send + use<> {
        if let Some(tls) = self.tls {
            req.extensions_mut().insert(tls);
        }
        let started = Instant::now();
        let access = self
            .proxy
            .access_log()
            .then(|| Access::of(&req, self.client.addr));
        let mut in_flight = self.activity.begin_at(started, access);
        let version = req.version();
        let method = crate::observe::metrics::method_index(req.method());
        // An HTTP/1.x request runs in the connection's task, whose timer can watch its
        // deadline; an HTTP/2 stream runs in a task of its own.
        let watchdog = (version != Version::HTTP_2).then(|| self.activity.watchdog.clone());
        // Boxed by `handle`, so a connection carries a request's state only while it runs.
        self.proxy
            .handle(req, &self.client, watchdog, started, move |mut resp| {
                if version == Version::HTTP_2 {
                    // hyper writes the map, and only the map.
                    crate::body::map_fields(&mut resp);
                }
                in_flight.leave_if_draining(version, &mut resp);
                in_flight.answered = Some(Answered {
                    method,
                    status: resp.status(),
                    error: resp.extensions().get::<ErrorCode>().copied(),
                });
                if let Some(access) = &mut in_flight.access {
                    access.correlation_id =
                        crate::listen::server::correlation_id_of(&resp).cloned();
                }
                // The request stays in flight until its response body is sent (or dropped), so a
                // long download or stream is not "idle".
                resp.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                })
            })
    }
}

/// Runs a connection until it ends (its output) or is dropped for not closing when asked
/// (`None`): closes it gracefully (`close`) when the proxy shuts down, when it has been idle
/// too long, or when draining asks an HTTP/2 connection to go.
async fn drive<F: Future>(
    mut conn: Pin<&mut F>,
    mut close: impl FnMut(Pin<&mut F>),
    activity: &Activity,
    limits: Limits,
    shutdown: &mut watch::Receiver<bool>,
    peer: SocketAddr,
) -> Option<F::Output> {
    let idle = idle(activity, limits);
    // Watches the HTTP/1.x exchange in flight, closing or not: its answer is still owed.
    let watch = watch(&activity.watchdog);
    tokio::pin!(watch);
    // Armed when an idle connection is asked to close: a graceful close waits for the
    // client (HTTP/2 GOAWAY and ping), and a client that never answers must not keep the
    // connection open. Boxed, and only then: a timer is hundreds of bytes that every
    // connection would otherwise carry.
    let mut force: Option<Pin<Box<tokio::time::Sleep>>> = None;
    tokio::pin!(idle);
    let mut closing = false;
    let arm = |force: &mut Option<Pin<Box<tokio::time::Sleep>>>| {
        *force = Some(Box::pin(tokio::time::sleep(limits.header_read_timeout)));
    };
    // The control futures are polled only after one of them woke the task: the connection's
    // own reads and writes wake it several times per request, and polling a watch, a Notify
    // and a timer on each of those wakeups cost ~1 000 instructions per request.
    let woken = Arc::new(WakeFlag::default());
    loop {
        woken.woken.store(true, Ordering::Release);
        let event = {
            let control = async {
                tokio::select! {
                    biased;
                    () = crate::stopped(shutdown), if !closing => Control::Shutdown,
                    () = activity.goaway.notified(), if !closing => Control::GoAway,
                    reason = &mut idle, if !closing => Control::Idle(reason),
                    never = &mut watch => match never {},
                    () = async {
                        match force.as_mut() {
                            Some(force) => force.await,
                            None => std::future::pending().await,
                        }
                    }, if force.is_some() => Control::Force,
                    // Closing, and not watched by a timer: only the connection is left.
                    else => std::future::pending().await,
                }
            };
            tokio::pin!(control);
            tokio::select! {
                biased;
                ended = conn.as_mut() => return Some(ended),
                event = OnWake { future: control.as_mut(), flag: &woken } => event,
            }
        };
        match event {
            Control::Shutdown => {
                closing = true;
                close(conn.as_mut());
            }
            // An HTTP/2 request was answered while draining: GOAWAY (new streams go to a
            // new connection, which the balancer sends elsewhere once it caught up).
            Control::GoAway => {
                tracing::debug!(%peer, "draining: sending GOAWAY");
                closing = true;
                arm(&mut force);
                close(conn.as_mut());
            }
            Control::Idle(reason) => {
                tracing::debug!(%peer, reason, "closing connection");
                closing = true;
                arm(&mut force);
                close(conn.as_mut());
            }
            Control::Force => {
                if activity.idle_for().is_some() {
                    tracing::debug!(%peer, "connection did not close when asked; dropping it");
                    return None;
                }
                arm(&mut force);
            }
        }
    }
}

/// Why [`drive`] was woken other than by its connection.
enum Control {
    Shutdown,
    GoAway,
    Idle(&'static str),
    Force,
}

/// Whether the futures behind it woke their task since they were last polled.
#[derive(Default)]
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for WakeFlag {
    fn wake_by_ref(flag: &Arc<Self>) {
        flag.woken.store(true, Ordering::Release);
        flag.task.wake();
    }
}

/// Polls `future` only when it asked to be, through `flag` (and the first time, which
/// [`drive`] marks): other wakeups of the task pass it by.
struct OnWake<'a, F> {
    future: Pin<&'a mut F>,
    flag: &'a Arc<WakeFlag>,
}

impl<F: Future> Future for OnWake<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = waker_ref(self.flag);
        self.future.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

/// A stream with bytes already read from it put back in front.
struct Prefixed<I> {
    read: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Resolves when the connection should be closed for want of requests: none in flight for
/// `idle_timeout`, or, before the first, for the smaller of that and `header_read_timeout`.
async fn idle(activity: &Activity, limits: Limits) -> &'static str {
    loop {
        let (limit, reason) =
            if activity.started() || limits.idle_timeout <= limits.header_read_timeout {
                (limits.idle_timeout, "idle timeout")
            } else {
                (
                    limits.header_read_timeout,
                    "no request within the header read timeout",
                )
            };
        let wait = match activity.idle_for() {
            Some(idle) if idle >= limit => return reason,
            Some(idle) => limit - idle,
            // Busy: look again later (the deadline only matters once it is idle).
            None => limits.idle_timeout,
        };
        // One timer (one await), not one per arm: every connection carries it.
        tokio::time::sleep(wait).await;
    }
}

/// When the upstream exchange in flight on an HTTP/1.x connection is due, for the
/// connection's [`watch`] to wake its task then.
///
/// A timer of each request's own (tokio's `timeout_at`) cost ~730 instructions a request:
/// registered in the timer wheel when the request first waits, taken out when it ends. An
/// HTTP/1.x request runs in its connection's task, which polls it at every wake-up, so one
/// timer per connection can watch its requests in turn. That timer is set again only when an
/// exchange is due before it fires, which a stream of requests with the same timeout never
/// is: it fires at the first one's deadline, and is set then for the one in flight, if any.
/// The exchange notices it is past due itself, when the wake-up polls it
/// ([`crate::listen::server`]'s `Due`). HTTP/2 streams run in tasks of their own and keep their own
/// timers.
#[derive(Debug)]
pub(crate) struct Watchdog {
    base: Instant,
    /// When the exchange in flight is due, in milliseconds after `base` (rounded up);
    /// `u64::MAX` when none is.
    due_ms: AtomicU64,
    /// When the connection's timer is set to fire, the same way.
    armed_ms: AtomicU64,
    /// Asks the connection's timer to look again: an exchange is due before it fires. (A
    /// flag and a waker rather than a `Notify`: waiting on one made every connection's state
    /// ~600 bytes larger.)
    rewatch: AtomicBool,
    task: AtomicWaker,
}

impl Watchdog {
    fn new(base: Instant) -> Watchdog {
        Watchdog {
            base,
            due_ms: AtomicU64::new(u64::MAX),
            armed_ms: AtomicU64::new(u64::MAX),
            rewatch: AtomicBool::new(false),
            task: AtomicWaker::new(),
        }
    }

    /// Milliseconds from `base` to `at`, rounded up (so a timer set for them fires at or
    /// after `at`).
    fn ms(&self, at: Instant) -> u64 {
        let after = at.saturating_duration_since(self.base);
        let ms = after.as_millis() + u128::from(!after.subsec_nanos().is_multiple_of(1_000_000));
        u64::try_from(ms).unwrap_or(u64::MAX - 1)
    }

    /// An exchange is in flight until [`Watchdog::unwatch`], due at `deadline`.
    pub(crate) fn watch(&self, deadline: Instant) {
        let due = self.ms(deadline);
        self.due_ms.store(due, Ordering::Relaxed);
        if due < self.armed_ms.load(Ordering::Relaxed) {
            self.rewatch.store(true, Ordering::Relaxed);
            self.task.wake();
        }
    }

    /// The exchange in flight ended.
    pub(crate) fn unwatch(&self) {
        self.due_ms.store(u64::MAX, Ordering::Relaxed);
    }

    /// How long until the exchange in flight is due, if one is.
    fn due_in(&self) -> Option<Duration> {
        match self.due_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(
                (self.base + Duration::from_millis(ms)).saturating_duration_since(Instant::now()),
            ),
        }
    }

    /// The connection's timer fires in `wait`.
    fn armed(&self, wait: Duration) {
        let at = self.ms(Instant::now() + wait);
        self.armed_ms.store(at, Ordering::Relaxed);
    }
}

/// Wakes its connection's task when the exchange `watchdog` watches is due (the wake-up polls
/// the exchange, which then answers that it timed out). Never ends. Its timer is boxed, and
/// made only when set: most of the time a connection has none.
async fn watch(watchdog: &Watchdog) -> Infallible {
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        watchdog.task.register(cx.waker());
        if watchdog.rewatch.swap(false, Ordering::Relaxed) {
            timer = None;
        }
        if let Some(set) = timer.as_mut() {
            if set.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired. The connection was polled first in this wake-up, so an exchange that
            // was due has answered; look again.
            timer = None;
        }
        match watchdog.due_in() {
            // Due already: the exchange has not seen it yet. Poll the connection once more
            // (it answers then), and do not look again: were the exchange gone without
            // saying so, looking again would spin.
            Some(wait) if wait.is_zero() => {
                watchdog.unwatch();
                cx.waker().wake_by_ref();
            }
            Some(wait) => {
                watchdog.armed(wait);
                let mut set = Box::pin(tokio::time::sleep(wait));
                // Registers it; it cannot have fired yet.
                let _ = set.as_mut().poll(cx);
                timer = Some(set);
            }
            None => watchdog.armed_ms.store(u64::MAX, Ordering::Relaxed),
        }
        Poll::Pending
    })
    .await
}

/// Requests in flight on one connection and when the last one began or ended. Atomics, so
/// that HTTP/2 streams on several threads never wait for each other.
struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `base`; `u64::MAX` until the first request.
    last_ms: AtomicU64,
    /// Whether the proxy is draining, checked as each response leaves.
    drain: DrainSignal,
    /// Asks the connection task for a GOAWAY (HTTP/2 only).
    goaway: Notify,
    /// Asks an HTTP/1.x connection to close (see [`crate::h1::server::serve`]).
    closing: AtomicBool,
    /// The HTTP/1.x exchange in flight's deadline.
    watchdog: Arc<Watchdog>,
    /// What the connection's requests are counted in: the metrics' shard `shard`.
    metrics: Arc<Metrics>,
    shard: usize,
}

impl Activity {
    /// A connection's, served by worker `shard`.
    fn new(drain: DrainSignal, metrics: Arc<Metrics>, shard: usize) -> Activity {
        let base = Instant::now();
        metrics.shard(shard).connected();
        Activity {
            metrics,
            shard,
            base,
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(u64::MAX),
            drain,
            goaway: Notify::new(),
            closing: AtomicBool::new(false),
            watchdog: Arc::new(Watchdog::new(base)),
        }
    }

    /// A request in flight from `now`: its start, read once by the caller, which uses it for
    /// the request's deadline too (a clock read is ~60 instructions); `access`: what its access log
    /// line will say, with the access log on.
    fn begin_at(self: &Arc<Self>, now: Instant, access: Option<Box<Access>>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        // Only the first start is stamped (see `started`): while a request is in flight the
        // connection is not idle whatever the stamp says, and the idle time counts from the
        // end of the last one, which `InFlight` stamps. Stamping each start converted the
        // clock once more a request.
        if !self.started() {
            self.touch_at(now);
        }
        self.shard().begin();
        InFlight {
            activity: self.clone(),
            started: now,
            answered: None,
            access,
        }
    }

    fn shard(&self) -> &Shard {
        self.metrics.shard(self.shard)
    }

    fn touch_at(&self, now: Instant) {
        let since = now.saturating_duration_since(self.base);
        let ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX - 1);
        self.last_ms.store(ms, Ordering::Release);
    }

    fn started(&self) -> bool {
        self.last_ms.load(Ordering::Acquire) != u64::MAX
    }

    /// How long nothing has been in flight; None while something is.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = match self.last_ms.load(Ordering::Acquire) {
            u64::MAX => Duration::ZERO,
            ms => Duration::from_millis(ms),
        };
        Some(self.base.elapsed().saturating_sub(last))
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        self.shard().disconnected();
    }
}

/// One request in flight; ends when dropped.
struct InFlight {
    activity: Arc<Activity>,
    started: Instant,
    /// How it was answered, once it was.
    answered: Option<Answered>,
    /// With the access log on, what its line will say.
    access: Option<Box<Access>>,
}

impl InFlight {
    /// While the proxy drains, asks the client to take its next request elsewhere: an
    /// HTTP/1.x response says `Connection: close` (hyper then closes the connection after
    /// it), an HTTP/2 one makes its connection send GOAWAY. One atomic load otherwise.
    fn leave_if_draining<B>(&self, version: Version, resp: &mut Response<B>) {
        if !self.activity.drain.is_draining() {
            return;
        }
        if version == Version::HTTP_2 {
            self.activity.goaway.notify_one();
        } else {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // One clock read for both: the idle time counts from here, and the latency ends here.
        let now = Instant::now();
        // Stamp first: a watcher that sees zero in flight must also see the fresh time.
        self.activity.touch_at(now);
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        let took = now.saturating_duration_since(self.started);
        self.activity.shard().end(self.answered.as_ref(), took);
        if let Some(access) = &self.access {
            access.log(self.answered.as_ref(), took);
        }
    }
}

impl<B: ResponseBody> ResponseBody for Tracked<B> {
    fn take_fields(&mut self) -> Option<RawFields> {
        self.body.take_fields()
    }
}

/// A response body that keeps its request counted as in flight until it is done.
struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            half_close: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_closed_after_the_header_read_timeout() {
        let activity = Arc::new(Activity::new(
            DrainSignal::never(),
            Arc::new(Metrics::new(1)),
            0,
        ));
        let start = Instant::now();
        let reason = idle(&activity, limits()).await;
        assert_eq!(reason, "no request within the header read timeout");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    /// Every open connection is one task; its allocation is what an idle connection costs.
    /// mimalloc serves it from its 2 048-byte size class while tokio's cell around the future
    /// (a 32-byte header, the scheduler handle and task id, a 48-byte trailer, all aligned to
    /// 128) stays within 2 048 bytes: a future over 1 944 bytes takes the 2 560-byte class,
    /// 512 more bytes per connection. (The test's debug build lays it out in 1 848 bytes,
    /// the release build in 1 816; it was 1 976 when `serve` was an `async fn`.)
    #[tokio::test]
    async fn a_connection_task_fits_its_allocation_class() {
        const BOUND: usize = 2048 - 32 - 24 - 48;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        let (stream, peer) = accepted.unwrap();
        let (_shutdown_tx, shutdown) = watch::channel(false);
        let (_drained_tx, drained) = watch::channel(());
        let config = ServerConfig::default();
        let conn = Conn {
            peer,
            worker: 0,
            proxy: Arc::new(Proxy::new(
                Arc::new(arc_swap::ArcSwapOption::empty()),
                config.clone(),
                Arc::default(),
            )),
            http2: Arc::new(http2(&config)),
            limits: limits(),
            drain: DrainSignal::never(),
            shutdown,
            _drained: drained,
        };
        let task = conn.serve(stream, None);
        let size = std::mem::size_of_val(&task);
        assert!(size <= BOUND, "a connection's future is {size} bytes");
        drop((task, client));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request() {
        let activity = Arc::new(Activity::new(
            DrainSignal::never(),
            Arc::new(Metrics::new(1)),
            0,
        ));
        let start = Instant::now();
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { idle(&activity, limits()).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let request = activity.begin_at(Instant::now(), None);
        // A long request is not idle, however long it takes.
        tokio::time::sleep(Duration::from_secs(150)).await;
        assert!(!watcher.is_finished());
        drop(request);
        // The next one starts 30 s into the idle time and runs past when it would have ended.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let request = activity.begin_at(Instant::now(), None);
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!watcher.is_finished());
        drop(request);
        assert_eq!(watcher.await.unwrap(), "idle timeout");
        assert_eq!(start.elapsed(), Duration::from_secs(341));
    }

    #[test]
    fn the_forwarded_proto_follows_the_marker() {
        let mut ext = Extensions::new();
        assert_eq!(forwarded_proto(&ext), "http");
        ext.insert(TlsConnection { client_cert: false });
        assert_eq!(forwarded_proto(&ext), "https");
    }
}
