//! Checks shared by the end-to-end tests: waiting for a condition within a deadline, and a
//! proxy's answer collected whole, with assertions on the echo's JSON and on Kanali's error
//! bodies.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use serde_json::Value;

/// How long a change may take to show before a test fails. A deadline, not a measurement:
/// the margin absorbs a loaded CI machine.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Polls `check` every 20 ms until it returns `true`.
///
/// # Panics
/// If it has not within [`DEADLINE`]; the message names `what` was awaited.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a raw connection until its peer closes it: all that arrived, as text.
///
/// # Panics
/// If it is not closed within [`DEADLINE`], or reading fails.
pub async fn read_until_closed<R>(stream: &mut R) -> String
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut bytes = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut bytes))
        .await
        .unwrap_or_else(|_| panic!("the connection is not closed within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("reading the connection failed: {e}"));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A response collected whole.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: StatusCode,
    /// The HTTP version of the response.
    pub version: Version,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Answer {
    /// Collects `resp`: its head and its whole body.
    ///
    /// # Panics
    /// If reading the body fails.
    pub async fn read<B>(resp: Response<B>) -> Answer
    where
        B: hyper::body::Body,
        B::Error: Debug,
    {
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("reading the body: {e:?}"))
            .to_bytes();
        Answer {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        }
    }

    /// The body as JSON.
    ///
    /// # Panics
    /// If it is not JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The name of the echo upstream that answered (the `upstream` field of its JSON).
    ///
    /// # Panics
    /// If the answer is not a `200` from an echo upstream.
    #[track_caller]
    pub fn upstream(&self) -> String {
        assert_eq!(self.status, StatusCode::OK, "{:?}", self.body);
        match self.json()["upstream"].as_str() {
            Some(name) => name.to_owned(),
            None => panic!("no upstream name: {:?}", self.body),
        }
    }

    /// The Kanali error code of an error answer (the `code` field of its JSON body); `None`
    /// if the body is not JSON or has no numeric `code`.
    pub fn code(&self) -> Option<u64> {
        serde_json::from_slice::<Value>(&self.body).ok()?["code"].as_u64()
    }

    /// Asserts this is Kanali error `code` with HTTP `status`.
    ///
    /// # Panics
    /// If it is not.
    #[track_caller]
    pub fn assert_code(&self, code: u64, status: u16) {
        assert_eq!(self.status.as_u16(), status, "{:?}", self.body);
        assert_eq!(self.code(), Some(code), "{:?}", self.body);
    }

    /// Asserts this is Kanali error `code` with HTTP `status` and `message`, byte for byte as
    /// the contract says (JSON content type, field order, documentation link).
    ///
    /// # Panics
    /// If it is not.
    #[track_caller]
    pub fn assert_error(&self, code: u32, status: u16, message: &str) {
        assert_eq!(self.status.as_u16(), status, "{:?}", self.body);
        assert_eq!(self.headers["content-type"], "application/json");
        let expected = format!(
            r#"{{"status":{status},"message":"{message}","code":{code},"details":"Visit https://kanali.io/docs/v2/errorcodes/#{code:02} for more details."}}"#
        );
        assert_eq!(String::from_utf8_lossy(&self.body), expected);
    }
}

/// A Prometheus text exposition as a map from each sample's name and labels, as written (e.g.
/// `kanali_errors_total{code="00"}`), to its value.
///
/// # Errors
/// A sample line without a value, or with one that is not a number.
pub fn samples(text: &str) -> Result<std::collections::HashMap<String, f64>, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .ok_or_else(|| format!("a sample line without a value: {l:?}"))?;
            let value = value
                .parse()
                .map_err(|e| format!("{l:?}: the value is not a number: {e}"))?;
            Ok((series.to_owned(), value))
        })
        .collect()
}

/// The sum of the samples of `name` (any labels) whose labels include every `label="value"`
/// pair of `with`.
pub fn sum_of(samples: &std::collections::HashMap<String, f64>, name: &str, with: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let labels = match series.strip_prefix(name) {
                Some("") => "",
                Some(rest) if rest.starts_with('{') => rest,
                _ => return false,
            };
            with.iter().all(|pair| labels.contains(pair))
        })
        .map(|(_, value)| value)
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n\
        lat_count{code=\"200\",method=\"GET\"} 5\nlat_count{code=\"200\",method=\"POST\"} 2\n\
        lat_count{code=\"502\",method=\"GET\"} 1\nlat_count_other 7\n";

    #[test]
    fn samples_are_summed_by_name_and_labels() {
        let s = samples(TEXT).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(sum_of(&s, "a_total", &[]), 3.0);
        assert_eq!(sum_of(&s, "lat_count", &[]), 8.0);
        assert_eq!(sum_of(&s, "lat_count", &["code=\"200\""]), 7.0);
        assert_eq!(
            sum_of(&s, "lat_count", &["code=\"200\"", "method=\"GET\""]),
            5.0
        );
        assert_eq!(sum_of(&s, "missing", &[]), 0.0);
    }

    #[test]
    fn a_broken_sample_is_an_error() {
        assert!(samples("a_total\n").is_err());
        assert!(samples("a_total x\n").is_err());
    }
}
