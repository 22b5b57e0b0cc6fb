//! A snapshot turned into what the request path needs: an immutable routing table. Built once
//! per snapshot, off the request path; the hot path never touches protobuf.

use std::sync::Arc;

use http::uri::{Authority, Scheme};
use kanali_proto::v1 as pb;

use crate::errors::ErrorCode;
use crate::mock::MockTable;
use crate::router::{Router, RouterBuilder};
use crate::upstream::{HostPool, Upstreams};

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
}

/// What a route does.
#[derive(Debug)]
pub enum Action {
    /// Proxy to this upstream (its pool, shared with every route and table that sends there).
    Proxy(Arc<HostPool>),
    /// Answer from a MockTarget.
    Mock(MockTable),
    /// Answer this error (the controller found a config problem).
    Fail(ErrorCode),
}

/// The routing table of one snapshot.
#[derive(Debug)]
pub struct RouteTable {
    /// The snapshot version.
    pub version: String,
    /// Routes by path and host.
    pub router: Router<Route>,
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
    /// Builds a table, or every reason it cannot be built (the proxy NACKs and keeps serving
    /// the previous one).
    pub fn build(
        snapshot: &pb::Snapshot,
        upstreams: &Upstreams,
    ) -> Result<RouteTable, Vec<ApplyError>> {
        let mut builder = RouterBuilder::new();
        let mut errors = Vec::new();
        for route in &snapshot.routes {
            let fail = |message: String| ApplyError {
                resource: route.source.clone(),
                message,
            };
            let action = match action(route, upstreams) {
                Ok(a) => a,
                Err(message) => {
                    errors.push(fail(message));
                    continue;
                }
            };
            let source = route
                .source
                .as_ref()
                .map(|s| Source {
                    kind: s.kind.clone(),
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                })
                .unwrap_or_else(|| Source {
                    kind: String::new(),
                    namespace: String::new(),
                    name: String::new(),
                });
            let host = Some(route.virtual_host.as_str()).filter(|h| !h.is_empty());
            let value = Route {
                source,
                path: route.path.clone().into_boxed_str(),
                target_path: route.target_path.clone().into_boxed_str(),
                action,
            };
            if let Err(e) = builder.insert(&route.path, host, value) {
                errors.push(fail(e.to_string()));
            }
        }
        if errors.is_empty() {
            Ok(RouteTable {
                version: snapshot.version.clone(),
                router: builder.build(),
            })
        } else {
            Err(errors)
        }
    }
}

fn action(route: &pb::Route, upstreams: &Upstreams) -> Result<Action, String> {
    use pb::route::Backend;
    let upstream = |scheme: &str, authority: &str| -> Result<Action, String> {
        let scheme = match scheme {
            "http" => Scheme::HTTP,
            "https" => Scheme::HTTPS,
            other => return Err(format!("unsupported upstream scheme {other:?}")),
        };
        let authority: Authority = authority
            .parse()
            .map_err(|e| format!("invalid upstream authority {authority:?}: {e}"))?;
        Ok(Action::Proxy(upstreams.pool(&scheme, &authority)))
    };
    if !route.path.starts_with('/') || !route.target_path.starts_with('/') {
        return Err(format!(
            "route paths must start with '/': {:?} -> {:?}",
            route.path, route.target_path
        ));
    }
    match &route.backend {
        Some(Backend::Endpoint(e)) => upstream(&e.scheme, &e.authority),
        Some(Backend::Service(s)) => upstream(
            &s.scheme,
            &format!("{}.{}.svc.cluster.local:{}", s.name, s.namespace, s.port),
        ),
        Some(Backend::Mock(m)) => MockTable::from_proto(m).map(Action::Mock),
        Some(Backend::Failure(f)) => ErrorCode::from_code(f.code)
            .map(Action::Fail)
            .ok_or_else(|| format!("unknown error code {}", f.code)),
        Some(Backend::DynamicService(_)) => {
            Err("dynamic service backends are not supported by this proxy".to_owned())
        }
        None => Err("route has no backend".to_owned()),
    }
}
