//! Leaving service without losing a request.
//!
//! Behind a Kubernetes Service, a terminating pod keeps receiving new connections for a while
//! after it got SIGTERM: the endpoint removal has to reach every node's kube-proxy (or the
//! cloud load balancer) first, which takes about a second and sometimes several. A proxy that
//! closed its listener on SIGTERM refused those connections. So shutdown has three phases:
//!
//! 1. **Draining**, for [`ShutdownConfig::delay`]: `/readyz` fails at once (so whatever still
//!    uses readiness stops choosing this pod) while `/healthz` keeps answering, and the
//!    listeners keep accepting and serving. Each HTTP/1.1 response carries
//!    `Connection: close` and each HTTP/2 connection that makes a request gets a GOAWAY, so
//!    clients with open connections reconnect — and reach another pod once the balancer
//!    caught up.
//! 2. **Closing**: the listeners close, idle connections are closed, and requests in flight
//!    finish, for at most [`ShutdownConfig::drain_timeout`].
//! 3. The admin port and the controller subscription end.
//!
//! The pod's `terminationGracePeriodSeconds` must cover delay + drain timeout, or the kubelet
//! kills the proxy mid-drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// How a proxy leaves service (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// How long the listeners keep accepting after shutdown starts, while readiness fails.
    pub delay: Duration,
    /// How long requests in flight may take to finish once the listeners are closed.
    pub drain_timeout: Duration,
}

impl ShutdownConfig {
    /// No delay, 30 s of drain: for a proxy that no load balancer sends traffic to (tests,
    /// a local demo).
    pub const IMMEDIATE: ShutdownConfig = ShutdownConfig {
        delay: Duration::ZERO,
        drain_timeout: Duration::from_secs(30),
    };
}

impl Default for ShutdownConfig {
    /// 5 s of delay covers kube-proxy's and most load balancers' endpoint propagation; 20 s
    /// of drain makes 25 s, inside Kubernetes' default grace period of 30 s.
    fn default() -> Self {
        ShutdownConfig {
            delay: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// Starts the draining phase; held by the [`crate::RunningProxy`].
#[derive(Debug)]
pub(crate) struct Drain {
    flag: Arc<AtomicBool>,
    tx: watch::Sender<bool>,
}

/// Whether the proxy is draining: a cheap check for every response, and a wait for the
/// connection tasks.
#[derive(Clone, Debug)]
pub struct DrainSignal {
    flag: Arc<AtomicBool>,
    rx: watch::Receiver<bool>,
}

impl Drain {
    /// A drain that has not started, and its signal.
    pub(crate) fn new() -> (Drain, DrainSignal) {
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel(false);
        (
            Drain {
                flag: flag.clone(),
                tx,
            },
            DrainSignal { flag, rx },
        )
    }

    /// Enters the draining phase (idempotent).
    pub(crate) fn start(&self) {
        // The flag first: a task woken by the watch must also see it.
        self.flag.store(true, Ordering::Release);
        let _ = self.tx.send(true);
    }
}

impl DrainSignal {
    /// A signal that never fires, for servers without a shutdown sequence (tests, benches).
    pub fn never() -> DrainSignal {
        Drain::new().1
    }

    /// Whether draining has started. One atomic load: checked on every response.
    pub fn is_draining(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves once draining has started (never, if the `Drain` is dropped unstarted).
    pub async fn started(&mut self) {
        if self.rx.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_signal_fires_once_the_drain_starts() {
        let (drain, signal) = Drain::new();
        assert!(!signal.is_draining());
        let mut waiting = signal.clone();
        let waiter = tokio::spawn(async move { waiting.started().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drain.start();
        waiter.await.unwrap();
        assert!(signal.is_draining());
        // Late subscribers see it at once.
        let mut late = signal.clone();
        late.started().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_drain_never_fires() {
        let mut signal = DrainSignal::never();
        let waited = tokio::time::timeout(Duration::from_secs(3600), signal.started()).await;
        assert!(waited.is_err());
        assert!(!signal.is_draining());
    }

    #[test]
    fn the_default_fits_the_default_grace_period() {
        let c = ShutdownConfig::default();
        assert!(c.delay + c.drain_timeout < Duration::from_secs(30));
    }
}
