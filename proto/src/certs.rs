//! Reading user-supplied X.509 certificates, shared by the controller (which validates the
//! Secrets it compiles) and the proxy (which loads its listener certificate).
//!
//! rustls parses certificates with webpki, which accepts only what it would verify: X.509 v3
//! end-entity certificates. That is right for a peer's certificate, but wrong for checking
//! that a certificate we *present* matches its key, or that a CA bundle is readable: `openssl
//! x509 -req` without extensions issues v1 certificates, which upstreams (and Kanali v2)
//! accept. So these checks parse the certificate structure with a general X.509 parser.

use x509_cert::Certificate;
use x509_cert::der::{Decode as _, Encode as _};

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertError(String);

impl std::fmt::Display for CertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not an X.509 certificate: {}", self.0)
    }
}

impl std::error::Error for CertError {}

/// Parses a DER certificate of any version (v1, v2 or v3).
pub fn parse_certificate(der: &[u8]) -> Result<(), CertError> {
    Certificate::from_der(der)
        .map(|_| ())
        .map_err(|e| CertError(e.to_string()))
}

/// The DER `SubjectPublicKeyInfo` of a DER certificate of any version: compared with the
/// public half of a private key, it tells whether the two form a pair.
pub fn subject_public_key_info(der: &[u8]) -> Result<Vec<u8>, CertError> {
    let cert = Certificate::from_der(der).map_err(|e| CertError(e.to_string()))?;
    cert.tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| CertError(e.to_string()))
}

/// Whether a DER certificate (any version) certifies the key whose DER
/// `SubjectPublicKeyInfo` is `key_spki`, compared byte for byte as rustls does.
pub fn certifies(cert_der: &[u8], key_spki: &[u8]) -> Result<bool, CertError> {
    Ok(subject_public_key_info(cert_der)? == key_spki)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DER of the first PEM block.
    fn der(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let b64: String = pem
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    }

    #[test]
    fn v1_certificates_made_by_openssl_parse() {
        let client = der(include_str!("../testdata/v1-client.pem"));
        parse_certificate(&client).unwrap();
        parse_certificate(&der(include_str!("../testdata/v1-ca.pem"))).unwrap();
        let spki = subject_public_key_info(&client).unwrap();
        assert!(certifies(&client, &spki).unwrap());
        assert!(!certifies(&client, &spki[1..]).unwrap());
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let err = parse_certificate(b"\x30\x03\x02\x01\x01").unwrap_err();
        assert!(
            err.to_string().starts_with("not an X.509 certificate"),
            "{err}"
        );
    }
}
