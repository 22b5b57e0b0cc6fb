//! What the controller knows right now: the newest snapshot (published to proxies), the
//! diagnostics that came with it, problems with the sources, and what each proxy applied.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use kanali_proto::v1 as pb;
use serde::Serialize;
use tokio::sync::watch;

use crate::compile::api_key::FastHash;
use crate::compile::{Compiled, Diagnostic, ObjectRef};
use crate::source::file::FileError;

/// One proxy's view, as reported over its stream.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct ProxyState {
    /// Whether its stream is open now.
    pub connected: bool,
    /// Open streams with this identity (more than one means two proxies share a name).
    pub streams: u32,
    /// Last version it ACKed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_version: Option<String>,
    /// Last NACK, if the newest answer was a NACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Rejection>,
    /// What does not work in `applied_version` on this proxy although it applied it (a plugin
    /// module that does not load), as of its latest Ack. Defaults to none in reports from
    /// replicas that predate it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    /// Seconds since the Unix epoch of the last message.
    pub last_seen_unix: u64,
}

/// A NACKed version with the proxy's reasons.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Rejection {
    /// The version refused.
    pub version: String,
    /// `Kind ns/name: message` per error.
    pub errors: Vec<String>,
}

/// A part of an applied version that does not work on one proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Problem {
    /// The object at fault, as `Kind ns/name` (what [`ObjectRef`]'s `Display` gives).
    pub object: String,
    /// CamelCase reason for the condition (`PluginNotFound`, ...).
    pub reason: String,
    /// The proxy's explanation.
    pub message: String,
}

/// Everything the admin endpoint shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StatusView {
    /// Version of the newest snapshot.
    pub version: String,
    /// Routes in it.
    pub routes: usize,
    /// Per-object conditions.
    pub objects: Vec<ObjectStatus>,
    /// Files (or other source inputs) that could not be used.
    pub source_errors: Vec<FileError>,
    /// Inputs skipped on purpose (unknown kinds).
    pub ignored: Vec<String>,
    /// Proxies by identity.
    pub proxies: BTreeMap<String, ProxyState>,
}

/// A diagnostic plus the summary `Ready` condition.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectStatus {
    /// Compile's view.
    #[serde(flatten)]
    pub diagnostic: Diagnostic,
    /// Whether `Ready` is True.
    pub ready: bool,
}

/// What each object compiled to in one snapshot version, as a fingerprint: its generation,
/// its diagnostic and (for an ApiProxy) its route. A change to something an object references
/// (a MockTarget's responses, a Service) changes the referencing object's fingerprint even
/// though its own generation stays the same.
pub type Fingerprints = HashMap<ObjectRef, u64, FastHash>;

/// How many recent versions to remember generations for: enough for proxies that lag a few
/// snapshots behind, small enough not to matter.
const HISTORY: usize = 32;

fn fingerprints(compiled: &Compiled) -> Fingerprints {
    use prost::Message as _;
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut routes: HashMap<(&str, &str), &pb::Route, FastHash> =
        HashMap::with_capacity_and_hasher(compiled.snapshot.routes.len(), FastHash::default());
    routes.extend(compiled.snapshot.routes.iter().filter_map(|r| {
        r.source
            .as_ref()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), r))
    }));
    // One buffer for every route's encoding, not an allocation each.
    let mut encoded = Vec::new();
    compiled
        .diagnostics
        .iter()
        .map(|d| {
            // A fixed seed: equal inputs hash equally within a process, which is all the
            // history needs. foldhash: SipHash over every route's encoding was a tenth of a
            // publish.
            let mut h = foldhash::fast::FixedState::default().build_hasher();
            d.hash(&mut h);
            if d.object.kind == crate::compile::Kind::ApiProxy {
                let key = (
                    d.object.namespace.as_deref().unwrap_or_default(),
                    d.object.name.as_str(),
                );
                if let Some(route) = routes.get(&key) {
                    encoded.clear();
                    route.encode_raw(&mut encoded);
                    encoded.hash(&mut h);
                }
            }
            (d.object.clone(), h.finish())
        })
        .collect()
}

/// What the proxies are sent: the routing snapshot and the credential shards, with the
/// version that names both.
#[derive(Debug)]
pub struct Published {
    /// The version proxies Ack (of the snapshot and the credentials together).
    pub version: String,
    /// The routing section.
    pub snapshot: Arc<pb::Snapshot>,
    /// The 256 credential shards, by index.
    pub credentials: Arc<Vec<pb::CredentialShard>>,
    /// The version of `credentials` as a whole.
    pub credentials_version: String,
}

/// When a proxy last saw a request with each key revision: (ApiKey name, revision id) →
/// seconds since the Unix epoch.
pub type Usage = HashMap<(String, u64), u64>;

/// Shared between the source loop, the gRPC server, the admin server and the status writer.
#[derive(Debug)]
pub struct Shared {
    snapshots: watch::Sender<Option<Arc<Published>>>,
    usage: Mutex<Usage>,
    usage_changes: watch::Sender<u64>,
    status: Mutex<StatusView>,
    history: Mutex<VecDeque<(String, Arc<Fingerprints>)>>,
    changes: watch::Sender<u64>,
    compiles: std::sync::atomic::AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            snapshots: watch::Sender::new(None),
            usage: Mutex::new(HashMap::new()),
            usage_changes: watch::Sender::new(0),
            status: Mutex::new(StatusView::default()),
            history: Mutex::new(VecDeque::new()),
            changes: watch::Sender::new(0),
            compiles: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Shared {
    /// Publishes a compile result. Proxies are only sent a snapshot when its version changed.
    pub fn publish(&self, compiled: Compiled, source_errors: Vec<FileError>, ignored: Vec<String>) {
        let version = compiled.version.clone();
        self.compiles
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fingerprints = fingerprints(&compiled);
        {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            // The same content can be compiled from newer generations (e.g. a no-op edit):
            // the newest generations win for that version.
            history.retain(|(v, _)| *v != version);
            history.push_back((version.clone(), Arc::new(fingerprints)));
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        {
            let mut status = self.status();
            status.version = version.clone();
            status.routes = compiled.snapshot.routes.len();
            status.objects = compiled
                .diagnostics
                .into_iter()
                .map(|diagnostic| ObjectStatus {
                    ready: diagnostic.ready().status,
                    diagnostic,
                })
                .collect();
            status.source_errors = source_errors;
            status.ignored = ignored;
        }
        let changed = self.snapshots.send_if_modified(|current| {
            if current.as_ref().is_some_and(|s| s.version == version) {
                return false;
            }
            *current = Some(Arc::new(Published {
                version: version.clone(),
                snapshot: Arc::new(compiled.snapshot),
                credentials: compiled.credentials,
                credentials_version: compiled.credentials_version,
            }));
            true
        });
        if changed {
            tracing::info!(%version, "new snapshot");
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// What each object compiled to in `version`, if it is recent enough to be remembered.
    pub fn fingerprints(&self, version: &str) -> Option<Arc<Fingerprints>> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history
            .iter()
            .rev()
            .find(|(v, _)| v == version)
            .map(|(_, g)| g.clone())
    }

    /// How many compiles have been published (a source that recompiles with nothing to do
    /// is a bug: it burns CPU and floods the status writer).
    pub fn compiles(&self) -> u64 {
        self.compiles.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ticks whenever diagnostics or a proxy's state changed (for the status writer).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Receiver of what proxies are sent, for one proxy stream.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.snapshots.subscribe()
    }

    /// What proxies are sent now, if anything was compiled yet.
    pub fn published(&self) -> Option<Arc<Published>> {
        self.snapshots.borrow().clone()
    }

    /// The newest routing snapshot, if any was compiled yet.
    pub fn snapshot(&self) -> Option<Arc<pb::Snapshot>> {
        self.published().map(|p| p.snapshot.clone())
    }

    /// The version proxies are sent now (what they Ack), if any.
    pub fn version(&self) -> Option<String> {
        self.published().map(|p| p.version.clone())
    }

    /// Records which key revisions a proxy saw used (the latest time wins).
    pub fn record_usage(&self, usage: &pb::Usage) {
        let mut known = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let mut newer = false;
        for u in &usage.keys {
            let at = known.entry((u.key.clone(), u.revision)).or_insert(0);
            if u.last_used_unix > *at {
                *at = u.last_used_unix;
                newer = true;
            }
        }
        drop(known);
        if newer {
            self.usage_changes.send_modify(|n| *n += 1);
        }
    }

    /// When each key revision was last used, as far as this replica's proxies said.
    pub fn usage(&self) -> Usage {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ticks when a proxy reported newer usage.
    pub fn usage_changes(&self) -> watch::Receiver<u64> {
        self.usage_changes.subscribe()
    }

    /// Locks the status view. Poisoning is ignored: the view is plain data, always consistent.
    pub fn status(&self) -> MutexGuard<'_, StatusView> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records something a proxy said.
    pub fn update_proxy(&self, id: &str, f: impl FnOnce(&mut ProxyState)) {
        let mut status = self.status();
        let proxy = status.proxies.entry(id.to_owned()).or_default();
        proxy.last_seen_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        f(proxy);
        drop(status);
        self.changes.send_modify(|n| *n += 1);
    }
}
