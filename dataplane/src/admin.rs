//! The proxy's admin port: `/healthz` (the process is up) and `/readyz` (a snapshot has been
//! applied, so traffic can be sent here), plus `/version` (the snapshot being served) and
//! `/metrics` (Prometheus' text format, see [`crate::observe::metrics`]).
//! Once the proxy drains ([`crate::shutdown`]) `/readyz` fails while `/healthz` still
//! answers: a terminating proxy is not ready, but it is alive and must not be restarted.

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::filter::rate_limit::RateLimits;
use crate::observe::metrics::Metrics;
use crate::route::table::RouteTable;
use crate::shutdown::DrainSignal;

/// What the admin port reports on.
#[derive(Clone)]
pub struct Sources {
    /// The table being served.
    pub tables: Arc<ArcSwapOption<RouteTable>>,
    /// The requests' and connections' counts.
    pub metrics: Arc<Metrics>,
    /// The rate limiters, for whether Redis is shared.
    pub limits: Arc<RateLimits>,
}

/// Serves the admin endpoints until `shutdown` turns true; `/readyz` fails once `drain` fires.
pub async fn serve(
    listener: TcpListener,
    sources: Sources,
    drain: DrainSignal,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    continue;
                }
            },
            () = crate::stopped(&mut shutdown) => return,
        };
        let sources = sources.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let table = sources.tables.load_full();
                    let version = table.as_ref().map(|t| t.version.clone());
                    let resp = match (req.uri().path(), version) {
                        ("/metrics", _) => {
                            let text = sources.metrics.render(&sources.limits, table.as_deref());
                            let mut resp = text_response(StatusCode::OK, text);
                            resp.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static(
                                    kanali_proto::exposition::CONTENT_TYPE,
                                ),
                            );
                            resp
                        }
                        ("/healthz", _) => text_response(StatusCode::OK, "ok\n".to_owned()),
                        ("/readyz", _) if drain.is_draining() => text_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "shutting down\n".to_owned(),
                        ),
                        ("/readyz", Some(_)) => text_response(StatusCode::OK, "ok\n".to_owned()),
                        ("/readyz", None) => text_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no snapshot applied yet\n".to_owned(),
                        ),
                        ("/version", Some(v)) => text_response(StatusCode::OK, format!("{v}\n")),
                        ("/version", None) => {
                            text_response(StatusCode::SERVICE_UNAVAILABLE, "none\n".to_owned())
                        }
                        _ => text_response(
                            StatusCode::NOT_FOUND,
                            "try /healthz, /readyz, /version or /metrics\n".to_owned(),
                        ),
                    };
                    async move { Ok::<_, Infallible>(resp) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
