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
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The version proxies Ack: of the snapshot and the credentials together.
    pub version: String,
    /// The routing snapshot, `version` filled in.
    pub snapshot: pb::Snapshot,
    /// The 256 credential shards, by index, versions filled in.
    pub credentials: Vec<pb::CredentialShard>,
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

/// Compiles the objects into a snapshot and per-object diagnostics.
pub fn compile(objects: &Objects) -> Compiled {
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

    let keys = api_key::compile_keys(objects);
    let mut routes = Routes::default();
    compile_api_proxies(
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

/// The routes of a snapshot and what they refer to.
#[derive(Default)]
struct Routes {
    routes: Vec<pb::Route>,
    tls: BTreeMap<String, pb::TlsMaterial>,
    services: std::collections::BTreeSet<upstream::ServiceKey>,
}

/// Compiles ApiProxies into routes. Two proxies claiming the same path and host: the older
/// one (creation time, then namespace/name) wins, both are told.
fn compile_api_proxies(
    objects: &Objects,
    mocks: &MockIndex,
    bindings: &HashMap<(String, String), bool>,
    diagnostics: &mut Vec<Diagnostic>,
    routes: &mut Routes,
) {
    let mut order: Vec<&ApiProxy> = objects.api_proxies.iter().collect();
    order.sort_by(|a, b| age_order(&a.metadata).cmp(&age_order(&b.metadata)));

    // (path, host) -> index into `claims`
    let mut owners: BTreeMap<(String, String), usize> = BTreeMap::new();
    type Claim = (
        ObjectRef,
        Diagnostic,
        Option<(pb::Route, api_proxy::Resolved)>,
    );
    let mut claims: Vec<Claim> = Vec::new();
    for ap in order {
        let object = object_ref(Kind::ApiProxy, ap);
        let generation = ap.metadata.generation;
        let namespace = namespace_of(ap);
        let valid = match api_proxy::validate(ap) {
            Ok(v) => v,
            Err(errors) => {
                let d = Diagnostic {
                    object: object.clone(),
                    generation,
                    conditions: vec![accepted(errors, "ApiProxy")],
                    backend: None,
                };
                claims.push((object, d, None));
                continue;
            }
        };
        let resolved = api_proxy::resolve(&valid, &namespace, objects, mocks, bindings);
        let key = (
            valid.path.clone(),
            valid.virtual_host.clone().unwrap_or_default(),
        );
        let host_text = valid.virtual_host.as_deref().unwrap_or("every host");
        if let Some(&winner) = owners.get(&key) {
            let winner_ref = claims[winner].0.clone();
            let d = Diagnostic {
                object: object.clone(),
                generation,
                conditions: vec![Condition::failed(
                    condition::ACCEPTED,
                    "PathConflict",
                    format!(
                        "path {} on {host_text} is already served by {winner_ref}, which wins (created earlier, or first by namespace/name); this ApiProxy is not routed",
                        valid.path
                    ),
                )],
                backend: Some(resolved.summary),
            };
            let note = format!(
                "; note: {object} also claims path {} on {host_text} and was rejected",
                valid.path
            );
            if let Some(c) = claims[winner].1.conditions.first_mut() {
                c.message.push_str(&note);
            }
            claims.push((object, d, None));
            continue;
        }
        let route = pb::Route {
            source: Some(resource_ref(&object, generation)),
            path: valid.path.clone(),
            virtual_host: valid.virtual_host.clone().unwrap_or_default(),
            target_path: valid.target_path.clone(),
            backend: Some(resolved.backend.clone()),
            timeout_ms: valid.timeout_ms,
            plugins: resolved.plugins.clone(),
        };
        let d = Diagnostic {
            object: object.clone(),
            generation,
            conditions: vec![accepted(Vec::new(), "ApiProxy"), resolved.condition.clone()],
            backend: Some(resolved.summary.clone()),
        };
        owners.insert(key, claims.len());
        claims.push((object, d, Some((route, resolved))));
    }
    for (_, d, route) in claims {
        diagnostics.push(d);
        if let Some((route, resolved)) = route {
            routes.routes.push(route);
            if let Some(tls) = resolved.tls {
                routes.tls.insert(tls.id.clone(), tls);
            }
            routes.services.extend(resolved.services);
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
    let hex = |bytes: Vec<u8>| kanali_proto::version::hex(&Sha256::digest(bytes));
    let mut snapshot = pb::Snapshot {
        routes,
        tls,
        ..Default::default()
    };
    snapshot.routes_version = hex(snapshot.encode_to_vec());
    snapshot.services = services;
    snapshot.version = hex(snapshot.encode_to_vec());
    snapshot
}

#[cfg(test)]
mod tests;
