//! The controller's admin port: `/healthz`, `/readyz`, `/status` (JSON: the snapshot
//! version, every object's conditions, source errors and each proxy's ACK/NACK) and `/metrics`
//! (the same, counted, for Prometheus). In standalone mode `/status` is where config mistakes
//! show, since files have no status subresource.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use kanali_proto::exposition::{Exposition, Kind};

use crate::compile::Kind as ObjectKind;
use crate::state::Shared;

/// Serves the admin endpoints on `listener` until `shutdown` turns true. `leader`: whether
/// this replica holds the Lease, in cluster mode.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    leader: Option<watch::Receiver<bool>>,
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
        let leader = leader.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let leader = leader.as_ref().map(|l| *l.borrow());
                async move { Ok::<_, Infallible>(handle(&req, &shared, leader)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn handle(req: &Request<Incoming>, shared: &Shared, leader: Option<bool>) -> Response<Full<Bytes>> {
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
        "/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(metrics(shared, leader))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(kanali_proto::exposition::CONTENT_TYPE),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /status, /metrics, /healthz or /readyz\n",
        ),
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

/// `/metrics`: what `/status` says, counted.
fn metrics(shared: &Shared, leader: Option<bool>) -> String {
    let view = with_programmed(shared);
    let version = shared.version();
    let mut page = Exposition::new();
    page.family(
        "kanali_controller_resources",
        Kind::Gauge,
        "Resources compiled, by kind and whether they are Ready (Accepted, their references resolved, and served by every connected proxy).",
    );
    let kinds = [
        ObjectKind::ApiProxy,
        ObjectKind::MockTarget,
        ObjectKind::ApiKey,
        ObjectKind::ApiKeyBinding,
    ];
    // One pass over the objects (there may be 100 000 ApiKeys), counted by kind and readiness.
    let mut counts = [[0usize; 2]; 4];
    for o in &view.objects {
        if let Some(k) = kinds.iter().position(|k| *k == o.diagnostic.object.kind) {
            counts[k][usize::from(!o.ready)] += 1;
        }
    }
    for (kind, [ready, not_ready]) in kinds.iter().zip(counts) {
        for (label, n) in [("true", ready), ("false", not_ready)] {
            let labels = [("kind", kind.as_str()), ("ready", label)];
            page.sample("kanali_controller_resources", &labels, n);
        }
    }
    page.single(
        "kanali_controller_source_errors",
        Kind::Gauge,
        "Inputs that could not be used (in standalone mode, manifest files that do not parse).",
        view.source_errors.len(),
    );
    page.single(
        "kanali_controller_compiles_total",
        Kind::Counter,
        "Snapshots compiled.",
        shared.compiles(),
    );
    if let Some(version) = &version {
        page.family(
            "kanali_controller_snapshot_info",
            Kind::Gauge,
            "The newest snapshot, by version.",
        )
        .sample(
            "kanali_controller_snapshot_info",
            &[("version", version)],
            1,
        );
        page.single(
            "kanali_controller_snapshot_routes",
            Kind::Gauge,
            "Routes in the newest snapshot.",
            view.routes,
        );
    }
    let connected = view.proxies.values().filter(|p| p.connected);
    let (mut current, mut behind, mut rejecting) = (0, 0, 0);
    for proxy in connected {
        if proxy.rejected.is_some() {
            rejecting += 1;
        } else if proxy.applied_version.is_some() && proxy.applied_version == version {
            current += 1;
        } else {
            behind += 1;
        }
    }
    page.family(
        "kanali_controller_proxies",
        Kind::Gauge,
        "Connected proxies, by state: current (applied the newest snapshot), behind (on an older one, or none yet), rejecting (their newest answer was a NACK).",
    );
    for (state, n) in [
        ("current", current),
        ("behind", behind),
        ("rejecting", rejecting),
    ] {
        page.sample("kanali_controller_proxies", &[("state", state)], n);
    }
    if let Some(leader) = leader {
        page.single(
            "kanali_controller_leader",
            Kind::Gauge,
            "1 on the replica holding the Lease, which writes the resources' status.",
            u8::from(leader),
        );
    }
    page.log_counts();
    page.process();
    page.finish()
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}
