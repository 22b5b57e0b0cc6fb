//! What `proxy_upstreams.rs` needs beyond `kanali_e2e`: a proxy harness serving
//! [`Proxy::handle`] on a local listener from tables built straight from snapshots (no
//! controller), a kept-alive HTTP/1.1 client to it, snapshot builders, and a one-line summary
//! of an echo answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use kanali_dataplane::listen::server::{Proxy, ServerConfig};
use kanali_dataplane::route::table::RouteTable;
use kanali_dataplane::upstream::{UpstreamConfig, Upstreams};
use kanali_e2e::check::Answer;
use kanali_e2e::tls::{Ca, Issued, start_tls_echo};
use kanali_e2e::{Echo, start_echo};
use kanali_proto::v1 as pb;
use pb::route::Backend;
use tokio::net::{TcpListener, TcpStream};

// ---- upstreams ----------------------------------------------------------------------------

/// A cleartext echo upstream (HTTP/1.1 and h2c) answering as `name`.
pub async fn echo(name: &str) -> Echo {
    start_echo(SocketAddr::from(([127, 0, 0, 1], 0)), name)
        .await
        .unwrap()
}

/// An HTTPS echo upstream (it answers as `tls-echo`) with a certificate of `ca` for `sans`,
/// requiring client certificates of `client_ca` if given, advertising `alpn`.
pub async fn tls_echo(ca: &Ca, sans: &[&str], client_ca: Option<&Ca>, alpn: &[&str]) -> Echo {
    start_tls_echo(&ca.issue_server(sans), client_ca, alpn).await
}

/// An address nothing listens on.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// An echo answer in one line: `<upstream> <version> authority=<a> host=<h> cert=<bool>`,
/// with `-` for an absent authority or Host header, and `cert` whether the upstream saw a
/// client certificate.
pub fn summary(a: &Answer) -> String {
    let name = a.upstream();
    let echo = a.json();
    format!(
        "{name} {} authority={} host={} cert={}",
        a.headers["x-echo-version"].to_str().unwrap(),
        echo["authority"].as_str().unwrap_or("-"),
        echo["headers"]["host"][0].as_str().unwrap_or("-"),
        a.headers.contains_key("x-echo-client-cert"),
    )
}

// ---- the proxy ----------------------------------------------------------------------------

/// A whole proxy's configuration with no controller to reach (the test installs tables
/// itself through `RunningProxy::tables`), defaults elsewhere; `id` names it in logs.
#[allow(dead_code)] // proxy_upstreams.rs serves through `Proxy::handle` instead
pub fn detached_proxy_config(id: &str) -> kanali_dataplane::ProxyConfig {
    // Port 9 (discard): nothing answers, and the client backs off for the test's length.
    let mut config = kanali_e2e::setup::proxy(SocketAddr::from(([127, 0, 0, 1], 9)), id);
    config.client.min_backoff = Duration::from_secs(5);
    config.client.max_backoff = Duration::from_secs(5);
    config
}

/// Serves `routes` on a proxy started with [`detached_proxy_config`]; the returned
/// `Upstreams` made the table's pools (tests keep it for their length).
#[allow(dead_code)] // proxy_upstreams.rs serves through `Proxy::handle` instead
pub fn install(proxy: &kanali_dataplane::RunningProxy, routes: Vec<pb::Route>) -> Upstreams {
    let upstreams = Upstreams::new(Default::default()).unwrap();
    let table = RouteTable::apply(
        &(&snapshot("v1", routes, vec![], vec![])).into(),
        &upstreams,
        None,
    )
    .unwrap();
    proxy.tables.store(Some(Arc::new(table)));
    upstreams
}

pub struct Harness {
    pub addr: SocketAddr,
    pub tables: Arc<ArcSwapOption<RouteTable>>,
    pub upstreams: Upstreams,
    /// Keeps the listener running.
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Harness {
    pub async fn start(config: UpstreamConfig) -> Harness {
        let tables = Arc::new(ArcSwapOption::empty());
        let proxy = Arc::new(Proxy::new(
            tables.clone(),
            ServerConfig {
                upstream_timeout: Duration::from_secs(10),
                ..Default::default()
            },
            Default::default(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The proxy's own listener, as kanali-proxy runs it; it stops with the test's runtime.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(kanali_dataplane::listen::server::serve(
            listener,
            None,
            proxy,
            0,
            kanali_dataplane::shutdown::DrainSignal::never(),
            stopped,
        ));
        Harness {
            addr,
            tables,
            _stop: stop,
            upstreams: Upstreams::new(config).unwrap(),
        }
    }

    pub fn apply(&self, snapshot: &pb::Snapshot) {
        let current = self.tables.load_full();
        let table = RouteTable::apply(&snapshot.into(), &self.upstreams, current.as_deref())
            .unwrap_or_else(|e| panic!("snapshot rejected: {e:?}"));
        self.tables.store(Some(Arc::new(table)));
    }

    /// A client connection to the proxy (HTTP/1.1, kept alive).
    pub async fn client(&self) -> Client {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client(sender)
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.client().await.get(path, headers).await
    }

    /// `GET path` for host `api.example.org` over HTTP/2 (h2c, prior knowledge), with
    /// `headers`, on a new connection.
    pub async fn h2_get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut req = Request::get(format!("http://api.example.org{path}"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        Answer::read(resp).await
    }
}

pub struct Client(hyper::client::conn::http1::SendRequest<Empty<Bytes>>);

impl Client {
    /// `GET path` for host `api.example.org`, with `headers`.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::get(path).header("host", "api.example.org");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        self.0.ready().await.unwrap();
        let resp = self
            .0
            .send_request(req.body(Empty::new()).unwrap())
            .await
            .unwrap();
        Answer::read(resp).await
    }
}

// ---- snapshots ----------------------------------------------------------------------------

pub fn route(path: &str, backend: Backend) -> pb::Route {
    pb::Route {
        source: Some(pb::ResourceRef {
            kind: "ApiProxy".into(),
            namespace: "shop".into(),
            name: path.trim_start_matches('/').into(),
            generation: 1,
        }),
        path: path.into(),
        virtual_host: String::new(),
        target_path: "/".into(),
        backend: Some(backend),
        timeout_ms: 0,
        plugins: Vec::new(),
    }
}

pub fn endpoint(scheme: &str, authority: &str, tls: &str) -> Backend {
    Backend::Endpoint(pb::Endpoint {
        scheme: scheme.into(),
        authority: authority.into(),
        tls: tls.into(),
    })
}

pub fn service(name: &str, scheme: &str, tls: &str) -> Backend {
    Backend::Service(pb::ServiceTarget {
        namespace: "shop".into(),
        name: name.into(),
        port: 80,
        scheme: scheme.into(),
        tls: tls.into(),
    })
}

pub fn endpoints(name: &str, addrs: &[SocketAddr]) -> pb::ServiceEndpoints {
    pb::ServiceEndpoints {
        namespace: "shop".into(),
        name: name.into(),
        port: 80,
        cluster_ip: String::new(),
        addresses: addrs.iter().map(ToString::to_string).collect(),
        external_name: String::new(),
    }
}

pub fn snapshot(
    version: &str,
    routes: Vec<pb::Route>,
    tls: Vec<pb::TlsMaterial>,
    services: Vec<pb::ServiceEndpoints>,
) -> pb::Snapshot {
    pb::Snapshot {
        version: version.into(),
        routes,
        tls,
        services,
        routes_version: format!("routes-{version}"),
    }
}

/// TLS material `id` trusting `ca` (none: the system roots), presenting `client` if given.
pub fn material(id: &str, ca: Option<&Ca>, client: Option<&Issued>) -> pb::TlsMaterial {
    pb::TlsMaterial {
        id: id.into(),
        secret: None,
        ca_pem: ca.map(|c| c.cert_pem().into_bytes()).unwrap_or_default(),
        cert_pem: client
            .map(|c| c.cert_pem.clone().into_bytes())
            .unwrap_or_default(),
        key_pem: client
            .map(|c| c.key_pem.clone().into_bytes())
            .unwrap_or_default(),
    }
}
