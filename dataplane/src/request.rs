//! What the proxy demands of a request before it routes it: one host, named consistently.
//!
//! Routing, the `Host` sent upstream and `X-Forwarded-Host` must always name the same host, or
//! a client could be routed by one name while the upstream (or its access rules) sees another.
//! So, per RFC 9112 §3.2: an HTTP/1.1 request needs exactly one valid `Host`; an absolute-form
//! target's authority replaces the `Host` header (§3.2.2); an HTTP/2 `:authority` and a `Host`
//! that disagree are malformed (RFC 9113 §8.3.1). `CONNECT` is refused: Kanali does not tunnel,
//! and a connection left open after refusing it would parse the tunnel's bytes as requests.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};

use crate::body::ProxyBody;

/// Why a request is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `CONNECT`: not a proxy for tunnels (405).
    Connect,
    /// More than one `Host` header (400).
    TwoHosts,
    /// HTTP/1.1 without `Host` (400).
    NoHost,
    /// A `Host` (or target authority) that is not `host[:port]` (400).
    BadHost,
    /// HTTP/2 `:authority` and `Host` name different hosts (400).
    HostMismatch,
    /// The body is malformed or ended early (400).
    BadBody,
    /// The body did not arrive in time (408).
    BodyTimeout,
}

impl Refusal {
    /// The status and the reason shown to the client.
    fn describe(self) -> (StatusCode, &'static str) {
        match self {
            Refusal::Connect => (
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: Kanali does not open tunnels\n",
            ),
            Refusal::TwoHosts => (
                StatusCode::BAD_REQUEST,
                "more than one Host header (RFC 9112 section 3.2)\n",
            ),
            Refusal::NoHost => (
                StatusCode::BAD_REQUEST,
                "an HTTP/1.1 request needs a Host header (RFC 9112 section 3.2)\n",
            ),
            Refusal::BadHost => (
                StatusCode::BAD_REQUEST,
                "the Host header (or the request target's authority) is not host[:port]\n",
            ),
            Refusal::HostMismatch => (
                StatusCode::BAD_REQUEST,
                "the :authority and the Host header name different hosts (RFC 9113 section 8.3.1)\n",
            ),
            Refusal::BadBody => (
                StatusCode::BAD_REQUEST,
                "the request body is malformed or shorter than announced\n",
            ),
            Refusal::BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time\n",
            ),
        }
    }

    /// The response: plain text, and for HTTP/1.x the end of the connection, whose framing
    /// can no longer be trusted (or, after CONNECT, whose next bytes belong to a tunnel).
    pub fn response(self, version: Version) -> Response<ProxyBody> {
        let (status, text) = self.describe();
        let mut resp = Response::new(ProxyBody::from(Bytes::from_static(text.as_bytes())));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self == Refusal::Connect {
            headers.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"),
            );
        }
        // HTTP/2 has no connection-level headers: the stream ends and the connection is fine.
        if version < Version::HTTP_2 {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The host the client addressed, after checking the request names it once and consistently:
/// the target's authority (absolute-form, or HTTP/2 `:authority`) or the `Host` header.
/// `None`: an HTTP/1.0 request that names no host (allowed).
pub fn host<B>(req: &Request<B>) -> Result<Option<&str>, Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::Connect);
    }
    checked_host(req.version(), req.uri(), req.headers())
}

/// [`host`], on a request taken apart.
pub fn host_of(parts: &http::request::Parts) -> Result<Option<&str>, Refusal> {
    if parts.method == Method::CONNECT {
        return Err(Refusal::Connect);
    }
    checked_host(parts.version, &parts.uri, &parts.headers)
}

fn checked_host<'a>(
    version: Version,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::TwoHosts);
    }
    let header = match header {
        // `to_str` checks for visible ASCII, a few instructions a byte; `str::from_utf8` cost
        // ~150 on a short host. A host is ASCII anyway: anything else is refused.
        Some(v) => Some(valid_host(v.to_str().map_err(|_| Refusal::BadHost)?)?),
        None if version == Version::HTTP_11 => return Err(Refusal::NoHost),
        None => None,
    };
    match uri.authority() {
        Some(authority) => {
            let target = valid_host(authority.as_str())?;
            // HTTP/1.1 absolute-form: the target wins over Host (RFC 9112 §3.2.2). HTTP/2: two
            // names for one request must agree.
            if version == Version::HTTP_2 && header.is_some_and(|h| !h.eq_ignore_ascii_case(target))
            {
                return Err(Refusal::HostMismatch);
            }
            Ok(Some(target))
        }
        None => Ok(header),
    }
}

/// The bytes of a reg-name or an IPv4 address (RFC 3986: unreserved, sub-delims and `%`), as a
/// table: checked for every request's host, byte by byte.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            );
        b += 1;
    }
    table
};

/// `host[:port]`: an authority without user information (RFC 3986 §3.2.2: a reg-name, an
/// IPv4 address or a bracketed IPv6 literal, then an optional numeric port). Checked by hand,
/// in one pass over the bytes: `http::uri::Authority` copies the text into a new buffer, and
/// a check by `str` methods (split at the last `:`, parse the port) went over it three times.
fn valid_host(text: &str) -> Result<&str, Refusal> {
    let ok = match text.as_bytes().split_first() {
        Some((b'[', rest)) => match memchr::memchr(b']', rest) {
            Some(end) => {
                let literal = &rest[..end];
                !literal.is_empty()
                    && literal
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                    && valid_port(&rest[end + 1..])
            }
            None => false,
        },
        _ => {
            let bytes = text.as_bytes();
            let name = bytes
                .iter()
                .position(|&b| !REG_NAME[usize::from(b)])
                .unwrap_or(bytes.len());
            name > 0 && valid_port(&bytes[name..])
        }
    };
    if ok { Ok(text) } else { Err(Refusal::BadHost) }
}

/// What follows a host: nothing, or `:` and a port of digits that fits in 16 bits (RFC 3986
/// allows it empty).
fn valid_port(rest: &[u8]) -> bool {
    match rest.split_first() {
        None => true,
        Some((b':', digits)) => {
            digits.iter().all(u8::is_ascii_digit)
                // Digit strings of one length compare as their numbers do.
                && (digits.len() < 5 || (digits.len() == 5 && digits <= b"65535".as_slice()))
        }
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(target).version(version);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn one_valid_host_is_required_of_http_1_1() {
        let v11 = Version::HTTP_11;
        assert_eq!(host(&req(v11, "/x", &["a.example"])), Ok(Some("a.example")));
        assert_eq!(
            host(&req(v11, "/x", &["a.example:8080"])),
            Ok(Some("a.example:8080"))
        );
        assert_eq!(host(&req(v11, "/x", &[])), Err(Refusal::NoHost));
        assert_eq!(host(&req(v11, "/x", &["a", "b"])), Err(Refusal::TwoHosts));
        assert_eq!(host(&req(v11, "/x", &["a", "a"])), Err(Refusal::TwoHosts));
        for ok in [
            "[::1]:8080",
            "[2001:db8::1]",
            "[::1]:",
            "10.0.0.1:80",
            "a.example:",
            "a.example:0",
            "a.example:00080",
            "a.example:65535",
        ] {
            assert_eq!(host(&req(v11, "/x", &[ok])), Ok(Some(ok)), "{ok:?}");
        }
        for bad in [
            "",
            "a b",
            "user@a.example",
            "a.example:port",
            "a/b",
            "a:b:c",
            "[::1",
            "[zz]",
            "[::1]x",
            "a.example:99999",
            "a.example:65536",
            "a.example:080800",
            "a.example:-1",
            "[::1]:65536",
            "[::1]:x",
            "[]",
            ":80",
            "ünï.example",
            "a\texample",
        ] {
            assert_eq!(
                host(&req(v11, "/x", &[bad])),
                Err(Refusal::BadHost),
                "{bad:?}"
            );
        }
        // HTTP/1.0 may name no host.
        assert_eq!(host(&req(Version::HTTP_10, "/x", &[])), Ok(None));
    }

    #[test]
    fn an_absolute_form_target_names_the_host() {
        let v11 = Version::HTTP_11;
        let r = req(v11, "http://evil.example/vh/x", &["a.example"]);
        assert_eq!(host(&r), Ok(Some("evil.example")));
        let r = req(v11, "http://user@evil.example/vh/x", &["a.example"]);
        assert_eq!(host(&r), Err(Refusal::BadHost));
    }

    #[test]
    fn http_2_authority_and_host_must_agree() {
        let v2 = Version::HTTP_2;
        assert_eq!(
            host(&req(v2, "http://a.example/x", &[])),
            Ok(Some("a.example"))
        );
        assert_eq!(
            host(&req(v2, "http://a.example/x", &["A.example"])),
            Ok(Some("a.example"))
        );
        assert_eq!(
            host(&req(v2, "http://a.example/x", &["b.example"])),
            Err(Refusal::HostMismatch)
        );
    }

    #[test]
    fn connect_is_refused_and_closes_http_1() {
        let r = Request::connect("a.example:443")
            .header(header::HOST, "a.example:443")
            .body(())
            .unwrap();
        assert_eq!(host(&r), Err(Refusal::Connect));
        let resp = Refusal::Connect.response(Version::HTTP_11);
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        assert!(resp.headers().contains_key(header::ALLOW));
        let resp = Refusal::TwoHosts.response(Version::HTTP_2);
        assert!(!resp.headers().contains_key(header::CONNECTION));
    }
}
