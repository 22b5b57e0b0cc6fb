//! The built-in `apikey` plugin (Kanali error codes 12, 13 and 14).
//!
//! In order, as v2 did: an `OPTIONS` request (CORS preflight) passes unless the route says
//! otherwise; no key, or an empty one, is 12 (403); a key that is unknown, of an Inactive
//! revision, not listed by the route's ApiKeyBinding (or the binding is missing), or whose
//! rule does not allow the method on this upstream path is 13 (401); a key over its rate
//! limit is 14 (429). The key header never reaches the upstream.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName};

use super::credentials::{Credentials, UsageLog};
use super::{Refused, RequestInfo};
use crate::errors::ErrorCode;

/// The header that carries keys unless a route names another.
pub const DEFAULT_HEADER: HeaderName = HeaderName::from_static("apikey");

/// The `apikey` plugin of one route.
#[derive(Debug)]
pub struct ApiKeyFilter {
    /// `(namespace, name)` of the ApiKeyBinding; `None` when none is named or it does not
    /// exist (every key is refused).
    pub binding: Option<(Arc<str>, Arc<str>)>,
    /// Where the key is.
    pub header: HeaderName,
    /// Whether OPTIONS requests need a key too.
    pub check_options: bool,
}

fn refuse(code: ErrorCode) -> Refused {
    Refused {
        code,
        headers: HeaderMap::new(),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ApiKeyFilter {
    /// Checks the request, removing the key header; rate-limit headers for the response go
    /// into `response_headers`.
    pub fn check(
        &self,
        request: &RequestInfo<'_>,
        headers: &mut HeaderMap,
        credentials: &Credentials,
        usage: &UsageLog,
        response_headers: &mut HeaderMap,
    ) -> Result<(), Refused> {
        // Removed whatever the outcome: the upstream never sees a key.
        let presented = headers.remove(&self.header);
        if request.method == http::Method::OPTIONS && !self.check_options {
            return Ok(());
        }
        let Some(presented) = presented.filter(|v| !v.is_empty()) else {
            return Err(refuse(ErrorCode::ApiKeyMissing));
        };
        let Some(credential) = credentials.lookup(presented.as_bytes()) else {
            return Err(refuse(ErrorCode::ApiKeyUnauthorized));
        };
        usage.record(&credential.usage, now_unix());
        if !credential.active {
            return Err(refuse(ErrorCode::ApiKeyUnauthorized));
        }
        let grant = self
            .binding
            .as_ref()
            .and_then(|(ns, name)| credential.grant(ns, name))
            .ok_or_else(|| refuse(ErrorCode::ApiKeyUnauthorized))?;
        if !grant.rule_for(request.upstream_path).allows(request.method) {
            return Err(refuse(ErrorCode::ApiKeyUnauthorized));
        }
        if let Some(limiter) = &grant.limiter {
            let decision = limiter.check();
            if !decision.allowed {
                let mut headers = HeaderMap::new();
                decision.write_headers(&mut headers);
                return Err(Refused {
                    code: ErrorCode::RateLimited,
                    headers,
                });
            }
            decision.write_headers(response_headers);
        }
        Ok(())
    }
}
