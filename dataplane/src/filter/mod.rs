//! The per-request chain: the plugins of a route, run in the order the ApiProxy lists them —
//! on the request before it reaches its backend (a mock or an upstream), and (Wasm plugins)
//! on the request body and on the response.
//!
//! Each filter lets the request through (possibly changing its headers, possibly with headers
//! for the response), answers it with a Kanali error, or (a Wasm plugin) answers it with a
//! response of its own. The chain has the built-in `apikey` check ([`api_key`]) with its rate
//! limits ([`rate_limit`]), against the [`credentials`] of the current configuration, and
//! custom plugins in WebAssembly ([`wasm`]).

pub mod api_key;
pub mod credentials;
pub mod rate_limit;
pub mod wasm;

use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, Method, Response, Uri, Version};

use crate::body::ProxyBody;
use crate::errors::ErrorCode;
use api_key::ApiKeyFilter;
use credentials::{Credentials, UsageLog};
use wasm::{Exchange, RequestProps, WasmFilter};

/// One plugin of a route, ready to run.
#[derive(Debug)]
pub enum Filter {
    /// The built-in API key check.
    ApiKey(ApiKeyFilter),
    /// A custom plugin: a proxy-wasm module.
    Wasm(WasmFilter),
}

/// What the filters need of a request, besides its headers.
pub struct RequestInfo<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path the upstream will see (rules are written against it).
    pub upstream_path: &'a str,
    /// The request target as the client sent it.
    pub uri: &'a Uri,
    /// The host it was routed by.
    pub host: &'a str,
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's HTTP version.
    pub version: Version,
    /// Whether it came over TLS.
    pub https: bool,
    /// The request's correlation id.
    pub correlation_id: &'a HeaderValue,
    /// Whether the request has no body.
    pub end_of_stream: bool,
}

impl RequestInfo<'_> {
    fn props(&self) -> RequestProps {
        let protocol = match self.version {
            Version::HTTP_09 => "HTTP/0.9",
            Version::HTTP_10 => "HTTP/1.0",
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_3 => "HTTP/3",
            _ => "HTTP/1.1",
        };
        RequestProps {
            method: self.method.clone(),
            path: self
                .uri
                .path_and_query()
                .map_or_else(|| self.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
            host: self.host.to_owned(),
            scheme: if self.https { "https" } else { "http" },
            protocol,
            source: self.peer,
            id: self.correlation_id.clone(),
        }
    }
}

/// What the chain decided against.
#[derive(Debug)]
pub struct Refused {
    /// The Kanali error to answer with.
    pub code: ErrorCode,
    /// Headers for that answer (e.g. `Retry-After`).
    pub headers: HeaderMap,
}

/// Why the chain stopped a request: the answer the client gets instead of the backend's.
#[derive(Debug)]
pub enum Stop {
    /// A Kanali error.
    Refused(Refused),
    /// A plugin's own response (boxed: rare, and large next to a refusal).
    Local(Box<Response<ProxyBody>>),
}

impl From<Refused> for Stop {
    fn from(refused: Refused) -> Self {
        Stop::Refused(refused)
    }
}

impl Stop {
    /// The response the client gets.
    pub fn into_response(self) -> Response<ProxyBody> {
        match self {
            Stop::Refused(refused) => {
                let mut resp = refused.code.response::<ProxyBody>();
                resp.headers_mut().extend(refused.headers);
                resp
            }
            Stop::Local(resp) => *resp,
        }
    }
}

/// What a request that passed the chain carries on.
#[derive(Debug, Default)]
pub struct Passed {
    /// Headers for the response (e.g. the rate limit's).
    pub headers: HeaderMap,
    /// The Wasm plugins' contexts, when the route has any: the body and response phases.
    pub wasm: Option<Exchange>,
}

impl Passed {
    /// Finishes a response: the chain's headers, then the Wasm plugins' response phases.
    pub async fn respond(self, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
        // The chain's fields replace the upstream's of the same name whether those are in
        // the map or still unparsed beside it (see `RawFields`).
        resp.headers_mut().extend(self.headers);
        match self.wasm {
            Some(exchange) => {
                // The plugins see, and may change, the upstream's fields too.
                crate::body::map_fields(&mut resp);
                exchange.respond(resp).await
            }
            None => resp,
        }
    }
}

/// Runs `filters` in order on a request's headers; the first filter that stops the request
/// ends the chain.
pub fn run(
    filters: &[Filter],
    request: &RequestInfo<'_>,
    headers: &mut HeaderMap,
    credentials: &Credentials,
    usage: &UsageLog,
) -> Result<Passed, Stop> {
    let mut passed = Passed::default();
    for filter in filters {
        match filter {
            Filter::ApiKey(f) => {
                f.check(request, headers, credentials, usage, &mut passed.headers)?
            }
            Filter::Wasm(f) => passed
                .wasm
                .get_or_insert_with(|| Exchange::new(request.props()))
                .request_headers(f, headers, request.end_of_stream)?,
        }
    }
    if let Some(exchange) = &mut passed.wasm {
        exchange.request_done(headers);
    }
    Ok(passed)
}
