//! Requests (to the proxies and the processes' admin ports) and what they answered.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;
use tokio::time::Instant;

use super::DEADLINE;

/// The plain-HTTP client every scenario uses.
pub type Http = Client<HttpConnector, Full<Bytes>>;

/// A whole response.
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("not JSON ({e}): {} {}", self.status, self.text()))
    }

    pub fn describe(&self) -> String {
        format!("{} {}", self.status, self.text())
    }

    /// Whether this is Kanali error `code`, byte for byte as the contract says.
    pub fn check_error(&self, code: u32, status: u16, message: &str) -> Result<(), String> {
        let expected = format!(
            r#"{{"status":{status},"message":"{message}","code":{code},"details":"Visit https://kanali.io/docs/v2/errorcodes/#{code:02} for more details."}}"#
        );
        let content_type = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok());
        if self.status.as_u16() == status
            && content_type == Some("application/json")
            && self.body == expected.as_bytes()
        {
            Ok(())
        } else {
            Err(format!(
                "wanted Kanali error {code:02} ({status} {expected}), got {} (content-type {content_type:?})",
                self.describe()
            ))
        }
    }

    /// Whether the echo upstream answered 200 and saw `path` (and `query`, when given).
    pub fn check_echo(&self, path: &str, query: Option<&str>) -> Result<(), String> {
        if self.status != StatusCode::OK {
            return Err(format!("wanted 200 from the echo, got {}", self.describe()));
        }
        let echo = self.json()?;
        if echo["path"] != path || (query.is_some() && echo["query"].as_str() != query) {
            return Err(format!(
                "the echo saw path {} query {}, wanted {path} {query:?}",
                echo["path"], echo["query"]
            ));
        }
        Ok(())
    }

    /// Whether the echo upstream named `name` (see [`kanali_e2e::start_echo`]) answered 200.
    pub fn check_upstream(&self, name: &str) -> Result<(), String> {
        if self.status != StatusCode::OK {
            return Err(format!("wanted 200 from {name}, got {}", self.describe()));
        }
        let upstream = &self.json()?["upstream"];
        if upstream != name {
            return Err(format!(
                "wanted an answer from {name}, got one from {upstream}"
            ));
        }
        Ok(())
    }

    /// Whether the header `name` is `value`.
    pub fn check_header(&self, name: &str, value: &str) -> Result<(), String> {
        match self.headers.get(name) {
            Some(v) if v == value => Ok(()),
            other => Err(format!(
                "wanted {name}: {value}, got {other:?} on {}",
                self.describe()
            )),
        }
    }

    /// Whether this is the `users` MockTarget's answer.
    pub fn check_users_mock(&self) -> Result<(), String> {
        if self.status == StatusCode::OK
            && self.body == br#"[{"id":1}]"#[..]
            && self.headers.get("x-mock").is_some_and(|v| v == "yes")
        {
            Ok(())
        } else {
            Err(format!(
                "wanted the users mock (200 [{{\"id\":1}}] x-mock: yes), got {}",
                self.describe()
            ))
        }
    }
}

/// `GET path` from `addr`.
pub async fn http_get(http: &Http, addr: SocketAddr, path: &str) -> Result<Answer, String> {
    http_get_with(http, addr, path, &[]).await
}

/// `GET path` from `addr` with extra request `headers`.
pub async fn http_get_with(
    http: &Http,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::default()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .map_err(|_| format!("GET http://{addr}{path}: no answer within 10s"))?
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .map_err(|_| format!("GET http://{addr}{path}: body not complete within 10s"))?
        .map_err(|e| format!("GET http://{addr}{path}: body: {e}"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A request through a proxy: every proxy answer carries a correlation id.
pub async fn through(http: &Http, proxy: SocketAddr, path: &str) -> Result<Answer, String> {
    through_with(http, proxy, path, &[]).await
}

/// [`through`] with extra request `headers`.
pub async fn through_with(
    http: &Http,
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let a = http_get_with(http, proxy, path, headers).await?;
    if !a.headers.contains_key("x-kanali-correlation-id") {
        return Err(format!(
            "no x-kanali-correlation-id on {} from {proxy}{path}",
            a.describe()
        ));
    }
    Ok(a)
}

/// Retries `check` until it returns `Ok` or `DEADLINE` passes; then fails with what it last
/// said.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => {
                assert!(
                    start.elapsed() < DEADLINE,
                    "{what}: not reached within {DEADLINE:?}; last observed: {last}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
