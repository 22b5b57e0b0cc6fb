//! The HTTPS listener's certificate: loaded from PEM files at start-up, and reloaded when the
//! files change, without a restart.
//!
//! A background task polls the files' metadata; when any of them changed it rebuilds the whole
//! `rustls::ServerConfig` (so a new client CA applies too) and swaps it in. Each accepted
//! connection takes whatever configuration is current, so connections already open keep the
//! certificate they were handshaken with. A new file that does not load leaves the previous
//! configuration in place and is logged; at start-up the same problem is an error.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use tokio::sync::watch;

/// How often the files are checked for changes, unless configured otherwise.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// ALPN protocols offered, most preferred first: HTTP/2, then HTTP/1.1.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The HTTPS listener: where it listens and where its certificate comes from.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    /// Address of the HTTPS listener.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate issued by one.
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// Why the TLS files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid PEM, or has none of the blocks it should have.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate is not a valid X.509 certificate.
    #[error("{path}: invalid certificate: {reason}")]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// The parser's reason.
        reason: kanali_proto::certs::CertError,
    },
    /// The private key is of a kind the crypto provider cannot use.
    #[error("{path}: unusable private key: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// The provider's reason.
        reason: rustls::Error,
    },
    /// The private key is not the certificate's.
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The client CA file cannot be used to verify clients.
    #[error("{path}: unusable client CA: {reason}")]
    ClientCa {
        /// The client CA file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the combination (e.g. no protocol version left).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The listener's current TLS configuration: replaced as a whole on reload, read without
/// locks by every accepted connection.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<ArcSwap<rustls::ServerConfig>>,
}

impl ServerTls {
    /// An acceptor with the configuration current now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// Loads the files named by `config`, and returns the configuration with the task that keeps
/// it up to date; the task ends when `shutdown` turns true.
pub fn start(
    config: TlsConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(ServerTls, impl Future<Output = ()> + Send + 'static), TlsError> {
    let files = Files::of(&config);
    let seen = files.stamps();
    let server = build(&files)?;
    let tls = ServerTls {
        current: Arc::new(ArcSwap::from_pointee(server)),
    };
    let task = reload(files, seen, config.reload_interval, tls.clone(), shutdown);
    Ok((tls, task))
}

/// Polls the files; on a change, rebuilds and swaps the configuration, or keeps the old one
/// and says why.
async fn reload(
    files: Files,
    mut seen: Stamps,
    interval: Duration,
    tls: ServerTls,
    mut shutdown: watch::Receiver<bool>,
) {
    let files = Arc::new(files);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = crate::stopped(&mut shutdown) => return,
        }
        // File I/O blocks; off the runtime's threads, so a slow disk never stalls requests
        // (the proxy may run on a single-threaded runtime).
        let f = files.clone();
        let previous = seen.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let now = f.stamps();
            (now != previous).then(|| (build(&f), now))
        })
        .await;
        let Ok(Some((built, now))) = checked else {
            continue;
        };
        // Remembered even when the new files are bad: they are retried when they change
        // again, not every poll (and the warning is not repeated every second).
        seen = now;
        match built {
            Ok(config) => {
                tls.current.store(Arc::new(config));
                tracing::info!(cert = %files.cert.display(), "reloaded the TLS certificate");
            }
            Err(error) => {
                tracing::warn!(%error, "the TLS files changed but do not load; still serving the previous certificate");
            }
        }
    }
}

/// The files that make up the configuration.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl Files {
    fn of(config: &TlsConfig) -> Files {
        Files {
            cert: config.cert_file.clone(),
            key: config.key_file.clone(),
            client_ca: config.client_ca_file.clone(),
        }
    }

    fn stamps(&self) -> Stamps {
        Stamps([
            Stamp::of(&self.cert),
            Stamp::of(&self.key),
            self.client_ca.as_deref().and_then(Stamp::of),
        ])
    }
}

/// What is compared to notice a change, for each file (None: could not be read).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamps([Option<Stamp>; 3]);

/// A file's identity and last change. The inode and device catch a file replaced by a
/// rename or a symlink swap (how Kubernetes updates mounted Secrets: the path follows the
/// `..data` link); size and both times catch an in-place rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Reads the files and builds the server configuration.
fn build(files: &Files) -> Result<rustls::ServerConfig, TlsError> {
    let cert = read(&files.cert)?;
    let key = read(&files.key)?;
    let client_ca = match &files.client_ca {
        Some(path) => Some((path, read(path)?)),
        None => None,
    };
    server_config(
        &files.cert,
        &cert,
        &files.key,
        &key,
        client_ca
            .as_ref()
            .map(|(p, pem)| (p.as_path(), pem.as_slice())),
    )
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the configuration from PEM contents; the paths only name files in errors.
fn server_config(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    client_ca: Option<(&Path, &[u8])>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let chain = certificates(cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key_path.to_owned(),
        reason: match e {
            pem::Error::NoItemsFound => "no private key (expected a PEM block PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)".to_owned(),
            other => format!("bad PEM: {other}"),
        },
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|reason| TlsError::Key {
            path: key_path.to_owned(),
            reason,
        })?;
    // Checked with a general X.509 parser rather than rustls' `keys_match`, which parses with
    // webpki and so refuses v1 certificates that clients accept.
    let certifies = match (chain.first(), key.public_key()) {
        (Some(leaf), Some(spki)) => kanali_proto::certs::certifies(leaf, &spki),
        // A key that cannot tell its public half is not a mismatch; rustls accepts it too.
        _ => Ok(true),
    };
    match certifies {
        Ok(true) => {}
        Ok(false) => {
            return Err(TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        Err(reason) => {
            return Err(TlsError::Certificate {
                path: cert_path.to_owned(),
                reason,
            });
        }
    }
    let certified = CertifiedKey::new(chain, key);

    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((path, pem)) => {
            let bad = |reason: String| TlsError::ClientCa {
                path: path.to_owned(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for ca in certificates(path, pem)? {
                roots.add(ca).map_err(|e| bad(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Every `CERTIFICATE` block of a PEM file; at least one.
fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate (expected PEM blocks CERTIFICATE)".to_owned()
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        cert: String,
        key: String,
    }

    fn ca_pem() -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    fn leaf() -> Pair {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn build_pem(
        cert: &str,
        key: &str,
        ca: Option<&str>,
    ) -> Result<rustls::ServerConfig, TlsError> {
        server_config(
            Path::new("cert.pem"),
            cert.as_bytes(),
            Path::new("key.pem"),
            key.as_bytes(),
            ca.map(|c| (Path::new("ca.pem"), c.as_bytes())),
        )
    }

    #[test]
    fn a_matching_pair_loads_with_alpn_h2_first() {
        let p = leaf();
        let config = build_pem(&p.cert, &p.key, None).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        build_pem(&p.cert, &p.key, Some(&ca_pem())).unwrap();
    }

    #[test]
    fn a_key_of_another_certificate_is_a_mismatch_naming_both_files() {
        let (a, b) = (leaf(), leaf());
        let err = build_pem(&a.cert, &b.key, None).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the private key in key.pem does not match the certificate in cert.pem"
        );
    }

    #[test]
    fn files_without_the_expected_blocks_say_what_was_expected() {
        let p = leaf();
        let err = build_pem(&p.key, &p.key, None).unwrap_err();
        assert!(
            err.to_string().starts_with("cert.pem: no certificate"),
            "{err}"
        );
        let err = build_pem(&p.cert, &p.cert, None).unwrap_err();
        assert!(
            err.to_string().starts_with("key.pem: no private key"),
            "{err}"
        );
        let err = build_pem(&p.cert, &p.key, Some("")).unwrap_err();
        assert!(
            err.to_string().starts_with("ca.pem: no certificate"),
            "{err}"
        );
        let truncated = &p.cert[..p.cert.len() / 2];
        let err = build_pem(truncated, &p.key, None).unwrap_err();
        assert!(err.to_string().starts_with("cert.pem: bad PEM"), "{err}");
    }

    /// A v1 certificate, as `openssl x509 -req` issues without extensions (issue #8), is a
    /// usable listener certificate, and a v1 CA a usable client CA; the pair is still checked.
    #[test]
    fn openssl_v1_certificates_load_and_their_pair_is_checked() {
        let cert = include_str!("../../../proto/testdata/v1-client.pem");
        let key = include_str!("../../../proto/testdata/v1-client.key");
        let ca = include_str!("../../../proto/testdata/v1-ca.pem");
        build_pem(cert, key, Some(ca)).unwrap();
        let err = build_pem(cert, &leaf().key, None).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn a_certificate_block_that_is_not_x509_is_reported_as_such() {
        let p = leaf();
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = build_pem(junk, &p.key, None).unwrap_err();
        assert!(matches!(err, TlsError::Certificate { .. }), "{err:?}");
    }

    #[test]
    fn stamps_change_when_a_file_is_rewritten_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca: None,
        };
        let missing = files.stamps();
        assert_eq!(missing, Stamps([None, None, None]));
        std::fs::write(&files.cert, "a").unwrap();
        std::fs::write(&files.key, "b").unwrap();
        let first = files.stamps();
        assert_ne!(first, missing);
        assert_eq!(first, files.stamps());
        // Replaced by a rename, as an atomic writer or a Secret update does: a new inode.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, "a").unwrap();
        std::fs::rename(&tmp, &files.cert).unwrap();
        assert_ne!(files.stamps(), first);
    }

    #[tokio::test]
    async fn a_bad_new_file_keeps_the_old_configuration_and_a_good_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let first = leaf();
        std::fs::write(&cert, &first.cert).unwrap();
        std::fs::write(&key, &first.key).unwrap();
        let (tx, rx) = watch::channel(false);
        let config = TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert_file: cert.clone(),
            key_file: key.clone(),
            client_ca_file: None,
            reload_interval: Duration::from_millis(20),
        };
        let (tls, task) = start(config, rx).unwrap();
        let task = tokio::spawn(task);
        let original = tls.current.load_full();

        let second = leaf();
        // A new certificate with the old key: does not load.
        std::fs::write(&cert, &second.cert).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(Arc::ptr_eq(&tls.current.load_full(), &original));

        std::fs::write(&key, &second.key).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::ptr_eq(&tls.current.load_full(), &original) {
            assert!(tokio::time::Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn start_up_with_missing_files_is_an_error_naming_the_file() {
        let (_tx, rx) = watch::channel(false);
        let config = TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert_file: "/nonexistent/cert.pem".into(),
            key_file: "/nonexistent/key.pem".into(),
            client_ca_file: None,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
        };
        let err = start(config, rx).err().unwrap();
        assert!(
            err.to_string()
                .starts_with("cannot read /nonexistent/cert.pem"),
            "{err}"
        );
    }
}
