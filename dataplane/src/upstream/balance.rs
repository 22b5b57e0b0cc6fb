//! Service backends: the addresses behind one Service port and how a request picks one.
//!
//! Power of two choices: sample two addresses, send to the one with fewer requests in flight.
//! It needs no shared state beyond one atomic counter per address, spreads evenly under equal
//! load and steers away from a slow address without the herding of "always the least loaded".
//! An address that just failed to connect sits out for a few seconds, unless every address is
//! failing. The address set lives behind an atomic pointer, so endpoint changes swap it in
//! without touching the routing table.

use std::sync::Arc;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::Request;
use http::uri::Authority;
use rustls::ClientConfig;

use crate::body::RequestBody;
use crate::headers::Added;
use crate::upstream::UpstreamError;
use crate::upstream::pool::{HostPool, InFlight, Sent, now_millis};

/// How long an address that failed to connect is skipped.
pub const FAILURE_SKIP_MS: u64 = 5_000;

/// Addresses tried for one request when connecting fails (nothing was sent, so trying
/// another one is safe).
const MAX_ATTEMPTS: usize = 3;

/// What makes two Service backends the same; routes of every snapshot that name it share one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: Box<str>,
    /// Service name.
    pub name: Box<str>,
    /// Service port.
    pub port: u16,
    /// TLS or cleartext.
    pub https: bool,
    /// `TlsMaterial.id`; empty: the default configuration.
    pub tls: Box<str>,
}

/// One port of one Service, as a set of addresses to balance over.
#[derive(Debug)]
pub struct ServiceBackend {
    key: ServiceKey,
    authority: Authority,
    tls: Option<Arc<ClientConfig>>,
    addresses: ArcSwap<Box<[Arc<HostPool>]>>,
}

impl ServiceBackend {
    pub(crate) fn new(
        key: ServiceKey,
        authority: Authority,
        tls: Option<Arc<ClientConfig>>,
        addresses: Box<[Arc<HostPool>]>,
    ) -> Self {
        ServiceBackend {
            key,
            authority,
            tls,
            addresses: ArcSwap::from_pointee(addresses),
        }
    }

    /// What identifies it.
    pub fn key(&self) -> &ServiceKey {
        &self.key
    }

    /// `<svc>.<ns>.svc.<cluster-domain>:<port>`: the TLS server name's host, and the `Host`
    /// sent when the client gave none.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    pub(crate) fn tls(&self) -> Option<&Arc<ClientConfig>> {
        self.tls.as_ref()
    }

    /// The pools requests are balanced over now.
    pub fn addresses(&self) -> Arc<Box<[Arc<HostPool>]>> {
        self.addresses.load_full()
    }

    /// Swaps in a new address set unless it holds the same pools.
    pub(crate) fn set_addresses(&self, addresses: Box<[Arc<HostPool>]>) {
        let current = self.addresses.load();
        let same = current.len() == addresses.len()
            && current
                .iter()
                .zip(addresses.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            self.addresses.store(Arc::new(addresses));
        }
    }

    /// Sends `req` (with `added`, see [`HostPool::send`]) to one of the addresses; when
    /// connecting fails, to another. The guard returned beside the head counts the request
    /// against the chosen address until it is dropped (with the response body).
    pub fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        added: Option<Added>,
    ) -> impl Future<Output = Result<Sent, UpstreamError>> + Send + use<> {
        // The common case without an `async fn` layer (see `HostPool::send`): the address
        // picked has a connection ready.
        let ready = {
            let set = self.addresses.load();
            pick(&set, now_millis(), |_| false)
                .and_then(|pool| Some((pool.clone(), pool.ready_connection()?)))
        };
        match ready {
            Some((pool, conn)) => {
                let in_flight = InFlight::new(&pool);
                Either::Left(pool.send_on(conn, req, added, None, Some(in_flight)))
            }
            // Boxed: connecting (and trying other addresses) is the rare path.
            None => {
                let this = self.clone();
                Either::Right(Box::pin(
                    async move { this.send_connecting(req, added).await },
                ))
            }
        }
    }

    /// [`send`](Self::send) when a connection has to be made first: on an address where
    /// connecting fails, the request tries another.
    async fn send_connecting(
        &self,
        req: Request<RequestBody>,
        added: Option<Added>,
    ) -> Result<Sent, UpstreamError> {
        // Allocates only after a failure.
        let mut tried: Vec<Arc<HostPool>> = Vec::new();
        let mut last_error = None;
        for _ in 0..MAX_ATTEMPTS {
            let pool = {
                let set = self.addresses.load();
                let excluded = |p: &Arc<HostPool>| tried.iter().any(|t| Arc::ptr_eq(t, p));
                match pick(&set, now_millis(), excluded) {
                    Some(pool) => pool.clone(),
                    None => break,
                }
            };
            let in_flight = InFlight::new(&pool);
            match pool.connection().await {
                Ok(conn) => return pool.send_on(conn, req, added, None, Some(in_flight)).await,
                Err(error) if error.is_connect() => {
                    tracing::debug!(%error, service = %self.authority, "connect failed; trying another address");
                    last_error = Some(error);
                    tried.push(pool.clone());
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| UpstreamError::NoAddresses(self.authority.to_string())))
    }
}

/// What the balancer needs to know about an address.
pub trait Candidate {
    /// Requests in flight.
    fn in_flight(&self) -> usize;
    /// When connecting last failed (`now_millis` scale); 0: it did not.
    fn failed_at(&self) -> u64;
}

impl Candidate for Arc<HostPool> {
    fn in_flight(&self) -> usize {
        HostPool::in_flight(self)
    }
    fn failed_at(&self) -> u64 {
        HostPool::failed_at(self)
    }
}

/// Picks an address: the less busy of two random ones that are not `excluded` and did not fail
/// within [`FAILURE_SKIP_MS`] of `now`; if the sample has no such address, any such address;
/// if every address failed recently, the least busy of those not excluded (trying beats
/// answering 08 without trying). `None` when nothing is left.
pub fn pick<C: Candidate>(set: &[C], now: u64, excluded: impl Fn(&C) -> bool) -> Option<&C> {
    let healthy = |c: &C| {
        let failed = c.failed_at();
        !excluded(c) && (failed == 0 || now.saturating_sub(failed) >= FAILURE_SKIP_MS)
    };
    let n = set.len();
    if n < 2 {
        return set.first().filter(|c| !excluded(c));
    }
    let i = fastrand::usize(..n);
    let mut j = fastrand::usize(..n - 1);
    if j >= i {
        j += 1;
    }
    let (a, b) = (&set[i], &set[j]);
    match (healthy(a), healthy(b)) {
        // `a` is as random as `b`, so ties need no coin flip.
        (true, true) => Some(if b.in_flight() < a.in_flight() { b } else { a }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => {
            // Rare (failures or retries): a scan from a random start, so the load of the
            // skipped addresses spreads over the rest.
            let start = fastrand::usize(..n);
            let rotated = set[start..].iter().chain(&set[..start]);
            rotated.clone().find(|c| healthy(c)).or_else(|| {
                rotated
                    .filter(|c| !excluded(c))
                    .min_by_key(|c| c.in_flight())
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Addr {
        id: usize,
        in_flight: usize,
        failed_at: u64,
    }

    impl Candidate for Addr {
        fn in_flight(&self) -> usize {
            self.in_flight
        }
        fn failed_at(&self) -> u64 {
            self.failed_at
        }
    }

    fn addrs(n: usize) -> Vec<Addr> {
        (0..n)
            .map(|id| Addr {
                id,
                ..Default::default()
            })
            .collect()
    }

    fn counts(
        set: &[Addr],
        now: u64,
        rounds: usize,
        excluded: impl Fn(&Addr) -> bool,
    ) -> Vec<usize> {
        let mut counts = vec![0; set.len()];
        for _ in 0..rounds {
            counts[pick(set, now, &excluded).unwrap().id] += 1;
        }
        counts
    }

    #[test]
    fn equal_load_spreads_evenly() {
        let set = addrs(3);
        let rounds = 30_000;
        let counts = counts(&set, 1, rounds, |_| false);
        let expected = rounds / 3;
        for c in &counts {
            let deviation = c.abs_diff(expected) as f64 / expected as f64;
            assert!(deviation < 0.15, "{counts:?}");
        }
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let mut set = addrs(2);
        set[0].in_flight = 5;
        assert_eq!(counts(&set, 1, 1000, |_| false), [0, 1000]);
        // With three, the busiest is never chosen (it loses every pair it is in) and the idle
        // one wins both of its pairs: about 0, 1000, 2000.
        let mut set = addrs(3);
        set[0].in_flight = 9;
        set[1].in_flight = 1;
        let c = counts(&set, 1, 3000, |_| false);
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[2] > c[1] * 3 / 2, "{c:?}");
    }

    #[test]
    fn recently_failed_addresses_are_skipped_until_the_window_passes() {
        let now = 100_000;
        let mut set = addrs(3);
        set[1].failed_at = now - 10;
        let c = counts(&set, now, 3000, |_| false);
        assert_eq!(c[1], 0, "{c:?}");
        assert!(c[0] > 1000 && c[2] > 1000, "{c:?}");
        // Once the window has passed it is back in rotation.
        let later = now - 10 + FAILURE_SKIP_MS;
        let c = counts(&set, later, 3000, |_| false);
        assert!(c[1] > 500, "{c:?}");
    }

    #[test]
    fn when_everything_failed_the_least_busy_is_still_tried() {
        let now = 100_000;
        let mut set = addrs(3);
        for (a, load) in set.iter_mut().zip([3, 1, 2]) {
            a.failed_at = now - 1;
            a.in_flight = load;
        }
        assert_eq!(counts(&set, now, 100, |_| false), [0, 100, 0]);
        // Only one healthy address: it gets everything, even when sampling misses it.
        set[2].failed_at = 0;
        assert_eq!(counts(&set, now, 300, |_| false), [0, 0, 300]);
    }

    #[test]
    fn excluded_addresses_are_never_picked() {
        let set = addrs(3);
        let c = counts(&set, 1, 600, |a| a.id == 0);
        assert_eq!(c[0], 0, "{c:?}");
        assert!(pick(&set, 1, |_| true).is_none());
        let one = addrs(1);
        assert_eq!(pick(&one, 1, |_| false).unwrap().id, 0);
        assert!(pick(&one, 1, |_| true).is_none());
        assert!(pick(&addrs(0), 1, |_| false).is_none());
    }
}
