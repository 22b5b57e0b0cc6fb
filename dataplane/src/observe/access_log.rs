//! The access log (`--access-log`): one `request details` line per request, at `info` on the
//! target `kanali::access`, in the proxy's log format (`--log-json` for JSON lines).
//!
//! Its fields are Kanali v2's (spec §6.2), so log pipelines built on them keep working, plus
//! the host and, for a Kanali error, its code. The correlation id is the one the client got in
//! `X-Kanali-Correlation-Id`: what a user reports, an operator finds here. The query string is
//! left out, as it may carry credentials; so are headers, the API key's among them.
//!
//! Off by default: formatting a line costs more than a proxied request's own user-space work.
//! Off, it costs nothing but a branch, and nothing is gathered.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Method, Request, StatusCode};

use crate::observe::metrics::Answered;

/// What the line says of one request, gathered while it runs.
#[derive(Debug)]
pub(crate) struct Access {
    remote: SocketAddr,
    method: Method,
    host: Option<String>,
    path: String,
    /// Set once the response has it.
    pub(crate) correlation_id: Option<HeaderValue>,
}

impl Access {
    /// What `req`, from `remote`, says of itself.
    pub(crate) fn of<B>(req: &Request<B>, remote: SocketAddr) -> Box<Access> {
        let host = req.uri().host().map(str::to_owned).or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
        Box::new(Access {
            remote,
            method: req.method().clone(),
            host,
            path: req.uri().path().to_owned(),
            correlation_id: None,
        })
    }

    /// Writes the line: the request ended after `took`, answered as `answered` says, or
    /// not at all (its client left first).
    pub(crate) fn log(&self, answered: Option<&Answered>, took: Duration) {
        let id = self
            .correlation_id
            .as_ref()
            .and_then(|id| id.to_str().ok())
            .unwrap_or("");
        let host = self.host.as_deref().unwrap_or("");
        let (status, code) = match answered {
            Some(a) => (
                Some(a.status.as_u16()),
                a.error.map(|e| format!("{:02}", e.code())),
            ),
            None => (None, None),
        };
        // Client-controlled text goes through `%` only where its type keeps it to one line:
        // a URI path and a method have no control characters, and neither has a header
        // value, which can still carry tabs and spaces (the JSON format escapes everything).
        // `event!`: `info!` cannot take a target and a dotted first field (tracing#1421).
        tracing::event!(
            target: "kanali::access",
            tracing::Level::INFO,
            http.request.correlation_id = %id,
            http.request.remote_address = %self.remote,
            http.request.method = %self.method,
            http.request.url.host = %host,
            http.request.url.path = %self.path,
            http.request.duration = ?took,
            http.response.status.code = status,
            kanali.error.code = code.as_deref(),
            "{}",
            if status.is_some() {
                "request details"
            } else {
                "request details: the client left before its answer"
            }
        );
    }
}

/// Writes the line for a request head the HTTP/1 server refused (answered with `status`,
/// for `reason`) before it was parsed into a request: there is no method, path or
/// correlation id to say.
pub(crate) fn refused(remote: SocketAddr, status: StatusCode, reason: &str) {
    tracing::event!(
        target: "kanali::access",
        tracing::Level::INFO,
        http.request.remote_address = %remote,
        http.response.status.code = status.as_u16(),
        reason = reason.trim_end(),
        "request refused"
    );
}
