//! The body types: what the proxy sends upstream ([`RequestBody`]) and what it answers with
//! ([`ProxyBody`]). Enums rather than boxed bodies, so the hot path does not allocate for them.
//!
//! A request body is read ahead before anything is sent upstream, up to a limit
//! ([`read_ahead`]): a body that turns out malformed (a chunk size that overflows, fewer bytes
//! than its `Content-Length`) is then refused with 400 instead of reaching the upstream half
//! sent, and most bodies reach the upstream in one piece. What is beyond the limit streams.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use crate::h1::server::ResponseBody;
use crate::h1::{H1Body, H1Error, RawFields};
use crate::upstream::pool::InFlight;

/// Body of every response the proxy sends.
#[derive(Debug)]
pub enum ProxyBody {
    /// Bytes produced by the proxy.
    Full(Full<Bytes>),
    /// The upstream's body, streamed; for a balanced Service, with the guard that counts the
    /// request against its address until the body is done.
    Upstream(UpstreamBody, Option<InFlight>),
}

/// A body that came over hyper or over the proxy's own HTTP/1 code: a client's request body
/// ([`ClientBody`]) or an upstream's response body ([`UpstreamBody`]).
#[derive(Debug)]
pub enum Over<H> {
    /// Over hyper: HTTP/2 (from clients or upstreams), and HTTP/1.1 upstream exchanges whose
    /// request body streams.
    Hyper(Incoming),
    /// Over the proxy's own HTTP/1.x server or client.
    H1(H),
}

/// A client's request body.
pub type ClientBody = Over<crate::h1::server::Incoming>;

/// A response body from an upstream.
pub type UpstreamBody = Over<H1Body>;

/// Why a body (a client's or an upstream's) stopped short.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// From hyper.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// From the proxy's own HTTP/1.1 client or server.
    #[error(transparent)]
    H1(#[from] H1Error),
}

impl<H> Body for Over<H>
where
    H: Body<Data = Bytes, Error = H1Error> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Over::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Over::H1(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Over::Hyper(b) => b.is_end_stream(),
            Over::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Over::Hyper(b) => b.size_hint(),
            Over::H1(b) => b.size_hint(),
        }
    }
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::Full(Full::new(bytes))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ProxyBody::Upstream(b, _) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_end_stream(),
            ProxyBody::Upstream(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => b.size_hint(),
            ProxyBody::Upstream(b, _) => b.size_hint(),
        }
    }
}

impl ProxyBody {
    /// The header fields an upstream's HTTP/1 response carries unparsed, if it does.
    pub fn raw_fields(&self) -> Option<&RawFields> {
        match self {
            ProxyBody::Upstream(Over::H1(body), _) => body.fields(),
            _ => None,
        }
    }

    /// The same, to change.
    pub fn raw_fields_mut(&mut self) -> Option<&mut RawFields> {
        match self {
            ProxyBody::Upstream(Over::H1(body), _) => body.fields_mut(),
            _ => None,
        }
    }
}

impl ResponseBody for ProxyBody {
    fn take_fields(&mut self) -> Option<RawFields> {
        match self {
            ProxyBody::Upstream(Over::H1(body), _) => body.take_fields(),
            _ => None,
        }
    }
}

/// Moves the header fields an upstream's HTTP/1 response carries unparsed ([`RawFields`])
/// into its map, behind the fields the map holds already, which replace theirs. For what
/// reads or writes the header section as a map: HTTP/2 clients (hyper writes the map), the
/// plugins' response phase. Only the proxy's own HTTP/1 server writes them as they are.
pub fn map_fields<B: ResponseBody>(resp: &mut http::Response<B>) {
    if let Some(raw) = resp.body_mut().take_fields() {
        let own = std::mem::take(resp.headers_mut());
        *resp.headers_mut() = raw.into_map(own);
    }
}

/// Body of every request the proxy sends upstream.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body as it arrives (also: no body at all).
    Streamed(ClientBody),
    /// What was read ahead: the data, then the trailers, then (if the body was longer than
    /// the read-ahead limit) the rest as it arrives.
    ReadAhead {
        /// Data not yet sent.
        data: Option<Bytes>,
        /// Trailers of a body that ended within the limit.
        trailers: Option<HeaderMap>,
        /// The unread rest.
        rest: Option<ClientBody>,
    },
}

impl RequestBody {
    /// A body wholly in hand (`None`: no body).
    pub fn complete(data: Option<Bytes>) -> Self {
        RequestBody::ReadAhead {
            data,
            trailers: None,
            rest: None,
        }
    }

    /// Whether the whole body is in hand: none at all, or read ahead to its end without
    /// trailers.
    pub fn is_complete(&self) -> bool {
        match self {
            RequestBody::Streamed(b) => b.is_end_stream(),
            RequestBody::ReadAhead { trailers, rest, .. } => trailers.is_none() && rest.is_none(),
        }
    }

    /// The data read ahead (all of it when [`RequestBody::is_complete`]).
    pub fn into_data(self) -> Option<Bytes> {
        match self {
            RequestBody::Streamed(_) => None,
            RequestBody::ReadAhead { data, .. } => data,
        }
    }
}

impl From<ClientBody> for RequestBody {
    fn from(body: ClientBody) -> Self {
        RequestBody::Streamed(body)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Streamed(b) => Pin::new(b).poll_frame(cx),
            RequestBody::ReadAhead {
                data,
                trailers,
                rest,
            } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(trailers) = trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                match rest {
                    Some(rest) => Pin::new(rest).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(b) => b.is_end_stream(),
            RequestBody::ReadAhead {
                data,
                trailers,
                rest,
            } => {
                data.is_none()
                    && trailers.is_none()
                    && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(b) => b.size_hint(),
            RequestBody::ReadAhead { data, rest, .. } => {
                let read = data.as_ref().map_or(0, |d| d.len() as u64);
                let rest = rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read));
                }
                hint.set_lower(rest.lower().saturating_add(read));
                hint
            }
        }
    }
}

/// Reads `body` ahead until it ends or `limit` bytes are in hand. An error is the client's:
/// its body is malformed or cut short, and nothing has been sent anywhere yet.
///
/// Only bodies the client sends without waiting for an answer are read ahead: every HTTP/1.x
/// body, and HTTP/2 bodies of a declared length. An HTTP/2 stream without a length (gRPC,
/// for one) may be a conversation, so it streams from the first byte; HTTP/2 framing has no
/// chunk sizes to get wrong.
pub async fn read_ahead(
    body: ClientBody,
    limit: usize,
    http2: bool,
) -> Result<RequestBody, BodyError> {
    let declared = body.size_hint().exact();
    if body.is_end_stream() || limit == 0 || (http2 && declared.is_none()) {
        return Ok(RequestBody::Streamed(body));
    }
    let mut body = body;
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    let mut read = 0usize;
    let mut trailers = None;
    let mut ended = false;
    while read < limit {
        let Some(frame) = body.frame().await else {
            ended = true;
            break;
        };
        match frame?.into_data() {
            Ok(data) => {
                read += data.len();
                // One frame (the usual case) is kept as it came; more are joined.
                match first.take() {
                    None if more.is_empty() => first = Some(data),
                    None => more.extend_from_slice(&data),
                    Some(f) => {
                        more.reserve(f.len() + data.len());
                        more.extend_from_slice(&f);
                        more.extend_from_slice(&data);
                    }
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
        if body.is_end_stream() {
            ended = true;
            break;
        }
    }
    let data = match first {
        Some(f) => Some(f),
        None if more.is_empty() => None,
        None => Some(more.freeze()),
    };
    Ok(RequestBody::ReadAhead {
        data,
        trailers,
        rest: (!ended).then_some(body),
    })
}
