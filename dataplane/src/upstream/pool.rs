//! Connections to one upstream address, shared by every route, Service and snapshot that sends
//! there, so swapping in a new snapshot keeps warm connections.
//!
//! HTTP/1.1 connections wait in a lock-free bounded queue: a request pops one (or dials a new
//! one), runs its exchange on it in its own task ([`crate::h1`]), and the connection goes back
//! as soon as its response is complete. A TLS upstream that
//! negotiates `h2` instead gets one multiplexed connection per worker, held in an atomic slot
//! every request clones its sender from, and redialled when it closes. The Go original built a
//! new transport — new TCP and TLS handshakes — for every request.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_queue::{ArrayQueue, SegQueue};
use futures_util::future::Either;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::body::{RequestBody, UpstreamBody};
use crate::h1::{self, ExchangeError, H1Conn, Io};
use crate::headers::Added;
use crate::upstream::UpstreamError;
use crate::upstream::tls::server_name;
use crate::workers::PerWorker;

/// What makes two pools the same: an unchanged upstream keeps its pool (and its warm
/// connections) across snapshots, while rotated TLS material — a new id — gets a new pool and
/// the old one drains with the requests still using it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// TLS or cleartext.
    pub https: bool,
    /// `host:port` dialled.
    pub dial: Box<str>,
    /// `host[:port]` the upstream is known as: its host is the TLS server name, the whole is
    /// the `Host` sent when the client gave none.
    pub authority: Box<str>,
    /// `TlsMaterial.id`; empty: the default configuration (system roots, no client cert).
    pub tls: Box<str>,
}

/// Pool tunables, from [`crate::upstream::UpstreamConfig`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// Workers that keep idle connections apart ([`crate::workers`]), `max_idle` shared out.
    pub workers: usize,
}

/// Milliseconds since the first call, never 0 (0 means "never failed").
pub(crate) fn now_millis() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// The pools that may hold idle HTTP/1.1 connections, for the sweep
/// ([`crate::upstream::Upstreams::sweep`]): a pool is listed when a connection goes idle in it
/// and it was not listed, and stays listed until a sweep finds it empty. A sweep then visits
/// the few pools with idle connections, not every pool of every table.
pub(crate) type SweepList = SegQueue<Weak<HostPool>>;

struct Idle {
    conn: Box<H1Conn>,
    since: Instant,
}

/// A connection ready for one request; nothing has been sent on it yet.
pub(crate) enum Conn {
    H1 {
        conn: Box<H1Conn>,
        reused: bool,
    },
    H2 {
        sender: http2::SendRequest<RequestBody>,
        reused: bool,
    },
}

impl Conn {
    fn reused(&self) -> bool {
        match self {
            Conn::H1 { reused, .. } | Conn::H2 { reused, .. } => *reused,
        }
    }
}

/// Connections to one upstream address.
pub struct HostPool {
    key: PoolKey,
    authority: Authority,
    dial_host: Box<str>,
    dial_port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    // Per worker, since a connection is watched by the runtime that opened it. Created on
    // first release: most endpoint addresses of a big cluster never see a request from this
    // proxy, and a queue allocates all its slots up front.
    idle: PerWorker<OnceLock<ArrayQueue<Idle>>>,
    /// Where this pool is listed when a connection goes idle in it, and whether it is.
    sweep_list: Option<Arc<SweepList>>,
    listed: AtomicBool,
    /// The multiplexed HTTP/2 connection of each worker (made on first use, as `idle`): one
    /// for all would be driven by the worker that dialled it, on every worker's behalf.
    h2: PerWorker<ArcSwapOption<http2::SendRequest<RequestBody>>>,
    speaks_h2: AtomicBool,
    h2_dial: tokio::sync::Mutex<()>,
    in_flight: AtomicUsize,
    failed_at: AtomicU64,
    settings: PoolSettings,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("key", &self.key)
            .field("idle", &self.queues().map(ArrayQueue::len).sum::<usize>())
            .field("h2", &self.speaks_h2.load(Ordering::Relaxed))
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// An upstream's response head, with what is kept until its body is done: a Service's
/// count on the address it chose (see [`InFlight`]).
pub type Sent = (Response<UpstreamBody>, Option<InFlight>);

/// How an HTTP/1.1 exchange goes: on `conn` (idle before: `reused`), sent again on a fresh
/// connection if it never left and `retry` allows, counted by `counting` until the response
/// head is in; `keep` comes back beside the head.
struct H1Exchange {
    conn: Box<H1Conn>,
    reused: bool,
    retry: bool,
    counting: Option<InFlight>,
    keep: Option<InFlight>,
}

/// Counts a balanced request against its address until dropped. The response body holds it,
/// so a long download or stream keeps its address busy in the balancer's eyes, not only the
/// wait for the response head.
pub struct InFlight(Arc<HostPool>);

impl InFlight {
    pub(crate) fn new(pool: &Arc<HostPool>) -> Self {
        pool.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(pool.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InFlight").field(&self.0.key).finish()
    }
}

impl HostPool {
    pub(crate) fn new(
        key: PoolKey,
        tls: Option<Arc<ClientConfig>>,
        settings: PoolSettings,
    ) -> Result<Self, String> {
        let authority: Authority = key
            .authority
            .parse()
            .map_err(|e| format!("invalid upstream authority {:?}: {e}", key.authority))?;
        let dial: Authority = key
            .dial
            .parse()
            .map_err(|e| format!("invalid upstream address {:?}: {e}", key.dial))?;
        let dial_port = dial.port_u16().unwrap_or(if key.https { 443 } else { 80 });
        let dial_host = dial.host().trim_start_matches('[').trim_end_matches(']');
        let tls = match tls {
            Some(config) if key.https => {
                Some((TlsConnector::from(config), server_name(authority.host())?))
            }
            _ => None,
        };
        Ok(HostPool {
            dial_host: dial_host.into(),
            dial_port,
            key,
            authority,
            tls,
            idle: PerWorker::new(),
            sweep_list: None,
            listed: AtomicBool::new(false),
            h2: PerWorker::new(),
            speaks_h2: AtomicBool::new(false),
            h2_dial: tokio::sync::Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            failed_at: AtomicU64::new(0),
            settings,
        })
    }

    /// This pool, listed in `list` whenever a connection goes idle in it.
    pub(crate) fn swept_from(mut self, list: Arc<SweepList>) -> Self {
        self.sweep_list = Some(list);
        self
    }

    /// Takes this pool off its sweep list, sweeps it, and lists it again if connections are
    /// left idle (or one went idle meanwhile: its release lists it). Returns how many closed.
    pub(crate) fn sweep_listed(self: &Arc<Self>, now: Instant) -> usize {
        self.listed.store(false, Ordering::SeqCst);
        let closed = self.sweep(now);
        if self.queues().any(|idle| !idle.is_empty()) {
            self.list();
        }
        closed
    }

    // Once per pool until a sweep empties it: kept out of the release's inlined path.
    #[cold]
    fn list(self: &Arc<Self>) {
        if let Some(list) = &self.sweep_list
            && !self.listed.swap(true, Ordering::SeqCst)
        {
            list.push(Arc::downgrade(self));
        }
    }

    /// What identifies this pool.
    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// The upstream this pool connects to, as it is known (not necessarily as dialled).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Requests waiting for a response head from this address.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// When connecting last failed ([`now_millis`] scale), 0 if the last attempt worked.
    pub(crate) fn failed_at(&self) -> u64 {
        self.failed_at.load(Ordering::Relaxed)
    }

    /// Whether the last attempt to connect failed (the balancer skips such an address for a
    /// few seconds).
    pub fn last_connect_failed(&self) -> bool {
        self.failed_at() != 0
    }

    /// Whether the upstream negotiated HTTP/2 on its last TLS handshake.
    pub fn speaks_h2(&self) -> bool {
        self.speaks_h2.load(Ordering::Relaxed)
    }

    /// Sends `req` (origin-form URI, `Host` set, headers final) and returns the response head;
    /// the body streams on. `added`: headers sent after the map's (see [`Added`]). `keep`
    /// comes back beside the head, to be kept with the body: returned, not added by a
    /// combinator, which moved the whole send future once more as it was made.
    ///
    /// Not an `async fn`, nor are the steps below it: each `async fn` keeps its arguments for
    /// as long as it runs, so every layer would hold its own copy of the request (hundreds of
    /// bytes) beside the layer it awaits, and every layer's future is moved into its parent's
    /// on the first poll. Here the request lives in one place, the exchange that sends it, and
    /// the layers above are combinators around it.
    pub fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        added: Option<Added>,
        keep: Option<InFlight>,
    ) -> impl Future<Output = Result<Sent, UpstreamError>> + Send + use<> {
        // Counted while it waits for the response head. The count holds the pool's `Arc`, so
        // the returned future borrows nothing: a caller can make it at once and keep only it,
        // not also the request it was made from (see `Forward::run`). The exchange holds it,
        // not a combinator around the exchange: that layer moved the whole future once more
        // as it was made, and its output as it ended (~220 instructions a request).
        let counting = Some(InFlight::new(self));
        match self.ready_connection() {
            Some(conn) => Either::Left(self.send_on(conn, req, added, counting, keep)),
            // Boxed: dialling, or waiting for another request's HTTP/2 handshake, is rare.
            None => {
                let pool = self.clone();
                Either::Right(Box::pin(async move {
                    let conn = pool.connection().await?;
                    pool.send_on(conn, req, added, counting, keep).await
                }))
            }
        }
    }

    /// A connection to send on without waiting: the shared HTTP/2 one, or an idle HTTP/1.1
    /// one.
    pub(crate) fn ready_connection(&self) -> Option<Conn> {
        if let Some(sender) = self.live_h2() {
            return Some(Conn::H2 {
                sender,
                reused: true,
            });
        }
        if self.speaks_h2() {
            return None;
        }
        self.checkout().map(|conn| Conn::H1 { conn, reused: true })
    }

    /// A connection to send on: the shared HTTP/2 one, an idle HTTP/1.1 one, or a new one.
    /// An error here means nothing was sent, so the caller may try another address.
    pub(crate) async fn connection(self: &Arc<Self>) -> Result<Conn, UpstreamError> {
        if let Some(conn) = self.ready_connection() {
            return Ok(conn);
        }
        if self.speaks_h2() {
            // One handshake for everyone waiting: the connection it makes serves them all.
            let _dialing = self.h2_dial.lock().await;
            if let Some(sender) = self.live_h2() {
                return Ok(Conn::H2 {
                    sender,
                    reused: true,
                });
            }
        }
        self.connect().await
    }

    /// Sends on `conn`. A reused connection that closed before the request went out is
    /// replaced once by a fresh one: nothing reached the upstream, so that is safe.
    /// `counting` is held until the response head is in; `keep` comes back beside it.
    pub(crate) fn send_on(
        self: &Arc<Self>,
        conn: Conn,
        req: Request<RequestBody>,
        added: Option<Added>,
        counting: Option<InFlight>,
        keep: Option<InFlight>,
    ) -> impl Future<Output = Result<Sent, UpstreamError>> + Send + use<> {
        let retry = conn.reused();
        self.clone()
            .dispatch(conn, req, added, retry, counting, keep)
    }

    /// The retry of [`send_on`](Self::send_on): HTTP/2 may find that another request already
    /// replaced the closed connection; HTTP/1.1 takes a fresh one, not the next idle one,
    /// which may be just as stale. It is not retried again.
    async fn resend(
        self: Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let conn = if self.speaks_h2() {
            self.connection().await?
        } else {
            self.connect().await?
        };
        Ok(self.dispatch(conn, req, None, false, None, None).await?.0)
    }

    /// Sends on `conn` in its protocol; `retry`: once more on a fresh connection if the
    /// request never left. Only the proxy's own HTTP/1.1 exchange writes `added` beside the
    /// map; for hyper it goes into the map. `counting` is held until the response head is in;
    /// `keep` comes back beside it.
    fn dispatch(
        self: Arc<Self>,
        conn: Conn,
        mut req: Request<RequestBody>,
        added: Option<Added>,
        retry: bool,
        counting: Option<InFlight>,
        keep: Option<InFlight>,
    ) -> impl Future<Output = Result<Sent, UpstreamError>> + Send + use<> {
        match conn {
            Conn::H1 { conn, reused } if req.body().is_complete() => {
                to_h1(&mut req);
                let (parts, body) = req.into_parts();
                let exchange = H1Exchange {
                    conn,
                    reused,
                    retry,
                    counting,
                    keep,
                };
                Either::Left(self.send_h1(exchange, parts, added, body.into_data()))
            }
            conn => {
                if let Some(added) = added {
                    added.apply(req.headers_mut());
                }
                // Boxed: rare, and their state is hyper's handshake and dispatch.
                Either::Right(Box::pin(async move {
                    let _counting = counting;
                    let resp = match conn {
                        Conn::H1 { conn, .. } => {
                            to_h1(&mut req);
                            self.send_streamed(conn, req, retry).await
                        }
                        Conn::H2 { sender, .. } => self.send_h2(sender, req, retry).await,
                    };
                    Ok((resp?, keep))
                }))
            }
        }
    }

    /// An HTTP/1.1 exchange whose request body is wholly in hand, in this task.
    ///
    /// An `async` block, not an `async fn`: an `async fn` stores its arguments twice (as
    /// arguments, then as the body's locals), and these are a whole request head.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would store the head twice"
    )]
    fn send_h1(
        self: Arc<Self>,
        exchange: H1Exchange,
        mut parts: http::request::Parts,
        added: Option<Added>,
        data: Option<bytes::Bytes>,
    ) -> impl Future<Output = Result<Sent, UpstreamError>> + Send {
        let H1Exchange {
            conn,
            reused,
            retry,
            counting,
            keep,
        } = exchange;
        async move {
            let _counting = counting;
            // Decided before the retry is awaited, so the exchange's result is not kept
            // beside it.
            let sent = h1::exchange(
                conn,
                &mut parts,
                added.as_ref(),
                data.as_ref(),
                reused,
                &self,
            );
            match sent.await {
                Ok(resp) => return Ok((resp.map(UpstreamBody::H1), keep)),
                Err(ExchangeError::Retry(_)) if retry => {}
                Err(ExchangeError::Retry(source) | ExchangeError::Fatal(source)) => {
                    return Err(self.h1_error(source));
                }
            }
            // Boxed: rare, and inline its state would enlarge every request's future.
            if let Some(added) = added {
                added.apply(&mut parts.headers);
            }
            let req = Request::from_parts(parts, RequestBody::complete(data));
            Ok((Box::pin(self.resend(req)).await?, keep))
        }
    }

    /// A request over the shared HTTP/2 connection (boxed by the caller: hyper's send future
    /// is large, and HTTP/2 upstreams are the rarer kind).
    async fn send_h2(
        self: Arc<Self>,
        mut sender: http2::SendRequest<RequestBody>,
        req: Request<RequestBody>,
        retry: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let req = self.h2_request(req)?;
        let result = sender.try_send_request(req).await;
        self.hyper_sent(result, retry).await
    }

    /// What a send over hyper comes to: the response, or — when the request never left and
    /// `retry` allows it — one more try on a fresh connection, else the error.
    async fn hyper_sent(
        self: Arc<Self>,
        result: Result<Response<hyper::body::Incoming>, TrySendError<Request<RequestBody>>>,
        retry: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut e = match result {
            Ok(resp) => return Ok(resp.map(UpstreamBody::Hyper)),
            Err(e) => e,
        };
        match e.take_message() {
            Some(req) if retry => Box::pin(self.resend(req)).await,
            _ => Err(self.http_error(e.into_error())),
        }
    }

    /// A request whose body streams (longer than the read-ahead, or an HTTP/2 stream of
    /// unknown length) goes over hyper, which writes the body while the response may already
    /// be arriving. Its connection is not reused afterwards: such requests are rare, and
    /// telling when hyper is done with the connection would take a task per request.
    async fn send_streamed(
        self: Arc<Self>,
        conn: Box<H1Conn>,
        req: Request<RequestBody>,
        retry: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (mut sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(conn.into_io()))
            .await
            .map_err(|e| self.http_error(e))?;
        drive(connection, self.key.dial.clone());
        let result = sender.try_send_request(req).await;
        self.hyper_sent(result, retry).await
    }

    /// HTTP/2 carries the host in `:authority`, which needs an absolute URI: the client's Host
    /// (what v2 forwarded) becomes the authority, the upstream's own when there is none.
    fn h2_request(&self, req: Request<RequestBody>) -> Result<Request<RequestBody>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        if parts.uri.scheme().is_none() {
            let authority = parts
                .headers
                .remove(header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                .unwrap_or_else(|| self.authority.clone());
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.scheme = Some(Scheme::HTTPS);
            uri.authority = Some(authority);
            parts.uri = Uri::from_parts(uri)
                .map_err(|e| UpstreamError::Request(format!("cannot build HTTP/2 URI: {e}")))?;
        }
        parts.version = Version::HTTP_2;
        Ok(Request::from_parts(parts, body))
    }

    fn live_h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let slot = self.h2.here()?.load();
        slot.as_ref()
            .filter(|sender| !sender.is_closed())
            .map(|sender| http2::SendRequest::clone(sender))
    }

    fn http_error(&self, source: hyper::Error) -> UpstreamError {
        UpstreamError::Http {
            upstream: self.key.dial.clone(),
            source,
        }
    }

    fn h1_error(&self, source: h1::H1Error) -> UpstreamError {
        UpstreamError::H1 {
            upstream: self.key.dial.clone(),
            source,
        }
    }

    /// Every worker's idle connections.
    fn queues(&self) -> impl Iterator<Item = &ArrayQueue<Idle>> {
        self.idle.all().filter_map(OnceLock::get)
    }

    /// This worker's idle connections, made on first use.
    fn queue_here(&self) -> &ArrayQueue<Idle> {
        let workers = self.settings.workers.max(1);
        self.idle
            .here_or_make(workers, OnceLock::new)
            .get_or_init(|| ArrayQueue::new(self.settings.max_idle.div_ceil(workers).max(1)))
    }

    fn checkout(&self) -> Option<Box<H1Conn>> {
        let idle = self.idle.here()?.get()?;
        while let Some(mut idle) = idle.pop() {
            if idle.since.elapsed() < self.settings.idle_timeout && idle.conn.still_open() {
                return Some(idle.conn);
            }
            // Closed by the upstream, or idle too long: drop it (closes the connection).
        }
        None
    }

    /// Closes the idle connections the upstream has closed (or sent something unasked on),
    /// and those idle for `idle_timeout` as of `now`; returns how many. Otherwise such a
    /// connection is only found out when a request checks it out, and one to an address no
    /// request goes to any more (a deleted pod's) keeps its socket half-closed, in CLOSE-WAIT,
    /// for as long as the pool lives. See [`crate::upstream::Upstreams::sweep`].
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        let mut closed = 0;
        // One pass over what is queued now, oldest first, kept ones going back in order; a
        // request racing the pass may miss one and dial instead, as when all are busy.
        for idle in self.queues() {
            for _ in 0..idle.len() {
                let Some(mut conn) = idle.pop() else { break };
                if now.saturating_duration_since(conn.since) < self.settings.idle_timeout
                    && conn.conn.still_open()
                {
                    // Full only when releases raced the pass: then it closes, as theirs would.
                    if idle.push(conn).is_ok() {
                        continue;
                    }
                }
                closed += 1;
            }
        }
        closed
    }

    /// Takes back a connection whose response ended cleanly.
    pub(crate) fn release_h1(self: &Arc<Self>, mut conn: Box<H1Conn>) {
        conn.shrink();
        let idle = self.queue_here();
        // Full: this connection just closes.
        let _ = idle.push(Idle {
            conn,
            since: Instant::now(),
        });
        // One load per release once listed (a plain load on x86). Should it race a sweep
        // that just found the queue empty and miss the listing, this connection waits for
        // the pool's next release, or a checkout, to be looked at.
        if !self.listed.load(Ordering::SeqCst) {
            self.list();
        }
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        // Boxed: dialling (TCP, TLS, HTTP/2 handshakes) is the rare path but its state is
        // kilobytes, and inline it would make every request's future that large — moved and
        // copied on every request (measured: 92k instructions per request instead of 41k).
        let dial = Box::pin(self.dial());
        let result = match tokio::time::timeout(self.settings.connect_timeout, dial).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::ConnectTimeout(self.key.dial.clone())),
        };
        match &result {
            Ok(_) => self.failed_at.store(0, Ordering::Relaxed),
            Err(e) if e.is_connect() => self.failed_at.store(now_millis(), Ordering::Relaxed),
            Err(_) => {}
        }
        result
    }

    async fn dial(&self) -> Result<Conn, UpstreamError> {
        let connect_error = |source| UpstreamError::Connect {
            upstream: self.key.dial.clone(),
            source,
        };
        let tcp = TcpStream::connect((&*self.dial_host, self.dial_port))
            .await
            .map_err(connect_error)?;
        let _ = tcp.set_nodelay(true);
        let Some((connector, name)) = &self.tls else {
            return Ok(Conn::H1 {
                conn: Box::new(H1Conn::new(Io::Tcp(tcp))),
                reused: false,
            });
        };
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(connect_error)?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let sender = self.h2_handshake(tls).await?;
            self.h2
                .here_or_make(self.settings.workers, ArcSwapOption::empty)
                .store(Some(Arc::new(sender.clone())));
            self.speaks_h2.store(true, Ordering::Relaxed);
            Ok(Conn::H2 {
                sender,
                reused: false,
            })
        } else {
            self.speaks_h2.store(false, Ordering::Relaxed);
            Ok(Conn::H1 {
                conn: Box::new(H1Conn::new(Io::Tls(Box::new(tls)))),
                reused: false,
            })
        }
    }

    async fn h2_handshake<T>(&self, io: T) -> Result<http2::SendRequest<RequestBody>, UpstreamError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Finds a connection that died without a FIN (e.g. a vanished pod) before a
            // request has to.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| self.http_error(source))?;
        drive(conn, self.key.dial.clone());
        Ok(sender)
    }
}

/// Runs a connection's I/O in its own task until it ends. Errors are routine (the upstream
/// closed or reset it; the request that saw it reports it), so they are only logged at debug.
fn drive(
    conn: impl Future<Output = Result<(), hyper::Error>> + Send + 'static,
    upstream: Box<str>,
) {
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, %upstream, "upstream connection ended with an error");
        }
    });
}

/// Undoes [`HostPool::h2_request`] for a request that has to go over HTTP/1.1 after all (the
/// upstream stopped offering h2 between two connections). In place: most requests need
/// nothing done, and taking and returning the request moved its ~400 bytes twice.
fn to_h1(req: &mut Request<RequestBody>) {
    if req.uri().scheme().is_none() {
        return;
    }
    if let Some(authority) = req.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    if let Some(pq) = req.uri().path_and_query()
        && let Ok(uri) = Uri::try_from(pq.as_str())
    {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_11;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_made_for_http2_goes_back_to_http1_in_place() {
        // Made for HTTP/2 (absolute target, `:authority`), then sent over HTTP/1.1 after all.
        let mut req = Request::get("https://up.example:8443/x?q=1")
            .version(Version::HTTP_2)
            .body(RequestBody::complete(None))
            .unwrap();
        to_h1(&mut req);
        assert_eq!(req.uri(), "/x?q=1");
        assert_eq!(req.headers()[header::HOST], "up.example:8443");
        assert_eq!(req.version(), Version::HTTP_11);
        // Most requests: origin-form already, left as they are.
        let mut req = Request::get("/y")
            .header(header::HOST, "client.example")
            .body(RequestBody::complete(None))
            .unwrap();
        to_h1(&mut req);
        assert_eq!(req.uri(), "/y");
        assert_eq!(req.headers()[header::HOST], "client.example");
        assert_eq!(req.version(), Version::HTTP_11);
    }
}
