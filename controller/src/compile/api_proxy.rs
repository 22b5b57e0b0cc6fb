//! ApiProxy validation (spec only, no references) and backend resolution (references).

use std::collections::HashMap;

use kanali_crds::{ApiProxy, Backend};
use kanali_proto::v1 as pb;

use super::Objects;
use super::diagnostics::{Condition, condition};
use super::paths::{normalize_host, normalize_path};
use super::upstream::{self, ServiceKey};

/// Error codes compiled into failure routes (see `reference/errorcodes.md`).
pub mod code {
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
    /// `spec.target.timeout` in milliseconds; 0 when unset.
    pub timeout_ms: u64,
    /// The plugins, in order.
    pub plugins: Vec<ValidPlugin>,
}

/// A plugin entry whose own settings are valid.
#[derive(Debug)]
pub enum ValidPlugin {
    /// The built-in API key check.
    ApiKey {
        /// `config.apiKeyBindingName`, if set.
        binding: Option<String>,
        /// `config.header`: the request header with the key, if not the proxies' default.
        header: Option<String>,
        /// `config.checkOptions: "true"`: OPTIONS requests need a key too.
        check_options: bool,
    },
    /// Any other plugin: a WebAssembly module the proxies load from their plugins directory
    /// (`<name>.wasm`, or `<name>_<version>.wasm`).
    Module {
        /// `name`, a safe file name part.
        name: String,
        /// `version`, a safe file name part, if set.
        version: Option<String>,
        /// `config` as a JSON object with sorted keys; empty when there is none.
        config_json: String,
    },
}

/// Whether `part` can be part of a module file name in the proxies' plugins directory: it
/// must not name another directory (`/`, `..`) or a hidden file, so only letters, digits,
/// `.`, `-` and `_`, not starting with `.`, and short enough for any file system.
fn is_file_name_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 100
        && !part.starts_with('.')
        && !part.contains("..")
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The `config` keys the `apikey` plugin understands.
const APIKEY_CONFIG: [&str; 3] = ["apiKeyBindingName", "header", "checkOptions"];

fn validate_plugin(
    i: usize,
    plugin: &kanali_crds::Plugin,
    errors: &mut Vec<String>,
) -> Option<ValidPlugin> {
    let at = format!("spec.plugins[{i}]");
    let name = plugin.name.trim();
    if name.is_empty() {
        errors.push(format!("{at}.name must not be empty"));
        return None;
    }
    if !name.eq_ignore_ascii_case("apikey") {
        return validate_module(&at, plugin, errors);
    }
    let mut ok = true;
    for key in plugin.config.keys() {
        if !APIKEY_CONFIG.contains(&key.as_str()) {
            errors.push(format!(
                "{at}.config: the apikey plugin has no setting {key:?} (it has {})",
                APIKEY_CONFIG.join(", ")
            ));
            ok = false;
        }
    }
    let binding = plugin
        .config
        .get("apiKeyBindingName")
        .map(|b| b.trim().to_owned())
        .filter(|b| !b.is_empty());
    let header = match plugin.config.get("header").map(|h| h.trim()) {
        None | Some("") => None,
        Some(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) => Some(name.as_str().to_owned()),
            Err(_) => {
                errors.push(format!(
                    "{at}.config.header {h:?} is not an HTTP header name"
                ));
                ok = false;
                None
            }
        },
    };
    let check_options = match plugin.config.get("checkOptions").map(|v| v.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            errors.push(format!(
                "{at}.config.checkOptions must be \"true\" or \"false\", not {other:?}"
            ));
            ok = false;
            false
        }
    };
    ok.then_some(ValidPlugin::ApiKey {
        binding,
        header,
        check_options,
    })
}

/// A custom plugin entry: its name and version become a file name on the proxies, so they
/// must stay inside the plugins directory.
fn validate_module(
    at: &str,
    plugin: &kanali_crds::Plugin,
    errors: &mut Vec<String>,
) -> Option<ValidPlugin> {
    const RULE: &str =
        "letters, digits, '.', '-' and '_' only, not starting with '.', no '..', at most 100";
    let name = plugin.name.trim();
    let mut ok = true;
    if !is_file_name_part(name) {
        errors.push(format!(
            "{at}.name {name:?} cannot name a plugin module file ({RULE})"
        ));
        ok = false;
    }
    let version = match plugin.version.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) if is_file_name_part(v) => Some(v.to_owned()),
        Some(v) => {
            errors.push(format!(
                "{at}.version {v:?} cannot be part of a plugin module file name ({RULE})"
            ));
            ok = false;
            None
        }
    };
    // A BTreeMap serialises with sorted keys, so equal configs give byte-identical snapshots.
    let config_json = if plugin.config.is_empty() {
        String::new()
    } else {
        match serde_json::to_string(&plugin.config) {
            Ok(json) => json,
            Err(e) => {
                errors.push(format!("{at}.config cannot be encoded as JSON: {e}"));
                ok = false;
                String::new()
            }
        }
    };
    ok.then(|| ValidPlugin::Module {
        name: name.to_owned(),
        version,
        config_json,
    })
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
    ServiceLabels {
        /// The labels, header names lowercased.
        labels: Vec<pb::LabelMatch>,
        /// Port to connect to.
        port: u16,
    },
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
    let timeout_ms = match spec.target.timeout.as_deref() {
        None => 0,
        Some(t) => parse_timeout(t)
            .map_err(|e| errors.push(format!("spec.target.timeout: {e}")))
            .unwrap_or_default(),
    };
    let mut plugins = Vec::new();
    for (i, plugin) in spec.plugins.iter().enumerate() {
        plugins.extend(validate_plugin(i, plugin, &mut errors));
    }
    if plugins
        .iter()
        .filter(|p| matches!(p, ValidPlugin::ApiKey { .. }))
        .count()
        > 1
    {
        errors.push("spec.plugins lists the apikey plugin more than once".to_owned());
    }
    match backend {
        Some(backend) if errors.is_empty() => Ok(ValidProxy {
            object: ap,
            path,
            virtual_host,
            target_path,
            backend,
            timeout_ms,
            plugins,
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
            (None, false) => validate_labels(&svc.labels)
                .map(|labels| ValidBackend::ServiceLabels { labels, port }),
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

fn validate_labels(labels: &[kanali_crds::ServiceLabel]) -> Result<Vec<pb::LabelMatch>, String> {
    use pb::label_match::Source;
    let mut out = Vec::with_capacity(labels.len());
    let mut seen = std::collections::BTreeSet::new();
    for (i, l) in labels.iter().enumerate() {
        let at = format!("spec.target.backend.service.labels[{i}]");
        if !upstream::is_label_key(&l.name) {
            return Err(format!(
                "{at}.name {:?} is not a Kubernetes label key",
                l.name
            ));
        }
        if !seen.insert(l.name.as_str()) {
            return Err(format!("{at}.name {:?} is listed twice", l.name));
        }
        let source = match (&l.value, &l.header) {
            (Some(v), None) if kanali_proto::is_label_value(v) => Source::Value(v.clone()),
            (Some(v), None) => {
                return Err(format!(
                    "{at}.value {v:?} is not a Kubernetes label value (at most 63 letters, digits, '-', '_' and '.', alphanumeric at both ends)"
                ));
            }
            (None, Some(h)) => match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) => Source::Header(name.as_str().to_owned()),
                Err(_) => return Err(format!("{at}.header {h:?} is not an HTTP header name")),
            },
            _ => return Err(format!("{at} must set exactly one of value and header")),
        };
        out.push(pb::LabelMatch {
            name: l.name.clone(),
            source: Some(source),
        });
    }
    Ok(out)
}

/// `target.timeout`: digits and a unit (`ms`, `s`, `m`), from 1 ms to 1 h.
fn parse_timeout(t: &str) -> Result<u64, String> {
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{t:?} is not a duration like 2500ms, 30s or 2m"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        _ => None,
    }
    .ok_or_else(|| format!("{t:?} is not a duration like 2500ms, 30s or 2m"))?;
    if !(1..=3_600_000).contains(&ms) {
        return Err(format!("{t:?} must be from 1ms to 60m"));
    }
    Ok(ms)
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
    /// TLS material the route refers to.
    pub tls: Option<pb::TlsMaterial>,
    /// Service ports whose addresses the proxies need for this route.
    pub services: Vec<ServiceKey>,
    /// The plugins the proxies run, in order.
    pub plugins: Vec<pb::Plugin>,
}

fn failure(code: u32, reason: &str, message: String, summary: String) -> Resolved {
    Resolved {
        backend: pb::route::Backend::Failure(pb::Failure { code }),
        condition: Condition::failed(condition::RESOLVED_REFS, reason, message),
        summary,
        tls: None,
        services: Vec::new(),
        plugins: Vec::new(),
    }
}

/// The plugins as the proxies run them, and what is wrong with their references (a missing
/// or invalid ApiKeyBinding: requests with a key get error 13, none passes unchecked).
fn resolve_plugins(
    plugins: &[ValidPlugin],
    namespace: &str,
    bindings: &HashMap<(String, String), bool>,
) -> (Vec<pb::Plugin>, Option<(&'static str, String)>) {
    let mut out = Vec::new();
    let mut problem = None;
    for plugin in plugins {
        let (binding, header, check_options) = match plugin {
            ValidPlugin::ApiKey {
                binding,
                header,
                check_options,
            } => (binding, header, check_options),
            // Whether the module loads is for each proxy to find out (its plugins directory
            // is its own); they report it, and it shows as `Programmed`.
            ValidPlugin::Module {
                name,
                version,
                config_json,
            } => {
                out.push(pb::Plugin {
                    kind: Some(pb::plugin::Kind::Wasm(pb::WasmPlugin {
                        name: name.clone(),
                        version: version.clone().unwrap_or_default(),
                        config_json: config_json.clone(),
                    })),
                });
                continue;
            }
        };
        let binding = match binding {
            None => {
                problem = Some((
                    "NoApiKeyBinding",
                    "the apikey plugin names no ApiKeyBinding (config.apiKeyBindingName); requests get error 12 without a key and 13 with one".to_owned(),
                ));
                String::new()
            }
            Some(b) => match bindings.get(&(namespace.to_owned(), b.clone())) {
                None => {
                    problem = Some((
                        "ApiKeyBindingNotFound",
                        format!(
                            "ApiKeyBinding {namespace}/{b} does not exist; requests with a key get error 13"
                        ),
                    ));
                    String::new()
                }
                Some(false) => {
                    problem = Some((
                        "ApiKeyBindingNotAccepted",
                        format!(
                            "ApiKeyBinding {namespace}/{b} is invalid (see its status); requests with a key get error 13"
                        ),
                    ));
                    String::new()
                }
                Some(true) => b.clone(),
            },
        };
        out.push(pb::Plugin {
            kind: Some(pb::plugin::Kind::ApiKey(pb::ApiKeyPlugin {
                binding,
                header: header.clone().unwrap_or_default(),
                check_options: *check_options,
            })),
        });
    }
    (out, problem)
}

fn summary(backend: &ValidBackend<'_>) -> String {
    use pb::label_match::Source;
    match backend {
        ValidBackend::Endpoint { scheme, authority } => format!("endpoint:{scheme}://{authority}"),
        ValidBackend::Service { name, port } => format!("service:{name}:{port}"),
        ValidBackend::ServiceLabels { labels, port } => {
            let labels: Vec<String> = labels
                .iter()
                .map(|l| match &l.source {
                    Some(Source::Value(v)) => format!("{}={v}", l.name),
                    Some(Source::Header(h)) => format!("{}=<{h}>", l.name),
                    None => l.name.clone(),
                })
                .collect();
            format!("service:{{{}}}:{port}", labels.join(","))
        }
        ValidBackend::Mock { name } => format!("mock:{name}"),
    }
}

/// Resolves the references of a valid proxy against the other objects. Dangling references
/// still produce a route: it answers the error code the contract assigns.
pub fn resolve(
    p: &ValidProxy<'_>,
    namespace: &str,
    objects: &Objects,
    mocks: &super::MockIndex,
    bindings: &HashMap<(String, String), bool>,
) -> Resolved {
    let mut resolved = resolve_backend(p, namespace, objects, mocks);
    let (plugins, problem) = resolve_plugins(&p.plugins, namespace, bindings);
    resolved.plugins = plugins;
    if let Some((reason, message)) = problem {
        if resolved.condition.status {
            resolved.condition = Condition::failed(condition::RESOLVED_REFS, reason, message);
        } else {
            resolved.condition.message.push_str("; ");
            resolved.condition.message.push_str(&message);
        }
    }
    resolved
}

fn resolve_backend(
    p: &ValidProxy<'_>,
    namespace: &str,
    objects: &Objects,
    mocks: &super::MockIndex,
) -> Resolved {
    let summary = summary(&p.backend);
    let spec = &p.object.spec;
    let https = match &p.backend {
        ValidBackend::Endpoint { scheme, .. } => scheme == "https",
        ValidBackend::Service { .. } | ValidBackend::ServiceLabels { .. } => {
            spec.target.ssl.is_some()
        }
        ValidBackend::Mock { .. } => false,
    };
    let mut notes = Vec::new();
    let tls = match (&spec.target.ssl, https) {
        (Some(ssl), true) => match upstream::tls_material(objects, namespace, &ssl.secret_name) {
            Ok(material) => {
                notes.push(format!("TLS from Secret {namespace}/{}", ssl.secret_name));
                Some(material)
            }
            Err(problem) => return failure(problem.code, problem.reason, problem.message, summary),
        },
        (Some(ssl), false) if !matches!(p.backend, ValidBackend::Mock { .. }) => {
            notes.push(format!(
                "spec.target.ssl (Secret {}) is not used: the endpoint is plain http",
                ssl.secret_name
            ));
            None
        }
        _ => None,
    };
    let tls_id = tls.as_ref().map(|t| t.id.clone()).unwrap_or_default();
    let scheme = if https { "https" } else { "http" };
    let services_unavailable = objects.unavailable.iter().any(|k| k == "Service");
    if services_unavailable
        && matches!(
            p.backend,
            ValidBackend::Service { .. } | ValidBackend::ServiceLabels { .. }
        )
    {
        return failure(
            code::SERVICE_LOOKUP,
            "ServicesUnavailable",
            "the controller has no view of Services (the Service watch has not listed; see its log); requests get error 09"
                .to_owned(),
            summary,
        );
    }
    let ok = |backend, message: String, services: Vec<ServiceKey>| {
        let mut message = message;
        for note in &notes {
            message.push_str("; ");
            message.push_str(note);
        }
        Resolved {
            backend,
            condition: Condition::ok(condition::RESOLVED_REFS, "ResolvedRefs", message),
            summary: summary.clone(),
            tls: tls.clone(),
            services,
            plugins: Vec::new(),
        }
    };
    match &p.backend {
        ValidBackend::Endpoint { scheme, authority } => ok(
            pb::route::Backend::Endpoint(pb::Endpoint {
                scheme: scheme.clone(),
                authority: authority.clone(),
                tls: tls_id,
            }),
            "endpoint backends have no references".to_owned(),
            Vec::new(),
        ),
        ValidBackend::Service { name, port } => {
            if upstream::find_service(&objects.services, namespace, name).is_none() {
                return failure(
                    code::NO_SERVICE,
                    "ServiceNotFound",
                    format!("Service {namespace}/{name} does not exist; requests get error 10"),
                    summary.clone(),
                );
            }
            ok(
                pb::route::Backend::Service(pb::ServiceTarget {
                    namespace: namespace.to_owned(),
                    name: (*name).to_owned(),
                    port: u32::from(*port),
                    scheme: scheme.to_owned(),
                    tls: tls_id,
                }),
                format!("Service {namespace}/{name} found"),
                vec![(namespace.to_owned(), (*name).to_owned(), *port)],
            )
        }
        ValidBackend::ServiceLabels { labels, port } => {
            let candidates = upstream::candidates(&objects.services, namespace, labels);
            let services = candidates
                .iter()
                .map(|c| (namespace.to_owned(), c.name.clone(), *port))
                .collect();
            let found = candidates.len();
            let backend = pb::route::Backend::DynamicService(pb::DynamicService {
                namespace: namespace.to_owned(),
                port: u32::from(*port),
                scheme: scheme.to_owned(),
                tls: tls_id,
                labels: labels.clone(),
                candidates,
            });
            if found == 0 {
                let mut r = failure(
                    code::NO_SERVICE,
                    "NoMatchingService",
                    format!(
                        "no Service in namespace {namespace} carries these labels; requests get error 10 until one does"
                    ),
                    summary.clone(),
                );
                r.backend = backend;
                return r;
            }
            ok(
                backend,
                format!("{found} Service(s) in namespace {namespace} can match"),
                services,
            )
        }
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
            Some(Ok(mock)) => ok(
                pb::route::Backend::Mock(mock.clone()),
                format!("MockTarget {namespace}/{name} found"),
                Vec::new(),
            ),
        },
    }
}
