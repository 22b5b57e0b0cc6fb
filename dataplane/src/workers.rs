//! Thread per core: each worker is an OS thread with tokio's current-thread runtime and a
//! listening socket of its own, on the same address as the others (`SO_REUSEPORT`): the kernel
//! spreads new connections over the sockets, and a connection lives its whole life on the
//! worker that accepted it.
//!
//! Against one work-stealing runtime over the same threads, a request never pays for the
//! stealing scheduler's cross-thread bookkeeping, and a connection's wake-ups never move it
//! to another core (e2e/bench/RESULTS.md measures both). The price: connections, not requests,
//! are spread, so a worker cannot take over a busy neighbour's HTTP/2 streams.
//!
//! What the workers share is read lock-free (the route table, the rate-limit counters); what
//! is tied to a runtime stays with its worker: the idle upstream connections are kept per
//! worker (`current`), since a socket is watched by the runtime that opened it.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::{Builder, Handle};
use tokio::sync::watch;

/// How the proxy runs its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    /// On the runtime `start` is called from, from one listening socket (tests, embedding,
    /// and `kanali-proxy --work-stealing`).
    Caller,
    /// On this many worker threads, each with its own runtime and listening socket.
    PerCore(usize),
}

impl Workers {
    /// How many workers hold connections of their own (1 for [`Workers::Caller`]).
    pub fn count(self) -> usize {
        match self {
            Workers::Caller => 1,
            Workers::PerCore(n) => n.max(1),
        }
    }
}

/// What [`INDEX`] holds outside workers.
const NOT_A_WORKER: usize = usize::MAX;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(NOT_A_WORKER) };
}

/// The index of the worker this thread is (0 outside workers): which per-worker state a
/// request on this thread uses.
pub(crate) fn current() -> usize {
    index().unwrap_or(0)
}

/// The index of the worker this thread is, if it is one.
pub(crate) fn index() -> Option<usize> {
    Some(INDEX.with(Cell::get)).filter(|&i| i != NOT_A_WORKER)
}

/// A `T` for each worker, made on first use (most pools of a big cluster's endpoints never
/// see a request from this proxy); each thread uses its worker's ([`current`]).
pub(crate) struct PerWorker<T>(OnceLock<Box<[T]>>);

impl<T> PerWorker<T> {
    /// None made yet.
    pub const fn new() -> Self {
        PerWorker(OnceLock::new())
    }

    /// This worker's, if they have been made.
    pub fn here(&self) -> Option<&T> {
        let all = self.0.get()?;
        all.get(current().min(all.len().saturating_sub(1)))
    }

    /// This worker's, made with `make` for each of `workers` (at least one) if need be.
    pub fn here_or_make(&self, workers: usize, make: impl Fn() -> T) -> &T {
        let all = self
            .0
            .get_or_init(|| (0..workers.max(1)).map(|_| make()).collect());
        // Never past the end: there is at least one, and the index is capped by them.
        &all[current().min(all.len() - 1)]
    }

    /// Every worker's.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.0.get().into_iter().flat_map(|all| all.iter())
    }
}

/// A running worker thread.
pub(crate) struct Worker {
    /// Its runtime: what is spawned here runs on the worker.
    pub handle: Handle,
    thread: std::thread::JoinHandle<()>,
}

/// Longest wait for a worker's blocking tasks (plugin compiles, say) when it ends.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

impl Worker {
    /// Starts worker `index`; it runs until `exit` turns true (or its sender is dropped), then
    /// drops what is left on it (connections the drain timeout gave up on).
    pub fn start(index: usize, mut exit: watch::Receiver<bool>) -> io::Result<Worker> {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let thread = std::thread::Builder::new()
            .name(format!("kanali-worker-{index}"))
            .spawn(move || {
                INDEX.with(|i| i.set(index));
                runtime.block_on(crate::stopped(&mut exit));
                runtime.shutdown_timeout(BLOCKING_GRACE);
            })?;
        Ok(Worker { handle, thread })
    }

    /// Waits until the worker's thread has ended (it ends once `exit` turns true), off the
    /// runtime's threads: a join blocks.
    pub async fn ended(self) {
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }

    /// `listener`, watched by this worker's runtime.
    pub fn adopt(&self, listener: std::net::TcpListener) -> io::Result<TcpListener> {
        let _in = self.handle.enter();
        TcpListener::from_std(listener)
    }
}

/// `n` listening sockets on `addr`, one per worker ([`Workers::count`]), with `SO_REUSEPORT`.
///
/// Sockets that share a port that way also share it with any other process of the same user
/// that asks for it, which would then silently take a share of the connections: the address
/// is first bound alone, so a port already in use fails start-up as it does without workers.
/// Port 0 gets one free port for all.
pub(crate) fn reuseport_listeners(
    addr: SocketAddr,
    n: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let port = std::net::TcpListener::bind(addr)?.local_addr()?.port();
    let addr = SocketAddr::new(addr.ip(), port);
    (0..n)
        .map(|_| {
            let socket = match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            // `listen` registers the socket with the calling thread's runtime; the worker
            // that serves it registers it again with its own.
            socket.listen(LISTEN_BACKLOG)?.into_std()
        })
        .collect()
}

/// The accept queue of each socket, as `TcpListener::bind` has it.
const LISTEN_BACKLOG: u32 = 1024;
