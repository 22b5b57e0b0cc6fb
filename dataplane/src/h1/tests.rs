use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
use crate::body::{RequestBody, UpstreamBody};
use crate::upstream::pool::{InFlight, PoolKey, PoolSettings};

// ---- parsing, pure ----

fn head(bytes: &str) -> Head {
    head_of(bytes, false)
}

fn take(
    bytes: impl AsRef<[u8]>,
    head_request: bool,
) -> (Result<Option<Option<Head>>, H1Error>, BytesMut) {
    let mut buf = BytesMut::from(bytes.as_ref());
    let taken = take_head(
        &mut buf,
        head_request,
        &mut Vec::new(),
        &mut HeaderMap::new(),
    );
    (taken, buf)
}

/// The head of `bytes`, its fields all in its map (the raw ones taken into it), as what
/// reads a response as a map sees them.
fn head_of(bytes: &str, head_request: bool) -> Head {
    let mut head = raw_head_of(bytes, head_request);
    if let Some(raw) = head.raw.take() {
        head.headers = raw.into_map(std::mem::take(&mut head.headers));
    }
    head
}

/// The head of `bytes` as it is taken.
fn raw_head_of(bytes: &str, head_request: bool) -> Head {
    match take(bytes, head_request) {
        (Ok(Some(Some(head))), rest) => {
            assert!(rest.is_empty(), "the whole head is consumed");
            head
        }
        other => panic!("{bytes:?}: {other:?}"),
    }
}

fn refused(bytes: &str) -> String {
    match take(bytes, false).0 {
        Err(e) => e.to_string(),
        other => panic!("{bytes:?} was accepted: {other:?}"),
    }
}

/// `Title-Case` of a lowercase name, as most clients and servers spell it.
fn title_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper { c.to_ascii_uppercase() } else { c });
        upper = c == '-';
    }
    out
}

#[test]
fn field_names_read_as_from_bytes_reads_them() {
    // Every name the http crate knows (so every one `field_name` could match), in the
    // spellings that reach the proxy, and names it does not know.
    let known = [
        header::ACCEPT,
        header::ACCEPT_CHARSET,
        header::ACCEPT_ENCODING,
        header::ACCEPT_LANGUAGE,
        header::ACCEPT_RANGES,
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        header::ACCESS_CONTROL_MAX_AGE,
        header::ACCESS_CONTROL_REQUEST_HEADERS,
        header::ACCESS_CONTROL_REQUEST_METHOD,
        header::AGE,
        header::ALLOW,
        header::ALT_SVC,
        header::AUTHORIZATION,
        header::CACHE_CONTROL,
        header::CACHE_STATUS,
        header::CDN_CACHE_CONTROL,
        header::CONNECTION,
        header::CONTENT_DISPOSITION,
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
        header::CONTENT_LENGTH,
        header::CONTENT_LOCATION,
        header::CONTENT_RANGE,
        header::CONTENT_SECURITY_POLICY,
        header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
        header::CONTENT_TYPE,
        header::COOKIE,
        header::DNT,
        header::DATE,
        header::ETAG,
        header::EXPECT,
        header::EXPIRES,
        header::FORWARDED,
        header::FROM,
        header::HOST,
        header::IF_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_NONE_MATCH,
        header::IF_RANGE,
        header::IF_UNMODIFIED_SINCE,
        header::LAST_MODIFIED,
        header::LINK,
        header::LOCATION,
        header::MAX_FORWARDS,
        header::ORIGIN,
        header::PRAGMA,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::PUBLIC_KEY_PINS,
        header::PUBLIC_KEY_PINS_REPORT_ONLY,
        header::RANGE,
        header::REFERER,
        header::REFERRER_POLICY,
        header::REFRESH,
        header::RETRY_AFTER,
        header::SEC_WEBSOCKET_ACCEPT,
        header::SEC_WEBSOCKET_EXTENSIONS,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_PROTOCOL,
        header::SEC_WEBSOCKET_VERSION,
        header::SERVER,
        header::SET_COOKIE,
        header::STRICT_TRANSPORT_SECURITY,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::USER_AGENT,
        header::UPGRADE,
        header::UPGRADE_INSECURE_REQUESTS,
        header::VARY,
        header::VIA,
        header::WARNING,
        header::WWW_AUTHENTICATE,
        header::X_CONTENT_TYPE_OPTIONS,
        header::X_DNS_PREFETCH_CONTROL,
        header::X_FRAME_OPTIONS,
        header::X_XSS_PROTECTION,
    ];
    let mut spellings: Vec<String> = Vec::new();
    for name in known.iter().map(HeaderName::as_str).chain([
        "x-forwarded-for",
        "x-forwarded-proto",
        "keep-alive",
        "apikey",
        "x-request-id",
        "a",
    ]) {
        spellings.push(name.to_owned());
        spellings.push(title_case(name));
        spellings.push(name.to_ascii_uppercase());
    }
    // The same lengths as matched names, one byte off; and names that are not names.
    spellings.extend(
        [
            "Hosu",
            "Dat\u{e9}",
            "ETaG",
            "Content-Lengtx",
            "Content-Length ",
            "Host:",
            "",
            "ho st",
        ]
        .map(str::to_owned),
    );
    spellings.push("ETag".to_owned());
    let mut matched = 0;
    for spelling in &spellings {
        let ours = field_name(spelling.as_bytes());
        let theirs = HeaderName::from_bytes(spelling.as_bytes());
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{spelling:?}"),
            (Err(_), Err(_)) => {}
            _ => panic!("{spelling:?}: {ours:?} against {theirs:?}"),
        }
        matched += usize::from(ours.is_ok());
    }
    assert!(matched > 250, "{matched}");
}

#[test]
fn content_lengths_are_digits_without_overflow() {
    assert_eq!(parse_length(b"0"), Some(0));
    assert_eq!(parse_length(b"1234"), Some(1234));
    assert_eq!(parse_length(b"18446744073709551615"), None, "20 digits");
    assert_eq!(
        parse_length(b"9999999999999999999"),
        Some(9_999_999_999_999_999_999)
    );
    for bad in [&b""[..], b"+1", b"-1", b"1 2", b"0x10", b"1.0"] {
        assert_eq!(parse_length(bad), None, "{bad:?}");
    }
}

#[test]
fn chunk_sizes_are_hex_with_optional_extensions() {
    assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
    assert_eq!(parse_chunk_size(b"0").unwrap(), 0);
    assert_eq!(parse_chunk_size(b"A;name=value").unwrap(), 10);
    assert_eq!(parse_chunk_size(b"a ; name").unwrap(), 10);
    assert_eq!(parse_chunk_size(b"ffffffffffffffff").unwrap(), u64::MAX);
    for bad in [
        &b""[..],
        b"g",
        b";x",
        b"1 2",
        b"10000000000000000",
        b"-1",
        b"0x1",
    ] {
        assert!(parse_chunk_size(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn response_heads_frame_their_bodies_as_rfc_9112_says() {
    let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\n");
    assert_eq!(h.status, 200);
    assert!(matches!(h.state, State::Length(5)) && h.keep_alive);
    assert_eq!(h.headers["x-a"], "1");

    // The same length twice, in one field or two, is one length.
    let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\nContent-Length: 5\r\n\r\n");
    assert!(matches!(h.state, State::Length(5)));

    // Transfer-Encoding wins over Content-Length, which is not passed on.
    let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n");
    assert!(matches!(h.state, State::Chunked(Chunk::Size)) && h.keep_alive);
    assert!(!h.headers.contains_key(header::CONTENT_LENGTH));

    // Not chunked last: the body runs to the end of the connection.
    let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
    assert!(matches!(h.state, State::Eof) && !h.keep_alive);
    let h =
        head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n");
    assert!(matches!(h.state, State::Chunked(_)));

    // No framing at all: to the end of the connection.
    let h = head("HTTP/1.1 200 OK\r\n\r\n");
    assert!(matches!(h.state, State::Eof) && !h.keep_alive);

    // Connection: close, and HTTP/1.0 unless it asks to keep alive.
    assert!(
        !head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: x, close\r\n\r\n").keep_alive
    );
    assert!(!head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
    let h = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\nConnection: Keep-Alive\r\n\r\n");
    assert!(h.keep_alive && h.version == Version::HTTP_10);

    // No body whatever the headers say: HEAD, 204, 304.
    let h = head_of("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", true);
    assert!(matches!(h.state, State::Length(0)) && h.keep_alive);
    assert_eq!(
        h.headers[header::CONTENT_LENGTH],
        "10",
        "a HEAD answer keeps its length"
    );
    for status in [204, 304] {
        let h = head(&format!(
            "HTTP/1.1 {status} X\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
        assert!(
            matches!(h.state, State::Length(0)) && h.keep_alive,
            "{status}"
        );
    }
}

#[test]
fn informational_responses_are_skipped_and_partial_heads_wait() {
    let (taken, rest) = take("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", false);
    assert!(matches!(taken, Ok(Some(None))) && rest == "HTTP/1.1 200");
    let partial = "HTTP/1.1 200 OK\r\ncontent-len";
    let (taken, rest) = take(partial, false);
    assert!(
        matches!(taken, Ok(None)) && rest == partial,
        "nothing taken"
    );
    assert!(matches!(take("", false).0, Ok(None)));
}

#[test]
fn malformed_and_ambiguous_heads_are_refused() {
    assert!(
        refused("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n")
            .contains("conflicting")
    );
    assert!(refused("HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n").contains("conflicting"));
    assert!(refused("HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n").contains("Content-Length"));
    assert!(refused("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n").contains("101"));
    // obs-fold, a space before the colon, no status code, a bad version.
    for bad in [
        "HTTP/1.1 200 OK\r\nx-a: 1\r\n  folded\r\n\r\n",
        "HTTP/1.1 200 OK\r\nx-a : 1\r\n\r\n",
        "HTTP/1.1 OK\r\n\r\n",
        "HTTP/2.0 200 OK\r\n\r\n",
        "SMTP ready\r\n\r\n",
    ] {
        refused(bad);
    }
    let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
    assert!(refused(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).contains("100"));
}

/// Feeds `wire` to the chunked decoder `step` bytes at a time; returns the data and trailers.
fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>, BytesMut), H1Error> {
    let mut state = State::Chunked(Chunk::Size);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut trailers = None;
    let mut fed = 0;
    loop {
        match state.decode(&mut buf)? {
            Decoded::Data(d) => data.extend_from_slice(&d),
            Decoded::Trailers(t) => trailers = Some(t),
            Decoded::End => return Ok((data, trailers, buf)),
            Decoded::NeedMore if fed >= wire.len() => return Err(H1Error::Truncated),
            Decoded::NeedMore => {
                let n = step.min(wire.len() - fed);
                buf.extend_from_slice(&wire[fed..fed + n]);
                fed += n;
            }
        }
    }
}

#[test]
fn chunked_bodies_decode_however_they_are_split() {
    let wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-check: 42\r\nx-more: a\r\n\r\nNEXT";
    for step in [1, 2, 3, 7, wire.len()] {
        let (data, trailers, left) = dechunk(wire, step).unwrap();
        assert_eq!(data, b"hello world", "step {step}");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["x-check"], "42");
        assert_eq!(trailers["x-more"], "a");
        // What follows the body stays in the buffer, unread.
        assert!(b"NEXT".starts_with(&left), "step {step}: {left:?}");
    }
    let (data, trailers, _) = dechunk(b"3\r\nabc\r\n0\r\n\r\n", 1).unwrap();
    assert_eq!((data.as_slice(), trailers.is_none()), (&b"abc"[..], true));
    // A large chunk comes out in pieces, without copying it whole first.
    let big = vec![b'x'; 100_000];
    let mut wire = format!("{:x}\r\n", big.len()).into_bytes();
    wire.extend_from_slice(&big);
    wire.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_eq!(dechunk(&wire, 8192).unwrap().0, big);
}

#[test]
fn malformed_chunked_bodies_are_errors() {
    for bad in [
        &b"5\r\nhelloXX0\r\n\r\n"[..],       // data longer than its size
        b"5\nhello\r\n0\r\n\r\n",            // size line without CR
        b"zz\r\n",                           // not hex
        b"10000000000000000\r\n",            // 17 hex digits
        b"0\r\nbad trailer\r\n\r\n",         // a trailer that is no field
        b"3\r\nabc\r\n0\r\nx: \x01\r\n\r\n", // control character in a trailer
    ] {
        assert!(
            matches!(dechunk(bad, 1), Err(H1Error::Invalid(_))),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = vec![b'1'; MAX_CHUNK_LINE + 2];
    assert!(matches!(dechunk(&long, 512), Err(H1Error::Invalid(_))));
}

#[test]
fn request_heads_carry_the_true_length_of_what_is_sent() {
    let req = |method: &str, headers: &[(&str, &str)]| {
        let mut b = Request::builder().method(method).uri("/a/b?c=d%20e");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    };
    let mut out = Vec::new();
    encode_head(
        &mut out,
        &req("GET", &[("host", "up"), ("x-a", "1")]),
        None,
        None,
    );
    assert_eq!(
        out,
        b"GET /a/b?c=d%20e HTTP/1.1\r\nhost: up\r\nx-a: 1\r\n\r\n"
    );

    // A stale length (a plugin changed the body) and a transfer coding are replaced.
    out.clear();
    let body = Bytes::from_static(b"hello");
    let parts = req(
        "POST",
        &[
            ("content-length", "999"),
            ("transfer-encoding", "chunked"),
            ("host", "up"),
        ],
    );
    encode_head(&mut out, &parts, None, Some(&body));
    assert_eq!(
        out,
        b"POST /a/b?c=d%20e HTTP/1.1\r\nhost: up\r\ncontent-length: 5\r\n\r\n"
    );

    // No body: a declared length stays, as 0; none is added where there was none.
    out.clear();
    encode_head(
        &mut out,
        &req("POST", &[("content-length", "0")]),
        None,
        None,
    );
    assert_eq!(
        out,
        b"POST /a/b?c=d%20e HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
    );
    out.clear();
    encode_head(&mut out, &req("DELETE", &[]), None, None);
    assert_eq!(out, b"DELETE /a/b?c=d%20e HTTP/1.1\r\n\r\n");
}

// ---- exchanges over real sockets ----

/// An upstream on loopback that runs `script` on every connection it accepts (with the
/// connection's number, from 0).
async fn upstream<F, Fut>(script: F) -> (std::net::SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(script(stream, n));
        }
    });
    (addr, accepted)
}

/// Reads one request (head, and a body of its Content-Length) from `stream`; `None` at EOF.
async fn read_request(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        read_more(stream, buf).await?;
    };
    let len: usize = String::from_utf8_lossy(&buf[..end])
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < end + len {
        read_more(stream, buf).await?;
    }
    let whole = String::from_utf8_lossy(&buf[..end + len]).into_owned();
    buf.drain(..end + len);
    Some(whole)
}

/// Reads one request and answers it with `bytes`; nothing at EOF.
async fn reply_once(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, bytes: &[u8]) {
    if read_request(stream, buf).await.is_some() {
        stream.write_all(bytes).await.unwrap();
    }
}

/// Appends what one read gives to `buf`; `None` at EOF or on an error.
async fn read_more(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut more = [0u8; 4096];
    let n = stream.read(&mut more).await.ok()?;
    (n > 0).then(|| buf.extend_from_slice(&more[..n]))
}

fn pool(addr: std::net::SocketAddr) -> Arc<HostPool> {
    let key = PoolKey {
        https: false,
        dial: addr.to_string().into(),
        authority: addr.to_string().into(),
        tls: "".into(),
    };
    let settings = PoolSettings {
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_idle: 8,
        workers: 1,
    };
    Arc::new(HostPool::new(key, None, settings).unwrap())
}

/// `method path` for host `up`, with `body` wholly in hand.
fn request(method: &str, path: &str, body: Option<&'static str>) -> Request<RequestBody> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "up")
        .body(RequestBody::complete(
            body.map(|b| Bytes::from_static(b.as_bytes())),
        ))
        .unwrap()
}

fn get(method: &str, body: Option<&'static str>) -> Request<RequestBody> {
    request(method, "/x", body)
}

/// Sends `req` through `pool` and reads the whole body of its answer.
async fn answer(pool: &Arc<HostPool>, req: Request<RequestBody>) -> String {
    text(pool.send(req, None, None).await.unwrap().0)
        .await
        .unwrap()
}

async fn text(resp: Response<UpstreamBody>) -> Result<String, String> {
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

#[tokio::test]
async fn keep_alive_connections_are_reused_and_split_responses_reassemble() {
    let (addr, accepted) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        let mut n = 0;
        while let Some(req) = read_request(&mut s, &mut buf).await {
            n += 1;
            let body = format!("{n}:{}", req.lines().next().unwrap());
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            // The head in two writes and the body byte by byte: reads see every split.
            let (a, b) = resp.split_at(9);
            s.write_all(a.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            for chunk in b.as_bytes().chunks(7) {
                s.write_all(chunk).await.unwrap();
            }
        }
    })
    .await;
    let pool = pool(addr);
    for i in 1..=3 {
        let (resp, _) = pool.send(get("GET", None), None, None).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(text(resp).await.unwrap(), format!("{i}:GET /x HTTP/1.1"));
    }
    assert_eq!(
        answer(&pool, get("POST", Some("hello"))).await,
        "4:POST /x HTTP/1.1"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection for all four"
    );
}

#[tokio::test]
async fn chunked_and_close_delimited_bodies_stream_and_only_the_first_keeps_its_connection() {
    let (addr, accepted) = upstream(|mut s, conn| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            if req.starts_with("GET /chunked") {
                s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                s.write_all(b"5\r\npedia\r\n0\r\nx-sum: 9\r\n\r\n")
                    .await
                    .unwrap();
            } else {
                let body = format!("until close on {conn}");
                s.write_all(format!("HTTP/1.1 200 OK\r\n\r\n{body}").as_bytes())
                    .await
                    .unwrap();
                return;
            }
        }
    })
    .await;
    let pool = pool(addr);
    let req = |path: &str| request("GET", path, None);
    let (resp, _) = pool.send(req("/chunked"), None, None).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-sum"], "9");
    assert_eq!(collected.to_bytes(), "wikipedia");
    assert_eq!(
        answer(&pool, req("/eof")).await,
        "until close on 0",
        "chunked kept the connection"
    );
    assert_eq!(
        answer(&pool, req("/eof")).await,
        "until close on 1",
        "close-delimited did not"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_extra_bytes_are_not_trusted() {
    let (addr, accepted) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut s, &mut buf).await {
            if req.starts_with("GET /short") {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                    .await
                    .unwrap();
                return;
            }
            // Two bytes more than framed: the connection is not used again.
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokXX")
                .await
                .unwrap();
        }
    })
    .await;
    let pool = pool(addr);
    let req = |path: &str| request("GET", path, None);
    let (resp, _) = pool.send(req("/short"), None, None).await.unwrap();
    assert!(
        text(resp)
            .await
            .unwrap_err()
            .contains("before the body ended")
    );
    assert_eq!(answer(&pool, req("/extra")).await, "ok");
    assert_eq!(answer(&pool, req("/extra")).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// An upstream whose every connection answers its first request `ok`, then reads the next
/// and closes without answering.
async fn answers_once_then_closes() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        reply_once(
            &mut s,
            &mut buf,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )
        .await;
        let _ = read_request(&mut s, &mut buf).await;
    })
    .await
}

#[tokio::test]
async fn a_reused_connection_that_closes_unanswered_retries_only_what_may_be_repeated() {
    // Every connection answers its first request, then reads the next and closes without
    // answering (an upstream's keep-alive timeout racing the request).
    let (addr, accepted) = answers_once_then_closes().await;
    let pool = pool(addr);
    assert_eq!(answer(&pool, get("GET", None)).await, "ok");
    // The GET goes again on a new connection.
    assert_eq!(answer(&pool, get("GET", None)).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // A POST may have been acted on: it is not sent twice.
    let error = pool
        .send(get("POST", Some("x")), None, None)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("closed the connection before responding"),
        "{error}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_connection_closed_while_idle_is_not_used() {
    let (addr, accepted) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        reply_once(
            &mut s,
            &mut buf,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )
        .await;
        // Closes at once, while the proxy holds the connection idle.
    })
    .await;
    let pool = pool(addr);
    for _ in 0..2 {
        assert_eq!(answer(&pool, get("POST", Some("x"))).await, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The second POST went on a new connection without an error: the FIN was seen first.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// An upstream that answers every request on a connection with "ok", then reports whether
/// the proxy closed its side — rather than the upstream — within a bound far above any sweep.
/// With `half_close`, it half-closes each connection after its first answer, as an upstream's
/// keep-alive timeout does.
async fn closing_upstream(
    half_close: bool,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::mpsc::UnboundedReceiver<bool>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (addr, accepted) = upstream(move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            let bound = Duration::from_secs(30);
            let mut answered = false;
            loop {
                match tokio::time::timeout(bound, read_request(&mut s, &mut buf)).await {
                    Ok(Some(_)) => {
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                        if half_close && !answered {
                            // Once the connection waits in the pool.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            s.shutdown().await.unwrap();
                        }
                        answered = true;
                    }
                    // The proxy closed it.
                    Ok(None) => break tx.send(true).unwrap(),
                    Err(_) => break tx.send(false).unwrap(),
                }
            }
        }
    })
    .await;
    (addr, accepted, rx)
}

/// Runs `sweep` until it closes a connection, for up to 10 s, and returns what the last run
/// closed: the upstream's FIN reaches the proxy's reactor a moment after it is sent.
async fn sweep_until_one_closes(mut sweep: impl FnMut() -> usize) -> usize {
    for _ in 0..500 {
        let swept = sweep();
        if swept > 0 {
            return swept;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    0
}

#[tokio::test]
async fn the_sweep_closes_idle_connections_the_upstream_closed() {
    let (addr, accepted, mut closed) = closing_upstream(true).await;
    let pool = pool(addr);
    assert_eq!(answer(&pool, get("GET", None)).await, "ok");
    let swept = sweep_until_one_closes(|| pool.sweep(tokio::time::Instant::now())).await;
    assert_eq!(swept, 1, "the half-closed connection is closed");
    assert_eq!(
        closed.recv().await,
        Some(true),
        "the upstream reads its close"
    );
    assert_eq!(pool.sweep(tokio::time::Instant::now()), 0);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstreams_sweep_the_pools_left_with_idle_connections() {
    let (addr, accepted, mut closed) = closing_upstream(true).await;
    let upstreams = crate::upstream::Upstreams::new(Default::default()).unwrap();
    let pool = upstreams.endpoint(false, &addr.to_string(), None).unwrap();
    assert_eq!(answer(&pool, get("GET", None)).await, "ok");
    // The first sweeps find the connection open and keep the pool listed; a later one finds
    // it half-closed.
    let swept = sweep_until_one_closes(|| upstreams.sweep()).await;
    assert_eq!(swept, 1, "the half-closed connection is closed");
    assert_eq!(
        closed.recv().await,
        Some(true),
        "the upstream reads its close"
    );
    assert_eq!(upstreams.sweep(), 0);
    // Listed again when a connection goes idle in it once more.
    assert_eq!(answer(&pool, get("GET", None)).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let swept = sweep_until_one_closes(|| upstreams.sweep()).await;
    assert_eq!(swept, 1, "the second connection is closed too");
}

#[tokio::test]
async fn the_sweep_closes_connections_idle_past_the_idle_timeout_and_keeps_the_rest() {
    let (addr, accepted, mut closed) = closing_upstream(false).await;
    let pool = pool(addr);
    assert_eq!(answer(&pool, get("GET", None)).await, "ok");
    let now = tokio::time::Instant::now();
    assert_eq!(pool.sweep(now), 0, "open and idle for less than 60 s: kept");
    // Kept where a request finds it.
    assert_eq!(answer(&pool, get("GET", None)).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // The pool's idle timeout is 60 s.
    assert_eq!(pool.sweep(now + Duration::from_secs(61)), 1);
    assert_eq!(
        closed.recv().await,
        Some(true),
        "the upstream reads its close"
    );
    assert_eq!(answer(&pool, get("GET", None)).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the next request dials");
}

#[tokio::test]
async fn bad_responses_are_errors() {
    let (addr, _) = upstream(|mut s, _| async move {
        let mut buf = Vec::new();
        reply_once(
            &mut s,
            &mut buf,
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        )
        .await;
    })
    .await;
    let error = pool(addr)
        .send(get("GET", None), None, None)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("conflicting Content-Length"),
        "{error}"
    );
}

#[test]
fn framing_fields_of_this_hop_stay_out_of_the_forwarded_head() {
    let h = head(
        "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\
         transfer-encoding: chunked\r\nx-a: 1\r\n\r\n",
    );
    assert!(h.keep_alive && matches!(h.state, State::Chunked(_)));
    assert_eq!(h.headers.len(), 1, "{:?}", h.headers);
    // A Connection field that names another field stays, for the hop-by-hop pass to act on.
    let h = head(
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close, x-secret\r\nx-secret: s\r\n\r\n",
    );
    assert!(!h.keep_alive);
    assert_eq!(h.headers[header::CONNECTION], "close, x-secret");
}

#[test]
fn fields_stay_as_they_arrived_unless_a_field_of_this_hop_needs_the_map() {
    let h = raw_head_of(
        "HTTP/1.1 200 OK\r\nServer: up\r\nconnection: keep-alive\r\nContent-Length: 0\r\n\
         Set-Cookie: a\r\nset-cookie: b\r\nX-Empty:\r\n\r\n",
        false,
    );
    assert!(h.headers.is_empty(), "{:?}", h.headers);
    let raw = h.raw.unwrap();
    let fields: Vec<(&[u8], &[u8])> = raw.iter().collect();
    assert_eq!(
        fields,
        [
            (&b"Server"[..], &b"up"[..]),
            (b"Content-Length", b"0"),
            (b"Set-Cookie", b"a"),
            (b"set-cookie", b"b"),
            (b"X-Empty", b""),
        ]
    );
    assert_eq!(raw.get(&header::SET_COOKIE).unwrap(), "a");
    assert_eq!(raw.get_all(&header::SET_COOKIE).count(), 2);
    // The proxy's own fields replace the upstream's of the same name, all of them.
    let mut own = HeaderMap::new();
    own.insert(header::SET_COOKIE, HeaderValue::from_static("mine"));
    own.insert(header::VIA, HeaderValue::from_static("kanali"));
    let map = raw.into_map(own);
    let cookies: Vec<_> = map.get_all(header::SET_COOKIE).iter().collect();
    assert_eq!(cookies, ["mine"]);
    assert_eq!(map[header::SERVER], "up");
    assert_eq!(map[header::VIA], "kanali");
    assert_eq!(map.len(), 5, "{map:?}");

    // A field of the proxy's own rides with them, in place of the upstream's (any case),
    // whether they are written, read or made a map of.
    static ID: HeaderName = HeaderName::from_static("x-kanali-correlation-id");
    let mut raw = raw_head_of(
        "HTTP/1.1 200 OK\r\nX-Kanali-Correlation-Id: theirs\r\nServer: up\r\n\
         x-kanali-correlation-id: theirs too\r\n\r\n",
        false,
    )
    .raw
    .unwrap();
    raw.set_own(&ID, HeaderValue::from_static("ours"));
    let fields: Vec<(&[u8], &[u8])> = raw.iter().collect();
    assert_eq!(
        fields,
        [
            (&b"Server"[..], &b"up"[..]),
            (b"x-kanali-correlation-id", b"ours")
        ]
    );
    assert_eq!(raw.get(&ID).unwrap(), "ours");
    assert_eq!(raw.get_all(&ID).collect::<Vec<_>>(), [b"ours"]);
    let map = raw.into_map(HeaderMap::new());
    assert_eq!(map.get_all(&ID).iter().collect::<Vec<_>>(), ["ours"]);
    assert_eq!(map.len(), 2, "{map:?}");

    // No fields at all: nothing to carry.
    assert!(
        raw_head_of("HTTP/1.1 204 No Content\r\n\r\n", false)
            .raw
            .is_none()
    );

    // Fields of this hop the parse cannot drop: all of them go through a map, for the
    // hop-by-hop pass.
    for hop in [
        "connection: close, x-secret",
        "Upgrade: h2c",
        "TE: trailers",
        "Proxy-Connection: keep-alive",
        "proxy-authenticate: Basic",
        "Proxy-Authorization: Basic eA==",
    ] {
        let h = raw_head_of(
            &format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n{hop}\r\nx-secret: s\r\n\r\n"),
            false,
        );
        assert!(h.raw.is_none(), "{hop}");
        assert_eq!(h.headers.len(), 3, "{hop}: {:?}", h.headers);
    }
}

#[test]
fn what_httparse_takes_in_a_field_http_takes_too() {
    // Raw fields skip `HeaderName` and `HeaderValue`'s checks: they rely on httparse having
    // made the same ones. Every byte, in a name and in a value.
    let (mut names, mut values) = (0, 0);
    for b in 0..=255u8 {
        let mut name = b"HTTP/1.1 200 OK\r\nx".to_vec();
        name.extend_from_slice(&[b, b'y', b':', b' ', b'v', b'\r', b'\n', b'\r', b'\n']);
        if let Ok(Some(Some(h))) = take(&name, false).0 {
            names += 1;
            for (n, v) in h.raw.iter().flat_map(RawFields::iter) {
                assert!(HeaderName::from_bytes(n).is_ok(), "name byte {b:#x}");
                assert!(field_name(n).is_ok(), "name byte {b:#x}");
                assert!(HeaderValue::from_bytes(v).is_ok());
            }
        }
        let mut value = b"HTTP/1.1 200 OK\r\nx: a".to_vec();
        value.extend_from_slice(&[b, b'b', b'\r', b'\n', b'\r', b'\n']);
        if let Ok(Some(Some(h))) = take(&value, false).0 {
            values += 1;
            for (_, v) in h.raw.iter().flat_map(RawFields::iter) {
                assert!(HeaderValue::from_bytes(v).is_ok(), "value byte {b:#x}");
            }
        }
    }
    // The 77 token characters (and `:`, which ends the name early); tab, and every byte
    // from space up but DEL.
    assert_eq!((names, values), (78, 224));
}

#[tokio::test]
async fn a_request_counts_against_its_pool_until_its_response_head_is_in() {
    // The balancer picks the address with the fewest requests in flight, so a request counts
    // from the moment it is sent until its answer starts: on a fresh connection and on a
    // reused one (the path most requests take).
    let (release, released) = tokio::sync::mpsc::unbounded_channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(released));
    let (addr, _) = upstream(move |mut s, _| {
        let released = released.clone();
        async move {
            let mut buf = Vec::new();
            while read_request(&mut s, &mut buf).await.is_some() {
                released.lock().await.recv().await;
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
        }
    })
    .await;
    let pool = pool(addr);
    for round in ["fresh", "reused"] {
        let sent = tokio::spawn({
            let pool = pool.clone();
            async move { answer(&pool, get("GET", None)).await }
        });
        let counted = async {
            while pool.in_flight() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), counted)
            .await
            .unwrap_or_else(|_| panic!("{round}: not counted while it waits"));
        release.send(()).unwrap();
        assert_eq!(sent.await.unwrap(), "ok", "{round}");
        assert_eq!(pool.in_flight(), 0, "{round}: counted after its answer");
    }
}

#[tokio::test]
async fn what_a_request_keeps_comes_back_beside_its_response_head() {
    // A Service's balancer counts a request against the address it chose until the response
    // body is done: the pool hands that guard back with the head, whether the request went
    // on the first connection or was sent again on a fresh one.
    let (addr, accepted) = answers_once_then_closes().await;
    let pool = pool(addr);
    for (round, connections) in [("first", 1), ("sent again", 2)] {
        let keep = InFlight::new(&pool);
        let (resp, kept) = pool.send(get("GET", None), None, Some(keep)).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), connections, "{round}");
        assert!(kept.is_some(), "{round}: not handed back");
        // Only the guard counts now: the pool's own count ended with the head.
        assert_eq!(pool.in_flight(), 1, "{round}: not held");
        assert_eq!(text(resp).await.unwrap(), "ok", "{round}");
        drop(kept);
        assert_eq!(pool.in_flight(), 0, "{round}");
    }
}

#[test]
fn fields_that_came_as_the_proxy_writes_them_are_copied_as_they_came() {
    // Runs of lines already written `name: value` are copied at once; the others are
    // written anew between them. The output is the same either way, in order.
    let head = "HTTP/1.1 200 OK\r\nServer: up\r\nDate: d\r\nX-Tight:tight\r\nX-Wide:   wide\r\n\
                Empty:\r\nSkip: me\r\nA: 1\r\nA: 2\r\nx-kanali-correlation-id: theirs\r\n\
                Last: l\r\nContent-Length: 0\r\n\r\n";
    let Ok(Some(Some(taken))) = take(head, false).0 else {
        panic!("not a head")
    };
    let mut raw = taken.raw.unwrap();
    raw.set_own(
        &crate::headers::X_KANALI_CORRELATION_ID,
        HeaderValue::from_static("ours"),
    );
    let mut out = Vec::new();
    let mut asked = Vec::new();
    raw.write(&mut out, |name, kind| {
        asked.push((String::from_utf8_lossy(name).into_owned(), kind));
        name != b"Skip" && kind != FieldKind::ContentLength
    });
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "Server: up\r\nDate: d\r\nX-Tight: tight\r\nX-Wide: wide\r\nEmpty: \r\nA: 1\r\nA: 2\r\n\
         Last: l\r\nx-kanali-correlation-id: ours\r\n"
    );
    // Asked about each of the upstream's fields but the one the proxy's own replaces.
    let names: Vec<_> = asked.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Server",
            "Date",
            "X-Tight",
            "X-Wide",
            "Empty",
            "Skip",
            "A",
            "A",
            "Last",
            "Content-Length"
        ]
    );
    assert_eq!(asked[1].1, FieldKind::Date);
}
