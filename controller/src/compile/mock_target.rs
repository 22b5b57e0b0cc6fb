//! MockTarget validation: every route must be something a proxy can answer with as written.

use base64::Engine as _;
use kanali_crds::{MockRoute, MockTarget};
use kanali_proto::v1 as pb;

use super::paths::normalize_path;

/// Headers a mock may not set: the proxy frames the body itself.
const FORBIDDEN_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// Validates every route of a MockTarget. On success returns the responses in the MockTarget's
/// order; otherwise every problem found, each naming the route by index.
pub fn compile_mock_target(mt: &MockTarget) -> Result<Vec<pb::MockResponse>, Vec<String>> {
    let routes = &mt.spec.routes;
    if routes.is_empty() {
        return Err(vec!["spec.routes must list at least one route".to_owned()]);
    }
    let mut errors = Vec::new();
    let mut out = Vec::with_capacity(routes.len());
    for (i, route) in routes.iter().enumerate() {
        match compile_route(route) {
            Ok(r) => out.push(r),
            Err(errs) => {
                errors.extend(errs.into_iter().map(|e| format!("spec.routes[{i}]: {e}")));
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn compile_route(route: &MockRoute) -> Result<pb::MockResponse, Vec<String>> {
    let mut errors = Vec::new();
    let path = normalize_path(&route.path)
        .map_err(|e| errors.push(e))
        .unwrap_or_default();

    let status = match u16::try_from(route.status) {
        Ok(s @ 200..=599) => u32::from(s),
        _ => {
            errors.push(format!(
                "status {} must be a final HTTP status from 200 to 599",
                route.status
            ));
            0
        }
    };

    let mut methods = Vec::with_capacity(route.methods.len());
    for m in &route.methods {
        let upper = m.to_ascii_uppercase();
        if http::Method::from_bytes(upper.as_bytes()).is_err() || upper.is_empty() {
            errors.push(format!("method {m:?} is not a valid HTTP method"));
        } else if !methods.contains(&upper) {
            methods.push(upper);
        }
    }

    let mut headers = Vec::with_capacity(route.headers.len());
    for (name, value) in &route.headers {
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => errors.push(format!(
                "header name {name:?} is not a valid HTTP header name"
            )),
            Ok(h) if FORBIDDEN_HEADERS.contains(&h.as_str()) => {
                errors.push(format!(
                    "header {name:?} is set by the proxy and cannot be mocked"
                ));
            }
            Ok(h) => {
                if http::HeaderValue::from_str(value).is_err() {
                    errors.push(format!(
                        "header {name:?} has a value that is not valid in HTTP"
                    ));
                } else {
                    headers.push(pb::Header {
                        name: h.as_str().to_owned(),
                        value: value.clone(),
                    });
                }
            }
        }
    }

    let body = match (&route.body, &route.body_base64) {
        (Some(_), Some(_)) => {
            errors.push("set either body or bodyBase64, not both".to_owned());
            Vec::new()
        }
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| errors.push(format!("bodyBase64 is not valid base64: {e}")))
            .unwrap_or_default(),
        (None, None) => Vec::new(),
    };

    if errors.is_empty() {
        Ok(pb::MockResponse {
            path,
            status,
            methods,
            headers,
            body,
        })
    } else {
        Err(errors)
    }
}
