//! MockTarget responses: pick the response for a target path and method, answer it, stop.
//! (v2 fell through to the upstream after a mock; here a mock is the whole answer.)

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use kanali_proto::v1 as pb;

use crate::body::ProxyBody;
use crate::route::path::segments;

/// The responses of one MockTarget, ready to serve.
#[derive(Debug)]
pub struct MockTable {
    responses: Vec<MockEntry>,
}

#[derive(Debug)]
struct MockEntry {
    path: Box<str>,
    depth: usize,
    methods: Vec<Method>,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl MockTable {
    /// Converts the snapshot form, rejecting anything that could not be served as written.
    pub fn from_proto(mock: &pb::Mock) -> Result<Self, String> {
        let mut responses = Vec::with_capacity(mock.responses.len());
        for (i, r) in mock.responses.iter().enumerate() {
            let status = u16::try_from(r.status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .ok_or_else(|| format!("response {i}: invalid status {}", r.status))?;
            let methods = r
                .methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.as_bytes())
                        .map_err(|_| format!("response {i}: invalid method {m:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut headers = HeaderMap::with_capacity(r.headers.len());
            for h in &r.headers {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("response {i}: invalid header name {:?}", h.name))?;
                let value = HeaderValue::from_str(&h.value)
                    .map_err(|_| format!("response {i}: invalid value for header {:?}", h.name))?;
                headers.append(name, value);
            }
            responses.push(MockEntry {
                depth: segments(&r.path).count(),
                path: r.path.clone().into_boxed_str(),
                methods,
                status,
                headers,
                body: Bytes::from(r.body.clone()),
            });
        }
        Ok(MockTable { responses })
    }

    /// The response for `target_path` (the rewritten, escaped path) and `method`: among the
    /// responses whose path is a segment-wise prefix of the target path and that allow the
    /// method, the longest path wins, the first listed on a tie.
    pub fn respond(&self, target_path: &str, method: &Method) -> Option<Response<ProxyBody>> {
        let mut best: Option<&MockEntry> = None;
        for entry in &self.responses {
            if best.is_some_and(|b| b.depth >= entry.depth) {
                continue;
            }
            let allowed = entry.methods.is_empty() || entry.methods.contains(method);
            if allowed && is_segment_prefix(&entry.path, target_path) {
                best = Some(entry);
            }
        }
        best.map(|entry| {
            let mut resp = Response::new(ProxyBody::from(entry.body.clone()));
            *resp.status_mut() = entry.status;
            *resp.headers_mut() = entry.headers.clone();
            resp
        })
    }
}

fn is_segment_prefix(prefix: &str, path: &str) -> bool {
    let mut path = segments(path);
    segments(prefix).all(|p| path.next() == Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn table() -> MockTable {
        let resp = |path: &str, status, methods: &[&str], body: &str| pb::MockResponse {
            path: path.to_owned(),
            status,
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            headers: vec![pb::Header {
                name: "x-mock".to_owned(),
                value: path.to_owned(),
            }],
            body: body.as_bytes().to_vec(),
        };
        let mock = pb::Mock {
            mock_target: None,
            responses: vec![
                resp("/", 200, &[], "root"),
                resp("/users", 200, &["GET"], "list"),
                resp("/users", 201, &["POST"], "created"),
                resp("/users/admin", 403, &["GET"], "no"),
                resp("/users", 299, &["GET"], "shadowed"),
            ],
        };
        MockTable::from_proto(&mock).unwrap()
    }

    async fn answer(t: &MockTable, path: &str, method: Method) -> Option<(u16, String, String)> {
        let resp = t.respond(path, &method)?;
        let status = resp.status().as_u16();
        let header = resp.headers()["x-mock"].to_str().unwrap().to_owned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Some((status, header, String::from_utf8(body.to_vec()).unwrap()))
    }

    #[tokio::test]
    async fn longest_matching_path_and_method_wins() {
        let t = table();
        assert_eq!(answer(&t, "/users", Method::GET).await.unwrap().2, "list");
        assert_eq!(answer(&t, "/users/", Method::GET).await.unwrap().2, "list");
        assert_eq!(
            answer(&t, "/users/42", Method::GET).await.unwrap().2,
            "list"
        );
        assert_eq!(answer(&t, "/users", Method::POST).await.unwrap().0, 201);
        assert_eq!(
            answer(&t, "/users/admin/x", Method::GET).await.unwrap(),
            (403, "/users/admin".into(), "no".into())
        );
        // No POST on /users/admin: the shorter /users POST answers.
        assert_eq!(
            answer(&t, "/users/admin", Method::POST).await.unwrap().2,
            "created"
        );
        // The root response takes every method, and `/` is reachable (a v2 bug).
        assert_eq!(answer(&t, "/", Method::DELETE).await.unwrap().2, "root");
        assert_eq!(answer(&t, "/other", Method::PUT).await.unwrap().2, "root");
        assert_eq!(answer(&t, "/usersx", Method::GET).await.unwrap().2, "root");
    }

    #[test]
    fn no_match_without_a_root_response() {
        let mock = pb::Mock {
            mock_target: None,
            responses: vec![pb::MockResponse {
                path: "/a".into(),
                status: 200,
                methods: vec!["GET".into()],
                headers: vec![],
                body: vec![],
            }],
        };
        let t = MockTable::from_proto(&mock).unwrap();
        assert!(t.respond("/b", &Method::GET).is_none());
        assert!(t.respond("/a", &Method::POST).is_none());
        assert!(t.respond("/", &Method::GET).is_none());
    }

    #[test]
    fn rejects_what_cannot_be_served() {
        let bad = |status, name: &str| pb::Mock {
            mock_target: None,
            responses: vec![pb::MockResponse {
                path: "/".into(),
                status,
                methods: vec![],
                headers: vec![pb::Header {
                    name: name.into(),
                    value: "v".into(),
                }],
                body: vec![],
            }],
        };
        assert!(MockTable::from_proto(&bad(99, "x")).is_err());
        assert!(MockTable::from_proto(&bad(200, "bad header")).is_err());
        assert!(MockTable::from_proto(&bad(200, "x")).is_ok());
    }
}
