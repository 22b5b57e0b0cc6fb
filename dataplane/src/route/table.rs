//! A snapshot turned into what the request path needs: an immutable routing table. Built once
//! per snapshot, off the request path; the hot path never touches protobuf.
//!
//! A snapshot whose `routes_version` equals the served table's changed only endpoints: the
//! table keeps its router (the same `Arc`) and only the Service backends' address sets move.
//! Otherwise the router is built again, but a route whose snapshot entry is unchanged keeps
//! what was built for it: a one-route edit among thousands resolves one upstream, not all.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use kanali_proto::v1 as pb;
use kanali_proto::view;
use prost::Message as _;

use crate::errors::ErrorCode;
use crate::filter::Filter;
use crate::filter::api_key::ApiKeyFilter;
use crate::filter::credentials::Credentials;
use crate::filter::wasm::{LoadError, Plugins, WasmFilter, WasmUse};
use crate::route::mock::MockTable;
use crate::route::router::{Router, RouterBuilder};
use crate::upstream::balance::{ServiceBackend, ServiceKey};
use crate::upstream::dynamic::DynamicService;
use crate::upstream::{TlsSet, Upstream, Upstreams};
use http::header::HeaderName;

/// The resource a route came from, for logs and NACKs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// `ApiProxy`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// One route, ready to serve.
#[derive(Debug)]
pub struct Route {
    /// Where it came from.
    pub source: Source,
    /// Normalised source path.
    pub path: Box<str>,
    /// Normalised target path.
    pub target_path: Box<str>,
    /// What to do with a matching request.
    pub action: Action,
    /// Upstream response timeout for this route; `None`: the proxy's default.
    pub timeout: Option<Duration>,
    /// The plugins, in order, run before the action.
    pub filters: Box<[Filter]>,
}

/// What a route does.
#[derive(Debug)]
pub enum Action {
    /// Proxy to this upstream (shared with every route and table that sends there).
    Proxy(Upstream),
    /// Proxy to the Service the request's labels choose.
    Dynamic(DynamicService<Arc<ServiceBackend>>),
    /// Answer from a MockTarget.
    Mock(MockTable),
    /// Answer this error (the controller found a config problem).
    Fail(ErrorCode),
}

/// What the request path serves from: the routing table of one snapshot and the credentials
/// of one update. A clone shares every part (they are behind `Arc`s) but the versions.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// The configuration's version (what the proxy Acked).
    pub version: String,
    /// The version of the routing snapshot.
    pub snapshot_version: String,
    /// The snapshot's `routes_version`: while it stays the same, so does `router`.
    pub routes_version: String,
    /// Routes by path and host; shared with the previous table when only endpoints changed.
    pub router: Arc<Router<Arc<Route>>>,
    /// The API key credentials; shared with the previous table when only routes changed.
    pub credentials: Arc<Credentials>,
    /// The Wasm plugins the routes run, by route: what the proxy reports when they do not
    /// load.
    pub plugins: Arc<[WasmUse]>,
    /// What the router's routes were built from, for the next snapshot to reuse.
    pub(crate) built: Arc<Built>,
}

/// The routes of a table by the snapshot entry each was built from, and what else their build
/// read: the next snapshot reuses a route whose entry comes again byte for byte, as long as the
/// rest stays the same too.
#[derive(Debug, Default)]
pub(crate) struct Built {
    routes: HashSet<ByEntry, EntryHash>,
    /// The TLS material ids the routes could name, in snapshot order. An id names its content
    /// (the controller puts a content hash in it, and [`Upstreams::tls_set`] caches by it).
    tls: Box<[String]>,
    /// The Service ports the routes could name, in snapshot order; their addresses are not
    /// part of a route (the backends are refreshed in place).
    services: Box<[(String, String, u32)]>,
}

/// The hasher of the encoded routes: they come from the controller, not from requests.
type EntryHash = foldhash::fast::RandomState;

/// A route with what the router and the Ack need besides it, and the encoded snapshot entry
/// it was built from.
#[derive(Debug)]
struct BuiltRoute {
    /// A copy, not a slice of the message: a slice would keep the whole message it came in
    /// alive for as long as this route lives.
    entry: Box<[u8]>,
    /// The source's `metadata.generation`, `None` without a source: with `route.source`,
    /// the resource an Ack's problems and a NACK name.
    generation: Option<i64>,
    virtual_host: Box<str>,
    route: Arc<Route>,
}

impl BuiltRoute {
    fn resource(&self) -> Option<pb::ResourceRef> {
        let source = &self.route.source;
        self.generation.map(|generation| pb::ResourceRef {
            kind: source.kind.clone(),
            namespace: source.namespace.clone(),
            name: source.name.clone(),
            generation,
        })
    }
}

/// A [`BuiltRoute`] found by its encoded entry.
#[derive(Debug, Clone)]
struct ByEntry(Arc<BuiltRoute>);

impl Borrow<[u8]> for ByEntry {
    fn borrow(&self) -> &[u8] {
        &self.0.entry
    }
}

impl Hash for ByEntry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.entry.hash(state);
    }
}

impl PartialEq for ByEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0.entry == other.0.entry
    }
}

impl Eq for ByEntry {}

impl Built {
    /// Whether a route built against this table's context builds the same in `snapshot`'s.
    fn same_context(&self, snapshot: &view::Snapshot) -> bool {
        self.tls.iter().eq(snapshot.tls.iter().map(|t| &t.id))
            && self.services.len() == snapshot.services.len()
            && self
                .services
                .iter()
                .zip(&snapshot.services)
                .all(|((namespace, name, port), s)| {
                    *namespace == s.namespace && *name == s.name && *port == s.port
                })
    }
}

/// A part of a snapshot this proxy cannot apply.
#[derive(Debug, Clone)]
pub struct ApplyError {
    /// The resource at fault, when known.
    pub resource: Option<pb::ResourceRef>,
    /// Why.
    pub message: String,
}

impl RouteTable {
    /// The table for `snapshot`, given the one being served: when only endpoints changed
    /// (same non-empty `routes_version`), the current router with the new addresses; otherwise
    /// a new router, with the routes of `current` whose entries came again unchanged. On error
    /// nothing changes (the proxy NACKs and keeps serving `current`).
    pub fn apply(
        snapshot: &view::Snapshot,
        upstreams: &Upstreams,
        current: Option<&RouteTable>,
    ) -> Result<RouteTable, Vec<ApplyError>> {
        Self::apply_with_plugins(snapshot, upstreams, None, current)
    }

    /// [`RouteTable::apply`] with a plugin runtime for the routes' Wasm plugins (without
    /// one, they answer error 03).
    pub fn apply_with_plugins(
        snapshot: &view::Snapshot,
        upstreams: &Upstreams,
        plugins: Option<&Plugins>,
        current: Option<&RouteTable>,
    ) -> Result<RouteTable, Vec<ApplyError>> {
        if let Some(current) = current
            && !snapshot.routes_version.is_empty()
            && current.routes_version == snapshot.routes_version
        {
            upstreams.refresh_services(&snapshot.services);
            // Pods come and go while routes stay put: forget the pools of gone addresses.
            upstreams.prune();
            return Ok(RouteTable {
                version: snapshot.version.clone(),
                snapshot_version: snapshot.version.clone(),
                ..current.clone()
            });
        }
        let tls = upstreams.tls_set(&snapshot.tls);
        let reuse = current
            .map(|c| &*c.built)
            .filter(|b| b.same_context(snapshot));
        let table = Self::build_with(snapshot, upstreams, plugins, &tls, reuse)?;
        upstreams.keep_tls(&tls);
        // Backends the new table shares with the old one still hold the old addresses.
        upstreams.refresh_services(&snapshot.services);
        upstreams.prune();
        Ok(table)
    }

    /// Builds a table from scratch, or every reason it cannot be built.
    pub fn build(
        snapshot: &view::Snapshot,
        upstreams: &Upstreams,
    ) -> Result<RouteTable, Vec<ApplyError>> {
        Self::build_with(
            snapshot,
            upstreams,
            None,
            &upstreams.tls_set(&snapshot.tls),
            None,
        )
    }

    /// What the proxy reports about this table besides applying it: its plugins that do
    /// not load.
    pub fn problems(&self) -> Vec<pb::ResourceError> {
        crate::filter::wasm::problems(&self.plugins)
    }

    /// Builds a table, taking from `reuse` the routes whose snapshot entry did not change.
    // A route's pools and backends change inside, but its key is only its entry's bytes.
    #[allow(clippy::mutable_key_type)]
    fn build_with(
        snapshot: &view::Snapshot,
        upstreams: &Upstreams,
        plugins: Option<&Plugins>,
        tls: &TlsSet,
        reuse: Option<&Built>,
    ) -> Result<RouteTable, Vec<ApplyError>> {
        let mut errors = Vec::new();
        // First what is new, decoded, so that the modules its plugins name load in one go.
        let staged: Vec<Staged> = snapshot
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                if let Some(same) = reuse.and_then(|b| b.routes.get(&entry[..])) {
                    return Some(Staged::Same(same.0.clone()));
                }
                match pb::Route::decode(&entry[..]) {
                    Ok(route) => Some(Staged::New(&entry[..], Box::new(route))),
                    Err(e) => {
                        errors.push(ApplyError {
                            resource: None,
                            message: format!("route {i} of the snapshot does not decode: {e}"),
                        });
                        None
                    }
                }
            })
            .collect();
        let _loaded = plugins.map(|p| {
            p.prepare(staged.iter().flat_map(|s| match s {
                Staged::New(_, route) => &route.plugins[..],
                Staged::Same(_) => &[],
            }))
        });
        let build = Build {
            snapshot,
            upstreams,
            plugins,
            tls,
        };
        let mut builder = RouterBuilder::new();
        let mut uses = Vec::new();
        let mut built = HashSet::with_capacity_and_hasher(staged.len(), EntryHash::default());
        for staged in staged {
            let entry = match staged {
                Staged::Same(same) => same,
                Staged::New(entry, route) => match build.route(&route) {
                    Ok(value) => Arc::new(BuiltRoute {
                        entry: Box::from(entry),
                        generation: route.source.as_ref().map(|s| s.generation),
                        virtual_host: route.virtual_host.into_boxed_str(),
                        route: Arc::new(value),
                    }),
                    Err(message) => {
                        errors.push(ApplyError {
                            resource: route.source,
                            message,
                        });
                        continue;
                    }
                },
            };
            uses.extend(entry.route.filters.iter().filter_map(|f| match f {
                Filter::Wasm(w) => Some(WasmUse {
                    source: entry.resource(),
                    slot: w.slot.clone(),
                }),
                Filter::ApiKey(_) => None,
            }));
            let host = Some(&*entry.virtual_host).filter(|h| !h.is_empty());
            if let Err(e) = builder.insert(&entry.route.path, host, entry.route.clone()) {
                errors.push(ApplyError {
                    resource: entry.resource(),
                    message: e.to_string(),
                });
                continue;
            }
            built.insert(ByEntry(entry));
        }
        if errors.is_empty() {
            Ok(RouteTable {
                version: snapshot.version.clone(),
                snapshot_version: snapshot.version.clone(),
                routes_version: snapshot.routes_version.clone(),
                router: Arc::new(builder.build()),
                credentials: Arc::default(),
                plugins: uses.into(),
                built: Arc::new(Built {
                    routes: built,
                    tls: snapshot.tls.iter().map(|t| t.id.clone()).collect(),
                    services: snapshot
                        .services
                        .iter()
                        .map(|s| (s.namespace.clone(), s.name.clone(), s.port))
                        .collect(),
                }),
            })
        } else {
            Err(errors)
        }
    }
}

/// A snapshot entry on its way into a table.
enum Staged<'a> {
    /// Equal to one the current table built.
    Same(Arc<BuiltRoute>),
    /// New or changed, decoded.
    New(&'a [u8], Box<pb::Route>),
}

/// What one table build needs to turn a route's backend into an [`Action`].
struct Build<'a> {
    snapshot: &'a view::Snapshot,
    upstreams: &'a Upstreams,
    plugins: Option<&'a Plugins>,
    tls: &'a TlsSet,
}

fn is_https(scheme: &str) -> Result<bool, String> {
    match scheme {
        "http" => Ok(false),
        "https" => Ok(true),
        other => Err(format!("unsupported upstream scheme {other:?}")),
    }
}

impl Build<'_> {
    /// Builds one route from its snapshot entry.
    fn route(&self, route: &pb::Route) -> Result<Route, String> {
        let action = self.action(route)?;
        let filters = self.filters(route)?;
        let source = route.source.as_ref().map_or_else(
            || Source {
                kind: String::new(),
                namespace: String::new(),
                name: String::new(),
            },
            |s| Source {
                kind: s.kind.clone(),
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            },
        );
        Ok(Route {
            source,
            path: route.path.clone().into_boxed_str(),
            target_path: route.target_path.clone().into_boxed_str(),
            action,
            timeout: (route.timeout_ms > 0).then(|| Duration::from_millis(route.timeout_ms)),
            filters,
        })
    }

    fn filters(&self, route: &pb::Route) -> Result<Box<[Filter]>, String> {
        use pb::plugin::Kind;
        let namespace = route.source.as_ref().map_or("", |s| s.namespace.as_str());
        route
            .plugins
            .iter()
            .map(|p| match &p.kind {
                Some(Kind::ApiKey(a)) => {
                    let header = if a.header.is_empty() {
                        self.upstreams.config().api_key_header.clone()
                    } else {
                        HeaderName::from_bytes(a.header.as_bytes())
                            .map_err(|_| format!("invalid API key header {:?}", a.header))?
                    };
                    Ok(Filter::ApiKey(ApiKeyFilter {
                        binding: (!a.binding.is_empty())
                            .then(|| (Arc::from(namespace), Arc::from(a.binding.as_str()))),
                        header,
                        check_options: a.check_options,
                    }))
                }
                // A module that does not load is not a reason to reject the snapshot: its
                // routes answer the load error, and the Ack reports it.
                Some(Kind::Wasm(w)) => Ok(Filter::Wasm(match self.plugins {
                    Some(plugins) => WasmFilter {
                        slot: plugins.slot(w),
                    },
                    None => WasmFilter::failed(w, LoadError::NoPluginsDir),
                })),
                None => Err(
                    "a plugin of an unknown kind (is this proxy older than the controller?)"
                        .to_owned(),
                ),
            })
            .collect()
    }

    fn action(&self, route: &pb::Route) -> Result<Action, String> {
        use pb::route::Backend;
        if !route.path.starts_with('/') || !route.target_path.starts_with('/') {
            return Err(format!(
                "route paths must start with '/': {:?} -> {:?}",
                route.path, route.target_path
            ));
        }
        match &route.backend {
            Some(Backend::Endpoint(e)) => {
                let https = is_https(&e.scheme)?;
                let tls = if https {
                    Some((e.tls.as_str(), self.tls.get(&e.tls)?))
                } else {
                    None
                };
                let pool = self.upstreams.endpoint(https, &e.authority, tls)?;
                Ok(Action::Proxy(Upstream::Host(pool)))
            }
            Some(Backend::Service(s)) => {
                let backend = self.service(&s.namespace, &s.name, s.port, &s.scheme, &s.tls)?;
                Ok(Action::Proxy(Upstream::Service(backend)))
            }
            Some(Backend::DynamicService(d)) => {
                let defaults = &self.upstreams.config().default_header_values;
                DynamicService::from_proto(d, defaults, |c| {
                    self.service(&d.namespace, &c.name, d.port, &d.scheme, &d.tls)
                })
                .map(Action::Dynamic)
            }
            Some(Backend::Mock(m)) => MockTable::from_proto(m).map(Action::Mock),
            Some(Backend::Failure(f)) => ErrorCode::from_code(f.code)
                .map(Action::Fail)
                .ok_or_else(|| format!("unknown error code {}", f.code)),
            None => Err("route has no backend".to_owned()),
        }
    }

    fn service(
        &self,
        namespace: &str,
        name: &str,
        port: u32,
        scheme: &str,
        tls: &str,
    ) -> Result<Arc<ServiceBackend>, String> {
        let https = is_https(scheme)?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("Service {namespace}/{name}: invalid port {port}"))?;
        let config = if https {
            Some(self.tls.get(tls)?)
        } else {
            None
        };
        // Sorted by (namespace, name, port) per the contract; a linear scan would be quadratic
        // for snapshots with many Services.
        let endpoints = self
            .snapshot
            .services
            .binary_search_by(|s| {
                (s.namespace.as_str(), s.name.as_str(), s.port).cmp(&(
                    namespace,
                    name,
                    u32::from(port),
                ))
            })
            .ok()
            .and_then(|i| self.snapshot.services.get(i))
            .or_else(|| {
                self.snapshot.services.iter().find(|s| {
                    s.namespace == namespace && s.name == name && s.port == u32::from(port)
                })
            })
            .ok_or_else(|| {
                format!("Service {namespace}/{name} port {port} is not in the snapshot's services")
            })?;
        let key = ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
            port,
            https,
            tls: if https { tls.into() } else { "".into() },
        };
        self.upstreams.service(key, config, Some(endpoints))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::upstream::balance::ServiceBackend;
    use crate::upstream::{AddressMode, UpstreamConfig};
    use pb::route::Backend;

    fn route(name: &str, path: &str, backend: Backend) -> pb::Route {
        pb::Route {
            source: Some(pb::ResourceRef {
                kind: "ApiProxy".into(),
                namespace: "shop".into(),
                name: name.into(),
                generation: 1,
            }),
            path: path.into(),
            virtual_host: String::new(),
            target_path: "/".into(),
            backend: Some(backend),
            timeout_ms: 0,
            plugins: Vec::new(),
        }
    }

    fn service(name: &str, scheme: &str, tls: &str) -> Backend {
        Backend::Service(pb::ServiceTarget {
            namespace: "shop".into(),
            name: name.into(),
            port: 80,
            scheme: scheme.into(),
            tls: tls.into(),
        })
    }

    fn endpoints(name: &str, cluster_ip: &str, addresses: &[&str]) -> pb::ServiceEndpoints {
        pb::ServiceEndpoints {
            namespace: "shop".into(),
            name: name.into(),
            port: 80,
            cluster_ip: cluster_ip.into(),
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            external_name: String::new(),
        }
    }

    fn snapshot(version: &str, routes_version: &str, addresses: &[&str]) -> pb::Snapshot {
        pb::Snapshot {
            version: version.into(),
            routes: vec![route("orders", "/orders", service("orders", "http", ""))],
            tls: vec![],
            services: vec![endpoints("orders", "10.96.0.10", addresses)],
            routes_version: routes_version.into(),
        }
    }

    /// [`RouteTable::apply`] as the proxy gets `snapshot` from the controller.
    fn apply(
        snapshot: &pb::Snapshot,
        upstreams: &Upstreams,
        current: Option<&RouteTable>,
    ) -> Result<RouteTable, Vec<ApplyError>> {
        RouteTable::apply(&snapshot.into(), upstreams, current)
    }

    fn upstreams(mode: AddressMode) -> Upstreams {
        Upstreams::new(UpstreamConfig {
            mode,
            ..Default::default()
        })
        .unwrap()
    }

    fn backend(table: &RouteTable, path: &str) -> Arc<ServiceBackend> {
        match &table.router.lookup(None, path).unwrap().action {
            Action::Proxy(Upstream::Service(b)) => b.clone(),
            other => panic!("not a Service route: {other:?}"),
        }
    }

    fn dials(backend: &ServiceBackend) -> Vec<String> {
        backend
            .addresses()
            .iter()
            .map(|p| p.key().dial.to_string())
            .collect()
    }

    #[test]
    fn unchanged_routes_version_keeps_the_router_and_moves_the_addresses() {
        let up = upstreams(AddressMode::Endpoints);
        let t1 = apply(&snapshot("v1", "r1", &["10.0.0.1:8080"]), &up, None).unwrap();
        let b1 = backend(&t1, "/orders");
        assert_eq!(dials(&b1), ["10.0.0.1:8080"]);
        assert_eq!(b1.authority().as_str(), "orders.shop.svc.cluster.local:80");
        let kept = b1.addresses()[0].clone();

        let s2 = snapshot("v2", "r1", &["10.0.0.1:8080", "10.0.0.2:8080"]);
        let t2 = apply(&s2, &up, Some(&t1)).unwrap();
        assert!(Arc::ptr_eq(&t1.router, &t2.router));
        assert_eq!(t2.version, "v2");
        // The same backend object now balances over both, and the address that stayed kept
        // its pool (and so its warm connections).
        assert_eq!(dials(&b1), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert!(Arc::ptr_eq(&kept, &b1.addresses()[0]));

        // New routes: a new router, but the backend and its pools carry over.
        let t3 = apply(&snapshot("v3", "r2", &["10.0.0.2:8080"]), &up, Some(&t2)).unwrap();
        assert!(!Arc::ptr_eq(&t2.router, &t3.router));
        assert!(Arc::ptr_eq(&b1, &backend(&t3, "/orders")));
        assert_eq!(dials(&b1), ["10.0.0.2:8080"]);

        // No routes_version (an older controller): always a full build.
        let t4 = apply(&snapshot("v4", "", &[]), &up, Some(&t3)).unwrap();
        let t5 = apply(&snapshot("v5", "", &[]), &up, Some(&t4)).unwrap();
        assert!(!Arc::ptr_eq(&t4.router, &t5.router));
        assert!(dials(&b1).is_empty());
    }

    #[test]
    fn a_rejected_snapshot_leaves_the_addresses_alone() {
        let up = upstreams(AddressMode::Endpoints);
        let t1 = apply(&snapshot("v1", "r1", &["10.0.0.1:8080"]), &up, None).unwrap();
        let mut bad = snapshot("v2", "r2", &["10.0.0.9:8080"]);
        bad.routes.push(route(
            "broken",
            "/broken",
            Backend::Failure(pb::Failure { code: 99 }),
        ));
        assert!(apply(&bad, &up, Some(&t1)).is_err());
        assert_eq!(dials(&backend(&t1, "/orders")), ["10.0.0.1:8080"]);
    }

    #[test]
    fn address_modes() {
        let s = snapshot(
            "v1",
            "r1",
            &["10.0.0.1:8080", "[fd00::1]:8080", "not-an-address"],
        );
        let t = apply(&s, &upstreams(AddressMode::Endpoints), None).unwrap();
        assert_eq!(
            dials(&backend(&t, "/orders")),
            ["10.0.0.1:8080", "[fd00::1]:8080"]
        );
        let t = apply(&s, &upstreams(AddressMode::ClusterIp), None).unwrap();
        assert_eq!(dials(&backend(&t, "/orders")), ["10.96.0.10:80"]);
        let t = apply(&s, &upstreams(AddressMode::Dns), None).unwrap();
        assert_eq!(
            dials(&backend(&t, "/orders")),
            ["orders.shop.svc.cluster.local:80"]
        );
        // Headless: cluster-ip mode falls back to the endpoints.
        let mut headless = s.clone();
        headless.services[0].cluster_ip = String::new();
        let t = apply(&headless, &upstreams(AddressMode::ClusterIp), None).unwrap();
        assert_eq!(dials(&backend(&t, "/orders")).len(), 2);
        let domain = Upstreams::new(UpstreamConfig {
            mode: AddressMode::Dns,
            cluster_domain: "corp.example".into(),
            ..Default::default()
        })
        .unwrap();
        let t = apply(&s, &domain, None).unwrap();
        assert_eq!(
            dials(&backend(&t, "/orders")),
            ["orders.shop.svc.corp.example:80"]
        );
    }

    fn material(id: &str, ca: &[u8]) -> pb::TlsMaterial {
        pb::TlsMaterial {
            id: id.into(),
            secret: None,
            ca_pem: ca.to_vec(),
            cert_pem: vec![],
            key_pem: vec![],
        }
    }

    fn endpoint(scheme: &str, authority: &str, tls: &str) -> Backend {
        Backend::Endpoint(pb::Endpoint {
            scheme: scheme.into(),
            authority: authority.into(),
            tls: tls.into(),
        })
    }

    #[test]
    fn unusable_tls_material_nacks_the_routes_that_use_it() {
        let up = upstreams(AddressMode::Endpoints);
        let s = pb::Snapshot {
            version: "v1".into(),
            routes: vec![
                route(
                    "bad",
                    "/bad",
                    endpoint("https", "api.example", "shop/bad#1"),
                ),
                route(
                    "missing",
                    "/missing",
                    endpoint("https", "api.example", "shop/gone#1"),
                ),
                // Plain http ignores the material, as v2 did.
                route(
                    "plain",
                    "/plain",
                    endpoint("http", "api.example", "shop/bad#1"),
                ),
                route("svc", "/svc", service("orders", "https", "shop/bad#1")),
                route(
                    "good",
                    "/good",
                    endpoint("https", "api.example", "shop/good#1"),
                ),
            ],
            tls: vec![
                material("shop/bad#1", b"garbage"),
                material("shop/good#1", b""),
            ],
            services: vec![endpoints("orders", "", &[])],
            routes_version: "r1".into(),
        };
        let errors = apply(&s, &up, None).unwrap_err();
        let names: Vec<_> = errors
            .iter()
            .map(|e| e.resource.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["bad", "missing", "svc"], "{errors:?}");
        assert!(errors[0].message.contains("shop/bad#1"), "{errors:?}");
        assert!(
            errors[1].message.contains("not in the snapshot"),
            "{errors:?}"
        );
    }

    #[test]
    fn rotated_tls_material_gets_a_new_pool_and_unchanged_keeps_its_own() {
        let up = upstreams(AddressMode::Endpoints);
        let mk = |version: &str, id: &str| pb::Snapshot {
            version: version.into(),
            routes: vec![route("api", "/api", endpoint("https", "api.example", id))],
            tls: vec![material(id, b"")],
            services: vec![],
            routes_version: version.into(),
        };
        let pool = |t: &RouteTable| match &t.router.lookup(None, "/api").unwrap().action {
            Action::Proxy(Upstream::Host(p)) => p.clone(),
            other => panic!("{other:?}"),
        };
        let t1 = apply(&mk("v1", "shop/tls#1"), &up, None).unwrap();
        let t2 = apply(&mk("v2", "shop/tls#1"), &up, Some(&t1)).unwrap();
        assert!(Arc::ptr_eq(&pool(&t1), &pool(&t2)));
        let t3 = apply(&mk("v3", "shop/tls#2"), &up, Some(&t2)).unwrap();
        assert!(!Arc::ptr_eq(&pool(&t2), &pool(&t3)));
        assert_eq!(&*pool(&t3).key().tls, "shop/tls#2");
        assert_eq!(&*pool(&t3).key().dial, "api.example:443");
    }

    #[test]
    fn services_missing_from_the_snapshot_and_bad_ports_are_rejected() {
        let up = upstreams(AddressMode::Endpoints);
        let mut s = snapshot("v1", "r1", &[]);
        s.services.clear();
        let errors = apply(&s, &up, None).unwrap_err();
        assert!(
            errors[0].message.contains("not in the snapshot"),
            "{errors:?}"
        );
        let mut s = snapshot("v1", "r1", &[]);
        if let Some(Backend::Service(t)) = &mut s.routes[0].backend {
            t.port = 70_000;
        }
        assert!(apply(&s, &up, None).is_err());
    }

    #[test]
    fn timeouts_and_dynamic_routes() {
        use pb::label_match::Source;
        let up = upstreams(AddressMode::Endpoints);
        let mut s = snapshot("v1", "r1", &["10.0.0.1:80"]);
        s.routes[0].timeout_ms = 250;
        s.routes.push(route(
            "catalog",
            "/catalog",
            Backend::DynamicService(pb::DynamicService {
                namespace: "shop".into(),
                port: 80,
                scheme: "http".into(),
                tls: String::new(),
                labels: vec![pb::LabelMatch {
                    name: "track".into(),
                    source: Some(Source::Header("x-track".into())),
                }],
                candidates: vec![pb::ServiceCandidate {
                    name: "orders".into(),
                    labels: vec![pb::Header {
                        name: "track".into(),
                        value: "stable".into(),
                    }],
                }],
            }),
        ));
        let t = apply(&s, &up, None).unwrap();
        let orders = t.router.lookup(None, "/orders").unwrap();
        assert_eq!(orders.timeout, Some(Duration::from_millis(250)));
        let catalog = t.router.lookup(None, "/catalog").unwrap();
        assert_eq!(catalog.timeout, None);
        let Action::Dynamic(d) = &catalog.action else {
            panic!("{:?}", catalog.action)
        };
        // The candidate shares the static route's backend.
        let chosen = d.targets().next().unwrap();
        assert!(Arc::ptr_eq(chosen, &backend(&t, "/orders")));
    }

    /// Two Service routes and an endpoint route, as a controller would sort them.
    fn three_routes(version: &str, orders_target: &str) -> pb::Snapshot {
        let mut orders = route("orders", "/orders", service("orders", "http", ""));
        orders.target_path = orders_target.into();
        pb::Snapshot {
            version: version.into(),
            routes: vec![
                route("catalog", "/catalog", service("catalog", "http", "")),
                route(
                    "edge",
                    "/edge",
                    Backend::Endpoint(pb::Endpoint {
                        scheme: "http".into(),
                        authority: "127.0.0.1:9".into(),
                        tls: String::new(),
                    }),
                ),
                orders,
            ],
            tls: vec![],
            services: vec![
                endpoints("catalog", "10.96.0.11", &["10.0.0.3:8080"]),
                endpoints("orders", "10.96.0.10", &["10.0.0.1:8080"]),
            ],
            routes_version: format!("r-{version}"),
        }
    }

    fn same_route(a: &RouteTable, b: &RouteTable, path: &str) -> bool {
        Arc::ptr_eq(
            a.router.lookup(None, path).unwrap(),
            b.router.lookup(None, path).unwrap(),
        )
    }

    #[test]
    fn a_new_snapshot_reuses_the_routes_whose_entry_did_not_change() {
        let up = upstreams(AddressMode::Endpoints);
        let t1 = apply(&three_routes("v1", "/"), &up, None).unwrap();
        let t2 = apply(&three_routes("v2", "/v2"), &up, Some(&t1)).unwrap();
        assert!(!Arc::ptr_eq(&t1.router, &t2.router));
        assert!(same_route(&t1, &t2, "/catalog"));
        assert!(same_route(&t1, &t2, "/edge"));
        assert!(!same_route(&t1, &t2, "/orders"));
        assert_eq!(
            &*t2.router.lookup(None, "/orders").unwrap().target_path,
            "/v2"
        );
        // Rebuilt or not, a route to the same Service shares its backend.
        assert!(Arc::ptr_eq(
            &backend(&t1, "/orders"),
            &backend(&t2, "/orders")
        ));

        // A removed route goes; an added one is built; the rest stay.
        let mut s3 = three_routes("v3", "/v2");
        s3.routes.remove(1);
        s3.routes
            .push(route("zz", "/zz", service("orders", "http", "")));
        let t3 = apply(&s3, &up, Some(&t2)).unwrap();
        assert!(t3.router.lookup(None, "/edge").is_none());
        assert!(same_route(&t2, &t3, "/catalog"));
        assert!(same_route(&t2, &t3, "/orders"));
        assert_eq!(t3.router.len(), 3);

        // The same route from a newer generation of its ApiProxy is built again.
        let mut s4 = three_routes("v4", "/v2");
        s4.routes[0].source.as_mut().unwrap().generation = 2;
        let t4 = apply(&s4, &up, Some(&t3)).unwrap();
        assert!(!same_route(&t3, &t4, "/catalog"));
    }

    #[test]
    fn nothing_is_reused_when_what_routes_may_name_changed() {
        let up = upstreams(AddressMode::Endpoints);
        let t1 = apply(&three_routes("v1", "/"), &up, None).unwrap();

        // Another Service port listed: a full build, which still serves the same.
        let mut s2 = three_routes("v2", "/");
        s2.services.push(endpoints("zz", "10.96.0.12", &[]));
        let t2 = apply(&s2, &up, Some(&t1)).unwrap();
        assert!(!same_route(&t1, &t2, "/catalog"));
        assert!(Arc::ptr_eq(
            &backend(&t1, "/catalog"),
            &backend(&t2, "/catalog")
        ));

        // A Service a kept route names is gone from the list: the snapshot is rejected as a
        // full build would reject it, not served from the routes built before.
        let mut s3 = three_routes("v3", "/");
        s3.services.remove(0);
        let errors = apply(&s3, &up, Some(&t1)).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("catalog"), "{errors:?}");

        // TLS material added: a full build too.
        let mut s4 = three_routes("v4", "/");
        s4.tls.push(pb::TlsMaterial {
            id: "shop/ca#1".into(),
            ..Default::default()
        });
        let t4 = apply(&s4, &up, Some(&t1)).unwrap();
        assert!(!same_route(&t1, &t4, "/edge"));
    }
}
