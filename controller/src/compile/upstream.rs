//! What a proxy needs to reach a backend: TLS material read from Secrets (validated here, once
//! per compile, so no request ever finds a broken key pair), and the addresses behind Services.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kanali_proto::v1 as pb;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

use super::Objects;

/// Annotation a Secret needs before Kanali uses it.
pub const ENABLED_ANNOTATION: &str = "kanali.io/enabled";

/// Why a Secret cannot be used for upstream TLS: the error code requests get, the
/// `ResolvedRefs` reason and a message for the operator.
#[derive(Debug, PartialEq, Eq)]
pub struct TlsProblem {
    /// Kanali error code (06, 07 or 08).
    pub code: u32,
    /// Condition reason.
    pub reason: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn problem(code: u32, reason: &'static str, message: String) -> TlsProblem {
    TlsProblem {
        code,
        reason,
        message,
    }
}

/// Reads and validates the TLS material of Secret `namespace/name`.
///
/// Data keys: `tls.crt`, `tls.key` and `tls.ca`, renamed by the annotations `kanali.io/cert`,
/// `kanali.io/key` and `kanali.io/ca`; without a `kanali.io/ca` annotation and without
/// `tls.ca`, the cert-manager / `kubernetes.io/tls` key `ca.crt` is used.
pub fn tls_material(
    objects: &Objects,
    namespace: &str,
    name: &str,
) -> Result<pb::TlsMaterial, TlsProblem> {
    let unavailable = objects.unavailable.iter().any(|k| k == "Secret");
    let secret = objects
        .secrets
        .iter()
        .find(|s| is_named(*s, namespace, name));
    let Some(secret) = secret else {
        let why = if unavailable {
            "cannot be read: the controller has no view of Secrets (see its log)"
        } else {
            "does not exist"
        };
        return Err(problem(
            6,
            "SecretNotFound",
            format!("Secret {namespace}/{name} {why}; requests get error 06"),
        ));
    };
    let annotations = secret.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    if annotation(ENABLED_ANNOTATION) != Some("true") {
        return Err(problem(
            6,
            "SecretNotEnabled",
            format!(
                "Secret {namespace}/{name} lacks the annotation {ENABLED_ANNOTATION}: \"true\" that lets Kanali read it; requests get error 06"
            ),
        ));
    }
    let data = secret.data.as_ref();
    let get = |key: &str| {
        data.and_then(|d| d.get(key))
            .map(|b| b.0.as_slice())
            .filter(|b| !b.is_empty())
    };
    let cert_key = annotation("kanali.io/cert").unwrap_or("tls.crt");
    let key_key = annotation("kanali.io/key").unwrap_or("tls.key");
    let (ca_key, ca) = match annotation("kanali.io/ca") {
        Some(k) => (k, get(k)),
        None => match get("tls.ca") {
            Some(ca) => ("tls.ca", Some(ca)),
            None => ("ca.crt", get("ca.crt")),
        },
    };
    let (cert, key) = (get(cert_key), get(key_key));
    if cert.is_none() && key.is_none() && ca.is_none() {
        return Err(problem(
            6,
            "SecretMissingData",
            format!(
                "Secret {namespace}/{name} has none of the data keys {cert_key}, {key_key} and {ca_key}; requests get error 06"
            ),
        ));
    }
    let ca_pem = match ca {
        None => Vec::new(),
        Some(pem) => {
            let certs = parse_certs(pem).map_err(|e| {
                problem(
                    8,
                    "InvalidCACertificate",
                    format!(
                        "Secret {namespace}/{name} key {ca_key} is not a PEM CA bundle ({e}); requests get error 08"
                    ),
                )
            })?;
            pem_certs(&certs)
        }
    };
    let (cert_pem, key_pem) = match (cert, key) {
        (None, None) => (Vec::new(), Vec::new()),
        (Some(_), None) | (None, Some(_)) => {
            let (has, lacks) = if cert.is_some() {
                (cert_key, key_key)
            } else {
                (key_key, cert_key)
            };
            return Err(problem(
                7,
                "InvalidKeyPair",
                format!(
                    "Secret {namespace}/{name} has {has} but no {lacks}; a client certificate needs both; requests get error 07"
                ),
            ));
        }
        (Some(cert), Some(key)) => {
            key_pair(cert, key).map_err(|e| {
                problem(
                    7,
                    "InvalidKeyPair",
                    format!(
                        "Secret {namespace}/{name}: {cert_key} and {key_key} are not a usable key pair ({e}); requests get error 07"
                    ),
                )
            })?;
            (cert.to_vec(), key.to_vec())
        }
    };
    let mut hash = Sha256::new();
    for part in [&ca_pem, &cert_pem, &key_pem] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(pb::TlsMaterial {
        id: format!("{namespace}/{name}#{short}"),
        secret: Some(pb::ResourceRef {
            kind: "Secret".to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            generation: 0,
        }),
        ca_pem,
        cert_pem,
        key_pem,
    })
}

/// The certificates of a PEM bundle, each parsed as X.509; an error names the first bad one.
pub(crate) fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block".to_owned());
    }
    for (i, cert) in certs.iter().enumerate() {
        x509_check(cert).map_err(|e| format!("certificate {}: {e}", i + 1))?;
    }
    Ok(certs)
}

/// A PEM block that decodes is not yet a certificate: parse it as X.509 so garbage inside a
/// well-formed block is caught here, not at the first handshake. Any version: a v1 CA or
/// client certificate (what `openssl x509 -req` issues without extensions) is as usable as
/// a v3 one.
fn x509_check(cert: &CertificateDer<'_>) -> Result<(), String> {
    kanali_proto::certs::parse_certificate(cert).map_err(|e| e.to_string())
}

/// Re-encodes certificates as PEM, so proxies get a normalised bundle.
fn pem_certs(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// Checks that a PEM certificate chain and a PEM private key belong together: the key loads,
/// and its public half is the one the first certificate certifies.
pub(crate) fn key_pair(cert: &[u8], key: &[u8]) -> Result<(), String> {
    let chain = parse_certs(cert)?;
    let Some(leaf) = chain.first() else {
        return Err("no CERTIFICATE block".to_owned());
    };
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("private key: {e}"))?;
    let key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("private key: {e}"))?;
    // Keys that cannot tell their public half are accepted, as rustls does.
    let Some(spki) = key.public_key() else {
        return Ok(());
    };
    match kanali_proto::certs::certifies(leaf, &spki) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the private key does not belong to the certificate".to_owned()),
        Err(e) => Err(format!("certificate 1: {e}")),
    }
}

/// Identifies one port of one Service.
pub type ServiceKey = (String, String, u16);

/// The addresses behind the given Service ports, in snapshot order.
pub fn service_endpoints(
    objects: &Objects,
    wanted: &BTreeSet<ServiceKey>,
) -> Vec<pb::ServiceEndpoints> {
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &objects.endpoint_slices {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"));
        if let Some(service) = service {
            let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
            by_service.entry((ns, service)).or_default().push(slice);
        }
    }
    wanted
        .iter()
        .map(|(ns, name, port)| {
            let service = find_service(&objects.services, ns, name);
            // The Service port names the endpoint port to use; without a matching Service
            // port (or without the Service) the number is used as given, as v2 did.
            let service_port = service
                .and_then(|s| s.spec.as_ref())
                .and_then(|s| s.ports.as_ref())
                .and_then(|ports| ports.iter().find(|p| p.port == i32::from(*port)));
            let port_name = service_port.and_then(|p| p.name.as_deref()).unwrap_or("");
            let fallback_port = service_port
                .and_then(|p| match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        u16::try_from(*n).ok()
                    }
                    _ => None,
                })
                .unwrap_or(*port);
            // A named Service port must exist in an endpoint object to be dialled; an unnamed
            // one (or none) falls back to the target port or the number itself.
            let required = service_port.is_some() && !port_name.is_empty();
            let mut addresses = BTreeSet::new();
            for slice in by_service
                .get(&(ns.as_str(), name.as_str()))
                .into_iter()
                .flatten()
            {
                if slice.address_type == "FQDN" {
                    continue;
                }
                let ports = slice.ports.iter().flatten();
                let ports = ports.map(|p| (p.name.as_deref(), p.port));
                let Some(target) = endpoint_port(ports, port_name, required, fallback_port) else {
                    continue;
                };
                for endpoint in &slice.endpoints {
                    // `ready` unset means ready (API docs: unknown is interpreted as ready).
                    if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    for ip in &endpoint.addresses {
                        addresses.insert(socket(ip, target));
                    }
                }
            }
            for ep in objects.endpoints.iter().filter(|e| is_named(*e, ns, name)) {
                for subset in ep.subsets.iter().flatten() {
                    let ports = subset.ports.iter().flatten();
                    let ports = ports.map(|p| (p.name.as_deref(), Some(p.port)));
                    let Some(target) = endpoint_port(ports, port_name, required, fallback_port)
                    else {
                        continue;
                    };
                    for address in subset.addresses.iter().flatten() {
                        addresses.insert(socket(&address.ip, target));
                    }
                }
            }
            let cluster_ip = service
                .and_then(|s| s.spec.as_ref())
                .and_then(|s| s.cluster_ip.as_deref())
                .filter(|ip| !ip.is_empty() && *ip != "None")
                .unwrap_or("")
                .to_owned();
            let external_name = service
                .and_then(|s| s.spec.as_ref())
                .filter(|s| s.type_.as_deref() == Some("ExternalName"))
                .and_then(|s| s.external_name.as_deref())
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                .unwrap_or_default();
            pb::ServiceEndpoints {
                namespace: ns.clone(),
                name: name.clone(),
                port: u32::from(*port),
                cluster_ip,
                addresses: addresses.into_iter().collect(),
                external_name,
            }
        })
        .collect()
}

/// The port the endpoints of one object (EndpointSlice or Endpoints subset) listen on, from
/// its (name, number) ports: the one named `port_name`; without it, `None` when the name is
/// `required` (nothing to dial), else `fallback`.
fn endpoint_port<'a>(
    mut ports: impl Iterator<Item = (Option<&'a str>, Option<i32>)>,
    port_name: &str,
    required: bool,
    fallback: u16,
) -> Option<u16> {
    let found = ports
        .find(|(n, _)| n.unwrap_or("") == port_name)
        .and_then(|(_, p)| p)
        .and_then(|p| u16::try_from(p).ok());
    match found {
        Some(t) => Some(t),
        None if required => None,
        None => Some(fallback),
    }
}

fn socket(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The Service `namespace/name`, if known.
pub fn find_service<'a>(
    services: &'a [Service],
    namespace: &str,
    name: &str,
) -> Option<&'a Service> {
    services.iter().find(|s| is_named(*s, namespace, name))
}

/// Whether `obj` is `namespace/name` (an object without a namespace is in `default`).
fn is_named<K: kube::Resource>(obj: &K, namespace: &str, name: &str) -> bool {
    let meta = obj.meta();
    meta.name.as_deref() == Some(name)
        && meta.namespace.as_deref().unwrap_or("default") == namespace
}

/// The Services of `namespace` a dynamic backend may pick: those whose labels already equal the
/// fixed-value labels and that carry every header-valued label key. Sorted by name.
pub fn candidates(
    services: &[Service],
    namespace: &str,
    labels: &[pb::LabelMatch],
) -> Vec<pb::ServiceCandidate> {
    use pb::label_match::Source;
    let mut out: Vec<pb::ServiceCandidate> = services
        .iter()
        .filter(|s| s.metadata.namespace.as_deref().unwrap_or("default") == namespace)
        .filter_map(|s| {
            let empty = BTreeMap::new();
            let have = s.metadata.labels.as_ref().unwrap_or(&empty);
            let fits = labels.iter().all(|l| match &l.source {
                Some(Source::Value(v)) => have.get(&l.name) == Some(v),
                Some(Source::Header(_)) => have.contains_key(&l.name),
                None => false,
            });
            fits.then(|| pb::ServiceCandidate {
                name: s.metadata.name.clone().unwrap_or_default(),
                labels: have
                    .iter()
                    .map(|(k, v)| pb::Header {
                        name: k.clone(),
                        value: v.clone(),
                    })
                    .collect(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name (1-63
/// characters, alphanumeric at both ends).
pub fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                let b = l.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            })
    });
    prefix_ok && !name.is_empty() && kanali_proto::is_label_value(name)
}
