//! What a request through a Wasm plugin costs the proxy (one thread, no I/O): the filter chain
//! on the request headers and the response phases, for a trivial plugin that adds a request
//! and a response header.
//!
//! - `pooled`: the plugin's VM was started once; the request opens a context in it (what the
//!   proxy does: one VM per worker).
//! - `instance_per_request`: a fresh VM per request (instantiate, `_initialize`, root context,
//!   `proxy_on_vm_start`, `proxy_on_configure`), then the same. The alternative the proxy
//!   does not take; this is why.
//! - `no_plugin`: the chain without plugins, for reference.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt as _;
use http::{HeaderMap, HeaderValue, Method, Response, Uri, Version};
use kanali_dataplane::body::ProxyBody;
use kanali_dataplane::filter::credentials::{Credentials, UsageLog};
use kanali_dataplane::filter::wasm::testkit::header_plugin;
use kanali_dataplane::filter::wasm::{Plugins, Slot, WasmConfig, WasmFilter};
use kanali_dataplane::filter::{self, Filter};
use kanali_proto::v1 as pb;

/// One request through `filters`: the request headers phase, then the response phases on a
/// small upstream answer.
fn request(filters: &[Filter], credentials: &Credentials, usage: &UsageLog) -> Response<ProxyBody> {
    let uri = Uri::from_static("/api/orders?page=2");
    let id = HeaderValue::from_static("3f6c1e0a-0000-4000-8000-000000000000");
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    let info = filter::RequestInfo {
        method: &Method::GET,
        upstream_path: "/orders",
        uri: &uri,
        host: "api.example",
        peer: "192.0.2.1:50000".parse().unwrap(),
        version: Version::HTTP_11,
        https: false,
        correlation_id: &id,
        end_of_stream: true,
    };
    let passed = filter::run(filters, &info, &mut headers, credentials, usage).unwrap();
    let mut resp = Response::new(ProxyBody::from(Bytes::from_static(b"{\"ok\":true}")));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    // Nothing in it waits: the body is in memory.
    passed.respond(resp).now_or_never().unwrap()
}

fn bench_plugin(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let wasm = wat::parse_str(header_plugin("x-bench", "1")).unwrap();
    std::fs::write(dir.path().join("bench.wasm"), wasm).unwrap();
    let plugins = Plugins::new(&WasmConfig {
        dir: Some(dir.path().to_owned()),
        vms_per_plugin: 1,
        ..WasmConfig::default()
    })
    .unwrap();
    let slot: Arc<Slot> = plugins.slot(&pb::WasmPlugin {
        name: "bench".into(),
        version: String::new(),
        config_json: r#"{"mode":"bench"}"#.into(),
    });
    assert_eq!(slot.load_error(), None);
    let credentials = Credentials::default();
    let usage = UsageLog::default();

    let mut group = c.benchmark_group("wasm_request");
    let pooled = [Filter::Wasm(WasmFilter { slot: slot.clone() })];
    let resp = request(&pooled, &credentials, &usage);
    assert_eq!(resp.headers()["x-bench"], "1");
    group.bench_function("pooled", |b| {
        b.iter(|| black_box(request(&pooled, &credentials, &usage)))
    });
    group.bench_function("instance_per_request", |b| {
        b.iter(|| {
            let fresh = [Filter::Wasm(WasmFilter {
                slot: slot.fresh_copy().unwrap(),
            })];
            black_box(request(&fresh, &credentials, &usage))
        })
    });
    // The chain is not run at all without plugins (the request path checks first); this is
    // what building the response costs, for scale.
    group.bench_function("no_plugin", |b| {
        b.iter(|| {
            let mut resp = Response::new(ProxyBody::from(Bytes::from_static(b"{\"ok\":true}")));
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            black_box(resp)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_plugin);
criterion_main!(benches);
