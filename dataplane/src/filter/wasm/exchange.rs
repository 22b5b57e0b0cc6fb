//! One request through a route's Wasm plugins: the HTTP context each plugin has for it, and
//! the phases — request headers, request body, response headers, response body — each run
//! for every plugin in the route's order.
//!
//! What Kanali does with a plugin's answer:
//! - `CONTINUE` goes on; so does `PAUSE` when nothing more is coming for that phase (with no
//!   outgoing calls or timers, nothing could ever resume it). `PAUSE` on the request headers
//!   waits for the body phase when there is one.
//! - `proxy_send_local_response` answers the client with that response; nothing more goes
//!   upstream and later plugins do not run.
//! - A failure (trap, budget, memory) answers error 11.
//!
//! Bodies: the request body phase sees what the proxy read ahead (`--request-buffer-bytes`)
//! with `end_of_stream` true when that is the whole body; a plugin that pauses on a partial
//! body (it wants all of it) gets 413. A response body is buffered for its phase when its
//! length is known and at most `--plugin-response-buffer-bytes`; others stream without it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt as _;

use super::abi::{Call, LocalResponse, Phase};
use super::vm::{Action, HttpCallback, Stream};
use super::{RunError, SlotState, WasmFilter};
use crate::body::{ProxyBody, RequestBody};
use crate::errors::ErrorCode;
use crate::filter::{Refused, Stop};

/// What a plugin can ask about the request besides its headers (pseudo-headers and
/// properties).
#[derive(Debug)]
pub struct RequestProps {
    /// The method.
    pub method: Method,
    /// Path and query, as the client sent them (`:path`, `request.path`).
    pub path: String,
    /// The host the request was routed by (`:authority`, `request.host`).
    pub host: String,
    /// `http` or `https` (`:scheme`).
    pub scheme: &'static str,
    /// `HTTP/1.1`, `HTTP/2`, ... (`request.protocol`).
    pub protocol: &'static str,
    /// The client's address (`source.address`).
    pub source: SocketAddr,
    /// The correlation id Kanali gives the request (`request.id`).
    pub id: HeaderValue,
}

/// The plugins' contexts for one request.
pub struct Exchange {
    props: Arc<RequestProps>,
    streams: Vec<Stream>,
    /// The request headers as the plugins left them: what response callbacks may read.
    request_headers: HeaderMap,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("props", &self.props)
            .field("plugins", &self.streams.len())
            .finish_non_exhaustive()
    }
}

fn runtime_error(plugin: &str, error: &RunError) -> Stop {
    // Traps are logged where the VM is discarded; these did not get that far.
    if matches!(error, RunError::Discarded | RunError::Start(_)) {
        tracing::warn!(%plugin, %error, "plugin could not run; the request gets error 11");
    }
    Stop::Refused(Refused {
        code: ErrorCode::PluginRuntime,
        headers: HeaderMap::new(),
    })
}

/// The response a plugin sent.
fn local_response(local: LocalResponse) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::from(local.body));
    *resp.status_mut() = local.status;
    for (name, value) in local.headers {
        resp.headers_mut().append(name, value);
    }
    resp
}

fn too_large() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::from(Bytes::from_static(
        b"the request body is longer than the proxy buffers (--request-buffer-bytes), and a plugin needs all of it\n",
    )));
    *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // The unread rest of the body is still on the connection.
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

impl Exchange {
    /// A request with no plugin contexts yet.
    pub fn new(props: RequestProps) -> Exchange {
        Exchange {
            props: Arc::new(props),
            streams: Vec::new(),
            request_headers: HeaderMap::new(),
        }
    }

    fn view(&self, phase: Phase) -> Call {
        Call {
            phase,
            props: Some(self.props.clone()),
            ..Call::default()
        }
    }

    /// Runs `filter`'s `proxy_on_request_headers` (opening its context for this request).
    pub fn request_headers(
        &mut self,
        filter: &WasmFilter,
        headers: &mut HeaderMap,
        end_of_stream: bool,
    ) -> Result<(), Stop> {
        let plugin = match &**filter.slot.state.load() {
            SlotState::Ready(plugin) => plugin.clone(),
            SlotState::Failed(error) => {
                // Reported to the controller once, not logged per request.
                tracing::debug!(plugin = %filter.slot.name, %error, "plugin not loaded");
                return Err(Stop::Refused(Refused {
                    code: error.code(),
                    headers: HeaderMap::new(),
                }));
            }
        };
        let mut stream = plugin
            .open()
            .map_err(|e| runtime_error(plugin.name(), &e))?;
        let mut view = self.view(Phase::RequestHeaders);
        view.request_headers = std::mem::take(headers);
        // The four pseudo-headers count.
        let count = view.request_headers.len() + 4;
        let result = stream.run(
            HttpCallback::RequestHeaders,
            &mut view,
            count,
            end_of_stream,
        );
        *headers = std::mem::take(&mut view.request_headers);
        result.map_err(|e| runtime_error(plugin.name(), &e))?;
        self.streams.push(stream);
        match view.local {
            Some(local) => Err(Stop::Local(Box::new(local_response(local)))),
            None => Ok(()),
        }
    }

    /// Remembers the request headers as the request phases left them, for the response
    /// callbacks to read.
    pub fn request_done(&mut self, headers: &HeaderMap) {
        self.request_headers = headers.clone();
    }

    /// Runs `proxy_on_request_body` of every plugin on a read-ahead body; other bodies
    /// (none, or HTTP/2 streams of unknown length) stream without it.
    pub fn request_body(
        &mut self,
        headers: &mut HeaderMap,
        body: RequestBody,
    ) -> Result<RequestBody, Stop> {
        let RequestBody::ReadAhead {
            data,
            trailers,
            rest,
        } = body
        else {
            return Ok(body);
        };
        let callers: Vec<usize> = (0..self.streams.len())
            .filter(|i| self.streams[*i].has(HttpCallback::RequestBody))
            .collect();
        if callers.is_empty() || (data.is_none() && rest.is_none()) {
            return Ok(RequestBody::ReadAhead {
                data,
                trailers,
                rest,
            });
        }
        let end_of_stream = rest.is_none();
        let before = data.as_ref().map_or(0, Bytes::len);
        let mut bytes = data.map(|d| d.to_vec()).unwrap_or_default();
        let mut changed = false;
        for i in callers {
            let mut view = self.view(Phase::RequestBody);
            view.request_headers = std::mem::take(headers);
            view.body = std::mem::take(&mut bytes);
            let len = view.body.len();
            let stream = &mut self.streams[i];
            let result = stream.run(HttpCallback::RequestBody, &mut view, len, end_of_stream);
            *headers = std::mem::take(&mut view.request_headers);
            bytes = std::mem::take(&mut view.body);
            changed |= view.body_changed;
            let action = result.map_err(|e| runtime_error(stream.plugin().name(), &e))?;
            if let Some(local) = view.local {
                return Err(Stop::Local(Box::new(local_response(local))));
            }
            if action == Action::Pause && !end_of_stream {
                return Err(Stop::Local(Box::new(too_large())));
            }
        }
        if changed {
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            // The length changes by what the plugins added or removed (a chunked body has
            // none to fix).
            if let Some(total) = declared {
                let total = (total + bytes.len() as u64).saturating_sub(before as u64);
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(total));
            }
        }
        self.request_headers.clone_from(headers);
        Ok(RequestBody::ReadAhead {
            data: (!bytes.is_empty()).then(|| Bytes::from(bytes)),
            trailers,
            rest,
        })
    }

    /// Runs the response callbacks on what the backend answered, then ends the contexts.
    pub async fn respond(mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        let limit = self
            .streams
            .first()
            .map_or(0, |s| s.plugin().limits.response_buffer);
        let buffered = !body.is_end_stream()
            && body.size_hint().exact().is_some_and(|n| n <= limit as u64)
            && self
                .streams
                .iter()
                .any(|s| s.has(HttpCallback::ResponseBody));
        let end_of_stream = body.is_end_stream();
        for i in 0..self.streams.len() {
            if !self.streams[i].has(HttpCallback::ResponseHeaders) {
                continue;
            }
            let mut view = self.view(Phase::ResponseHeaders);
            view.request_headers = std::mem::take(&mut self.request_headers);
            view.response_headers = std::mem::take(&mut parts.headers);
            view.status = parts.status;
            let count = view.response_headers.len() + 1;
            let stream = &mut self.streams[i];
            let result = stream.run(
                HttpCallback::ResponseHeaders,
                &mut view,
                count,
                end_of_stream,
            );
            self.request_headers = std::mem::take(&mut view.request_headers);
            parts.headers = std::mem::take(&mut view.response_headers);
            parts.status = view.status;
            if let Err(e) = result {
                return runtime_error(stream.plugin().name(), &e).into_response();
            }
            if let Some(local) = view.local {
                return local_response(local);
            }
        }
        if !buffered {
            return Response::from_parts(parts, body);
        }
        let mut bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes().to_vec(),
            Err(error) => {
                tracing::debug!(%error, "upstream response body failed");
                return ErrorCode::Upstream.response();
            }
        };
        let mut changed = false;
        for i in 0..self.streams.len() {
            if !self.streams[i].has(HttpCallback::ResponseBody) {
                continue;
            }
            let mut view = self.view(Phase::ResponseBody);
            view.request_headers = std::mem::take(&mut self.request_headers);
            view.response_headers = std::mem::take(&mut parts.headers);
            view.status = parts.status;
            view.body = std::mem::take(&mut bytes);
            let len = view.body.len();
            let stream = &mut self.streams[i];
            let result = stream.run(HttpCallback::ResponseBody, &mut view, len, true);
            self.request_headers = std::mem::take(&mut view.request_headers);
            parts.headers = std::mem::take(&mut view.response_headers);
            parts.status = view.status;
            bytes = std::mem::take(&mut view.body);
            changed |= view.body_changed;
            if let Err(e) = result {
                return runtime_error(stream.plugin().name(), &e).into_response();
            }
            if let Some(local) = view.local {
                return local_response(local);
            }
        }
        if changed {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        }
        Response::from_parts(parts, ProxyBody::from(Bytes::from(bytes)))
    }
}
