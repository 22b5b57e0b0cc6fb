//! The traffic listener: HTTP/1.1 and HTTP/2 (h2c) on one port, and the per-request flow:
//! route lookup → failure / mock / proxy pass, with the Kanali error contract for every
//! failure and a correlation id on every response.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version, request};
use http_body::Body as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{ClientBody, ProxyBody, RequestBody, read_ahead};
use crate::errors::ErrorCode;
use crate::filter::credentials::UsageLog;
use crate::filter::wasm::Exchange;
use crate::filter::{self, Passed, RequestInfo};
use crate::headers::{Added, X_KANALI_CORRELATION_ID, strip_hop_by_hop};
use crate::listen::listener::Watchdog;
use crate::observe::metrics::Metrics;
use crate::request::Refusal;
use crate::route::path::upstream_path;
use crate::route::table::{Action, RouteTable};
use crate::upstream::dynamic::X_KANALI_SERVICE_CARDINALITY;
use crate::upstream::pool::Sent;
use crate::upstream::{Upstream, UpstreamError};

/// Listener limits, and the optional HTTPS listener.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Time a client has to send the request head (slowloris protection); also the time a
    /// new connection has to complete its TLS handshake, and, for HTTP/1.1, how long a
    /// keep-alive connection may wait for its next request.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger heads get 431.
    pub max_header_bytes: usize,
    /// Time the upstream has to start answering.
    pub upstream_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 keep-alive pings on a connection that received nothing meanwhile;
    /// None: no pings.
    pub http2_keep_alive_interval: Option<Duration>,
    /// A ping not acknowledged within this closes the HTTP/2 connection.
    pub http2_keep_alive_timeout: Duration,
    /// The HTTPS listener, if any (the cleartext one always runs).
    pub tls: Option<crate::listen::tls::TlsConfig>,
    /// Request bodies are read up to this many bytes before anything is sent upstream, so a
    /// malformed one is refused (400) instead of reaching the upstream half sent; the rest of
    /// a longer body streams. 0: stream from the first byte.
    pub request_buffer_bytes: usize,
    /// HTTP/1: keep handling a request after the client shut down its sending side (see
    /// [`crate::h1::server::Settings::half_close`]). Off: the request is cancelled, upstream
    /// included, as soon as the client's stream ends.
    pub http1_half_close: bool,
    /// Log a line for every request (the access log: `observe::access_log`).
    pub access_log: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            upstream_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            http2_keep_alive_interval: Some(Duration::from_secs(30)),
            http2_keep_alive_timeout: Duration::from_secs(20),
            tls: None,
            request_buffer_bytes: 64 * 1024,
            http1_half_close: false,
            access_log: false,
        }
    }
}

/// The client end of a connection, with what every request on it forwards about it (made
/// once per connection, not per request).
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its address.
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl Peer {
    /// The peer at `addr`.
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            forwarded_for: crate::headers::forwarded_for(addr.ip()),
        }
    }
}

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    /// The current routing table; `None` until the first snapshot is applied.
    pub tables: Arc<ArcSwapOption<RouteTable>>,
    config: ServerConfig,
    usage: Arc<UsageLog>,
    /// What its requests and connections are counted in.
    pub metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy serving from `tables`, logging key usage into `usage`, counting into a
    /// [`Metrics`] of one shard (see [`Proxy::with_metrics`]).
    pub fn new(
        tables: Arc<ArcSwapOption<RouteTable>>,
        config: ServerConfig,
        usage: Arc<UsageLog>,
    ) -> Self {
        Proxy {
            tables,
            config,
            usage,
            metrics: Arc::new(Metrics::new(1)),
        }
    }

    /// Whether every request gets a line in the access log.
    pub(crate) fn access_log(&self) -> bool {
        self.config.access_log
    }

    /// The same, counting into `metrics` (one shard per worker).
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Proxy { metrics, ..self }
    }

    /// Handles one request. Never fails: every problem becomes a Kanali error response, and a
    /// panic while routing or answering becomes error 01 (logged) rather than a dropped
    /// connection. `finish` gets the response last, with its correlation id; its result is
    /// the future's output.
    ///
    /// Routing, the plugins' request phase and the rewriting of the head happen in this call;
    /// the future it returns owns what is left — sending upstream, the response phase — and
    /// borrows nothing. No layer of it is an `async fn`: an `async fn` keeps its arguments (a
    /// request, here) for as long as it runs, twice over, beside the future it awaits, and
    /// each layer's future is moved into its parent's on the first poll. Built that way the
    /// request's state was 5 KiB, copied several times per request. `finish` and the panic
    /// guard are inside it for the same reason: as layers around it, each moved the ~700-byte
    /// future once more.
    ///
    /// `watchdog`: the request runs in its connection's task, whose timer watches the upstream
    /// exchange's deadline (HTTP/1.x); without, the exchange has a timer of its own.
    /// `started`: when the request began, which its deadline counts from.
    ///
    /// The future comes boxed, as its callers keep it: a connection holds its request's
    /// future, and unboxed every connection would carry a request's state while idle.
    pub(crate) fn handle<F, R>(
        &self,
        req: Request<ClientBody>,
        peer: &Peer,
        watchdog: Option<Arc<Watchdog>>,
        started: tokio::time::Instant,
        finish: F,
    ) -> Pin<Box<impl Future<Output = R> + Send + use<F, R>>>
    where
        F: FnOnce(Response<ProxyBody>) -> R + Send,
    {
        // Boxed first, and the state made into the box: made first, it was copied on its way
        // out of the panic guard, into `Handling`, and into the box (~700 bytes each time).
        let mut handling = crate::boxed(|| Handling {
            state: Handled::Answer { resp: None },
            correlation_id: None,
            finish: Some(finish),
        });
        let this = handling.as_mut().project();
        let id = this.correlation_id.insert(correlation_id());
        guarded(this.state, id, || {
            let (decision, passed) = self.decide(req, peer, id, watchdog, started);
            match (decision, passed) {
                (Decision::Answer(resp), None) => Handled::Answer { resp: Some(resp) },
                (Decision::Forward(forward), passed) => forward.run(passed),
                // Boxed, as every plugin response phase: rare, and its state is the plugins'.
                (Decision::Answer(resp), Some(passed)) => Handled::Boxed {
                    handling: Box::pin(passed.respond(resp)),
                },
            }
        });
        handling
    }

    /// Where a request goes: the answer (failure, mock, a plugin's refusal) or its head
    /// rewritten for the upstream, with what the plugins that passed it keep for the response.
    fn decide(
        &self,
        req: Request<ClientBody>,
        peer: &Peer,
        correlation_id: &HeaderValue,
        watchdog: Option<Arc<Watchdog>>,
        started: tokio::time::Instant,
    ) -> (Decision, Option<Box<Passed>>) {
        let answer = |resp| (Decision::Answer(resp), None);
        let (mut parts, body) = req.into_parts();
        // In-flight requests keep what they computed from the table, and a snapshot swap
        // never waits for them: the guard ends with this call, before anything is awaited.
        let tables = self.tables.load();
        let Some(table) = tables.as_ref() else {
            return answer(ErrorCode::NoApiProxy.response());
        };
        let host = match crate::request::host_of(&parts) {
            Ok(host) => host,
            Err(refusal) => return answer(refusal.response(parts.version)),
        };
        let path = parts.uri.path();
        let Some(route) = table.router.lookup(host, path) else {
            return answer(ErrorCode::NoApiProxy.response());
        };
        // With room for the query, which follows it upstream (see `origin_form`).
        let query_room = parts.uri.query().map_or(0, |q| q.len() + 1);
        let target = upstream_path(&route.path, &route.target_path, path, query_room);
        // The plugins see every request the route takes, whatever its backend (v2 ran them
        // before the mock step too).
        let passed = if route.filters.is_empty() {
            None
        } else {
            let host = host.unwrap_or_default().to_owned();
            let info = RequestInfo {
                method: &parts.method,
                upstream_path: &target,
                uri: &parts.uri,
                host: &host,
                peer: peer.addr,
                version: parts.version,
                https: crate::listen::listener::forwarded_proto(&parts.extensions) == "https",
                correlation_id,
                end_of_stream: body.is_end_stream(),
            };
            match filter::run(
                &route.filters,
                &info,
                &mut parts.headers,
                &table.credentials,
                &self.usage,
            ) {
                Ok(passed) => Some(Box::new(passed)),
                Err(stop) => return answer(stop.into_response()),
            }
        };
        let (upstream, cardinality) = match &route.action {
            Action::Fail(code) => return (Decision::Answer(code.response()), passed),
            Action::Mock(mock) => {
                let resp = mock
                    .respond(&target, &parts.method)
                    .unwrap_or_else(|| ErrorCode::NoMockTarget.response());
                return (Decision::Answer(resp), passed);
            }
            Action::Proxy(upstream) => (upstream.clone(), None),
            Action::Dynamic(dynamic) => match dynamic.select(&parts.headers) {
                Some(chosen) => (
                    Upstream::Service(chosen.target.clone()),
                    (chosen.matches > 1).then_some(chosen.matches),
                ),
                None => return (Decision::Answer(ErrorCode::NoService.response()), passed),
            },
        };
        let Some(uri) = origin_form(target, parts.uri.query()) else {
            return (Decision::Answer(ErrorCode::Upstream.response()), passed);
        };
        let timeout = route.timeout.unwrap_or(self.config.upstream_timeout);
        let client_version = parts.version;
        let added = rewrite_head(&mut parts, peer, &upstream, uri, correlation_id);
        let forward = Forward {
            parts,
            added,
            body,
            upstream,
            deadline: started + timeout,
            timeout,
            cardinality,
            client_version,
            read_ahead: self.config.request_buffer_bytes,
            watchdog,
        };
        (Decision::Forward(forward), passed)
    }
}

/// What [`Proxy::decide`] decided.
enum Decision {
    /// The response, made here.
    Answer(Response<ProxyBody>),
    /// The request goes upstream.
    Forward(Forward),
}

/// A request on its way upstream: its head rewritten, its body still the client's.
struct Forward {
    parts: request::Parts,
    /// What the proxy sets on it, beside its map.
    added: Added,
    body: ClientBody,
    upstream: Upstream,
    deadline: tokio::time::Instant,
    timeout: Duration,
    /// How many Services a dynamic route matched, when more than one.
    cardinality: Option<usize>,
    /// The client's protocol (the head now says HTTP/1.1).
    client_version: Version,
    /// [`ServerConfig::request_buffer_bytes`].
    read_ahead: usize,
    /// See [`Proxy::handle`].
    watchdog: Option<Arc<Watchdog>>,
}

impl Forward {
    /// Sends the request and answers with the upstream's response, or the error that
    /// replaces it; then the plugins' response phase, if `passed` has one.
    ///
    /// The upstream send is made here for a request with nothing to read first (most), so
    /// the returned future holds that send, which owns the head, and not the head as well: an
    /// `async` block keeps what it captures for as long as it runs.
    fn run(self, passed: Option<Box<Passed>>) -> Handled<impl Sending> {
        let Forward {
            mut parts,
            added,
            body,
            upstream,
            deadline,
            timeout,
            cardinality,
            client_version,
            read_ahead,
            watchdog,
        } = self;
        if passed.is_none() && body.is_end_stream() {
            let request = Request::from_parts(parts, RequestBody::Streamed(body));
            // Not an `async` block: awaiting the send, it would hold it twice, captured and
            // pinned.
            return Handled::Sending {
                sent: upstream.send(request, Some(added)),
                due: match watchdog {
                    Some(watchdog) => Due::Watched {
                        watching: Watching {
                            watchdog,
                            deadline,
                            started: false,
                        },
                    },
                    None => Due::Timer {
                        sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    },
                },
                upstream,
                timeout,
                cardinality,
            };
        }
        // Boxed: only requests with a body to read first, or plugins with a response phase,
        // carry the state of those.
        Handled::Boxed {
            handling: Box::pin(async move {
                let mut passed = passed;
                let mut resp = 'resp: {
                    let wasm = passed.as_mut().and_then(|p| p.wasm.as_mut());
                    // A Wasm plugin's body phase sees the head as it will go.
                    let added = match wasm {
                        Some(_) => {
                            added.apply(&mut parts.headers);
                            None
                        }
                        None => Some(added),
                    };
                    let request = if body.is_end_stream() && wasm.is_none() {
                        Request::from_parts(parts, RequestBody::Streamed(body))
                    } else {
                        let read =
                            body_phase(parts, body, client_version, deadline, read_ahead, wasm);
                        match read.await {
                            Ok(request) => request,
                            Err(refused) => break 'resp refused,
                        }
                    };
                    let send = upstream.send(request, added);
                    let sent = tokio::time::timeout_at(deadline, send).await.ok();
                    upstream_answer(sent, &upstream, timeout)
                };
                with_cardinality(&mut resp, cardinality);
                match passed {
                    None => resp,
                    // Boxed, as every plugin response phase: its state is the plugins'.
                    Some(passed) => Box::pin(passed.respond(resp)).await,
                }
            }),
        }
    }
}

/// What [`Upstream::send`] returns.
trait Sending: Future<Output = Result<Sent, UpstreamError>> + Send {}

impl<F: Future<Output = Result<Sent, UpstreamError>> + Send> Sending for F {}

pin_project_lite::pin_project! {
    /// A request being handled, as one future: its answer, put together where it is ready.
    ///
    /// One layer, not a combinator for each step (`Either`s of the ways a request goes,
    /// `Map`s that finish the answer and add the correlation id): every layer moved the
    /// 192-byte response once more on its way out, and matched its own state on every poll.
    struct Handling<S, F> {
        #[pin]
        state: Handled<S>,
        correlation_id: Option<HeaderValue>,
        finish: Option<F>,
    }
}

pin_project_lite::pin_project! {
    /// How a request is answered.
    #[project = HandledProj]
    enum Handled<S> {
        /// Already: a failure, a mock, a plugin's refusal.
        Answer { resp: Option<Response<ProxyBody>> },
        /// By the upstream, with nothing to read or run first (most requests).
        Sending {
            #[pin]
            sent: S,
            #[pin]
            due: Due,
            upstream: Upstream,
            timeout: Duration,
            cardinality: Option<usize>,
        },
        /// After reading the body first, or with the plugins' response phase.
        Boxed { handling: Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>> },
    }
}

pin_project_lite::pin_project! {
    /// What tells an upstream exchange that it is past its deadline.
    #[project = DueProj]
    enum Due {
        /// A timer of its own (HTTP/2). Boxed: inline, its 112 bytes made every request's
        /// future larger, HTTP/1.x's too, which are watched by their connection's timer.
        Timer {
            sleep: Pin<Box<tokio::time::Sleep>>,
        },
        /// Its connection's timer (see [`Watchdog`]), which wakes the task the exchange runs
        /// in when it is due; the exchange then looks at the clock.
        Watched { watching: Watching },
    }
}

/// An exchange on its connection's [`Watchdog`], from its first wait until it ends or is
/// dropped (answered, cancelled, or its handling panicked).
struct Watching {
    watchdog: Arc<Watchdog>,
    deadline: tokio::time::Instant,
    started: bool,
}

impl Watching {
    fn stop(&mut self) {
        if std::mem::take(&mut self.started) {
            self.watchdog.unwatch();
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Due {
    /// Ready once the exchange's deadline has passed.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project() {
            DueProj::Timer { sleep } => sleep.as_mut().poll(cx),
            DueProj::Watched { watching } => {
                if !watching.started {
                    // Just sent: not due yet (the connection's timer wakes it if it is
                    // already).
                    watching.started = true;
                    watching.watchdog.watch(watching.deadline);
                    return Poll::Pending;
                }
                if tokio::time::Instant::now() < watching.deadline {
                    return Poll::Pending;
                }
                watching.stop();
                Poll::Ready(())
            }
        }
    }

    /// The exchange answered.
    fn done(self: Pin<&mut Self>) {
        if let DueProj::Watched { watching } = self.project() {
            watching.stop();
        }
    }
}

/// Sets `state` to what `make` makes, or to the answer to its panic (for the request `id`).
fn guarded<S>(
    mut state: Pin<&mut Handled<S>>,
    id: &HeaderValue,
    make: impl FnOnce() -> Handled<S>,
) {
    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.set(make())));
    if let Err(panic) = made {
        state.set(Handled::Answer {
            resp: Some(panicked(panic, Some(id))),
        });
    }
}

impl<S: Sending> Handled<S> {
    /// The answer, once there is one.
    fn poll_answer(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<ProxyBody>> {
        Poll::Ready(match self.project() {
            // Taken once: `Handling` is not polled again once it answered (it would panic).
            HandledProj::Answer { resp } => {
                resp.take().unwrap_or_else(|| ErrorCode::Unknown.response())
            }
            HandledProj::Sending {
                sent,
                mut due,
                upstream,
                timeout,
                cardinality,
            } => {
                let sent = match sent.poll(cx) {
                    Poll::Ready(sent) => {
                        due.as_mut().done();
                        Some(sent)
                    }
                    Poll::Pending => {
                        ready!(due.as_mut().poll(cx));
                        None
                    }
                };
                let mut resp = upstream_answer(sent, upstream, *timeout);
                with_cardinality(&mut resp, *cardinality);
                resp
            }
            HandledProj::Boxed { handling } => ready!(handling.as_mut().poll(cx)),
        })
    }
}

impl<S: Sending, F, R> Future for Handling<S, F>
where
    F: FnOnce(Response<ProxyBody>) -> R,
{
    type Output = R;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<R> {
        let this = self.project();
        let state = this.state;
        // A panic leaves the state half-done; it is answered here and never polled again.
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.poll_answer(cx)));
        let mut resp = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(resp)) => resp,
            Err(panic) => panicked(panic, this.correlation_id.as_ref()),
        };
        if let Some(id) = this.correlation_id.take() {
            // With the upstream's fields when it sent them unparsed: in the map, which then
            // held it alone, it cost a hash and a clear (see `RawFields`).
            match resp.body_mut().raw_fields_mut() {
                Some(raw) => raw.set_own(&X_KANALI_CORRELATION_ID, id),
                None => {
                    resp.headers_mut().insert(&X_KANALI_CORRELATION_ID, id);
                }
            }
        }
        match this.finish.take() {
            Some(finish) => Poll::Ready(finish(resp)),
            None => panic!("a request's handling was polled after it answered"),
        }
    }
}

/// The correlation id a response carries: in its map, or with the upstream's unparsed
/// fields (see [`Handling`]).
pub(crate) fn correlation_id_of(resp: &Response<ProxyBody>) -> Option<&HeaderValue> {
    match resp.body().raw_fields() {
        Some(raw) => raw.own_value(),
        None => resp.headers().get(&X_KANALI_CORRELATION_ID),
    }
}

/// Says how many Services a dynamic route matched, when more than one.
fn with_cardinality(resp: &mut Response<ProxyBody>, cardinality: Option<usize>) {
    if let Some(n) = cardinality {
        // Said on errors too: v2 set it before proxying.
        resp.headers_mut()
            .insert(&X_KANALI_SERVICE_CARDINALITY, HeaderValue::from(n));
    }
}

/// Rewrites a request head for the upstream: hop-by-hop headers out, `Host` in, the target in
/// origin form, HTTP/1.1; returns the `X-Forwarded-*` headers and correlation id to send with
/// it.
fn rewrite_head(
    parts: &mut request::Parts,
    peer: &Peer,
    upstream: &Upstream,
    uri: Uri,
    correlation_id: &HeaderValue,
) -> Added {
    // The host the request was routed by (`decide` checked it): the target's authority
    // (absolute-form, HTTP/2 `:authority`) or the Host header. The upstream and
    // X-Forwarded-Host get that same name (RFC 9112 §3.2.2: an absolute-form target replaces
    // Host).
    let (host, in_header) = match parts.uri.authority() {
        Some(authority) => (HeaderValue::from_str(authority.as_str()).ok(), false),
        None => (parts.headers.get(header::HOST).cloned(), true),
    };
    // Never forward an API key (v2 did the same): on routes with the apikey plugin the plugin
    // has removed its header already; this is for the others.
    let stripped = strip_hop_by_hop(
        &mut parts.headers,
        Some(&crate::filter::api_key::DEFAULT_HEADER),
    );
    // HTTP/2 clients send the host as :authority, which HTTP/1.1 upstreams need as a header
    // (an HTTP/2 upstream gets it back as :authority). A client that named no host at all
    // (HTTP/1.0) gets the upstream's own, since HTTP/1.1 requires one.
    match &host {
        // Most requests: the Host header is the name already (one, `decide` checked), unless
        // the client's `Connection` header named it.
        Some(_) if in_header && !stripped.named_any => {}
        Some(v) => {
            parts.headers.insert(header::HOST, v.clone());
        }
        None => match HeaderValue::from_str(upstream.authority().as_str()) {
            Ok(v) => {
                parts.headers.insert(header::HOST, v);
            }
            Err(_) => {
                parts.headers.remove(header::HOST);
            }
        },
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    Added::take(
        &mut parts.headers,
        stripped.proxy_set,
        &peer.forwarded_for,
        crate::listen::listener::forwarded_proto(&parts.extensions),
        host,
        correlation_id.clone(),
    )
}

/// A request with a body (or Wasm plugins with a body phase): the body read ahead, so a
/// malformed or truncated one is refused before anything is sent, then the plugins' body
/// phase.
async fn body_phase(
    mut parts: request::Parts,
    body: ClientBody,
    client_version: Version,
    deadline: tokio::time::Instant,
    read_ahead: usize,
    wasm: Option<&mut Exchange>,
) -> Result<Request<RequestBody>, Response<ProxyBody>> {
    let body = if body.is_end_stream() {
        RequestBody::Streamed(body)
    } else {
        read_body(body, read_ahead, client_version, deadline).await?
    };
    if matches!(body, RequestBody::ReadAhead { .. }) {
        // Reading the body answered the client's 100-continue already.
        parts.headers.remove(header::EXPECT);
    }
    let body = match wasm {
        None => body,
        Some(exchange) => exchange
            .request_body(&mut parts.headers, body)
            .map_err(|stop| stop.into_response())?,
    };
    Ok(Request::from_parts(parts, body))
}

/// Reads a request body ahead (see [`read_ahead`]), or the answer refusing it.
async fn read_body(
    body: ClientBody,
    limit: usize,
    version: Version,
    deadline: tokio::time::Instant,
) -> Result<RequestBody, Response<ProxyBody>> {
    let read = read_ahead(body, limit, version == Version::HTTP_2);
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(error)) => {
            tracing::debug!(%error, "request body refused");
            Err(Refusal::BadBody.response(version))
        }
        Err(_) => Err(Refusal::BodyTimeout.response(version)),
    }
}

/// The client's response from what the upstream answered (`None`: nothing before the
/// deadline), or the error that replaces it.
fn upstream_answer(
    sent: Option<Result<Sent, UpstreamError>>,
    upstream: &Upstream,
    timeout: Duration,
) -> Response<ProxyBody> {
    match sent {
        Some(Ok((resp, in_flight))) => {
            let (mut parts, body) = resp.into_parts();
            let _ = strip_hop_by_hop(&mut parts.headers, None);
            // An HTTP/2 upstream's response goes back in the client's protocol.
            parts.version = Version::HTTP_11;
            Response::from_parts(parts, ProxyBody::Upstream(body, in_flight))
        }
        Some(Err(error)) => {
            tracing::debug!(%error, upstream = %upstream.authority(), "upstream request failed");
            ErrorCode::Upstream.response()
        }
        None => {
            tracing::debug!(upstream = %upstream.authority(), ?timeout, "upstream timed out");
            ErrorCode::Upstream.response()
        }
    }
}

/// Error 01 for a request (`id`) whose handling panicked, and the panic logged.
#[cold]
fn panicked(panic: Box<dyn std::any::Any + Send>, id: Option<&HeaderValue>) -> Response<ProxyBody> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    let id = id.and_then(|v| v.to_str().ok()).unwrap_or("-");
    tracing::error!(panic = %what, correlation_id = ?id, "request handler panicked; answered error 01");
    ErrorCode::Unknown.response::<ProxyBody>()
}

/// The request target sent upstream: `path[?query]`, the query exactly as the client sent it.
/// `path` becomes the target's own bytes (no copy: a `Uri` made from a `String` takes it).
fn origin_form(mut path: String, query: Option<&str>) -> Option<Uri> {
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    Uri::try_from(path).ok()
}

/// A random UUID v4. Not cryptographic (it needs to be unique, not unguessable), so a fast
/// thread-local generator instead of a syscall per request.
fn correlation_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf);
    // Owner-backed, so the copy that goes upstream is a reference count: a value copied from
    // a slice allocates again on its first clone (measured: 131 instructions a request). A
    // table-driven formatter of our own in place of `uuid`'s measured 184 more: the value's
    // validation then ran byte by byte.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Accepts connections until `shutdown` turns true, then lets open connections finish their
/// current requests. With `tls`, every connection is a TLS handshake first (with the
/// certificate current when it was accepted), and its requests carry a
/// [`crate::listen::listener::TlsConnection`] extension. Once `drain` fires, connections are asked
/// to close (see [`crate::shutdown`]) while new ones are still accepted. `worker`: which
/// worker serves it, whose shard of the metrics its connections count in.
pub async fn serve(
    listener: TcpListener,
    tls: Option<crate::listen::tls::ServerTls>,
    proxy: Arc<Proxy>,
    worker: usize,
    drain: crate::shutdown::DrainSignal,
    shutdown: watch::Receiver<bool>,
) {
    let config = proxy.config.clone();
    crate::listen::listener::serve(listener, tls, proxy, worker, &config, drain, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::BodyExt as _;

    /// Never made: the send type of handlings that do not send.
    type NoSend = std::future::Ready<Result<Sent, UpstreamError>>;
    /// A `finish` that keeps the response as it is.
    type AsIs = fn(Response<ProxyBody>) -> Response<ProxyBody>;

    fn handling(state: Handled<NoSend>, id: &HeaderValue) -> Handling<NoSend, AsIs> {
        Handling {
            state,
            correlation_id: Some(id.clone()),
            finish: Some(|resp| resp),
        }
    }

    #[tokio::test]
    async fn a_panic_while_routing_or_answering_answers_error_01() {
        let id = correlation_id();
        let answering = Handled::Boxed {
            handling: Box::pin(async { panic!("boom") }),
        };
        let resp = handling(answering, &id).await;
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers().get(&X_KANALI_CORRELATION_ID), Some(&id));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, ErrorCode::Unknown.body().as_bytes());
        // Routing runs when the handling is made.
        let mut routing = Box::pin(handling(Handled::Answer { resp: None }, &id));
        guarded(routing.as_mut().project().state, &id, || panic!("routing"));
        let resp = routing.await;
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers().get(&X_KANALI_CORRELATION_ID), Some(&id));
        let ok = Handled::Answer {
            resp: Some(ErrorCode::NoApiProxy.response()),
        };
        let resp = handling(ok, &id).await;
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers().get(&X_KANALI_CORRELATION_ID), Some(&id));
    }

    #[test]
    fn correlation_ids_are_uuid_v4_text() {
        let (a, b) = (correlation_id(), correlation_id());
        assert_ne!(a, b);
        for id in [a, b] {
            let parsed = uuid::Uuid::try_parse_ascii(id.as_bytes()).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
            assert_eq!(parsed.hyphenated().to_string().as_bytes(), id.as_bytes());
        }
    }
}
