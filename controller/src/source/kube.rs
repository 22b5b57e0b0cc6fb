//! Cluster mode's source: watchers on the four Kanali kinds, Secrets and Services, folded into
//! one in-memory cache that compile reads. An object that fails to decode is kept as
//! "undecodable" (so its status can say why) instead of breaking its kind's watch.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Endpoints, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kanali_crds::{ApiKey, ApiKeyBinding, ApiProxy, MockTarget};
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use crate::compile::upstream::ENABLED_ANNOTATION;
use crate::compile::{Kind, ObjectRef, Objects, Undecodable};

type Key = (String, String);

/// Everything the watchers have seen, per kind.
#[derive(Default)]
struct Inner {
    api_proxies: BTreeMap<Key, ApiProxy>,
    mock_targets: BTreeMap<Key, MockTarget>,
    api_keys: BTreeMap<Key, ApiKey>,
    api_key_bindings: BTreeMap<Key, ApiKeyBinding>,
    secrets: BTreeMap<Key, Secret>,
    services: BTreeMap<Key, Service>,
    endpoint_slices: BTreeMap<Key, EndpointSlice>,
    endpoints: BTreeMap<Key, Endpoints>,
    undecodable: BTreeMap<(&'static str, Key), Undecodable>,
    synced: BTreeSet<&'static str>,
}

/// The watched objects, shared by the watcher tasks and the compile loop.
#[derive(Default)]
pub struct Cache {
    inner: Mutex<Inner>,
    /// Woken on every change.
    pub changed: Notify,
}

/// Kinds whose initial list must have arrived before the first compile, so that a missing
/// object is really missing and not just not listed yet.
pub const KINDS: [&str; 7] = [
    "ApiProxy",
    "MockTarget",
    "ApiKey",
    "ApiKeyBinding",
    "Secret",
    "Service",
    // EndpointSlices, or core Endpoints where the server has no discovery.k8s.io/v1.
    "Endpoints",
];

impl Cache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kinds that have not completed their initial list.
    pub fn unsynced(&self) -> Vec<&'static str> {
        let inner = self.lock();
        KINDS
            .iter()
            .copied()
            .filter(|k| !inner.synced.contains(k))
            .collect()
    }

    /// Whether every kind has completed its initial list.
    pub fn synced(&self) -> bool {
        let inner = self.lock();
        KINDS.iter().all(|k| inner.synced.contains(k))
    }

    /// A copy of the objects for compile.
    pub fn objects(&self) -> Objects {
        let inner = self.lock();
        Objects {
            api_proxies: inner.api_proxies.values().cloned().collect(),
            mock_targets: inner.mock_targets.values().cloned().collect(),
            api_keys: inner.api_keys.values().cloned().collect(),
            api_key_bindings: inner.api_key_bindings.values().cloned().collect(),
            secrets: inner.secrets.values().cloned().collect(),
            services: inner.services.values().cloned().collect(),
            endpoint_slices: inner.endpoint_slices.values().cloned().collect(),
            endpoints: inner.endpoints.values().cloned().collect(),
            undecodable: inner.undecodable.values().cloned().collect(),
            unavailable: KINDS
                .iter()
                .filter(|k| !inner.synced.contains(*k))
                .map(|k| (*k).to_owned())
                .collect(),
            decrypted: Default::default(),
        }
    }

    /// The cached ApiKey `name`.
    pub fn api_key(&self, name: &str) -> Option<ApiKey> {
        self.lock()
            .api_keys
            .get(&(String::new(), name.to_owned()))
            .cloned()
    }

    /// A reference to the object (with its uid) for Events, if it is cached.
    pub fn reference_of(
        &self,
        object: &ObjectRef,
    ) -> Option<k8s_openapi::api::core::v1::ObjectReference> {
        let inner = self.lock();
        let key = (
            object.namespace.clone().unwrap_or_default(),
            object.name.clone(),
        );
        match object.kind {
            Kind::ApiProxy => inner.api_proxies.get(&key).map(|o| o.object_ref(&())),
            Kind::MockTarget => inner.mock_targets.get(&key).map(|o| o.object_ref(&())),
            Kind::ApiKey => inner.api_keys.get(&key).map(|o| o.object_ref(&())),
            Kind::ApiKeyBinding => inner.api_key_bindings.get(&key).map(|o| o.object_ref(&())),
        }
    }

    /// The object's current `status` as JSON (what is stored in the API server), if known.
    pub fn status_of(&self, object: &ObjectRef) -> Option<serde_json::Value> {
        let inner = self.lock();
        let key = (
            object.namespace.clone().unwrap_or_default(),
            object.name.clone(),
        );
        let status = match object.kind {
            Kind::ApiProxy => serde_json::to_value(&inner.api_proxies.get(&key)?.status),
            Kind::MockTarget => serde_json::to_value(&inner.mock_targets.get(&key)?.status),
            Kind::ApiKey => serde_json::to_value(&inner.api_keys.get(&key)?.status),
            Kind::ApiKeyBinding => serde_json::to_value(&inner.api_key_bindings.get(&key)?.status),
        };
        status.ok()
    }
}

/// A kind the cache holds.
trait Cached:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: &'static str;
    /// Kanali kind for status, `None` for core kinds.
    const STATUS_KIND: Option<Kind>;
    fn store(inner: &mut Inner) -> &mut BTreeMap<Key, Self>;
    /// Whether `new` can change nothing compile reads compared with `old`: for the Kanali
    /// kinds, the same `metadata.generation` means only status or metadata changed — in
    /// particular our own status patches, which must not trigger a recompile each.
    fn same_spec(old: &Self, new: &Self) -> bool {
        let (a, b) = (old.meta().generation, new.meta().generation);
        Self::STATUS_KIND.is_some() && a.is_some() && a == b
    }
    /// What to keep of an object (Secrets: data only when opted in).
    fn admit(self) -> Self {
        self
    }
}

macro_rules! cached {
    ($ty:ty, $kind:literal, $status:expr, $field:ident) => {
        impl Cached for $ty {
            const KIND: &'static str = $kind;
            const STATUS_KIND: Option<Kind> = $status;
            fn store(inner: &mut Inner) -> &mut BTreeMap<Key, Self> {
                &mut inner.$field
            }
        }
    };
}

cached!(ApiProxy, "ApiProxy", Some(Kind::ApiProxy), api_proxies);
cached!(
    MockTarget,
    "MockTarget",
    Some(Kind::MockTarget),
    mock_targets
);
cached!(ApiKey, "ApiKey", Some(Kind::ApiKey), api_keys);
cached!(
    ApiKeyBinding,
    "ApiKeyBinding",
    Some(Kind::ApiKeyBinding),
    api_key_bindings
);
cached!(Service, "Service", None, services);
// Both endpoint kinds count as "Endpoints" for the initial-sync check: one of them is watched.
cached!(EndpointSlice, "Endpoints", None, endpoint_slices);
cached!(Endpoints, "Endpoints", None, endpoints);

impl Cached for Secret {
    const KIND: &'static str = "Secret";
    const STATUS_KIND: Option<Kind> = None;
    fn store(inner: &mut Inner) -> &mut BTreeMap<Key, Self> {
        &mut inner.secrets
    }
    /// Secrets that did not opt in keep their metadata only (so compile can say "not enabled"),
    /// never their data: Kanali must not hold credentials it was not given.
    fn admit(mut self) -> Self {
        let enabled = self
            .annotations()
            .get(ENABLED_ANNOTATION)
            .is_some_and(|v| v == "true");
        if !enabled {
            self.data = None;
            self.string_data = None;
        }
        self
    }
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Drops what compile never reads but every compile would copy: managed fields and
/// `kubectl apply`'s copy of the whole previous object.
fn trim<K: Cached>(mut obj: K) -> K {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    obj
}

/// Stores an object; returns whether compile needs to run again.
fn apply<K: Cached>(inner: &mut Inner, guarded: DeserializeGuard<K>) -> bool {
    match guarded.0 {
        Ok(obj) => {
            let key = key_of(obj.meta());
            let was_undecodable = inner.undecodable.remove(&(K::KIND, key.clone())).is_some();
            let obj = trim(obj.admit());
            let same = K::store(inner)
                .get(&key)
                .is_some_and(|old| K::same_spec(old, &obj));
            K::store(inner).insert(key, obj);
            was_undecodable || !same
        }
        Err(invalid) => {
            let key = key_of(&invalid.metadata);
            tracing::warn!(kind = K::KIND, namespace = %key.0, name = %key.1, error = %invalid.error,
                "object does not decode; reporting it instead of routing it");
            K::store(inner).remove(&key);
            if let Some(kind) = K::STATUS_KIND {
                let object = ObjectRef {
                    kind,
                    namespace: (kind != Kind::ApiKey).then(|| key.0.clone()),
                    name: key.1.clone(),
                };
                let bad = Undecodable {
                    object,
                    generation: invalid.metadata.generation,
                    error: invalid.error,
                };
                inner.undecodable.insert((K::KIND, key), bad);
            }
            true
        }
    }
}

fn remove<K: Cached>(inner: &mut Inner, guarded: &DeserializeGuard<K>) {
    let key = match &guarded.0 {
        Ok(obj) => key_of(obj.meta()),
        Err(invalid) => key_of(&invalid.metadata),
    };
    K::store(inner).remove(&key);
    inner.undecodable.remove(&(K::KIND, key));
}

/// Watches one kind until `shutdown`, keeping the cache's copy of it current. Errors are
/// retried with kube's backoff; they never end the watch.
async fn watch_kind<K: Cached>(
    api: Api<DeserializeGuard<K>>,
    cache: Arc<Cache>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures_util::pin_mut!(stream);
    // The initial list (and every relist) is buffered and swapped in whole, so objects
    // deleted while the watch was down disappear too.
    let mut relist: Option<Inner> = None;
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(event) = event else { return };
        let event = match event {
            Ok(e) => e,
            Err(error) => {
                tracing::warn!(kind = K::KIND, %error, "watch failed; retrying");
                continue;
            }
        };
        match event {
            Event::Init => relist = Some(Inner::default()),
            Event::InitApply(obj) => {
                if let Some(buffer) = relist.as_mut() {
                    let _ = apply(buffer, obj);
                }
            }
            Event::InitDone => {
                let mut buffer = relist.take().unwrap_or_default();
                let mut inner = cache.lock();
                std::mem::swap(K::store(&mut inner), K::store(&mut buffer));
                inner.undecodable.retain(|(kind, _), _| *kind != K::KIND);
                inner
                    .undecodable
                    .extend(std::mem::take(&mut buffer.undecodable));
                if inner.synced.insert(K::KIND) {
                    tracing::info!(
                        kind = K::KIND,
                        count = K::store(&mut inner).len(),
                        "initial list complete"
                    );
                }
                drop(inner);
                cache.changed.notify_one();
            }
            Event::Apply(obj) => {
                if apply(&mut cache.lock(), obj) {
                    cache.changed.notify_one();
                }
            }
            Event::Delete(obj) => {
                remove(&mut cache.lock(), &obj);
                cache.changed.notify_one();
            }
        }
    }
}

/// Starts one watcher per kind; `namespace` limits the namespaced kinds (ApiKey is
/// cluster-scoped and is always watched cluster-wide).
pub async fn spawn_watchers(
    client: &Client,
    namespace: Option<&str>,
    cache: &Arc<Cache>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    fn api<K: Cached<Scope = k8s_openapi::NamespaceResourceScope>>(
        client: &Client,
        namespace: Option<&str>,
    ) -> Api<DeserializeGuard<K>> {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let (c, s) = (cache, shutdown);
    // EndpointSlice v1 arrived in Kubernetes 1.21; older servers get core Endpoints.
    let slices = client
        .list_api_group_resources("discovery.k8s.io/v1")
        .await
        .is_ok_and(|l| l.resources.iter().any(|r| r.name == "endpointslices"));
    let endpoints = if slices {
        tokio::spawn(watch_kind::<EndpointSlice>(
            api(client, namespace),
            c.clone(),
            s.clone(),
        ))
    } else {
        tracing::info!(
            "no discovery.k8s.io/v1 EndpointSlices on this server; watching core Endpoints"
        );
        tokio::spawn(watch_kind::<Endpoints>(
            api(client, namespace),
            c.clone(),
            s.clone(),
        ))
    };
    vec![
        endpoints,
        tokio::spawn(watch_kind::<ApiProxy>(
            api(client, namespace),
            c.clone(),
            s.clone(),
        )),
        tokio::spawn(watch_kind::<MockTarget>(
            api(client, namespace),
            c.clone(),
            s.clone(),
        )),
        tokio::spawn(watch_kind::<ApiKey>(
            Api::all(client.clone()),
            c.clone(),
            s.clone(),
        )),
        tokio::spawn(watch_kind::<ApiKeyBinding>(
            api(client, namespace),
            c.clone(),
            s.clone(),
        )),
        tokio::spawn(watch_kind::<Secret>(
            api(client, namespace),
            c.clone(),
            s.clone(),
        )),
        tokio::spawn(watch_kind::<Service>(
            api(client, namespace),
            c.clone(),
            s.clone(),
        )),
    ]
}
