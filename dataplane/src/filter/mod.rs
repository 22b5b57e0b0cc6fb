//! The per-request chain: the plugins of a route, run in the order the ApiProxy lists them,
//! before the request reaches its backend (a mock or an upstream).
//!
//! Each filter lets the request through (possibly changing its headers, possibly with headers
//! for the response) or answers it with a Kanali error. Today the chain has the built-in
//! `apikey` check ([`api_key`]) with its rate limits ([`rate_limit`]), against the
//! [`credentials`] of the current configuration.

pub mod api_key;
pub mod credentials;
pub mod rate_limit;

use http::{HeaderMap, Method};

use crate::errors::ErrorCode;
use api_key::ApiKeyFilter;
use credentials::{Credentials, UsageLog};

/// One plugin of a route, ready to run.
#[derive(Debug)]
pub enum Filter {
    /// The built-in API key check.
    ApiKey(ApiKeyFilter),
}

/// What the filters need of a request, besides its headers.
pub struct RequestInfo<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path the upstream will see (rules are written against it).
    pub upstream_path: &'a str,
}

/// What the chain decided against.
#[derive(Debug)]
pub struct Refused {
    /// The Kanali error to answer with.
    pub code: ErrorCode,
    /// Headers for that answer (e.g. `Retry-After`).
    pub headers: HeaderMap,
}

/// Runs `filters` in order on a request. `Ok` carries headers for the response (e.g. the
/// rate limit's); the first filter that refuses ends the chain.
pub fn run(
    filters: &[Filter],
    request: &RequestInfo<'_>,
    headers: &mut HeaderMap,
    credentials: &Credentials,
    usage: &UsageLog,
) -> Result<HeaderMap, Refused> {
    let mut response_headers = HeaderMap::new();
    for filter in filters {
        match filter {
            Filter::ApiKey(f) => {
                f.check(request, headers, credentials, usage, &mut response_headers)?
            }
        }
    }
    Ok(response_headers)
}
