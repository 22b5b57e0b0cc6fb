//! HTTP/1.1 to upstreams, in the request's own task.
//!
//! hyper's client runs each connection in a task of its own and hands it every request over a
//! channel: per request a send, a wake-up of the connection's task and another for the
//! response — ~12k of the ~41k instructions a proxied request cost (callgrind). Here the
//! request's task writes the request and reads the response itself, and an idle connection is
//! a socket and two buffers in its pool's queue, with no task behind it.
//!
//! Requests whose whole body is in hand (none, or one read ahead to its end) go this way.
//! A body that streams goes over hyper (see [`crate::upstream::pool`]), which can write it while the
//! response is already arriving.
//!
//! Responses are parsed strictly (RFC 9112): a malformed head, conflicting `Content-Length`s,
//! a bad chunk size or a body cut short is an error, never guessed at, and a connection is
//! reused only when its response ended exactly where its framing said.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version, request};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::headers::Added;
use crate::upstream::pool::HostPool;

pub mod server;

/// A response head larger than this is refused (nginx's default is 4–8 KiB; hyper's ~400).
const MAX_HEAD: usize = 64 * 1024;
/// Header fields in a response head (hyper's default is 100 too).
const MAX_HEADERS: usize = 100;
/// Header fields in a chunked body's trailer section.
const MAX_TRAILERS: usize = 32;
/// A chunk-size line (with extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// What one read asks for at least (a head, a body of unknown length).
const READ_CHUNK: usize = 8 * 1024;
/// What one read asks for at most: a body of known length is read in one go up to this size
/// (a 16 KiB body in one `recvfrom`, not three).
const READ_MAX: usize = 64 * 1024;
/// An idle connection whose read buffer grew past this gets a new, empty one, so idle
/// connections do not pin large buffers (or the body frames that share them).
const KEEP_BUFFER: usize = 16 * 1024;
/// Body pieces up to this size are copied out of the read buffer, so the buffer stays the
/// connection's own and is reused by the next response instead of reallocated.
const COPY_MAX: usize = 4 * 1024;
/// Request bodies up to this size go out in the same write as the head.
const INLINE_BODY: usize = 16 * 1024;

/// A connection's byte stream: TCP, or TLS over it.
#[derive(Debug)]
pub enum Io {
    /// Cleartext.
    Tcp(TcpStream),
    /// TLS (boxed: its state is kilobytes).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One connection to an upstream, with the buffers its exchanges reuse.
#[derive(Debug)]
pub struct H1Conn {
    io: Io,
    read: BytesMut,
    write: Vec<u8>,
    /// Where a response head's fields are, while it is parsed (kept to reuse its capacity).
    spans: Vec<Span>,
}

/// A parsed header field: its name, and where its value is in the head.
type Field = (HeaderName, usize, usize);

/// Where a response head's field is in the head's bytes: its name and its value. (A head is
/// at most [`MAX_HEAD`] and one read beyond it, so `u32`.)
#[derive(Debug, Clone, Copy)]
struct Span {
    name: u32,
    name_end: u32,
    value: u32,
    value_end: u32,
    /// What its name is, of what writing the fields out needs to know.
    kind: FieldKind,
}

/// What a raw field is, of what writing it out needs to know (found once, by the parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// `Content-Length`, which the proxy writes itself when it frames the body.
    ContentLength,
    /// `Date`: the upstream's, when it sent one, stands.
    Date,
    /// Anything else.
    Other,
}

/// An upstream response's header fields as they arrived, less this hop's (`Connection`,
/// `Keep-Alive`, `Transfer-Encoding`): the head's bytes and where each field is in them.
///
/// An HTTP/1.x client gets them written as they are, beside the response's map, which then
/// holds only the proxy's own fields and replaces any field of the same name. The correlation
/// id, which every response gets, rides with them instead ([`RawFields::set_own`]): put into
/// the otherwise empty map, it cost a hash and then the map's clearing, ~300 instructions a
/// response (205 fewer in all, measured, with the fields' own filter paid).
/// Building a map of the upstream's fields only to write them out again cost ~1 600
/// instructions a response: a name looked up, a value checked and hashed into the map for
/// each, then the map cleared. What reads or writes the header section whole — HTTP/2
/// clients, the plugins' response phase — takes them into the map first
/// ([`crate::body::map_fields`]).
///
/// The names and values are those httparse accepted, by the same rules as `http`'s
/// `HeaderName` and `HeaderValue` (tokens; no control characters but tab): a test checks it
/// byte by byte, so a map can always be made of them.
///
/// Boxed, so the response body that carries it grows by a pointer (48 bytes more made every
/// move of a response a `memcpy` call: +270 instructions a request), and the boxes are kept
/// per thread ([`RawFields::recycle`]), so carrying one allocates nothing.
#[derive(Debug)]
pub struct RawFields(Box<Raw>);

#[derive(Debug, Default)]
struct Raw {
    head: Bytes,
    spans: Vec<Span>,
    /// A field of the proxy's, in place of the upstream's of that name.
    own: Option<(&'static HeaderName, HeaderValue)>,
}

/// [`RawFields`] kept per thread, emptied, with the capacity of their span lists.
#[allow(clippy::vec_box)] // The boxes are what is kept: a response carries one.
mod spare {
    use std::cell::RefCell;

    use super::Raw;

    /// Boxes kept per thread: enough for the responses in flight on a busy thread.
    const KEEP: usize = 64;
    /// A list that grew past this many fields is not kept.
    const KEEP_SPANS: usize = 64;

    thread_local! {
        static SPARE: RefCell<Vec<Box<Raw>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take() -> Box<Raw> {
        SPARE
            .with(|spare| spare.borrow_mut().pop())
            .unwrap_or_default()
    }

    pub(super) fn give(mut raw: Box<Raw>) {
        if raw.spans.capacity() > KEEP_SPANS {
            return;
        }
        raw.head = bytes::Bytes::new();
        raw.spans.clear();
        raw.own = None;
        SPARE.with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < KEEP {
                spare.push(raw);
            }
        });
    }
}

impl RawFields {
    /// The fields of `head` that `spans` lists. The spans move in, and `spans` gets an empty
    /// list in exchange, with the capacity of one that served before.
    fn new(head: Bytes, spans: &mut Vec<Span>) -> RawFields {
        let mut raw = spare::take();
        raw.head = head;
        std::mem::swap(&mut raw.spans, spans);
        RawFields(raw)
    }

    /// Sets a field of the proxy's own, written last: it replaces the upstream's fields of
    /// the same name wherever the fields are read, written or made a map of.
    pub fn set_own(&mut self, name: &'static HeaderName, value: HeaderValue) {
        self.0.own = Some((name, value));
    }

    /// The proxy's own field's value, if set.
    pub fn own_value(&self) -> Option<&HeaderValue> {
        self.0.own.as_ref().map(|(_, value)| value)
    }

    /// Each field's name (spelled as the upstream spelled it), value and kind, in order, then
    /// the proxy's own (see [`RawFields::set_own`]).
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8], FieldKind)> + '_ {
        let own =
            self.0.own.as_ref().map(|(name, value)| {
                (name.as_str().as_bytes(), value.as_bytes(), FieldKind::Other)
            });
        self.upstream_fields().chain(own)
    }

    /// The upstream's fields, less those the proxy's own replaces.
    fn upstream_fields(&self) -> impl Iterator<Item = (&[u8], &[u8], FieldKind)> + '_ {
        let head = &self.0.head;
        let own = self.0.own.as_ref().map(|(name, _)| *name);
        self.0
            .spans
            .iter()
            .map(move |s| {
                let at =
                    |from: u32, to: u32| head.get(from as usize..to as usize).unwrap_or_default();
                (at(s.name, s.name_end), at(s.value, s.value_end), s.kind)
            })
            .filter(move |(name, _, _)| !replaces(own, name))
    }

    /// Writes the fields, in order, as `name: value` lines, less those `keep` refuses (it sees
    /// the upstream's, not the proxy's own). A line that arrived written just so is copied as
    /// it is, and consecutive ones at once: a head's fields are most often a few such lines
    /// in a row, and writing them field by field took four copies a field.
    pub fn write(&self, out: &mut Vec<u8>, mut keep: impl FnMut(&[u8], FieldKind) -> bool) {
        let head = &self.0.head[..];
        let own = self.0.own.as_ref();
        let own_name = own.map(|(name, _)| *name);
        let at = |from: u32, to: u32| head.get(from as usize..to as usize);
        // Lines of the head not yet written, all as they arrived.
        let mut run = 0..0;
        for s in &self.0.spans {
            let (Some(name), Some(value)) = (at(s.name, s.name_end), at(s.value, s.value_end))
            else {
                continue;
            };
            if replaces(own_name, name) || !keep(name, s.kind) {
                continue;
            }
            let as_written = at(s.name_end, s.value) == Some(b": ")
                && at(s.value_end, s.value_end.saturating_add(2)) == Some(b"\r\n");
            let line = s.name as usize..s.value_end as usize + 2;
            if as_written && line.start == run.end {
                run.end = line.end;
                continue;
            }
            out.extend_from_slice(head.get(run).unwrap_or_default());
            if as_written {
                run = line;
            } else {
                run = 0..0;
                write_field(out, name, value);
            }
        }
        out.extend_from_slice(head.get(run).unwrap_or_default());
        if let Some((name, value)) = own {
            write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }

    /// Each field's name (spelled as the upstream spelled it) and value, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.fields().map(|(name, value, _)| (name, value))
    }

    /// The values of the fields named `name` (which is lowercase, as `HeaderName`s are).
    pub fn get_all<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        let name = name.as_str().as_bytes();
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// `value`, one of the fields' values, as a header value sharing the head's bytes.
    fn value(&self, value: &[u8]) -> Option<HeaderValue> {
        let head = &self.0.head;
        let at = offset(head, value);
        let end = at
            .checked_add(value.len())
            .filter(|&end| end <= head.len())?;
        HeaderValue::from_maybe_shared(head.slice(at..end)).ok()
    }

    /// The first value of `name`, sharing the head's bytes.
    pub fn get(&self, name: &HeaderName) -> Option<HeaderValue> {
        match &self.0.own {
            Some((own, value)) if *own == name => Some(value.clone()),
            _ => self.value(self.get_all(name).next()?),
        }
    }

    /// A field as a map entry, its value sharing the head's bytes.
    fn entry(&self, name: &[u8], value: &[u8]) -> Result<(HeaderName, HeaderValue), H1Error> {
        let name = field_name(name).map_err(|_| H1Error::Invalid("bad header name"))?;
        let value = self
            .value(value)
            .ok_or(H1Error::Invalid("bad header value"))?;
        Ok((name, value))
    }

    /// The fields as a map, with `over`'s fields replacing those of the same name (the
    /// proxy's own fields win, as when they are inserted into a map of the upstream's).
    pub fn into_map(self, over: HeaderMap) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.0.spans.len() + 1 + over.len());
        for (name, value, _) in self.upstream_fields() {
            // Always made: httparse checked the same rules (see above).
            if let Ok((name, value)) = self.entry(name, value) {
                map.append(name, value);
            }
        }
        let mut raw = self.0;
        if let Some((name, value)) = raw.own.take() {
            map.insert(name, value);
        }
        map.extend(over);
        spare::give(raw);
        map
    }

    /// Done with: kept for another response on this thread.
    pub fn recycle(self) {
        spare::give(self.0);
    }
}

impl H1Conn {
    /// A fresh connection.
    pub fn new(io: Io) -> Self {
        H1Conn {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            spans: Vec::new(),
        }
    }

    /// Drops buffers that grew large for one exchange (see `KEEP_BUFFER`); for a
    /// connection going idle.
    pub fn shrink(&mut self) {
        if self.read.capacity() > KEEP_BUFFER {
            self.read = BytesMut::new();
        }
        if self.write.capacity() > KEEP_BUFFER {
            self.write = Vec::new();
        }
    }

    /// The byte stream, for a request that has to go over hyper. Only for a connection between
    /// exchanges (nothing unread).
    pub fn into_io(self) -> Io {
        self.io
    }

    /// Whether an idle connection can take a request: the upstream has not closed it (or sent
    /// anything unasked). Costs a system call only when the socket was left readable, or was
    /// made so by the runtime seeing it close. A plain TCP connection is only looked at:
    /// polling it for readiness stored a waker, under the socket's lock, for nothing
    /// (~110 instructions a request).
    pub fn still_open(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match &mut self.io {
            Io::Tcp(s) => {
                matches!(s.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // TLS may have records to take in (session tickets) that are not data.
            Io::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut byte);
                Pin::new(s.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_pending()
            }
        }
    }
}

/// Why an exchange or a response body failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The connection ended before a response head arrived.
    #[error("the upstream closed the connection before responding")]
    Closed,
    /// The response broke HTTP/1.1.
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// The connection ended before the body did.
    #[error("the connection closed before the body ended")]
    Truncated,
}

/// How an exchange failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// Nothing of a response arrived and the request may go again on another connection: it
    /// never fully left, or it is one a client may repeat (RFC 9110 §9.2.2) and this reused
    /// connection closed before answering it.
    Retry(H1Error),
    /// Anything else.
    Fatal(H1Error),
}

/// A response head, and how its body is framed.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    /// The header fields, when a field of this hop the parse could not drop (one the
    /// `Connection` field names, `Upgrade`, `TE`...) leaves them for the hop-by-hop pass on a
    /// map; otherwise empty (the recycled map, for the proxy's own fields).
    headers: HeaderMap,
    /// Otherwise, the fields as they arrived (`None` if there are none).
    raw: Option<RawFields>,
    state: State,
    keep_alive: bool,
}

/// What [`parse_head`] reads of a final response head.
#[derive(Debug)]
struct Parsed {
    status: StatusCode,
    version: Version,
    state: State,
    keep_alive: bool,
    /// A field of this hop is left among the fields, for the hop-by-hop pass.
    hop_by_hop: bool,
}

/// Sends a request whose whole body is `body` on `conn`, with the headers `added` after its
/// map's, and reads the response head. The returned response owns the connection until its
/// body has been read; then the connection goes back to `pool` if it can take another
/// request.
pub async fn exchange(
    mut conn: Box<H1Conn>,
    parts: &mut request::Parts,
    added: Option<&Added>,
    body: Option<&Bytes>,
    reused: bool,
    pool: &Arc<HostPool>,
) -> Result<Response<H1Body>, ExchangeError> {
    let head_request = parts.method == Method::HEAD;
    {
        let H1Conn { io, write, .. } = &mut *conn;
        write.clear();
        encode_head(write, parts, added, body);
        let inline = body.filter(|b| b.len() <= INLINE_BODY);
        if let Some(b) = inline {
            write.extend_from_slice(b);
        }
        let sent = async {
            io.write_all(write).await?;
            if let Some(b) = body.filter(|_| inline.is_none()) {
                io.write_all(b).await?;
            }
            io.flush().await
        };
        if let Err(e) = sent.await {
            // The upstream closed or reset it before taking the request whole: it cannot have
            // acted on it.
            return Err(ExchangeError::Retry(e.into()));
        }
    }
    let head = match read_head(&mut conn, head_request, &mut parts.headers).await {
        Ok(head) => head,
        Err((error, nothing_arrived)) => {
            let replayable = matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            );
            return Err(if reused && nothing_arrived && replayable {
                ExchangeError::Retry(error)
            } else {
                ExchangeError::Fatal(error)
            });
        }
    };
    let Head {
        status,
        version,
        headers,
        raw,
        state,
        keep_alive,
    } = head;
    let mut body = H1Body {
        ready: None,
        state: State::Done,
        conn: None,
        pool: None,
        keep_alive,
        fields: raw,
    };
    // Most responses arrive whole with their head: the connection goes back at once and the
    // body is a buffer.
    match state {
        State::Length(n) if (conn.read.len() as u64) >= n => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            body.ready = (n > 0).then(|| take(&mut conn.read, n));
            give_back(conn, keep_alive, pool);
        }
        state => {
            body.state = state;
            body.conn = Some(conn);
            body.pool = Some(pool.clone());
        }
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// Writes the request line and header section. The body's framing is the proxy's: any
/// `Content-Length` the request carried is replaced by the length of what is sent (a plugin
/// may have changed the body), and a request that came without a body but with a
/// `Content-Length` keeps saying 0.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &request::Parts,
    added: Option<&Added>,
    body: Option<&Bytes>,
) {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(added) = added {
        added.encode(out);
    }
    match body {
        Some(b) => {
            out.extend_from_slice(b"content-length: ");
            let mut digits = itoa::Buffer::new();
            out.extend_from_slice(digits.format(b.len()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        None if had_length => out.extend_from_slice(b"content-length: 0\r\n"),
        None => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads until a final (non-1xx) response head is in, and takes it out of the buffer. The
/// error comes with whether nothing at all had arrived.
async fn read_head(
    conn: &mut H1Conn,
    head_request: bool,
    recycle: &mut HeaderMap,
) -> Result<Head, (H1Error, bool)> {
    let mut arrived = !conn.read.is_empty();
    loop {
        // (A reused connection starts empty: nothing to parse before the first read.)
        let parsed = if conn.read.is_empty() {
            Ok(None)
        } else {
            take_head(&mut conn.read, head_request, &mut conn.spans, recycle)
        };
        match parsed {
            // 100 Continue, 103 Early Hints: informational, the real answer follows.
            Ok(Some(None)) => continue,
            Ok(Some(Some(head))) => return Ok(head),
            Ok(None) => {}
            Err(e) => return Err((e, false)),
        }
        if conn.read.len() >= MAX_HEAD {
            return Err((H1Error::Invalid("response head larger than 64 KiB"), false));
        }
        reserve(&mut conn.read, READ_CHUNK);
        match conn.io.read_buf(&mut conn.read).await {
            Ok(0) => return Err((H1Error::Closed, !arrived)),
            Ok(_) => arrived = true,
            Err(e) => return Err((e.into(), !arrived)),
        }
    }
}

/// Makes room to read `want` bytes (at most [`READ_MAX`]) in one call.
fn reserve(buf: &mut BytesMut, want: usize) {
    let want = want.clamp(READ_CHUNK / 4, READ_MAX);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want.max(READ_CHUNK));
    }
}

/// Takes a complete response head off the front of `buf`: `None` if it is not all there
/// yet, `Some(None)` for an informational (1xx) response, skipped. The fields stay in the
/// head's bytes ([`RawFields`]), as they arrived; values share those bytes, as hyper's do,
/// instead of each being copied into an allocation of its own.
///
/// The response's header map is `recycle`, emptied: the request's, which has served once the
/// request is sent. Its memory is reused instead of a new map allocated (two allocations, and
/// two frees when the request's is dropped). It holds the fields only when a field of this
/// hop is among them, for the hop-by-hop pass to act on.
fn take_head(
    buf: &mut BytesMut,
    head_request: bool,
    spans: &mut Vec<Span>,
    recycle: &mut HeaderMap,
) -> Result<Option<Option<Head>>, H1Error> {
    spans.clear();
    let Some((parsed, len)) = parse_head(buf, head_request, spans)? else {
        return Ok(None);
    };
    let Some(parsed) = parsed else {
        buf.advance(len);
        return Ok(Some(None));
    };
    let bytes = buf.split_to(len).freeze();
    let mut headers = std::mem::take(recycle);
    clear_map(&mut headers);
    let raw = if parsed.hop_by_hop {
        headers.reserve(spans.len() + crate::headers::ADDED_HEADERS);
        let fields = RawFields::new(bytes, spans);
        for (name, value) in fields.iter() {
            let (name, value) = fields.entry(name, value)?;
            headers.append(name, value);
        }
        fields.recycle();
        None
    } else {
        headers.reserve(crate::headers::ADDED_HEADERS);
        (!spans.is_empty()).then(|| RawFields::new(bytes, spans))
    };
    Ok(Some(Some(Head {
        status: parsed.status,
        version: parsed.version,
        headers,
        raw,
        state: parsed.state,
        keep_alive: parsed.keep_alive,
    })))
}

/// Whether the proxy's own field (`own`, see [`RawFields::set_own`]) replaces the upstream's
/// field `name`.
fn replaces(own: Option<&HeaderName>, name: &[u8]) -> bool {
    own.is_some_and(|own| {
        own.as_str().len() == name.len() && name.eq_ignore_ascii_case(own.as_str().as_bytes())
    })
}

/// Writes a `name: value` line.
pub(crate) fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A field name as it arrived, as a [`HeaderName`]: what [`HeaderName::from_bytes`] makes of
/// it, with the names most heads carry, in the spellings clients and servers send, matched
/// as they are. `from_bytes` lowercases every name into a buffer and then looks it up: ~150
/// instructions a field, a tenth of the proxy's own work on a small request.
fn field_name(name: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    // By length first, so each name is compared with a few of the same length.
    let known = match name.len() {
        3 => match name {
            b"Age" | b"age" => header::AGE,
            b"Via" | b"via" => header::VIA,
            _ => return HeaderName::from_bytes(name),
        },
        4 => match name {
            b"Host" | b"host" => header::HOST,
            b"Date" | b"date" => header::DATE,
            b"ETag" | b"Etag" | b"etag" => header::ETAG,
            b"Vary" | b"vary" => header::VARY,
            _ => return HeaderName::from_bytes(name),
        },
        6 => match name {
            b"Server" | b"server" => header::SERVER,
            b"Accept" | b"accept" => header::ACCEPT,
            b"Cookie" | b"cookie" => header::COOKIE,
            b"Origin" | b"origin" => header::ORIGIN,
            b"Expect" | b"expect" => header::EXPECT,
            b"Pragma" | b"pragma" => header::PRAGMA,
            _ => return HeaderName::from_bytes(name),
        },
        7 => match name {
            b"Referer" | b"referer" => header::REFERER,
            b"Expires" | b"expires" => header::EXPIRES,
            _ => return HeaderName::from_bytes(name),
        },
        8 => match name {
            b"Location" | b"location" => header::LOCATION,
            _ => return HeaderName::from_bytes(name),
        },
        10 => match name {
            b"Connection" | b"connection" => header::CONNECTION,
            b"User-Agent" | b"user-agent" => header::USER_AGENT,
            b"Set-Cookie" | b"set-cookie" => header::SET_COOKIE,
            _ => return HeaderName::from_bytes(name),
        },
        12 => match name {
            b"Content-Type" | b"content-type" => header::CONTENT_TYPE,
            _ => return HeaderName::from_bytes(name),
        },
        13 => match name {
            b"Last-Modified" | b"last-modified" => header::LAST_MODIFIED,
            b"Cache-Control" | b"cache-control" => header::CACHE_CONTROL,
            b"Accept-Ranges" | b"accept-ranges" => header::ACCEPT_RANGES,
            b"Authorization" | b"authorization" => header::AUTHORIZATION,
            b"If-None-Match" | b"if-none-match" => header::IF_NONE_MATCH,
            _ => return HeaderName::from_bytes(name),
        },
        14 => match name {
            b"Content-Length" | b"content-length" => header::CONTENT_LENGTH,
            _ => return HeaderName::from_bytes(name),
        },
        15 => match name {
            b"Accept-Encoding" | b"accept-encoding" => header::ACCEPT_ENCODING,
            b"Accept-Language" | b"accept-language" => header::ACCEPT_LANGUAGE,
            b"X-Forwarded-For" | b"x-forwarded-for" => crate::headers::X_FORWARDED_FOR.clone(),
            _ => return HeaderName::from_bytes(name),
        },
        16 => match name {
            b"Content-Encoding" | b"content-encoding" => header::CONTENT_ENCODING,
            _ => return HeaderName::from_bytes(name),
        },
        17 => match name {
            b"Transfer-Encoding" | b"transfer-encoding" => header::TRANSFER_ENCODING,
            b"If-Modified-Since" | b"if-modified-since" => header::IF_MODIFIED_SINCE,
            _ => return HeaderName::from_bytes(name),
        },
        _ => return HeaderName::from_bytes(name),
    };
    Ok(known)
}

/// What a response field's name says to the parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    ContentLength,
    Date,
    TransferEncoding,
    Connection,
    KeepAlive,
    /// Another field of this hop (RFC 9110 §7.6.1 and the legacy ones; see
    /// [`crate::headers::strip_hop_by_hop`]).
    HopByHop,
    Other,
}

/// What `name` (any case) says to the parse.
fn named(name: &[u8]) -> Named {
    // The spellings servers send, matched as they are (a word or two compared); then any
    // case, byte by byte, by length first: most names are ruled out by it.
    match name {
        b"Content-Length" | b"content-length" => return Named::ContentLength,
        b"Connection" | b"connection" => return Named::Connection,
        b"Date" | b"date" => return Named::Date,
        b"Server" | b"server" | b"Content-Type" | b"content-type" => return Named::Other,
        _ => {}
    }
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    match name.len() {
        2 if is("te") => Named::HopByHop,
        4 if is("date") => Named::Date,
        7 if is("upgrade") => Named::HopByHop,
        10 if is("connection") => Named::Connection,
        10 if is("keep-alive") => Named::KeepAlive,
        14 if is("content-length") => Named::ContentLength,
        16 if is("proxy-connection") => Named::HopByHop,
        17 if is("transfer-encoding") => Named::TransferEncoding,
        18 if is("proxy-authenticate") => Named::HopByHop,
        19 if is("proxy-authorization") => Named::HopByHop,
        _ => Named::Other,
    }
}

/// Parses a response head at the start of `buf` into `spans` (where its fields are in
/// `buf`, less this hop's framing fields): `None` if it is not all there yet; otherwise its
/// length, with `None` for an informational (1xx) response.
fn parse_head(
    buf: &[u8],
    head_request: bool,
    spans: &mut Vec<Span>,
) -> Result<Option<(Option<Parsed>, usize)>, H1Error> {
    // Uninitialised slots: zeroing 100 of them cost more than parsing a typical head.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Invalid("more than 100 header fields"));
        }
        Err(_) => return Err(H1Error::Invalid("malformed response head")),
    };
    let code = parsed.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("status code out of range"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // The proxy never forwards Upgrade, so nothing asked for this.
        return Err(H1Error::Invalid(
            "101 Switching Protocols without an upgrade",
        ));
    }
    if status.is_informational() {
        return Ok(Some((None, len)));
    }
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive = false;
    let mut hop_by_hop = false;
    let at = |part: &[u8]| {
        u32::try_from(offset(buf, part)).map_err(|_| H1Error::Invalid("response head too large"))
    };
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        let named = named(name);
        match named {
            Named::ContentLength => {
                content_length(field.value, &mut length).map_err(|e| match e {
                    LengthError::NotANumber => H1Error::Invalid("bad Content-Length"),
                    LengthError::Disagree => H1Error::Invalid("conflicting Content-Length values"),
                })?;
            }
            Named::TransferEncoding => {
                transfer_encoding = true;
                // Only the final coding decides (RFC 9112 §6.3): a later field overrides.
                chunked = elements(field.value)
                    .next_back()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
                // Hop-by-hop: the proxy frames its own response.
                continue;
            }
            Named::Connection => {
                let mut only_framing = true;
                for token in elements(field.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    } else {
                        only_framing = false;
                    }
                }
                // `Connection: keep-alive` / `close` is about this hop only, and all most
                // responses carry: read here and dropped. One that names other fields stays
                // for the hop-by-hop pass to act on.
                if only_framing {
                    continue;
                }
                hop_by_hop = true;
            }
            Named::KeepAlive => continue,
            Named::HopByHop => hop_by_hop = true,
            Named::Date | Named::Other => {}
        }
        let name_at = at(name)?;
        let value_at = at(field.value)?;
        spans.push(Span {
            name: name_at,
            name_end: name_at + name.len() as u32,
            value: value_at,
            value_end: value_at + field.value.len() as u32,
            kind: match named {
                Named::ContentLength => FieldKind::ContentLength,
                Named::Date => FieldKind::Date,
                _ => FieldKind::Other,
            },
        });
    }
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let state = if no_body {
        State::Length(0)
    } else if transfer_encoding {
        // Transfer-Encoding overrides Content-Length, which a proxy must then not pass on
        // (RFC 9112 §6.3); a body not chunked last runs until the connection closes.
        spans.retain(|s| s.kind != FieldKind::ContentLength);
        if chunked {
            State::Chunked(Chunk::Size)
        } else {
            State::Eof
        }
    } else {
        match length {
            Some(n) => State::Length(n),
            None => State::Eof,
        }
    };
    let keep_alive = !close
        && !matches!(state, State::Eof)
        // HTTP/1.0 closes unless it says otherwise, and knows no Transfer-Encoding.
        && (version == Version::HTTP_11 || (keep_alive && !transfer_encoding));
    let parsed = Parsed {
        status,
        version,
        state,
        keep_alive,
        hop_by_hop,
    };
    Ok(Some((Some(parsed), len)))
}

/// The elements of a comma-separated field value (RFC 9110 §5.6.1), trimmed; empty ones
/// included.
fn elements(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Why a `Content-Length` field was refused.
enum LengthError {
    /// A value that is not plain digits.
    NotANumber,
    /// Values (in this field or an earlier one) that disagree.
    Disagree,
}

/// Reads a `Content-Length` field into `length` (what earlier fields said), strictly: every
/// value plain digits, all of them equal (RFC 9112 §6.3). Whether its last value repeated a
/// length already known.
fn content_length(value: &[u8], length: &mut Option<u64>) -> Result<bool, LengthError> {
    let mut repeated = false;
    for n in elements(value) {
        let n = parse_length(n).ok_or(LengthError::NotANumber)?;
        if length.is_some_and(|l| l != n) {
            return Err(LengthError::Disagree);
        }
        repeated = length.is_some();
        *length = Some(n);
    }
    Ok(repeated)
}

/// Where `part`, a slice of `buf`, starts in it (from the two addresses; no dereference).
fn offset(buf: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize)
}

/// A `Content-Length` value: digits only, no sign, no overflow.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .flatten()
    })
}

/// Empties `map` for reuse. `HeaderMap::clear` walks the whole index even when the map holds
/// nothing (~100 instructions), and the recycled maps here mostly do.
fn clear_map(map: &mut HeaderMap) {
    if !map.is_empty() {
        map.clear();
    }
}

/// Takes `n` bytes off the front of `buf` (copied when small: see [`COPY_MAX`]).
fn take(buf: &mut BytesMut, n: usize) -> Bytes {
    if n <= COPY_MAX {
        let bytes = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        bytes
    } else {
        buf.split_to(n).freeze()
    }
}

/// Where a response body is.
#[derive(Debug)]
enum State {
    /// This many bytes to go.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunk),
    /// Until the connection closes.
    Eof,
    /// Ended.
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, with this many bytes to go.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, at the trailer section.
    Trailers,
}

/// What decoding the buffered bytes gave.
enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

impl State {
    /// Decodes what `buf` holds of the body; `eof` says the connection has ended.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        match self {
            State::Done | State::Length(0) => {
                *self = State::Done;
                Ok(Decoded::End)
            }
            State::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                Ok(Decoded::Data(take(buf, n)))
            }
            State::Eof => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = buf.len();
                Ok(Decoded::Data(take(buf, n)))
            }
            State::Chunked(chunk) => {
                let decoded = decode_chunked(chunk, buf)?;
                if matches!(decoded, Decoded::End | Decoded::Trailers(_)) {
                    *self = State::Done;
                }
                Ok(decoded)
            }
        }
    }
}

/// Decodes chunked transfer coding (RFC 9112 §7.1) from `buf`, strictly: CRLF line ends,
/// at most 16 hex digits per size, trailers parsed as header fields.
fn decode_chunked(chunk: &mut Chunk, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
    loop {
        match *chunk {
            Chunk::Size => {
                let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(H1Error::Invalid("chunk-size line too long"));
                    }
                    return Ok(Decoded::NeedMore);
                };
                let line = buf
                    .get(..lf)
                    .and_then(|l| l.strip_suffix(b"\r"))
                    .ok_or(H1Error::Invalid("chunk-size line without CRLF"))?;
                let size = parse_chunk_size(line)?;
                buf.advance(lf + 1);
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let left = left - n as u64;
                *chunk = if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                };
                return Ok(Decoded::Data(take(buf, n)));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(H1Error::Invalid("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *chunk = Chunk::Size;
            }
            Chunk::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Decoded::End);
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
                let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut map = HeaderMap::with_capacity(fields.len());
                        for f in fields {
                            let name = HeaderName::from_bytes(f.name.as_bytes())
                                .map_err(|_| H1Error::Invalid("bad trailer name"))?;
                            let value = HeaderValue::from_bytes(f.value)
                                .map_err(|_| H1Error::Invalid("bad trailer value"))?;
                            map.append(name, value);
                        }
                        (len, map)
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {
                        return Ok(Decoded::NeedMore);
                    }
                    _ => return Err(H1Error::Invalid("malformed trailer section")),
                };
                buf.advance(len);
                return Ok(Decoded::Trailers(trailers));
            }
        }
    }
}

/// `1*HEXDIG [BWS ";" chunk-ext]`, the size at most 16 hex digits.
fn parse_chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let bad = H1Error::Invalid("bad chunk size");
    if digits == 0 || digits > 16 {
        return Err(bad);
    }
    // Whitespace only before an extension's `;` (RFC 9112 §7.1.1): a size followed by spaces
    // alone is one a lenient parser and a strict one would read differently.
    let rest = &line[digits..];
    if !(rest.is_empty() || rest.trim_ascii_start().starts_with(b";")) {
        return Err(bad);
    }
    let hex =
        std::str::from_utf8(&line[..digits]).map_err(|_| H1Error::Invalid("bad chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| bad)
}

/// A response body read from an upstream connection in the task that polls it.
#[derive(Debug)]
pub struct H1Body {
    /// Data already in hand (all of it when `conn` is `None`).
    ready: Option<Bytes>,
    state: State,
    /// The connection, until the body has been read.
    conn: Option<Box<H1Conn>>,
    /// Where the connection goes back.
    pool: Option<Arc<HostPool>>,
    keep_alive: bool,
    /// The response's header fields as they arrived, until the response is written (see
    /// [`RawFields`]). Here because the body goes where the response goes, unlike an
    /// extension, which would cost three allocations.
    fields: Option<RawFields>,
}

/// A response has been read whole: its connection goes back to `pool` if it can take another
/// request and nothing is left unread on it (an upstream that sent more than it framed is not
/// trusted again); otherwise it closes.
fn give_back(conn: Box<H1Conn>, keep_alive: bool, pool: &Arc<HostPool>) {
    if keep_alive && conn.read.is_empty() {
        pool.release_h1(conn);
    }
}

impl H1Body {
    /// The response's header fields that are not in its map (see [`RawFields`]), taken.
    pub fn take_fields(&mut self) -> Option<RawFields> {
        self.fields.take()
    }

    /// The response's header fields that are not in its map, if it carries them.
    pub fn fields(&self) -> Option<&RawFields> {
        self.fields.as_ref()
    }

    /// The same, to change.
    pub fn fields_mut(&mut self) -> Option<&mut RawFields> {
        self.fields.as_mut()
    }

    /// The body ended: see [`give_back`].
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take()) {
            give_back(conn, self.keep_alive, &pool);
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let decoded = match this.state.decode(&mut conn.read) {
                Ok(d) => d,
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            match decoded {
                Decoded::Data(data) => {
                    if matches!(this.state, State::Length(0)) {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoded::Trailers(trailers) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Decoded::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Decoded::NeedMore => {}
            }
            let want = match this.state {
                State::Length(left) | State::Chunked(Chunk::Data(left)) => usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .saturating_add(5),
                _ => READ_CHUNK,
            };
            reserve(&mut conn.read, want);
            let read = std::pin::pin!(conn.io.read_buf(&mut conn.read)).poll(cx);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(this.state, State::Eof) => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Truncated)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        let ready = self.ready.as_ref().map_or(0, |b| b.len() as u64);
        match self.state {
            State::Done => SizeHint::with_exact(ready),
            State::Length(left) => SizeHint::with_exact(ready.saturating_add(left)),
            State::Chunked(_) | State::Eof => {
                let mut hint = SizeHint::new();
                hint.set_lower(ready);
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests;
