//! Header rewriting between client and upstream.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the legacy ones): they describe one connection and
/// must not be forwarded. `Upgrade` too: upgrades are not proxied. Not `Trailer` (RFC 2616
/// listed it; RFC 9110 does not): it declares the fields a chunked body ends with, and hyper
/// sends an HTTP/1.1 client only the trailers it declares.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The lengths of the names in [`HOP_BY_HOP`].
const HOP_LENGTHS: [usize; 7] = [2, 7, 10, 16, 17, 18, 19];

/// Which of [`HOP_BY_HOP`] `name` is (its bit), if any; `extra` gets the bit after them.
fn hop_bit(name: &HeaderName, extra: Option<&HeaderName>) -> u16 {
    // One pass over a request's handful of headers decides what to do. Most names are ruled
    // out by their length alone (no hop-by-hop name is 4, 12, 14 or 15 bytes long: Host,
    // Date, Content-Type, Content-Length, Accept-Encoding...), before comparing with nine.
    let len = name.as_str().len();
    if !HOP_LENGTHS.contains(&len) && extra.is_none_or(|e| e.as_str().len() != len) {
        return 0;
    }
    match HOP_BY_HOP.iter().position(|h| h == name) {
        Some(i) => 1 << i,
        None if extra == Some(name) => 1 << HOP_BY_HOP.len(),
        None => 0,
    }
}

/// Removes hop-by-hop headers and every header the `Connection` header names (and `extra`,
/// if given: a header the proxy never forwards). One pass finds which are present; only
/// those are removed, and the common `Connection: keep-alive` / `close` costs no allocation.
/// Returns whether the `Connection` header named any header (which may have been any, even
/// `Host`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, extra: Option<&HeaderName>) -> bool {
    let present = headers
        .keys()
        .fold(0u16, |acc, name| acc | hop_bit(name, extra));
    if present == 0 {
        return false;
    }
    let mut named_any = false;
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The list is removed anyway, and `close` names no header.
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| t.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        named_any = !named.is_empty();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if let Some(extra) = extra
        && present & (1 << HOP_BY_HOP.len()) != 0
    {
        headers.remove(extra);
    }
    named_any
}

/// How many headers the proxy may add to a request on its way upstream (`X-Forwarded-For`,
/// `-Proto`, `-Host`, the correlation id, `Host`) or to a response on its way back (the
/// correlation id, the Service cardinality): a parsed head's map is made with this much room
/// beyond its own fields, so those inserts never grow (rehash) it.
pub const ADDED_HEADERS: usize = 5;

/// Name of the forwarded-for header.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Name of the forwarded-proto header.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Name of the forwarded-host header.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Correlation id on every response (and forwarded upstream).
pub static X_KANALI_CORRELATION_ID: HeaderName = HeaderName::from_static("x-kanali-correlation-id");

/// The client's address as an `X-Forwarded-For` value, made once per connection.
pub fn forwarded_for(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string()).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Sets the `X-Forwarded-*` headers: the client address (`client`, from [`forwarded_for`]) is
/// appended to any existing chain (folded into one header); proto and host describe what
/// this proxy saw and replace any client-supplied value, which could not be trusted.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    // Most requests come without a chain: the connection's value as it is, no allocation.
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(entry) => {
            entry.insert(client.clone());
        }
        header::Entry::Occupied(_) => {
            let mut chain = String::new();
            for v in headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
            {
                chain.push_str(v);
                chain.push_str(", ");
            }
            chain.push_str(client.to_str().unwrap_or("-"));
            if let Ok(v) = HeaderValue::from_str(&chain) {
                headers.insert(&X_FORWARDED_FOR, v);
            }
        }
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(v) => {
            headers.insert(&X_FORWARDED_HOST, v.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        h.insert("apikey", HeaderValue::from_static("secret"));
        let apikey = HeaderName::from_static("apikey");
        assert!(
            strip_hop_by_hop(&mut h, Some(&apikey)),
            "Connection named x-secret"
        );
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        // Nothing to strip: nothing touched; `close` names no header.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("close", HeaderValue::from_static("kept"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        assert!(!strip_hop_by_hop(&mut h, Some(&apikey)));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn the_length_filter_knows_every_hop_by_hop_name() {
        for name in &HOP_BY_HOP {
            assert!(HOP_LENGTHS.contains(&name.as_str().len()), "{name}");
        }
    }

    #[test]
    fn forwarded_headers_append_and_replace() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let client = forwarded_for("127.0.0.1".parse().unwrap());
        set_forwarded(
            &mut h,
            &client,
            "http",
            Some(&HeaderValue::from_static("api.example.org")),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "api.example.org");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &client, "https", None);
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1");
    }
}
