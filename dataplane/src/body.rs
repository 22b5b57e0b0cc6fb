//! The response body type: either bytes we produced (errors, mocks) or the upstream's body,
//! streamed through frame by frame. An enum rather than a boxed body, so the hot path does not
//! allocate for it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::pool::InFlight;

/// Body of every response the proxy sends.
#[derive(Debug)]
pub enum ProxyBody {
    /// Bytes produced by the proxy.
    Full(Full<Bytes>),
    /// The upstream's body, streamed; for a balanced Service, with the guard that counts the
    /// request against its address until the body is done.
    Upstream(Incoming, Option<InFlight>),
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::Full(Full::new(bytes))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
