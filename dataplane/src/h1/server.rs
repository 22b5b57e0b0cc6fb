//! HTTP/1.x from clients, in the connection's own task.
//!
//! hyper's server cost ~9k of the ~31k instructions a proxied request took (callgrind), and
//! every keep-alive connection kept two 8 KiB read buffers and an 8 KiB write buffer for as
//! long as it lived (massif: ~29 KiB per idle connection after one request; hyper has no
//! setting to release them). Here a connection between requests holds no buffer at all: it
//! waits for its next request by reading into the stack, and only a request that arrives is
//! copied to the heap, in an allocation of its own size.
//!
//! Requests are parsed strictly, because a proxy that reads a request's framing differently
//! from the server behind it lets one request hide inside another (request smuggling). Per
//! RFC 9112, refused with 400 and the connection closed:
//! - `Content-Length` together with `Transfer-Encoding`, `Content-Length`s that disagree or
//!   are not plain digits, `Transfer-Encoding` in HTTP/1.0 or not ending in `chunked`
//!   (codings other than `chunked`: 501);
//! - obs-fold, bare LF line ends, control characters in values, whitespace before a colon;
//! - chunk sizes that are not 1–16 hex digits, chunk data not followed by CRLF.
//!
//! A body streams to the handler through a channel, read from the socket only once the
//! handler asks for it (which is also when `Expect: 100-continue` is answered); bodies that
//! arrived whole with their head are handed over as they are.

use std::fmt::Display;
use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::{
    Chunk, Decoded, Field, FieldKind, H1Error, LengthError, MAX_HEADERS, RawFields, State,
    clear_map, content_length, elements, field_name, offset, parse_length, reserve, take,
    write_field,
};

/// What a wait for a request reads at once, on the stack (a request head is usually far
/// smaller; a larger one takes more reads).
const STACK_READ: usize = 8 * 1024;
/// A response head buffer that grew past this is not kept for the next response.
const KEEP_WRITE: usize = 4 * 1024;
/// Closing with a request (body) still coming: how long to wait for more of it at a time, and
/// at most in all (nginx's `lingering_timeout` and `lingering_time`).
const LINGER_QUIET: Duration = Duration::from_secs(5);
const LINGER_MAX: Duration = Duration::from_secs(30);
/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A response body as the connection writes it: its frames, and the upstream's header
/// fields it may carry unparsed ([`RawFields`]), which go out beside the response's map.
pub trait ResponseBody: Body<Data = Bytes> + Unpin {
    /// The fields it carries, taken; `None` when the map is the whole header section.
    fn take_fields(&mut self) -> Option<RawFields> {
        None
    }
}

/// How a connection ended.
pub enum Ended<I> {
    /// Closed (by either side), or given up after an error.
    Closed,
    /// A request head was refused before any handler saw it (malformed, or too large): it
    /// was answered with this status and reason, and the connection closed.
    Refused(StatusCode, &'static str),
    /// The client speaks HTTP/2 (it sent the connection preface): the stream, and what was
    /// read of it, for an HTTP/2 server to take over.
    Http2(I, Bytes),
}

/// How a connection treats its client.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Largest request head accepted; larger heads get 431.
    pub max_head: usize,
    /// Keep handling a request after the client shut down its sending side. Off, the end of
    /// the client's stream while a request is handled means the client is gone (most clients
    /// close only when they give up): the request is dropped, and with it its upstream
    /// exchange, as hyper and nginx do.
    pub half_close: bool,
}

/// A client's stream, which can tell without being polled that it has nothing to read.
///
/// Between requests the connection reads the next head, which mostly is not there yet: the
/// read then stores the task's waker with the socket, under the socket's lock. While the
/// upstream answered, though, the connection was watched for the client leaving
/// (`poll_gone`), which stored that same waker; it stays stored until the socket turns
/// readable, which also sets the readiness the runtime keeps for it. So while that readiness
/// is clear, the waker is there, and the read can wait without being tried (measured: −135
/// instructions a request).
pub trait Peek {
    /// Whether a read now would surely find nothing, neither bytes nor the end; `false` when
    /// the stream cannot tell without a read.
    fn nothing_to_read(&self) -> bool {
        false
    }
}

impl Peek for tokio::net::TcpStream {
    fn nothing_to_read(&self) -> bool {
        // Looks at the readiness only: no system call unless it says readable.
        matches!(self.try_read(&mut []), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// TLS may hold decrypted bytes the socket's readiness does not show.
impl<IO> Peek for tokio_rustls::server::TlsStream<IO> {}

/// A boxed stream peeks as the stream does.
impl<T: Peek + ?Sized> Peek for Box<T> {
    fn nothing_to_read(&self) -> bool {
        (**self).nothing_to_read()
    }
}

/// The tests' in-memory streams.
#[cfg(test)]
impl Peek for tokio::io::DuplexStream {}

/// Serves HTTP/1.x requests on `io` with `service` until the connection closes.
///
/// `closing` asks the connection to end: at once when no request is in progress, else after
/// the current response (which then says `Connection: close`). It is checked whenever the
/// connection is polled, so whoever sets it must poll this future again (the connection task
/// does: it owns both).
pub async fn serve<I, S, F, B>(
    io: I,
    settings: Settings,
    closing: &AtomicBool,
    mut service: S,
) -> Result<Ended<I>, H1Error>
where
    I: AsyncRead + AsyncWrite + Peek + Unpin,
    S: FnMut(Request<Incoming>) -> F,
    F: Future<Output = Response<B>>,
    B: ResponseBody,
    B::Error: Display,
{
    let mut conn = Conn {
        io,
        read: BytesMut::new(),
        write: Vec::new(),
        max_head: settings.max_head,
        half_close: settings.half_close,
        watched: false,
    };
    let mut first = true;
    loop {
        let head = match poll_fn(|cx| conn.poll_head(cx, closing, first)).await {
            Ok(Next::Head(head)) => head,
            Ok(Next::Closed) => return Ok(Ended::Closed),
            Ok(Next::Http2) => return Ok(Ended::Http2(conn.io, conn.read.freeze())),
            // Reading failed: nobody to answer.
            Err(Refused::Io(e)) => return Err(e.into()),
            Err(Refused::Status(status, reason)) => {
                conn.refuse(status, reason).await;
                return Ok(Ended::Refused(status, reason));
            }
        };
        first = false;
        // Boxed: a request's state (its body pump, the response being written) is a
        // request's memory, not something every idle connection carries.
        if !crate::boxed(|| conn.exchange(head, &mut service, closing)).await {
            return Ok(Ended::Closed);
        }
        conn.idle();
    }
}

/// A request's body, read by the connection it came on.
#[derive(Debug)]
pub struct Incoming {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// All of it, in hand (`None`: none, or taken).
    Full(Option<Bytes>),
    /// Arriving: frames from the connection's task, which starts reading once `want` fires.
    Stream {
        frames: mpsc::Receiver<Result<Frame<Bytes>, H1Error>>,
        want: Option<oneshot::Sender<()>>,
        /// Bytes still to come, for a body of known length.
        left: Option<u64>,
        ended: bool,
    },
}

impl Incoming {
    fn empty() -> Self {
        Incoming {
            kind: Kind::Full(None),
        }
    }

    fn full(data: Bytes) -> Self {
        Incoming {
            kind: Kind::Full((!data.is_empty()).then_some(data)),
        }
    }

    fn stream(state: State, left: Option<u64>, expect_continue: bool) -> (Self, Option<Pump>) {
        // Capacity 0 is one frame per sender: the connection reads at most one frame ahead.
        let (tx, frames) = mpsc::channel(0);
        let (want, wanted) = oneshot::channel();
        let body = Incoming {
            kind: Kind::Stream {
                frames,
                want: Some(want),
                left,
                ended: false,
            },
        };
        let pump = Pump {
            state,
            tx,
            phase: Phase::Unwanted(wanted),
            expect_continue,
        };
        (body, Some(pump))
    }
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Stream {
                frames,
                want,
                left,
                ended,
            } => {
                if *ended {
                    return Poll::Ready(None);
                }
                if let Some(want) = want.take() {
                    let _ = want.send(());
                }
                let frame = ready!(frames.poll_next_unpin(cx));
                match &frame {
                    Some(Ok(f)) => {
                        if let (Some(left), Some(data)) = (left.as_mut(), f.data_ref()) {
                            *left = left.saturating_sub(data.len() as u64);
                        }
                    }
                    Some(Err(_)) | None => *ended = true,
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Stream { left, ended, .. } => *ended || *left == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Stream { left: Some(n), .. } => SizeHint::with_exact(*n),
            Kind::Stream { .. } => SizeHint::new(),
        }
    }
}

/// The connection's side of a streamed request body.
struct Pump {
    state: State,
    tx: mpsc::Sender<Result<Frame<Bytes>, H1Error>>,
    phase: Phase,
    expect_continue: bool,
}

enum Phase {
    /// The handler has not asked for the body yet (and may never).
    Unwanted(oneshot::Receiver<()>),
    /// Writing `100 Continue`: this much of it is out.
    Continue(usize),
    Reading,
    /// Read to its end.
    Ended,
    /// Not read to its end: the handler dropped it, or it was malformed or cut short.
    Abandoned,
}

impl Pump {
    fn ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }
}

/// The outcome of waiting for a request head.
#[allow(clippy::large_enum_variant)] // a return value, moved once per request; never stored
enum Next {
    Head(Head),
    Closed,
    Http2,
}

/// A request refused before it reached the handler.
#[derive(Debug)]
enum Refused {
    Status(StatusCode, &'static str),
    Io(io::Error),
}

struct Head {
    parts: http::request::Parts,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

struct Conn<I> {
    io: I,
    /// Bytes read and not yet taken; empty and unallocated between requests.
    read: BytesMut,
    /// The response head and chunk lines being written: the thread's spare (see
    /// [`scratch`]) while a response is, empty between requests.
    write: Vec<u8>,
    max_head: usize,
    /// See [`Settings::half_close`].
    half_close: bool,
    /// The last read of the client returned `Pending`, and nothing has read since: the task's
    /// waker is stored with the socket until it turns readable (see [`Peek`]).
    watched: bool,
}

impl<I: AsyncRead + AsyncWrite + Peek + Unpin> Conn<I> {
    /// Reads until a whole request head is in, and takes it.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        closing: &AtomicBool,
        first: bool,
    ) -> Poll<Result<Next, Refused>> {
        loop {
            if !self.read.is_empty() {
                let n = self.read.len().min(H2_PREFACE.len());
                if first && self.read[..n] == H2_PREFACE[..n] {
                    // HTTP/2 with prior knowledge, or (so far) a prefix of its preface.
                    if n == H2_PREFACE.len() {
                        return Poll::Ready(Ok(Next::Http2));
                    }
                } else if let Some(head) = self.take_head()? {
                    return Poll::Ready(Ok(Next::Head(head)));
                }
                if self.read.len() >= self.max_head {
                    return Poll::Ready(Err(too_large()));
                }
            }
            // Asked to close, and no request in progress (a partial head is not one).
            if closing.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(Next::Closed));
            }
            let n = if self.read.is_empty() {
                if std::mem::take(&mut self.watched) && self.io.nothing_to_read() {
                    return Poll::Pending;
                }
                // Between requests: read into the stack, so an idle connection holds no buffer.
                let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
                let mut buf = ReadBuf::uninit(&mut stack);
                ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)).map_err(Refused::Io)?;
                let filled = buf.filled();
                if !filled.is_empty() {
                    self.read = BytesMut::from(filled);
                }
                filled.len()
            } else {
                let room = self.max_head - self.read.len();
                reserve(&mut self.read, room);
                ready!(poll_read_buf(&mut self.io, cx, &mut self.read)).map_err(Refused::Io)?
            };
            if n == 0 {
                // Closed between requests, or in the middle of a head: nothing to answer.
                return Poll::Ready(Ok(Next::Closed));
            }
        }
    }

    /// Hands a request to `service` and writes its response; whether the connection can
    /// take another request.
    ///
    /// Not an `async fn`: the handler is called before the returned future is made, so that
    /// future holds the handler's future, not the request head as well (an `async fn` keeps
    /// its arguments for as long as it runs).
    fn exchange<'a, S, F, B>(
        &'a mut self,
        head: Head,
        service: &mut S,
        closing: &'a AtomicBool,
    ) -> impl Future<Output = bool> + 'a
    where
        S: FnMut(Request<Incoming>) -> F,
        F: Future<Output = Response<B>> + 'a,
        B: ResponseBody + 'a,
        B::Error: Display,
    {
        let Head {
            parts,
            framing,
            keep_alive,
            expect_continue,
        } = head;
        let head_request = parts.method == Method::HEAD;
        let version = parts.version;
        let (body, mut pump) = match framing {
            Framing::None => (Incoming::empty(), None),
            Framing::Length(n) if self.read.len() as u64 >= n => {
                // Fits: the buffer holds at least n bytes.
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                (Incoming::full(take(&mut self.read, n)), None)
            }
            Framing::Length(n) => Incoming::stream(State::Length(n), Some(n), expect_continue),
            Framing::Chunked => {
                Incoming::stream(State::Chunked(Chunk::Size), None, expect_continue)
            }
        };
        let handled = service(Request::from_parts(parts, body));
        async move {
            let Some((mut out, close)) = ({
                let mut handled = pin!(handled);
                poll_fn(|cx| {
                    if let Some(pump) = pump.as_mut() {
                        self.poll_pump(pump, cx);
                    }
                    if let Poll::Ready(resp) = handled.as_mut().poll(cx) {
                        // A body that failed (or that the handler dropped) leaves the
                        // connection where its framing cannot be trusted.
                        let abandoned = pump
                            .as_ref()
                            .is_some_and(|p| matches!(p.phase, Phase::Abandoned));
                        let close = !keep_alive || abandoned || closing.load(Ordering::Relaxed);
                        // Taken apart here, and `out` bound straight from the `await`: the
                        // response, or a binding of what this returns, was otherwise kept in
                        // this future beside `out` until it was written. This future was 808
                        // bytes, now 392, allocated and moved once a request.
                        let started = self.start_response(resp, head_request, version, close);
                        return Poll::Ready(Some(started));
                    }
                    // Once the body is in (or there is none), what the client sends is the next
                    // request, or the end of its stream.
                    let body_in = pump.as_ref().is_none_or(Pump::ended);
                    if body_in && !self.half_close && self.poll_gone(cx) {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await
            }) else {
                // Dropping the handler's future (above) dropped its upstream exchange.
                tracing::debug!("the client closed its connection before the response");
                return false;
            };
            let written = poll_fn(|cx| {
                if let Some(pump) = pump.as_mut() {
                    self.poll_pump(pump, cx);
                }
                self.poll_response(&mut out, cx)
            })
            .await;
            // The response is done with (and with it the request's hold on its upstream).
            drop(out);
            scratch::give_write(std::mem::take(&mut self.write));
            if let Err(error) = written {
                tracing::debug!(%error, "response not sent whole");
                return false;
            }
            // A body left unread (in part) would be parsed as the next request.
            let unread = pump.is_some_and(|p| !p.ended());
            if unread {
                Box::pin(linger(&mut self.io)).await;
                return false;
            }
            if close || closing.load(Ordering::Relaxed) {
                let _ = self.io.shutdown().await;
                return false;
            }
            true
        }
    }

    /// Lays out a response's head in the write buffer, and what is left of it to send;
    /// whether the connection closes after it (`close`: it does already).
    fn start_response<B>(
        &mut self,
        resp: Response<B>,
        head_request: bool,
        version: Version,
        close: bool,
    ) -> (Out<B>, bool)
    where
        B: ResponseBody,
    {
        let (parts, mut body) = resp.into_parts();
        let raw = body.take_fields();
        let (framing, length) = out_framing(&parts, raw.as_ref(), &body, head_request, version);
        // (The upstream's `Connection` is never among its raw fields.)
        let said_close = says_close(&parts.headers);
        let close = close || framing == OutFraming::Eof || said_close;
        self.write = scratch::take_write();
        encode_head(
            &mut self.write,
            &parts,
            raw.as_ref(),
            framing,
            length,
            // The response may say so already.
            close && !said_close,
            !close && version == Version::HTTP_10,
        );
        let out = Out {
            body: (framing != OutFraming::None).then_some(body),
            framing,
            trailer: (framing == OutFraming::Chunked)
                .then(|| match parts.headers.get(header::TRAILER) {
                    Some(declared) => Some(declared.clone()),
                    None => raw.as_ref().and_then(|raw| raw.get(&header::TRAILER)),
                })
                .flatten(),
            at: 0,
            data: Bytes::new(),
            tail: b"",
            last_chunk: false,
            done: framing == OutFraming::None || framing == OutFraming::Length(0),
        };
        // The map a request came in (usually: the upstream's response is read into it),
        // for the next request on this thread.
        scratch::give_headers(parts.headers);
        if let Some(raw) = raw {
            raw.recycle();
        }
        (out, close)
    }

    /// Takes a request head off the front of the buffer, if it is all there.
    fn take_head(&mut self) -> Result<Option<Head>, Refused> {
        let mut fields = scratch::take_fields();
        let Some((parsed, len)) = parse_head(&self.read, &mut fields)? else {
            scratch::give_fields(fields);
            return Ok(None);
        };
        if len > self.max_head {
            scratch::give_fields(fields);
            return Err(too_large());
        }
        // Most reads hold one head and no more: the buffer is then taken whole, which spares
        // `split_to` (~130 instructions, an allocation among them).
        let bytes = if len == self.read.len() {
            std::mem::take(&mut self.read).freeze()
        } else {
            self.read.split_to(len).freeze()
        };
        let Parsed {
            method,
            target,
            version,
            framing,
            keep_alive,
            expect_continue,
        } = parsed;
        let uri = Uri::from_maybe_shared(bytes.slice(target.0..target.1))
            .map_err(|_| bad("the request target is not a valid URI\n"))?;
        let mut headers = scratch::take_headers();
        headers.reserve(fields.len() + crate::headers::ADDED_HEADERS);
        let mut valid = true;
        for (name, start, end) in fields.drain(..) {
            // Checked by the parser already: visible ASCII, obs-text, spaces and tabs.
            let Ok(value) = HeaderValue::from_maybe_shared(bytes.slice(start..end)) else {
                valid = false;
                break;
            };
            headers.append(name, value);
        }
        scratch::give_fields(fields);
        if !valid {
            return Err(bad("a header value has characters not allowed there\n"));
        }
        let mut req = Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        let (parts, ()) = req.into_parts();
        Ok(Some(Head {
            parts,
            framing,
            keep_alive,
            expect_continue,
        }))
    }

    /// Moves a streamed request body along: reads it once wanted, as far as the channel has
    /// room. Never fails: what goes wrong reaches the handler as the body's error.
    fn poll_pump(&mut self, pump: &mut Pump, cx: &mut Context<'_>) {
        loop {
            match &mut pump.phase {
                Phase::Ended | Phase::Abandoned => return,
                Phase::Unwanted(wanted) => match Pin::new(wanted).poll(cx) {
                    Poll::Pending => return,
                    Poll::Ready(Ok(())) => {
                        // A client that sent its body already is not waiting for a go-ahead.
                        pump.phase = if pump.expect_continue && self.read.is_empty() {
                            Phase::Continue(0)
                        } else {
                            Phase::Reading
                        };
                    }
                    Poll::Ready(Err(_)) => pump.phase = Phase::Abandoned,
                },
                Phase::Continue(sent) => {
                    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
                    match Pin::new(&mut self.io).poll_write(cx, &CONTINUE[*sent..]) {
                        Poll::Pending => return,
                        Poll::Ready(Ok(n)) if n > 0 => {
                            *sent += n;
                            if *sent == CONTINUE.len() {
                                pump.phase = Phase::Reading;
                            }
                        }
                        Poll::Ready(_) => pump.phase = Phase::Abandoned,
                    }
                }
                Phase::Reading => {
                    match pump.tx.poll_ready(cx) {
                        Poll::Pending => return,
                        Poll::Ready(Ok(())) => {}
                        // The handler dropped the body.
                        Poll::Ready(Err(_)) => {
                            pump.phase = Phase::Abandoned;
                            continue;
                        }
                    }
                    let frame = match pump.state.decode(&mut self.read) {
                        Ok(Decoded::Data(data)) => {
                            if matches!(pump.state, State::Length(0)) {
                                pump.state = State::Done;
                            }
                            Ok(Frame::data(data))
                        }
                        Ok(Decoded::Trailers(trailers)) => Ok(Frame::trailers(trailers)),
                        Ok(Decoded::End) => {
                            pump.phase = Phase::Ended;
                            pump.tx.close_channel();
                            return;
                        }
                        Ok(Decoded::NeedMore) => {
                            let want = match pump.state {
                                State::Length(left) | State::Chunked(Chunk::Data(left)) => {
                                    usize::try_from(left).unwrap_or(usize::MAX)
                                }
                                _ => 0,
                            };
                            reserve(&mut self.read, want);
                            match poll_read_buf(&mut self.io, cx, &mut self.read) {
                                Poll::Pending => return,
                                Poll::Ready(Ok(n)) if n > 0 => continue,
                                Poll::Ready(Ok(_)) => Err(H1Error::Truncated),
                                Poll::Ready(Err(e)) => Err(H1Error::Io(e)),
                            }
                        }
                        Err(e) => Err(e),
                    };
                    let failed = frame.is_err();
                    let _ = pump.tx.start_send(frame);
                    if failed {
                        pump.phase = Phase::Abandoned;
                        pump.tx.close_channel();
                        return;
                    }
                    if matches!(pump.state, State::Done) {
                        pump.phase = Phase::Ended;
                        pump.tx.close_channel();
                        return;
                    }
                }
            }
        }
    }

    /// Writes the response: the head, then the body's frames as they come, each laid out
    /// behind what is still pending so that most responses take one write.
    fn poll_response<B>(&mut self, out: &mut Out<B>, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Display,
    {
        loop {
            while !out.done && out.data.is_empty() && out.tail.is_empty() {
                match self.next_frame(out, cx) {
                    Poll::Ready(result) => result?,
                    Poll::Pending if out.pending(&self.write) => break,
                    Poll::Pending => return Poll::Pending,
                }
            }
            while out.pending(&self.write) {
                let slices = [
                    io::IoSlice::new(&self.write[out.at..]),
                    io::IoSlice::new(&out.data),
                    io::IoSlice::new(out.tail),
                ];
                let mut n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                let head = (self.write.len() - out.at).min(n);
                out.at += head;
                n -= head;
                let data = out.data.len().min(n);
                out.data.advance(data);
                n -= data;
                out.tail = &out.tail[n.min(out.tail.len())..];
            }
            self.write.clear();
            out.at = 0;
            if out.done {
                return Pin::new(&mut self.io).poll_flush(cx);
            }
        }
    }

    /// Polls the response body once and lays out what it gave behind what is pending.
    fn next_frame<B>(&mut self, out: &mut Out<B>, cx: &mut Context<'_>) -> Poll<io::Result<()>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Display,
    {
        let Some(body) = out.body.as_mut() else {
            return Poll::Ready(out.end(&mut self.write));
        };
        let frame = match ready!(Pin::new(body).poll_frame(cx)) {
            None => return Poll::Ready(out.end(&mut self.write)),
            Some(Err(error)) => {
                out.body = None;
                return Poll::Ready(Err(io::Error::other(format!(
                    "response body failed: {error}"
                ))));
            }
            Some(Ok(frame)) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Ok(trailers), OutFraming::Chunked) = (frame.into_trailers(), out.framing) {
                    self.write.extend_from_slice(b"0\r\n");
                    for (name, value) in &trailers {
                        if out.trailer_allowed(name) {
                            write_field(
                                &mut self.write,
                                name.as_str().as_bytes(),
                                value.as_bytes(),
                            );
                        }
                    }
                    self.write.extend_from_slice(b"\r\n");
                    out.last_chunk = true;
                }
                return Poll::Ready(Ok(()));
            }
        };
        if data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match &mut out.framing {
            OutFraming::Length(left) => {
                *left = left.checked_sub(data.len() as u64).ok_or_else(|| {
                    io::Error::other("response body longer than its Content-Length")
                })?;
                out.data = data;
                if *left == 0 {
                    // All there is: no need to wait for the body to say so.
                    out.body = None;
                    out.done = true;
                }
            }
            OutFraming::Chunked => {
                let mut hex = [0u8; 16];
                self.write.extend_from_slice(hex_len(data.len(), &mut hex));
                self.write.extend_from_slice(b"\r\n");
                out.data = data;
                out.tail = b"\r\n";
            }
            OutFraming::Eof => out.data = data,
            OutFraming::None => {}
        }
        Poll::Ready(Ok(()))
    }

    /// Answers a request refused before the handler saw it (plain text, as the handler's
    /// own refusals are), and closes.
    async fn refuse(&mut self, status: StatusCode, reason: &'static str) {
        let mut head = Vec::with_capacity(160 + reason.len());
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(
            b"\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n",
        );
        write_field(&mut head, b"date", &date::now());
        let mut digits = itoa::Buffer::new();
        write_field(
            &mut head,
            b"content-length",
            digits.format(reason.len()).as_bytes(),
        );
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(reason.as_bytes());
        if self.io.write_all(&head).await.is_ok() {
            // What follows a refused head (its body, say) is still on its way.
            Box::pin(linger(&mut self.io)).await;
        }
    }

    /// Reads ahead while a request is handled: whether the client is gone (its stream ended
    /// or failed). What it sends meanwhile (pipelined requests) is kept for later, up to
    /// `max_head`; past that, reading waits for the response. After the short read that
    /// brought the request in, tokio knows the socket is drained, so polling costs no
    /// system call until the client sends something.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> bool {
        while self.read.len() < self.max_head {
            let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
            let mut buf = ReadBuf::uninit(&mut stack);
            self.watched = false;
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    self.watched = true;
                    return false;
                }
                Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return true,
                Poll::Ready(Ok(())) => self.read.extend_from_slice(buf.filled()),
            }
        }
        false
    }

    /// Between requests: keeps no empty buffer.
    fn idle(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
        }
    }
}

/// Ends a connection whose client may still be sending (a body the proxy answered without
/// reading): shuts down the sending side, then reads and drops what arrives until the client
/// closes, goes quiet for [`LINGER_QUIET`], or [`LINGER_MAX`] has passed. Closing a socket
/// with unread data makes the kernel reset the connection, and a reset can destroy the
/// response before the client reads it: a client that writes its whole request before
/// reading (Python's http.client, for one) would see a broken pipe instead of the answer.
async fn linger<I: AsyncRead + AsyncWrite + Unpin>(io: &mut I) {
    if io.shutdown().await.is_err() {
        return;
    }
    let mut sink = vec![0u8; STACK_READ];
    let drain = async {
        loop {
            match tokio::time::timeout(LINGER_QUIET, io.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_MAX, drain).await;
}

fn too_large() -> Refused {
    Refused::Status(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "the request head is larger than this proxy accepts\n",
    )
}

fn bad(reason: &'static str) -> Refused {
    Refused::Status(StatusCode::BAD_REQUEST, reason)
}

/// Reads into the spare capacity of `buf` (tokio's `read_buf`, polled in place).
fn poll_read_buf<I: AsyncRead + Unpin>(
    io: &mut I,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    pin!(io.read_buf(buf)).poll(cx)
}

/// The parsed request line and what the header section says about framing.
struct Parsed {
    method: Method,
    target: (usize, usize),
    version: Version,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

/// Parses a request head at the start of `buf` into `fields`: `None` if it is not all there
/// yet, else the head and its length.
fn parse_head(buf: &[u8], fields: &mut Vec<Field>) -> Result<Option<(Parsed, usize)>, Refused> {
    // Uninitialised slots: zeroing 100 of them cost more than parsing a typical head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refused::Status(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "more than 100 header fields\n",
            ));
        }
        Err(_) => return Err(bad("malformed request head (RFC 9112)\n")),
    };
    // httparse takes a bare LF for CRLF; a server behind the proxy may not, and then the two
    // would see different requests.
    if memchr::memchr_iter(b'\n', &buf[..len]).any(|i| i == 0 || buf[i - 1] != b'\r') {
        return Err(bad("a line of the request head ends in LF without CR\n"));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("malformed request method\n"))?;
    let path = req.path.unwrap_or("");
    let start = offset(buf, path.as_bytes());
    let version = if req.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut unknown_coding = false;
    let mut close = false;
    let mut keep_alive = false;
    let mut expect_continue = false;
    for field in req.headers.iter() {
        let name =
            field_name(field.name.as_bytes()).map_err(|_| bad("malformed header field name\n"))?;
        if name == header::CONTENT_LENGTH {
            let repeated = content_length(field.value, &mut length).map_err(|e| match e {
                LengthError::NotANumber => bad("Content-Length is not a number\n"),
                LengthError::Disagree => bad("Content-Length values disagree\n"),
            })?;
            // Only one goes on: repeats of the same value are dropped (RFC 9110 §8.6).
            if repeated {
                continue;
            }
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            for coding in elements(field.value) {
                if coding.is_empty() {
                    continue;
                }
                if chunked {
                    return Err(bad("chunked must be the last transfer coding, and once\n"));
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else {
                    unknown_coding = true;
                }
            }
        } else if name == header::CONNECTION {
            for token in elements(field.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expect_continue = field
                .value
                .trim_ascii()
                .eq_ignore_ascii_case(b"100-continue");
        }
        let start = offset(buf, field.value);
        fields.push((name, start, start + field.value.len()));
    }
    let framing = if transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request\n"));
        }
        if length.is_some() {
            return Err(bad(
                "Content-Length and Transfer-Encoding together (RFC 9112 section 6.1)\n",
            ));
        }
        if unknown_coding {
            return Err(Refused::Status(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported\n",
            ));
        }
        if !chunked {
            return Err(bad("an empty Transfer-Encoding\n"));
        }
        Framing::Chunked
    } else {
        match length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    let keep_alive = !close && (version == Version::HTTP_11 || keep_alive);
    let parsed = Parsed {
        method,
        target: (start, start + path.len()),
        version,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
    };
    Ok(Some((parsed, len)))
}

/// Whether a response's `Connection` header says `close`.
fn says_close(headers: &HeaderMap) -> bool {
    // Most maps here hold the correlation id alone: a walk over their names is cheaper than
    // the lookup (~90 instructions a request).
    if !in_map(headers, b"connection") {
        return false;
    }
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| elements(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close")))
}

/// How a response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutFraming {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length`, with this many bytes to go.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    Eof,
}

/// How to frame a response, and the `Content-Length` to write (`None`: the response's own
/// header, if any, goes out as it is — a HEAD response's says what a GET would get).
fn out_framing<B: Body>(
    parts: &http::response::Parts,
    raw: Option<&RawFields>,
    body: &B,
    head_request: bool,
    version: Version,
) -> (OutFraming, Option<u64>) {
    let status = parts.status;
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return (OutFraming::None, None);
    }
    let declared = || {
        let mut values = lengths(&parts.headers, raw);
        let first = values.next().and_then(parse_length);
        first.filter(|n| values.all(|v| parse_length(v) == Some(*n)))
    };
    if head_request {
        if lengths(&parts.headers, raw).next().is_some() {
            return (OutFraming::None, None);
        }
        return (OutFraming::None, body.size_hint().exact());
    }
    match body.size_hint().exact().or_else(declared) {
        Some(n) => (OutFraming::Length(n), Some(n)),
        None if version == Version::HTTP_11 => (OutFraming::Chunked, None),
        None => (OutFraming::Eof, None),
    }
}

/// A response's `Content-Length` values: its map's, or if the map has none, its raw fields'.
fn lengths<'a>(
    map: &'a HeaderMap,
    raw: Option<&'a RawFields>,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let from_map = map.get_all(header::CONTENT_LENGTH);
    let in_map = from_map.iter().next().is_some();
    let from_map = from_map.into_iter().map(HeaderValue::as_bytes);
    let from_raw = raw
        .filter(|_| !in_map)
        .into_iter()
        .flat_map(|raw| raw.get_all(&header::CONTENT_LENGTH));
    from_map.chain(from_raw)
}

/// Whether `map` has a field named `name` (any case): one that replaces the upstream's.
fn in_map(map: &HeaderMap, name: &[u8]) -> bool {
    // Most maps here are empty or hold a field or two (a plugin's), so a walk over their
    // names, compared by length first, beats hashing `name` for a lookup.
    map.keys().any(|key| {
        key.as_str().len() == name.len() && name.eq_ignore_ascii_case(key.as_str().as_bytes())
    })
}

/// Writes the status line and header section: `raw`'s fields (the upstream's as they came)
/// less those the map replaces, then the map's. The framing headers are the proxy's own;
/// `add_close` and `keep_alive_10` add `Connection: close` and (for an HTTP/1.0 client whose
/// connection stays) `Connection: keep-alive`.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    raw: Option<&RawFields>,
    framing: OutFraming,
    length: Option<u64>,
    add_close: bool,
    keep_alive_10: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let own_length = length.is_some() || framing != OutFraming::None;
    let mut dated = false;
    if let Some(raw) = raw {
        raw.write(out, |name, kind| {
            if (own_length && kind == FieldKind::ContentLength) || in_map(&parts.headers, name) {
                return false;
            }
            dated |= kind == FieldKind::Date;
            true
        });
    }
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING || (own_length && name == header::CONTENT_LENGTH) {
            continue;
        }
        dated |= name == header::DATE;
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !dated {
        write_field(out, b"date", &date::now());
    }
    if let Some(n) = length {
        let mut digits = itoa::Buffer::new();
        write_field(out, b"content-length", digits.format(n).as_bytes());
    }
    if framing == OutFraming::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if add_close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// `n` in hexadecimal, for a chunk-size line.
fn hex_len(n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 || at == 0 {
            break;
        }
    }
    &buf[at..]
}

/// A response being written.
struct Out<B> {
    body: Option<B>,
    framing: OutFraming,
    /// The response's `Trailer` field: the trailer fields it declared, the only ones sent (as
    /// hyper does).
    trailer: Option<HeaderValue>,
    /// How much of the connection's `write` buffer is out.
    at: usize,
    /// Body data after that.
    data: Bytes,
    /// After the data (a chunk's CRLF).
    tail: &'static [u8],
    /// A chunked body's last chunk and trailers are laid out.
    last_chunk: bool,
    /// Nothing more to lay out.
    done: bool,
}

impl<B: Body<Data = Bytes> + Unpin> Out<B> {
    fn pending(&self, write: &[u8]) -> bool {
        self.at < write.len() || !self.data.is_empty() || !self.tail.is_empty()
    }

    /// The body ended: lays out what ends its framing.
    fn end(&mut self, write: &mut Vec<u8>) -> io::Result<()> {
        self.body = None;
        self.done = true;
        match self.framing {
            OutFraming::Length(0) | OutFraming::None | OutFraming::Eof => Ok(()),
            OutFraming::Length(_) => Err(io::Error::other(
                "response body shorter than its Content-Length",
            )),
            OutFraming::Chunked => {
                if !self.last_chunk {
                    write.extend_from_slice(b"0\r\n\r\n");
                }
                Ok(())
            }
        }
    }

    fn trailer_allowed(&self, name: &HeaderName) -> bool {
        self.trailer.as_ref().is_some_and(|declared| {
            elements(declared.as_bytes()).any(|d| d.eq_ignore_ascii_case(name.as_str().as_bytes()))
        })
    }
}

/// Buffers a connection needs only while it parses a head or writes a response, kept one of
/// each per thread instead of one per connection: an idle keep-alive connection then holds
/// none (the per-connection memory goal is 4 KiB), and a busy one does not allocate them.
///
/// Header maps too, a few dozen of them: one goes with every request in flight and comes back
/// with its response, and making a map and dropping it cost ~850 instructions a request
/// (two allocations, and its index filled), against ~300 to clear it and keep it.
mod scratch {
    use std::cell::{Cell, RefCell};

    use http::HeaderMap;

    use super::{Field, KEEP_WRITE};

    /// Maps kept per thread, enough for the requests in flight on a busy thread.
    const KEEP_MAPS: usize = 64;
    /// A map that grew past this many fields (a head with many) is dropped, not kept.
    const KEEP_MAP_FIELDS: usize = 48;

    thread_local! {
        static WRITE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
        static FIELDS: Cell<Vec<Field>> = const { Cell::new(Vec::new()) };
        static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty header map: a kept one if there is one.
    pub(super) fn take_headers() -> HeaderMap {
        MAPS.with(|maps| maps.borrow_mut().pop())
            .unwrap_or_default()
    }

    /// Keeps `map`, emptied, for another request on this thread, unless enough are kept or it
    /// grew large.
    pub(super) fn give_headers(mut map: HeaderMap) {
        if map.capacity() > KEEP_MAP_FIELDS {
            return;
        }
        MAPS.with(|maps| {
            let mut maps = maps.borrow_mut();
            if maps.len() < KEEP_MAPS {
                super::clear_map(&mut map);
                maps.push(map);
            }
        });
    }

    pub(super) fn take_write() -> Vec<u8> {
        WRITE.with(Cell::take)
    }

    /// Keeps `buf` for the next response on this thread, unless it grew large.
    pub(super) fn give_write(mut buf: Vec<u8>) {
        if buf.capacity() <= KEEP_WRITE {
            buf.clear();
            WRITE.with(|spare| spare.set(buf));
        }
    }

    pub(super) fn take_fields() -> Vec<Field> {
        FIELDS.with(Cell::take)
    }

    pub(super) fn give_fields(mut fields: Vec<Field>) {
        fields.clear();
        FIELDS.with(|spare| spare.set(fields));
    }
}

/// `Date` values, made once a second per thread.
mod date {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};

    const LEN: usize = 29;

    thread_local! {
        static CACHED: Cell<(u64, [u8; LEN])> = const { Cell::new((u64::MAX, [0; LEN])) };
    }

    /// Now, as an HTTP date (`Tue, 01 Dec 2026 10:00:00 GMT`).
    pub(super) fn now() -> [u8; LEN] {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let (at, text) = cached.get();
            if at == secs {
                return text;
            }
            let mut text = [b' '; LEN];
            let formatted = httpdate::fmt_http_date(now);
            let n = formatted.len().min(LEN);
            text[..n].copy_from_slice(&formatted.as_bytes()[..n]);
            cached.set((secs, text));
            text
        })
    }
}

#[cfg(test)]
mod tests;
