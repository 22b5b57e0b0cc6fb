//! TLS test support: certificate authorities and certificates generated in the test (rcgen),
//! an HTTPS echo upstream, and a small HTTPS client that reports the HTTP version it got.
//!
//! Everything uses the ring provider explicitly, so nothing depends on a process-wide
//! default `CryptoProvider` being installed.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use crate::Echo;

/// A certificate authority made up for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, both PEM (the key as PKCS#8), as written to files.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf certificate (`CERTIFICATE` block).
    pub cert_pem: String,
    /// The private key (`PRIVATE KEY` block).
    pub key_pem: String,
}

impl Ca {
    /// A new self-signed CA whose subject common name is `name`.
    ///
    /// # Panics
    /// If rcgen cannot generate a key or sign (never expected; this is test support).
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = generate_key();
        let issuer = CertifiedIssuer::self_signed(params, key)
            .unwrap_or_else(|e| panic!("rcgen: cannot self-sign CA {name}: {e}"));
        Ca { issuer }
    }

    /// The CA certificate, PEM; what a client or server trusts.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `sans`: DNS names, or IP addresses such as `"127.0.0.1"`
    /// (rcgen makes an IP SAN of anything that parses as one). The common name is the first SAN.
    ///
    /// # Panics
    /// If a SAN is not a valid DNS name or IP address.
    pub fn issue_server(&self, sans: &[&str]) -> Issued {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans.clone())
            .unwrap_or_else(|e| panic!("rcgen: bad SANs {sans:?}: {e}"));
        if let Some(first) = sans.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate whose subject common name is `cn`.
    pub fn issue_client(&self, cn: &str) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Issued {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        // A random serial, so two certificates issued with the same parameters still differ
        // (a rotation test must be able to tell them apart).
        params.serial_number = Some(rcgen::SerialNumber::from_slice(
            &rand_serial().to_be_bytes(),
        ));
        let key = generate_key();
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("rcgen: cannot sign: {e}"));
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn generate_key() -> KeyPair {
    KeyPair::generate().unwrap_or_else(|e| panic!("rcgen: cannot generate a key: {e}"))
}

/// 63 random bits with the top bit clear: a positive DER integer that is never zero.
fn rand_serial() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    // std's RandomState is seeded randomly per instance; good enough for test serials and
    // avoids a dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 1) | 1
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses the certificates of a PEM bundle.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".to_owned());
    }
    Ok(certs)
}

fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("bad key PEM: {e}"))
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert).map_err(|e| format!("bad CA: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// A rustls server configuration for `server`, requiring client certificates from
/// `client_ca` if given, advertising `alpn` (e.g. `["h2", "http/1.1"]`; empty: no ALPN).
pub fn server_config(
    server: &Issued,
    client_ca: Option<&Ca>,
    alpn: &[&str],
) -> Result<rustls::ServerConfig, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots(&ca.cert_pem())?,
                provider(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(
            certs_from_pem(&server.cert_pem)?,
            key_from_pem(&server.key_pem)?,
        )
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// Starts an HTTPS echo upstream on 127.0.0.1 (a free port) presenting `server`.
///
/// It answers like [`crate::start_echo`] (same [`Echo`] handle and counters), over HTTP/2
/// when ALPN negotiated `h2` and HTTP/1.1 otherwise. Every answer carries `x-echo-version`
/// (e.g. `HTTP/2.0`); with `client_ca`, client certificates are required and verified
/// against it (a client without one fails the handshake), and answers carry
/// `x-echo-client-cert: present`. `alpn` is what the server advertises, e.g.
/// `&["h2", "http/1.1"]`, or `&["http/1.1"]` for an HTTP/1.1-only upstream.
///
/// # Panics
/// If the certificate does not load or no port can be bound (test support).
pub async fn start_tls_echo(server: &Issued, client_ca: Option<&Ca>, alpn: &[&str]) -> Echo {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap_or_else(|e| panic!("TLS echo bind: {e}"));
    start_tls_echo_on(listener, server, client_ca, alpn)
}

/// [`start_tls_echo`] on a listener the caller made (e.g. in a [`crate::netns::TestHost`]).
///
/// # Panics
/// If the certificate does not load (test support).
pub fn start_tls_echo_on(
    listener: TcpListener,
    server: &Issued,
    client_ca: Option<&Ca>,
    alpn: &[&str],
) -> Echo {
    let config = server_config(server, client_ca, alpn)
        .unwrap_or_else(|e| panic!("TLS echo configuration: {e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    crate::spawn_echo(listener, "tls-echo", Some(acceptor))
        .unwrap_or_else(|e| panic!("TLS echo start: {e}"))
}

/// A rustls client configuration trusting `ca_pem`, presenting `client` if given, offering
/// `h2` and `http/1.1` when `alpn_h2` and only `http/1.1` otherwise.
pub fn client_config(
    ca_pem: &str,
    client: Option<&Issued>,
    alpn_h2: bool,
) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(certs_from_pem(&c.cert_pem)?, key_from_pem(&c.key_pem)?)
            .map_err(|e| e.to_string())?,
    };
    config.alpn_protocols = if alpn_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// Connects to `addr` over TLS, verifying the server as `server_name` (a DNS name or an IP)
/// against `ca_pem`. Errors are strings naming the step that failed (`connect`, `handshake`).
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    client: Option<&Issued>,
    alpn_h2: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = client_config(ca_pem, client, alpn_h2)?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("bad server name {server_name}: {e}"))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake with {addr}: {e}"))
}

/// One `GET path` over a new TLS connection (see [`tls_connect`]), HTTP/2 if the server
/// chose `h2` by ALPN, else HTTP/1.1. Returns the status, the HTTP version of the response,
/// its headers and its whole body.
///
/// A TLS 1.3 server rejects a client certificate only after the client's handshake has
/// completed, so such a rejection may surface as an error of the request rather than of the
/// handshake; either way this returns `Err`.
pub async fn https_request(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    client: Option<&Issued>,
    alpn_h2: bool,
    path: &str,
) -> Result<(StatusCode, http::Version, HeaderMap, Bytes), String> {
    let tls = tls_connect(addr, server_name, ca_pem, client, alpn_h2).await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let req = Request::get(path)
        .header(http::header::HOST, server_name)
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = if h2 {
        // HTTP/2 needs the authority in the URI (:authority), not a Host header.
        let uri = format!("https://{server_name}{path}");
        let (mut parts, body) = req.into_parts();
        parts.uri = uri.parse().map_err(|e| format!("bad URI {uri}: {e}"))?;
        parts.headers.remove(http::header::HOST);
        let req = Request::from_parts(parts, body);
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP/2 request: {e}"))?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP/1.1 request: {e}"))?
    };
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((parts.status, parts.version, parts.headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_over_tls_speaks_h2_and_h1_and_sees_client_certs() {
        let ca = Ca::new("test CA");
        let server = ca.issue_server(&["localhost", "127.0.0.1"]);
        let echo = start_tls_echo(&server, None, &["h2", "http/1.1"]).await;

        let (status, version, headers, _) =
            https_request(echo.addr, "127.0.0.1", &ca.cert_pem(), None, true, "/x")
                .await
                .unwrap();
        assert_eq!(status, 200);
        assert_eq!(version, http::Version::HTTP_2);
        assert_eq!(headers["x-echo-version"], "HTTP/2.0");
        assert!(!headers.contains_key("x-echo-client-cert"));

        let (_, version, headers, _) =
            https_request(echo.addr, "localhost", &ca.cert_pem(), None, false, "/x")
                .await
                .unwrap();
        assert_eq!(version, http::Version::HTTP_11);
        assert_eq!(headers["x-echo-version"], "HTTP/1.1");

        // Another CA's client does not trust this server.
        let other = Ca::new("other CA");
        assert!(
            https_request(echo.addr, "localhost", &other.cert_pem(), None, false, "/")
                .await
                .is_err()
        );

        let mtls = start_tls_echo(&server, Some(&ca), &["h2", "http/1.1"]).await;
        let client = ca.issue_client("proxy");
        let (_, _, headers, _) = https_request(
            mtls.addr,
            "localhost",
            &ca.cert_pem(),
            Some(&client),
            true,
            "/",
        )
        .await
        .unwrap();
        assert_eq!(headers["x-echo-client-cert"], "present");
        assert!(
            https_request(mtls.addr, "localhost", &ca.cert_pem(), None, true, "/")
                .await
                .is_err()
        );
    }
}
