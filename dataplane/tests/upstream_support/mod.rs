//! Test support for `tests/upstreams.rs`: certificates made up per test (rcgen), local
//! upstream servers (cleartext or TLS, optionally requiring client certificates, with chosen
//! ALPN), a proxy harness serving [`Proxy::handle`] from tables built straight from snapshots,
//! and snapshot builders.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test support

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kanali_dataplane::server::{Proxy, ServerConfig};
use kanali_dataplane::table::RouteTable;
use kanali_dataplane::upstream::{UpstreamConfig, Upstreams};
use kanali_proto::v1 as pb;
use pb::route::Backend;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};

// ---- certificates -------------------------------------------------------------------------

pub struct Ca(pub CertifiedIssuer<'static, KeyPair>);

pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    pub fn pem(&self) -> String {
        self.0.pem()
    }

    pub fn server(&self, sans: &[&str]) -> Issued {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    pub fn client(&self, cn: &str) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    pub fn issue(&self, mut params: CertificateParams) -> Issued {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

pub fn material(id: &str, ca: Option<&Ca>, client: Option<&Issued>) -> pb::TlsMaterial {
    pb::TlsMaterial {
        id: id.into(),
        secret: None,
        ca_pem: ca.map(|c| c.pem().into_bytes()).unwrap_or_default(),
        cert_pem: client
            .map(|c| c.cert_pem.clone().into_bytes())
            .unwrap_or_default(),
        key_pem: client
            .map(|c| c.key_pem.clone().into_bytes())
            .unwrap_or_default(),
    }
}

// ---- upstream servers ---------------------------------------------------------------------

/// A local upstream that answers `<name> <version> authority=<a> host=<h> cert=<bool>` and
/// counts connections and requests.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
}

pub struct TlsOpts<'a> {
    pub cert: &'a Issued,
    pub client_ca: Option<&'a Ca>,
    pub alpn: &'a [&'a str],
}

pub async fn upstream(name: &str, tls: Option<TlsOpts<'_>>, delay: Duration) -> TestUpstream {
    let acceptor = tls.map(|t| {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match t.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(certs(&ca.pem()));
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(
                certs(&t.cert.cert_pem),
                PrivateKeyDer::from_pem_slice(t.cert.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = t.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r, name) = (connections.clone(), requests.clone(), name.to_owned());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, r, name) = (acceptor.clone(), r.clone(), name.clone());
            tokio::spawn(async move {
                match acceptor {
                    None => serve_upstream(TokioIo::new(tcp), name, false, r, delay).await,
                    Some(acceptor) => {
                        // A failed handshake is what some tests are about.
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let cert = tls.get_ref().1.peer_certificates().is_some();
                        serve_upstream(TokioIo::new(tls), name, cert, r, delay).await
                    }
                }
            });
        }
    });
    TestUpstream {
        addr,
        connections,
        requests,
    }
}

pub async fn serve_upstream<T>(
    io: TokioIo<T>,
    name: String,
    cert: bool,
    requests: Arc<AtomicUsize>,
    delay: Duration,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        requests.fetch_add(1, Ordering::SeqCst);
        let text = format!(
            "{name} {:?} authority={} host={} cert={cert}",
            req.version(),
            req.uri().authority().map(|a| a.as_str()).unwrap_or("-"),
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("-"),
        );
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, service)
        .await;
}

/// An address nothing listens on.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---- the proxy ----------------------------------------------------------------------------

pub struct Harness {
    pub addr: SocketAddr,
    pub tables: Arc<ArcSwapOption<RouteTable>>,
    pub upstreams: Upstreams,
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
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    return;
                };
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Harness {
            addr,
            tables,
            upstreams: Upstreams::new(config).unwrap(),
        }
    }

    pub fn apply(&self, snapshot: &pb::Snapshot) {
        let current = self.tables.load_full();
        let table = RouteTable::apply(snapshot, &self.upstreams, current.as_deref())
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
}

pub struct Client(pub hyper::client::conn::http1::SendRequest<Empty<Bytes>>);

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// The Kanali error code of an error answer.
    pub fn code(&self) -> Option<u32> {
        let rest = self.body.split("\"code\":").nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
}

impl Client {
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
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
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
