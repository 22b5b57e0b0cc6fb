//! The pure compiler: objects in, a routing [`Snapshot`](pb::Snapshot) and one
//! [`Diagnostic`] per object out. No I/O, no clock, no client — the same inputs always give a
//! byte-identical snapshot, so its version is a content hash and every controller replica
//! serves the same version.
//!
//! Compile never fails as a whole: an invalid object is left out with `Accepted=False`, a
//! dangling reference compiles into a route that answers the contract's error code with
//! `ResolvedRefs=False`, and one bad object never affects another.

pub mod api_key;
mod api_proxy;
pub mod diagnostics;
mod mock_target;
pub mod paths;
pub mod upstream;

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Endpoints, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kanali_crds::{ApiKey, ApiKeyBinding, ApiProxy, MockTarget};
use kanali_proto::v1 as pb;
use kube::ResourceExt as _;
use prost::Message as _;
use sha2::{Digest as _, Sha256};

use api_key::FastHash;
pub use diagnostics::{Condition, Diagnostic, Kind, ObjectRef, condition};

/// Everything compile reads. Namespaced objects without a namespace are in `default`.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// ApiProxies.
    pub api_proxies: Vec<ApiProxy>,
    /// MockTargets.
    pub mock_targets: Vec<MockTarget>,
    /// ApiKeys (cluster-scoped).
    pub api_keys: Vec<ApiKey>,
    /// ApiKeyBindings.
    pub api_key_bindings: Vec<ApiKeyBinding>,
    /// Secrets that may be used for upstream TLS.
    pub secrets: Vec<Secret>,
    /// Services that may be used as backends.
    pub services: Vec<Service>,
    /// Ready endpoint addresses of Services (clusters with discovery.k8s.io/v1).
    pub endpoint_slices: Vec<EndpointSlice>,
    /// The same from core Endpoints, for API servers without EndpointSlice v1.
    pub endpoints: Vec<Endpoints>,
    /// Kinds the source could not list (e.g. `Service` when the watch is forbidden): compile
    /// says so on the routes that need them instead of calling their objects missing.
    pub unavailable: Vec<String>,
    /// Objects of the four Kanali kinds that could not even be decoded (the API server
    /// stored something the types reject); each gets `Accepted=False`.
    pub undecodable: Vec<Undecodable>,
    /// The digests of the ApiKey revisions (decrypted before compile, which does no crypto
    /// beyond hashing), or why there are none.
    pub decrypted: std::sync::Arc<api_key::Decrypted>,
}

/// An object that failed to decode, with what is known about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undecodable {
    /// Kind, namespace and name (from its metadata, which did decode).
    pub object: ObjectRef,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The decode error.
    pub error: String,
}

/// The result of one compile.
#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    /// The version proxies Ack: of the snapshot and the credentials together.
    pub version: String,
    /// The routing snapshot, `version` filled in.
    pub snapshot: pb::Snapshot,
    /// The 256 credential shards, by index, versions filled in.
    pub credentials: std::sync::Arc<Vec<pb::CredentialShard>>,
    /// The version of `credentials` as a whole.
    pub credentials_version: String,
    /// One entry per ApiProxy, MockTarget, ApiKey and ApiKeyBinding, sorted by object.
    pub diagnostics: Vec<Diagnostic>,
}

/// MockTargets by (namespace, name): the compiled responses, or the fact that it is invalid.
type MockIndex = HashMap<(String, String), Result<pb::Mock, ()>>;

fn namespace_of<K: kube::Resource>(obj: &K) -> String {
    obj.meta()
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned())
}

/// "Older first": creation time, then namespace and name. Borrowed, since sorting a hundred
/// thousand objects compares millions of times.
pub(crate) fn age_order(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (Option<k8s_openapi::jiff::Timestamp>, &str, &str) {
    (
        meta.creation_timestamp.as_ref().map(|t| t.0),
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default(),
    )
}

fn object_ref<K: kube::Resource>(kind: Kind, obj: &K) -> ObjectRef {
    let namespace = (kind != Kind::ApiKey).then(|| namespace_of(obj));
    ObjectRef {
        kind,
        namespace,
        name: obj.meta().name.clone().unwrap_or_default(),
    }
}

fn resource_ref(object: &ObjectRef, generation: Option<i64>) -> pb::ResourceRef {
    pb::ResourceRef {
        kind: object.kind.as_str().to_owned(),
        namespace: object.namespace.clone().unwrap_or_default(),
        name: object.name.clone(),
        generation: generation.unwrap_or(0),
    }
}

fn accepted(errors: Vec<String>, what: &str) -> Condition {
    if errors.is_empty() {
        Condition::ok(condition::ACCEPTED, "Accepted", format!("{what} is valid"))
    } else {
        Condition::failed(condition::ACCEPTED, "Invalid", errors.join("; "))
    }
}

/// Compiles the objects into a snapshot and per-object diagnostics, from scratch.
pub fn compile(objects: &Objects) -> Compiled {
    Compiler {
        from_scratch: true,
        ..Compiler::default()
    }
    .compile(objects)
}

/// Compiles objects again and again, keeping what each ApiProxy compiled to: the next
/// compile reuses it while neither the ApiProxy nor anything an ApiProxy can refer to
/// (MockTargets, ApiKeyBindings, Secrets, Services) changed. A controller compiles on every
/// change, and most changes touch one object among thousands; validating and resolving every
/// ApiProxy again was most of a compile. The output is always what [`compile`] gives for the
/// same objects.
#[derive(Default)]
pub struct Compiler {
    /// What the ApiProxies' outcomes were resolved against; they are dropped when it changes.
    context: Option<Context>,
    /// Each ApiProxy's outcome, by namespace and then name (so that looking one up borrows).
    proxies: HashMap<String, HashMap<String, Outcome, FastHash>, FastHash>,
    /// Counts compiles, to tell the outcomes seen in this one.
    round: u64,
    /// How many ApiProxies the last compile took as they were.
    reused: usize,
    /// Keep nothing: what [`compile`] does, and what a kept outcome must equal.
    from_scratch: bool,
    /// What the ApiKeys and ApiKeyBindings compiled to last, with what they were.
    keys: Option<KeptKeys>,
    /// Whether the last compile reused them.
    keys_reused: bool,
}

/// The ApiKeys' and ApiKeyBindings' compile, with what it was made from. It is reused while
/// every key and binding has the same name, generation, creation time (the older of two
/// keys with one plaintext keeps it) and spec, and the vault gave the same digests. Their
/// metadata beyond that is not compared: usage and status writes change it all the time.
/// Compiling 10 000 keys takes ~28 ms, on every change to anything.
struct KeptKeys {
    api_keys: Vec<ApiKey>,
    bindings: Vec<ApiKeyBinding>,
    decrypted: std::sync::Arc<api_key::Decrypted>,
    compiled: api_key::CompiledKeys,
}

impl KeptKeys {
    fn matches(&self, objects: &Objects) -> bool {
        // Namespace too, though ApiKeys have none: it breaks ties in the age order.
        let same_key = |a: &ApiKey, b: &ApiKey| {
            a.metadata.namespace == b.metadata.namespace
                && a.metadata.name == b.metadata.name
                && a.metadata.generation == b.metadata.generation
                && a.metadata.creation_timestamp == b.metadata.creation_timestamp
                && a.spec == b.spec
        };
        let same_binding = |a: &ApiKeyBinding, b: &ApiKeyBinding| {
            a.metadata.namespace == b.metadata.namespace
                && a.metadata.name == b.metadata.name
                && a.metadata.generation == b.metadata.generation
                && a.spec == b.spec
        };
        // The vault hands out the same `Arc` while nothing changed; without a key it makes
        // a new, empty one each time.
        let (was, now) = (&self.decrypted, &objects.decrypted);
        let same_digests = std::sync::Arc::ptr_eq(was, now)
            || (was.digests.is_empty() && now.digests.is_empty() && was.no_key == now.no_key);
        same_digests
            && self.api_keys.len() == objects.api_keys.len()
            && self.bindings.len() == objects.api_key_bindings.len()
            && self
                .api_keys
                .iter()
                .zip(&objects.api_keys)
                .all(|(a, b)| same_key(a, b))
            && self
                .bindings
                .iter()
                .zip(&objects.api_key_bindings)
                .all(|(a, b)| same_binding(a, b))
    }
}

impl Compiler {
    /// How many ApiProxies the last compile reused without validating or resolving them.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Whether the last compile reused the ApiKeys' and ApiKeyBindings' compile.
    #[cfg(test)]
    fn keys_reused(&self) -> bool {
        self.keys_reused
    }

    /// The ApiKeys and ApiKeyBindings compiled, or as they were if nothing they depend on
    /// changed.
    fn compile_keys(&mut self, objects: &Objects) -> api_key::CompiledKeys {
        self.keys_reused = false;
        if self.from_scratch {
            return api_key::compile_keys(objects);
        }
        if let Some(kept) = self.keys.as_ref().filter(|k| k.matches(objects)) {
            self.keys_reused = true;
            return kept.compiled.clone();
        }
        let compiled = api_key::compile_keys(objects);
        self.keys = Some(KeptKeys {
            api_keys: objects.api_keys.clone(),
            bindings: objects.api_key_bindings.clone(),
            decrypted: objects.decrypted.clone(),
            compiled: compiled.clone(),
        });
        compiled
    }

    /// How many ApiProxies' outcomes are kept.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.proxies.values().map(HashMap::len).sum()
    }

    /// Compiles the objects into a snapshot and per-object diagnostics.
    pub fn compile(&mut self, objects: &Objects) -> Compiled {
        let mut diagnostics = Vec::new();

        // MockTargets first: ApiProxies embed the ones they reference.
        let mut mocks: MockIndex = HashMap::new();
        for mt in &objects.mock_targets {
            let object = object_ref(Kind::MockTarget, mt);
            let generation = mt.metadata.generation;
            let result = mock_target::compile_mock_target(mt);
            let condition = match &result {
                Ok(_) => accepted(Vec::new(), "MockTarget"),
                Err(errors) => accepted(errors.clone(), "MockTarget"),
            };
            let key = (namespace_of(mt), mt.name_any());
            let compiled = result
                .map(|responses| pb::Mock {
                    mock_target: Some(resource_ref(&object, generation)),
                    responses,
                })
                .map_err(|_| ());
            mocks.insert(key, compiled);
            diagnostics.push(Diagnostic {
                object,
                generation,
                conditions: vec![
                    condition,
                    Condition::ok(
                        condition::RESOLVED_REFS,
                        "ResolvedRefs",
                        "MockTargets have no references",
                    ),
                ],
                backend: None,
            });
        }

        let keys = self.compile_keys(objects);
        let mut routes = Routes::default();
        self.compile_api_proxies(
            objects,
            &mocks,
            &keys.bindings,
            &mut diagnostics,
            &mut routes,
        );
        diagnostics.extend(keys.diagnostics);

        for bad in &objects.undecodable {
            diagnostics.push(Diagnostic {
                object: bad.object.clone(),
                generation: bad.generation,
                conditions: vec![Condition::failed(
                    condition::ACCEPTED,
                    "Invalid",
                    format!(
                        "the object does not match the kanali.io/v2 schema: {}",
                        bad.error
                    ),
                )],
                backend: None,
            });
        }
        diagnostics.sort_by(|a, b| a.object.cmp(&b.object));
        let services = upstream::service_endpoints(objects, &routes.services);
        let snapshot = seal(routes.routes, routes.tls.into_values().collect(), services);
        Compiled {
            version: kanali_proto::version::combined_version(&snapshot.version, &keys.version),
            snapshot,
            credentials: keys.shards,
            credentials_version: keys.version,
            diagnostics,
        }
    }
}

/// The routes of a snapshot and what they refer to.
#[derive(Default)]
struct Routes {
    routes: Vec<pb::Route>,
    tls: BTreeMap<String, pb::TlsMaterial>,
    services: std::collections::BTreeSet<upstream::ServiceKey>,
}

/// Everything besides an ApiProxy itself that its outcome depends on, as of the compile that
/// made the outcomes kept.
struct Context {
    mock_targets: Vec<MockTarget>,
    services: Vec<Service>,
    unavailable: Vec<String>,
    bindings: HashMap<(String, String), bool>,
    /// The Secrets the ApiProxies name in `spec.target.ssl`, as they were (`None`: missing).
    /// Only those: a cluster has many Secrets (tokens, Helm releases, certificates being
    /// renewed), and a change to one nobody names must not make every ApiProxy compile again.
    secrets: NamedSecrets,
}

/// Secrets by (namespace, name), each as it was or `None` if there was none.
type NamedSecrets = BTreeMap<(String, String), Option<Secret>>;

/// The Secrets `objects` has, by (namespace, name); the first of two with one name, as
/// [`upstream::tls_material`] takes.
fn secret_index(objects: &Objects) -> HashMap<(&str, &str), &Secret, FastHash> {
    let mut index = HashMap::with_capacity_and_hasher(objects.secrets.len(), FastHash::default());
    for secret in &objects.secrets {
        let meta = &secret.metadata;
        let key = (
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or_default(),
        );
        index.entry(key).or_insert(secret);
    }
    index
}

/// The Secrets the ApiProxies of `objects` name, as `objects` has them. Those in `known`,
/// which must equal `objects`' (the context matched), are moved rather than copied again.
fn named_secrets(objects: &Objects, mut known: NamedSecrets) -> NamedSecrets {
    let index = secret_index(objects);
    let mut named = NamedSecrets::new();
    for ap in &objects.api_proxies {
        let Some(ssl) = &ap.spec.target.ssl else {
            continue;
        };
        let namespace = ap.metadata.namespace.as_deref().unwrap_or("default");
        let name = ssl.secret_name.as_str();
        let key = (namespace.to_owned(), name.to_owned());
        if named.contains_key(&key) {
            continue;
        }
        let secret = match known.remove(&key) {
            Some(known) => known,
            None => index.get(&(namespace, name)).map(|s| (*s).clone()),
        };
        named.insert(key, secret);
    }
    named
}

impl Context {
    fn matches(&self, objects: &Objects, bindings: &HashMap<(String, String), bool>) -> bool {
        if !(self.mock_targets == objects.mock_targets
            && self.services == objects.services
            && self.unavailable == objects.unavailable
            && self.bindings == *bindings)
        {
            return false;
        }
        let index = secret_index(objects);
        self.secrets.iter().all(|((namespace, name), was)| {
            index.get(&(namespace.as_str(), name.as_str())).copied() == was.as_ref()
        })
    }

    fn of(objects: &Objects, bindings: &HashMap<(String, String), bool>) -> Context {
        Context {
            mock_targets: objects.mock_targets.clone(),
            services: objects.services.clone(),
            unavailable: objects.unavailable.clone(),
            bindings: bindings.clone(),
            secrets: named_secrets(objects, NamedSecrets::new()),
        }
    }
}

/// What one ApiProxy compiled to on its own, before its path is weighed against the others'.
struct Outcome {
    /// What an outcome depends on of the object itself, besides its namespace and name: the
    /// outcome holds while the current object has the same. Not the whole object: its
    /// metadata changes with every status write (`resourceVersion`, `managedFields`), and
    /// `kubectl apply` keeps a copy of the object in an annotation.
    spec: kanali_crds::ApiProxySpec,
    generation: Option<i64>,
    object: ObjectRef,
    /// The compile that last saw it.
    round: u64,
    /// Its route, or why it has none (`Accepted=False`).
    result: Result<Valid, Condition>,
}

/// A valid ApiProxy, resolved.
struct Valid {
    /// `path` and `virtual_host` (empty: every host) are also what it claims.
    route: pb::Route,
    accepted: Condition,
    resolved: Condition,
    summary: String,
    tls: Option<pb::TlsMaterial>,
    services: Vec<upstream::ServiceKey>,
}

impl Outcome {
    fn of(
        ap: &ApiProxy,
        objects: &Objects,
        mocks: &MockIndex,
        bindings: &HashMap<(String, String), bool>,
        round: u64,
    ) -> Outcome {
        let object = object_ref(Kind::ApiProxy, ap);
        let result = match api_proxy::validate(ap) {
            Err(errors) => Err(accepted(errors, "ApiProxy")),
            Ok(valid) => {
                let namespace = object.namespace.as_deref().unwrap_or("default");
                let resolved = api_proxy::resolve(&valid, namespace, objects, mocks, bindings);
                Ok(Valid {
                    route: pb::Route {
                        source: Some(resource_ref(&object, ap.metadata.generation)),
                        path: valid.path,
                        virtual_host: valid.virtual_host.unwrap_or_default(),
                        target_path: valid.target_path,
                        backend: Some(resolved.backend),
                        timeout_ms: valid.timeout_ms,
                        plugins: resolved.plugins,
                    },
                    accepted: accepted(Vec::new(), "ApiProxy"),
                    resolved: resolved.condition,
                    summary: resolved.summary,
                    tls: resolved.tls,
                    services: resolved.services,
                })
            }
        };
        Outcome {
            spec: ap.spec.clone(),
            generation: ap.metadata.generation,
            object,
            round,
            result,
        }
    }
}

impl Compiler {
    /// Brings the kept outcomes up to date with `objects`: each ApiProxy's is reused if the
    /// object and the context are unchanged, made again otherwise; those of ApiProxies that
    /// are gone are dropped. Returns `false` when two ApiProxies share a namespace and name
    /// (only a buggy source sends that); then nothing is kept.
    fn update_outcomes(
        &mut self,
        objects: &Objects,
        mocks: &MockIndex,
        bindings: &HashMap<(String, String), bool>,
    ) -> bool {
        match &mut self.context {
            Some(context) if context.matches(objects, bindings) => {
                // The Secrets the kept outcomes read are unchanged; from now on, those the
                // ApiProxies compiled now name (an edited one may name another).
                context.secrets = named_secrets(objects, std::mem::take(&mut context.secrets));
            }
            _ => {
                self.proxies.clear();
                self.context = Some(Context::of(objects, bindings));
            }
        }
        self.round += 1;
        let round = self.round;
        self.reused = 0;
        for ap in &objects.api_proxies {
            let namespace = ap.metadata.namespace.as_deref().unwrap_or("default");
            let name = ap.metadata.name.as_deref().unwrap_or_default();
            // Looked up before inserting: `entry` would copy the namespace for every ApiProxy.
            if !self.proxies.contains_key(namespace) {
                self.proxies
                    .insert(namespace.to_owned(), HashMap::default());
            }
            let Some(by_name) = self.proxies.get_mut(namespace) else {
                continue;
            };
            match by_name.get_mut(name) {
                Some(kept) if kept.round == round => {
                    self.proxies.clear();
                    self.context = None;
                    self.reused = 0;
                    return false;
                }
                Some(kept) if kept.generation == ap.metadata.generation && kept.spec == ap.spec => {
                    kept.round = round;
                    self.reused += 1;
                }
                Some(kept) => *kept = Outcome::of(ap, objects, mocks, bindings, round),
                None => {
                    let outcome = Outcome::of(ap, objects, mocks, bindings, round);
                    by_name.insert(name.to_owned(), outcome);
                }
            }
        }
        self.proxies.retain(|_, by_name| {
            by_name.retain(|_, kept| kept.round == round);
            !by_name.is_empty()
        });
        true
    }

    /// Compiles ApiProxies into routes. Two proxies claiming the same path and host: the
    /// older one (creation time, then namespace/name) wins, both are told.
    fn compile_api_proxies(
        &mut self,
        objects: &Objects,
        mocks: &MockIndex,
        bindings: &HashMap<(String, String), bool>,
        diagnostics: &mut Vec<Diagnostic>,
        routes: &mut Routes,
    ) {
        let fresh: Vec<Outcome>;
        let keep = !self.from_scratch && self.update_outcomes(objects, mocks, bindings);
        let mut order: Vec<(&ApiProxy, &Outcome)> = if keep {
            let kept = &self.proxies;
            objects
                .api_proxies
                .iter()
                .filter_map(|ap| {
                    let namespace = ap.metadata.namespace.as_deref().unwrap_or("default");
                    let name = ap.metadata.name.as_deref().unwrap_or_default();
                    kept.get(namespace)
                        .and_then(|by_name| by_name.get(name))
                        .map(|outcome| (ap, outcome))
                })
                .collect()
        } else {
            fresh = objects
                .api_proxies
                .iter()
                .map(|ap| Outcome::of(ap, objects, mocks, bindings, 0))
                .collect();
            objects.api_proxies.iter().zip(&fresh).collect()
        };
        order.sort_by(|a, b| age_order(&a.0.metadata).cmp(&age_order(&b.0.metadata)));

        // (path, host) -> index into `claims`
        let mut owners: HashMap<(&str, &str), usize, FastHash> =
            HashMap::with_capacity_and_hasher(order.len(), FastHash::default());
        // Each proxy's diagnostic, and its outcome if it is routed.
        let mut claims: Vec<(Diagnostic, Option<&Valid>)> = Vec::with_capacity(order.len());
        for (ap, outcome) in order {
            let object = &outcome.object;
            let generation = ap.metadata.generation;
            let valid = match &outcome.result {
                Ok(valid) => valid,
                Err(invalid) => {
                    let d = Diagnostic {
                        object: object.clone(),
                        generation,
                        conditions: vec![invalid.clone()],
                        backend: None,
                    };
                    claims.push((d, None));
                    continue;
                }
            };
            let path = valid.route.path.as_str();
            let host = valid.route.virtual_host.as_str();
            let host_text = if host.is_empty() { "every host" } else { host };
            if let Some(&winner) = owners.get(&(path, host)) {
                let winner_ref = &claims[winner].0.object;
                let d = Diagnostic {
                    object: object.clone(),
                    generation,
                    conditions: vec![Condition::failed(
                        condition::ACCEPTED,
                        "PathConflict",
                        format!(
                            "path {path} on {host_text} is already served by {winner_ref}, which wins (created earlier, or first by namespace/name); this ApiProxy is not routed"
                        ),
                    )],
                    backend: Some(valid.summary.clone()),
                };
                let note = format!(
                    "; note: {object} also claims path {path} on {host_text} and was rejected"
                );
                if let Some(c) = claims[winner].0.conditions.first_mut() {
                    c.message.push_str(&note);
                }
                claims.push((d, None));
                continue;
            }
            let d = Diagnostic {
                object: object.clone(),
                generation,
                conditions: vec![valid.accepted.clone(), valid.resolved.clone()],
                backend: Some(valid.summary.clone()),
            };
            owners.insert((path, host), claims.len());
            claims.push((d, Some(valid)));
        }
        diagnostics.reserve(claims.len());
        routes.routes.reserve(claims.len());
        for (d, valid) in claims {
            diagnostics.push(d);
            if let Some(valid) = valid {
                routes.routes.push(valid.route.clone());
                if let Some(tls) = &valid.tls {
                    routes.tls.insert(tls.id.clone(), tls.clone());
                }
                routes.services.extend(valid.services.iter().cloned());
            }
        }
    }
}

/// Sorts the routes and fills in the content-hash versions.
fn seal(
    mut routes: Vec<pb::Route>,
    tls: Vec<pb::TlsMaterial>,
    services: Vec<pb::ServiceEndpoints>,
) -> pb::Snapshot {
    routes.sort_by(|a, b| (&a.path, &a.virtual_host).cmp(&(&b.path, &b.virtual_host)));
    let mut snapshot = pb::Snapshot {
        routes,
        tls,
        ..Default::default()
    };
    // `routes` and `tls` (fields 2 and 3) begin the encoding of the whole snapshot: prost
    // writes fields in order, and `version` (1) is empty when hashed. So they are encoded and
    // hashed once, for `routes_version` and as the start of `version`; the routes are most of
    // the bytes.
    let mut hasher = Sha256::new();
    hasher.update(snapshot.encode_to_vec());
    snapshot.routes_version = kanali_proto::version::hex(&hasher.clone().finalize());
    let rest = pb::Snapshot {
        services,
        routes_version: std::mem::take(&mut snapshot.routes_version),
        ..Default::default()
    };
    hasher.update(rest.encode_to_vec());
    snapshot.services = rest.services;
    snapshot.routes_version = rest.routes_version;
    snapshot.version = kanali_proto::version::hex(&hasher.finalize());
    snapshot
}

#[cfg(test)]
mod tests;
