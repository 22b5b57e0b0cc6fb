//! Upstream TLS: one rustls [`ClientConfig`] per [`pb::TlsMaterial`], built when a snapshot is
//! applied and never per request.
//!
//! Trust is the material's CA when it has one, else the system roots; v2 started from an empty
//! pool whenever a Secret was named, so a Secret holding only a client certificate made every
//! handshake fail. Hostname verification is on unless the proxy opts out, and the opt-out still
//! checks the chain, validity and key usage — it forgives only the name.

use std::sync::Arc;

use kanali_proto::v1 as pb;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Protocols offered to TLS upstreams, preferred first: HTTP/2 when the upstream speaks it.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why TLS material cannot be used (the route that names it is NACKed).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA bundle is not PEM, or holds no certificate rustls can use.
    #[error("CA certificates: {0}")]
    Ca(String),
    /// The client certificate chain is not PEM or is empty.
    #[error("client certificate: {0}")]
    ClientCert(String),
    /// The client private key is not PEM.
    #[error("client key: {0}")]
    ClientKey(String),
    /// The client private key is not the certificate's.
    #[error("client certificate: the private key does not belong to it")]
    KeyMismatch,
    /// Only one of certificate and key is set.
    #[error("client certificate and key must both be set or both be empty")]
    HalfPair,
    /// rustls rejected the configuration (e.g. certificate and key do not pair).
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built (e.g. no trust anchors).
    #[error("verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Builds client configurations with one crypto provider, one set of system roots and one
/// hostname policy for the whole proxy.
#[derive(Debug)]
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    system_roots: Arc<RootCertStore>,
    verify_hostname: bool,
}

impl TlsContext {
    /// Loads the system's CA certificates, or the bundled Mozilla roots when it has none.
    pub fn new(verify_hostname: bool) -> Self {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            tracing::info!("no usable system CA certificates; trusting the bundled Mozilla roots");
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        TlsContext {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            system_roots: Arc::new(roots),
            verify_hostname,
        }
    }

    /// The configuration for https upstreams that name no material: system roots, no client
    /// certificate.
    pub fn default_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.build(self.system_roots.clone(), None)
    }

    /// The configuration for one piece of material.
    pub fn config(&self, material: &pb::TlsMaterial) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = if material.ca_pem.is_empty() {
            self.system_roots.clone()
        } else {
            Arc::new(parse_roots(&material.ca_pem)?)
        };
        let client = match (material.cert_pem.is_empty(), material.key_pem.is_empty()) {
            (true, true) => None,
            (false, false) => Some(parse_client(&material.cert_pem, &material.key_pem)?),
            _ => return Err(TlsError::HalfPair),
        };
        self.build(roots, client)
    }

    fn build(
        &self,
        roots: Arc<RootCertStore>,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let webpki =
            WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone()).build()?;
        let verifier: Arc<dyn ServerCertVerifier> = if self.verify_hostname {
            webpki
        } else {
            Arc::new(IgnoreHostname(webpki))
        };
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client {
            // Not `with_client_auth_cert`: it checks the pair by parsing the certificate with
            // webpki, which refuses the v1 certificates upstreams accept. The upstream
            // verifies the certificate; here only the pair is checked.
            Some((chain, key)) => {
                let key = self.provider.key_provider.load_private_key(key)?;
                if let (Some(leaf), Some(spki)) = (chain.first(), key.public_key()) {
                    match kanali_proto::certs::certifies(leaf, &spki) {
                        Ok(true) => {}
                        Ok(false) => return Err(TlsError::KeyMismatch),
                        Err(e) => return Err(TlsError::ClientCert(e.to_string())),
                    }
                }
                let certified = CertifiedKey::new(chain, key);
                builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

fn parse_roots(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Ca(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    // Bundles sometimes carry a certificate webpki cannot use (e.g. an unsupported key); the
    // rest still count. (v1 CA certificates are usable trust anchors.)
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::Ca(format!(
            "no usable CA certificate ({ignored} unparseable)"
        )));
    }
    Ok(roots)
}

fn parse_client(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::ClientCert(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::ClientCert("no certificate in PEM".to_owned()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::ClientKey(e.to_string()))?;
    Ok((chain, key))
}

/// The server name to verify and send as SNI: a DNS name, or an IP address (brackets of an
/// IPv6 authority removed).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("invalid TLS server name {host:?}: {e}"))
}

/// Full WebPKI verification, except that a certificate for another name is accepted (the
/// per-proxy opt-out). WebPKI checks the name last, after the chain, validity and EKU, so only
/// that one error is forgiven and everything before it still holds.
#[derive(Debug)]
struct IgnoreHostname(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostname {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn material(ca: &[u8], cert: &[u8], key: &[u8]) -> pb::TlsMaterial {
        pb::TlsMaterial {
            id: "ns/s#1".into(),
            secret: None,
            ca_pem: ca.to_vec(),
            cert_pem: cert.to_vec(),
            key_pem: key.to_vec(),
        }
    }

    // Certificates that parse are exercised with generated ones in tests/upstreams.rs.
    #[test]
    fn unusable_material_is_an_error_not_a_panic() {
        let ctx = TlsContext::new(true);
        let empty_block = b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n";
        for (what, m) in [
            ("garbage CA", material(b"not pem", b"", b"")),
            ("empty CA block", material(empty_block, b"", b"")),
            ("cert without key", material(b"", b"not pem", b"")),
            ("key without cert", material(b"", b"", b"not pem")),
            ("nothing in either", material(b"", b"x", b"y")),
        ] {
            assert!(ctx.config(&m).is_err(), "{what} was accepted");
        }
        let default = ctx.default_config().unwrap();
        assert_eq!(
            default.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(!default.client_auth_cert_resolver.has_certs());
        assert!(ctx.config(&material(b"", b"", b"")).is_ok());
    }

    /// `openssl x509 -req` issues v1 certificates without extensions: they are usable as a
    /// client certificate and as a CA (issue #8).
    #[test]
    fn openssl_v1_certificates_load_as_client_certificate_and_ca() {
        let ctx = TlsContext::new(true);
        let m = material(
            include_bytes!("../../../proto/testdata/v1-ca.pem"),
            include_bytes!("../../../proto/testdata/v1-client.pem"),
            include_bytes!("../../../proto/testdata/v1-client.key"),
        );
        let config = ctx.config(&m).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("api.example"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("10.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(server_name("bad name!").is_err());
    }
}
