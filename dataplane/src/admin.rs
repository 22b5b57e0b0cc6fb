//! The proxy's admin port: `/healthz` (the process is up) and `/readyz` (a snapshot has been
//! applied, so traffic can be sent here), plus `/version` (the snapshot being served).
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

use crate::shutdown::DrainSignal;
use crate::table::RouteTable;

/// Serves the admin endpoints until `shutdown` turns true; `/readyz` fails once `drain` fires.
pub async fn serve(
    listener: TcpListener,
    tables: Arc<ArcSwapOption<RouteTable>>,
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
        let tables = tables.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let version = tables.load().as_ref().map(|t| t.version.clone());
                    let resp = match (req.uri().path(), version) {
                        ("/healthz", _) => text(StatusCode::OK, "ok\n".to_owned()),
                        ("/readyz", _) if drain.is_draining() => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "shutting down\n".to_owned(),
                        ),
                        ("/readyz", Some(_)) => text(StatusCode::OK, "ok\n".to_owned()),
                        ("/readyz", None) => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no snapshot applied yet\n".to_owned(),
                        ),
                        ("/version", Some(v)) => text(StatusCode::OK, format!("{v}\n")),
                        ("/version", None) => {
                            text(StatusCode::SERVICE_UNAVAILABLE, "none\n".to_owned())
                        }
                        _ => text(
                            StatusCode::NOT_FOUND,
                            "try /healthz, /readyz or /version\n".to_owned(),
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

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
