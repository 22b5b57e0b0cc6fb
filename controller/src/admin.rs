//! The controller's admin port: `/healthz`, `/readyz` and `/status` (JSON: the snapshot
//! version, every object's conditions, source errors and each proxy's ACK/NACK). In standalone
//! mode `/status` is where config mistakes show, since files have no status subresource.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::Shared;

/// Serves the admin endpoints on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&req, &shared)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn handle(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match shared.snapshot() {
            Some(_) => text(StatusCode::OK, "ok\n"),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no snapshot compiled yet\n",
            ),
        },
        "/status" => {
            let mut view = serde_json::to_value(with_programmed(shared)).unwrap_or_default();
            // Which key revisions this controller's proxies saw used, newest first: in
            // standalone mode there is no ApiKey status to show it in.
            let mut usage: Vec<((String, u64), u64)> = shared.usage().into_iter().collect();
            usage.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            view["keyUsage"] = usage
                .into_iter()
                .map(|((key, revision), at)| {
                    serde_json::json!({
                        "key": key,
                        "revision": format!("{revision:016x}"),
                        "lastUsed": crate::usage::rfc3339(at),
                    })
                })
                .collect();
            let body = serde_json::to_vec_pretty(&view).unwrap_or_default();
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "try /status, /healthz or /readyz\n"),
    }
}

/// The status view with each object's `Programmed` condition (and `ready` including it), as
/// the status writer computes it for a cluster: files have no status to show it in, so in
/// standalone mode this is where a plugin that does not load on a proxy shows.
fn with_programmed(shared: &Shared) -> crate::state::StatusView {
    let mut view = shared.status().clone();
    let latest = shared.version().and_then(|v| shared.fingerprints(&v));
    for o in &mut view.objects {
        let d = &o.diagnostic;
        let current = latest.as_ref().and_then(|f| f.get(&d.object).copied());
        let programmed =
            crate::status::programmed(d, current, &view.proxies, |v| shared.fingerprints(v));
        o.ready = o.ready && programmed.status;
        o.diagnostic.conditions.push(programmed);
    }
    view
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}
