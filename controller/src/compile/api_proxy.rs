//! ApiProxy validation (spec only, no references) and backend resolution (references).

use kanali_crds::{ApiProxy, Backend};
use kanali_proto::v1 as pb;

use super::Objects;
use super::diagnostics::{Condition, condition};
use super::paths::{normalize_host, normalize_path};

/// Error codes compiled into failure routes (see `reference/errorcodes.md`).
pub mod code {
    /// Could not open or load plugin.
    pub const PLUGIN_OPEN: u32 = 3;
    /// Could not retrieve Kubernetes secret.
    pub const SECRET: u32 = 6;
    /// No MockTarget resource was found.
    pub const NO_MOCK_TARGET: u32 = 2;
    /// Could not retrieve Kubernetes services.
    pub const SERVICE_LOOKUP: u32 = 9;
    /// Could not retrieve any matching Kubernetes services.
    pub const NO_SERVICE: u32 = 10;
}

/// An ApiProxy whose spec is valid on its own.
#[derive(Debug)]
pub struct ValidProxy<'a> {
    /// The object it came from.
    pub object: &'a ApiProxy,
    /// Normalised source path.
    pub path: String,
    /// Lowercased virtual host, if any.
    pub virtual_host: Option<String>,
    /// Normalised target path (`/` by default).
    pub target_path: String,
    /// Which backend, with its spec-level data validated.
    pub backend: ValidBackend<'a>,
}

/// A validated backend choice.
#[derive(Debug)]
pub enum ValidBackend<'a> {
    /// `scheme://authority` endpoint.
    Endpoint {
        /// `http` or `https`.
        scheme: String,
        /// Lowercased `host[:port]`.
        authority: String,
    },
    /// Static service by name.
    Service {
        /// Service name in the ApiProxy's namespace.
        name: &'a str,
        /// Port to connect to.
        port: u16,
    },
    /// Dynamic service selection by labels.
    ServiceLabels,
    /// A MockTarget in the ApiProxy's namespace.
    Mock {
        /// MockTarget name.
        name: &'a str,
    },
}

/// Checks everything about an ApiProxy that does not depend on other objects.
pub fn validate(ap: &ApiProxy) -> Result<ValidProxy<'_>, Vec<String>> {
    let mut errors = Vec::new();
    let spec = &ap.spec;
    let path = normalize_path(&spec.source.path)
        .map_err(|e| errors.push(format!("spec.source.path: {e}")))
        .unwrap_or_default();
    let virtual_host = match spec.source.virtual_host.as_deref() {
        None | Some("") => None,
        Some(h) => normalize_host(h)
            .map_err(|e| errors.push(format!("spec.source.virtualHost: {e}")))
            .ok(),
    };
    let target_path = match spec.target.path.as_deref() {
        None | Some("") => "/".to_owned(),
        Some(p) => normalize_path(p)
            .map_err(|e| errors.push(format!("spec.target.path: {e}")))
            .unwrap_or_default(),
    };
    let backend = validate_backend(&spec.target.backend)
        .map_err(|e| errors.push(e))
        .ok();
    for (i, plugin) in spec.plugins.iter().enumerate() {
        if plugin.name.trim().is_empty() {
            errors.push(format!("spec.plugins[{i}].name must not be empty"));
        }
    }
    match backend {
        Some(backend) if errors.is_empty() => Ok(ValidProxy {
            object: ap,
            path,
            virtual_host,
            target_path,
            backend,
        }),
        _ => Err(errors),
    }
}

fn validate_backend(b: &Backend) -> Result<ValidBackend<'_>, String> {
    let set = [b.endpoint.is_some(), b.service.is_some(), b.mock.is_some()];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(
            "spec.target.backend must set exactly one of endpoint, service and mock".to_owned(),
        );
    }
    if let Some(endpoint) = &b.endpoint {
        return validate_endpoint(endpoint)
            .map_err(|e| format!("spec.target.backend.endpoint: {e}"));
    }
    if let Some(svc) = &b.service {
        let port = u16::try_from(svc.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                format!(
                    "spec.target.backend.service.port {} must be from 1 to 65535",
                    svc.port
                )
            })?;
        return match (svc.name.as_deref(), svc.labels.is_empty()) {
            (Some(name), true) if !name.is_empty() => Ok(ValidBackend::Service { name, port }),
            (None, false) => {
                for (i, l) in svc.labels.iter().enumerate() {
                    if l.value.is_some() == l.header.is_some() {
                        return Err(format!(
                            "spec.target.backend.service.labels[{i}] must set exactly one of value and header"
                        ));
                    }
                }
                Ok(ValidBackend::ServiceLabels)
            }
            _ => Err(
                "spec.target.backend.service must set exactly one of name and labels".to_owned(),
            ),
        };
    }
    match &b.mock {
        Some(m) if !m.mock_target_name.is_empty() => Ok(ValidBackend::Mock {
            name: &m.mock_target_name,
        }),
        _ => Err("spec.target.backend.mock.mockTargetName must not be empty".to_owned()),
    }
}

/// An endpoint is `http(s)://host[:port]`: the path comes from `target.path`, so anything else
/// in the URL would be silently ignored (as v2 did) — reject it instead.
fn validate_endpoint(endpoint: &str) -> Result<ValidBackend<'static>, String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        Some(other) => {
            return Err(format!(
                "scheme {other:?} is not supported; use http or https"
            ));
        }
        None => {
            return Err(format!(
                "{endpoint:?} needs a scheme, e.g. http://{endpoint}"
            ));
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{endpoint:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err("user info in the endpoint URL is not supported".to_owned());
    }
    if authority.host().is_empty() {
        return Err(format!("{endpoint:?} has no host"));
    }
    // `http::Uri` does not check the port: `host:99999`, `host:abc` and `host:` all parse.
    let has_port = authority
        .as_str()
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.ends_with(']'));
    if has_port && authority.port_u16().is_none_or(|p| p == 0) {
        return Err(format!(
            "{endpoint:?} has a port that is not a number from 1 to 65535"
        ));
    }
    // A fragment is dropped silently by the parser.
    if endpoint.contains('#') {
        return Err(format!(
            "{endpoint:?} has a fragment; an endpoint is scheme://host[:port]"
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{endpoint:?} has a path or query; an endpoint is scheme://host[:port] and the upstream path comes from spec.target.path"
        ));
    }
    Ok(ValidBackend::Endpoint {
        scheme: scheme.to_owned(),
        authority: authority.as_str().to_ascii_lowercase(),
    })
}

/// The outcome of resolving a valid proxy's references.
pub struct Resolved {
    /// What the route does.
    pub backend: pb::route::Backend,
    /// The `ResolvedRefs` condition.
    pub condition: Condition,
    /// Summary for the printer column.
    pub summary: String,
}

fn failure(code: u32, reason: &str, message: String, summary: String) -> Resolved {
    Resolved {
        backend: pb::route::Backend::Failure(pb::Failure { code }),
        condition: Condition::failed(condition::RESOLVED_REFS, reason, message),
        summary,
    }
}

/// Resolves the references of a valid proxy against the other objects. Dangling references
/// still produce a route: it answers the error code the contract assigns.
pub fn resolve(
    p: &ValidProxy<'_>,
    namespace: &str,
    objects: &Objects,
    mocks: &super::MockIndex,
) -> Resolved {
    let summary = match &p.backend {
        ValidBackend::Endpoint { scheme, authority } => format!("endpoint:{scheme}://{authority}"),
        ValidBackend::Service { name, port } => format!("service:{name}:{port}"),
        ValidBackend::ServiceLabels => "service:<labels>".to_owned(),
        ValidBackend::Mock { name } => format!("mock:{name}"),
    };
    let spec = &p.object.spec;
    // Plugins are enforced by the proxy; until a plugin can run there, fail closed rather than
    // serve a route without the check its owner asked for.
    if let Some(plugin) = spec.plugins.first() {
        return failure(
            code::PLUGIN_OPEN,
            "PluginNotAvailable",
            format!(
                "plugin {:?} is not available on the proxies of this version; requests get error 03 until it is",
                plugin.name
            ),
            summary,
        );
    }
    let https = match &p.backend {
        ValidBackend::Endpoint { scheme, .. } => scheme == "https",
        ValidBackend::Service { .. } | ValidBackend::ServiceLabels => spec.target.ssl.is_some(),
        ValidBackend::Mock { .. } => false,
    };
    if let (true, Some(ssl)) = (https, &spec.target.ssl) {
        return failure(
            code::SECRET,
            "SecretNotSupported",
            format!(
                "upstream TLS from Secret {namespace}/{} is not supported by this version; requests get error 06",
                ssl.secret_name
            ),
            summary,
        );
    }
    let resolved_ok = |backend, message: String| Resolved {
        backend,
        condition: Condition::ok(condition::RESOLVED_REFS, "ResolvedRefs", message),
        summary: summary.clone(),
    };
    match &p.backend {
        ValidBackend::Endpoint { scheme, authority } => resolved_ok(
            pb::route::Backend::Endpoint(pb::Endpoint {
                scheme: scheme.clone(),
                authority: authority.clone(),
                tls: String::new(),
            }),
            "endpoint backends have no references".to_owned(),
        ),
        ValidBackend::Service { name, port } => {
            let found = objects.services.iter().any(|s| {
                s.metadata.name.as_deref() == Some(*name)
                    && s.metadata.namespace.as_deref().unwrap_or("default") == namespace
            });
            if !found {
                return failure(
                    code::NO_SERVICE,
                    "ServiceNotFound",
                    format!("Service {namespace}/{name} does not exist; requests get error 10"),
                    summary.clone(),
                );
            }
            let scheme = if https { "https" } else { "http" };
            resolved_ok(
                pb::route::Backend::Service(pb::ServiceTarget {
                    namespace: namespace.to_owned(),
                    name: (*name).to_owned(),
                    port: u32::from(*port),
                    scheme: scheme.to_owned(),
                    tls: String::new(),
                }),
                format!("Service {namespace}/{name} found"),
            )
        }
        ValidBackend::ServiceLabels => failure(
            code::SERVICE_LOOKUP,
            "DynamicServiceNotSupported",
            "service selection by labels is not supported by this version; requests get error 09"
                .to_owned(),
            summary.clone(),
        ),
        ValidBackend::Mock { name } => match mocks.get(&(namespace.to_owned(), (*name).to_owned()))
        {
            None => failure(
                code::NO_MOCK_TARGET,
                "MockTargetNotFound",
                format!("MockTarget {namespace}/{name} does not exist; requests get error 02"),
                summary.clone(),
            ),
            Some(Err(_)) => failure(
                code::NO_MOCK_TARGET,
                "MockTargetNotAccepted",
                format!(
                    "MockTarget {namespace}/{name} is invalid (see its status); requests get error 02"
                ),
                summary.clone(),
            ),
            Some(Ok(mock)) => resolved_ok(
                pb::route::Backend::Mock(mock.clone()),
                format!("MockTarget {namespace}/{name} found"),
            ),
        },
    }
}
