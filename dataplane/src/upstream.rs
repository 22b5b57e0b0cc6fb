//! Upstream connections: one pool per upstream (`scheme://host:port`), shared by every route
//! and every snapshot that sends there, so swapping in a new snapshot keeps warm connections.
//!
//! The request path takes no lock: idle connections wait in a lock-free bounded queue, a
//! request pops one (or dials a new one), and the connection goes back as soon as its response
//! is complete. The Go original built a new transport — new TCP and TLS handshakes — for every
//! request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// Upstream connection settings.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// TCP connect (and TLS handshake) timeout.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection may be reused.
    pub idle_timeout: Duration,
    /// Idle connections kept per upstream.
    pub max_idle_per_host: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            // Below the common 60-75 s keep-alive of upstream servers, so we rarely reuse a
            // connection the server is about to close.
            idle_timeout: Duration::from_secs(50),
            max_idle_per_host: 256,
        }
    }
}

/// Why an upstream request failed (every variant becomes error 08 for the client).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TLS could not be set up.
    #[error("cannot set up upstream TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Connecting (TCP or TLS) failed.
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        /// The upstream.
        authority: Authority,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Connecting took too long.
    #[error("connecting to {0} timed out")]
    ConnectTimeout(Authority),
    /// The HTTP exchange failed.
    #[error("request to {authority} failed: {source}")]
    Http {
        /// The upstream.
        authority: Authority,
        /// What went wrong.
        source: hyper::Error,
    },
}

/// Creates the per-upstream pools and hands the same pool to every table that needs it.
pub struct Upstreams {
    config: UpstreamConfig,
    tls: TlsConnector,
    // Only touched when a snapshot is applied, never per request.
    pools: Mutex<HashMap<(Scheme, Authority), Weak<HostPool>>>,
}

impl Upstreams {
    /// Sets up TLS trust: the system's CA certificates, or the Mozilla roots bundled in the
    /// binary when the system has none.
    pub fn new(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            tracing::info!("no usable system CA certificates; trusting the bundled Mozilla roots");
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Upstreams {
            config,
            tls: TlsConnector::from(Arc::new(tls)),
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// The pool for `scheme://authority`, shared with earlier tables while any still uses it.
    pub fn pool(&self, scheme: &Scheme, authority: &Authority) -> Arc<HostPool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let key = (scheme.clone(), authority.clone());
        if let Some(pool) = pools.get(&key).and_then(Weak::upgrade) {
            return pool;
        }
        pools.retain(|_, weak| weak.strong_count() > 0);
        let https = *scheme == Scheme::HTTPS;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = https.then(|| {
            let name = ServerName::try_from(host.clone()).ok();
            (self.tls.clone(), name)
        });
        let pool = Arc::new(HostPool {
            authority: authority.clone(),
            host,
            port,
            tls,
            idle: ArrayQueue::new(self.config.max_idle_per_host.max(1)),
            connect_timeout: self.config.connect_timeout,
            idle_timeout: self.config.idle_timeout,
        });
        pools.insert(key, Arc::downgrade(&pool));
        pool
    }
}

struct Idle {
    sender: SendRequest<Incoming>,
    since: Instant,
}

/// Connections to one upstream.
pub struct HostPool {
    authority: Authority,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, Option<ServerName<'static>>)>,
    idle: ArrayQueue<Idle>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("authority", &self.authority)
            .field("idle", &self.idle.len())
            .finish()
    }
}

impl HostPool {
    /// The upstream this pool connects to.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Sends `req` (origin-form URI, headers final) and returns the response head; the body
    /// streams on. The connection returns to the pool once the exchange is complete.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut sender, reused) = match self.checkout() {
            Some(sender) => (sender, true),
            None => (self.connect().await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // A pooled connection closed before the request was written to it: nothing
                // reached the upstream, so it is safe to try once more on a fresh connection.
                Some(req) if reused => {
                    sender = self.connect().await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|source| self.http_error(source))?
                }
                _ => return Err(self.http_error(e.into_error())),
            },
        };
        self.release(sender);
        Ok(resp)
    }

    fn http_error(&self, source: hyper::Error) -> UpstreamError {
        UpstreamError::Http {
            authority: self.authority.clone(),
            source,
        }
    }

    fn checkout(&self) -> Option<SendRequest<Incoming>> {
        while let Some(idle) = self.idle.pop() {
            if idle.sender.is_ready() && idle.since.elapsed() < self.idle_timeout {
                return Some(idle.sender);
            }
            // Closed by the upstream, or idle too long: drop it (closes the connection).
        }
        None
    }

    fn release(self: &Arc<Self>, mut sender: SendRequest<Incoming>) {
        if sender.is_ready() {
            let _ = self.idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        } else if !sender.is_closed() {
            // Still busy with this response's body: take it back once that is done.
            let pool = self.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    let _ = pool.idle.push(Idle {
                        sender,
                        since: Instant::now(),
                    });
                }
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        match tokio::time::timeout(self.connect_timeout, self.dial()).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::ConnectTimeout(self.authority.clone())),
        }
    }

    async fn dial(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let connect_error = |source| UpstreamError::Connect {
            authority: self.authority.clone(),
            source,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(connect_error)?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.handshake(tcp).await,
            Some((connector, name)) => {
                let name = name.clone().ok_or_else(|| {
                    connect_error(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "not a valid TLS server name",
                    ))
                })?;
                let tls = connector.connect(name, tcp).await.map_err(connect_error)?;
                self.handshake(tls).await
            }
        }
    }

    async fn handshake<T>(&self, io: T) -> Result<SendRequest<Incoming>, UpstreamError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| self.http_error(source))?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, upstream = %authority, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}
