//! Request smuggling at the proxy's HTTP/1.1 server, as exact bytes on a raw socket to a real
//! proxy listener whose one route, `/api/`, leads to a raw upstream that records every byte it
//! receives. Each case states what RFC 9112 requires of a server that forwards: a request
//! whose framing or syntax another parser could read differently is refused (4xx or 5xx),
//! its connection ends after the answer, and not one byte of it (nor of anything sent behind
//! it) reaches the upstream; a request that is merely unusual but unambiguous goes through as
//! exactly one well-formed request.
//!
//! This is the gate for replacing hyper's HTTP/1 server, so the expectations are the strict
//! reading even where hyper is more lenient today (bare LF line ends, Content-Length beside
//! Transfer-Encoding, ...). The checks that `requests.rs` already makes (Host, CONNECT, a
//! non-hex chunk size, chunks or a Content-Length body cut short) are not repeated here.
//!
//! Every case of a test runs and the test fails listing all the cases that did not hold, with
//! what the proxy answered and what the upstream received.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // a failed unwrap is a failed test

#[path = "proxy_upstreams/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{detached_proxy_config, endpoint, install, route};
use kanali_dataplane::RunningProxy;
use kanali_dataplane::upstream::Upstreams;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// How long the proxy has to answer and close. Shorter than its `header_read_timeout` (10 s),
/// so a proxy still waiting for more of a head it should have refused fails the case instead
/// of closing on its own timer and looking like a refusal.
const REPLY_WITHIN: Duration = Duration::from_secs(5);

/// How long after a refusal bytes may still be on their way to the upstream: a server that
/// dispatches pipelined requests concurrently could forward the one behind a refusal while
/// already answering the refusal.
const SETTLE: Duration = Duration::from_millis(200);

/// The upstream's answer to every request it parses.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

// ---- the recording upstream ---------------------------------------------------------------

/// Everything the upstream received since the last [`Upstream::reset`].
#[derive(Default)]
struct Received {
    /// Every byte, over all connections, in order of arrival.
    raw: Vec<u8>,
    /// The requests parsed whole, in order.
    requests: Vec<Forwarded>,
    /// Why bytes could not be parsed as a request (that connection was then closed).
    malformed: Vec<String>,
}

/// One request as the upstream parsed it.
struct Forwarded {
    /// The head without its final blank line.
    head: String,
    /// The body, de-chunked if it was chunked.
    body: Vec<u8>,
    /// How many bytes it took on the wire.
    len: usize,
}

struct Upstream {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

impl Upstream {
    /// Listens on loopback; answers each request it can parse with [`OK`] and keeps the
    /// connection, so the proxy's pool may reuse it.
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let record = received.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, record.clone()));
            }
        });
        Upstream { addr, received }
    }

    fn reset(&self) {
        *self.received.lock().unwrap() = Received::default();
    }
}

async fn serve(mut s: TcpStream, record: Arc<Mutex<Received>>) {
    let mut buf = Vec::new();
    loop {
        match parse_request(&buf) {
            Parsed::Request(request) => {
                buf.drain(..request.len);
                record.lock().unwrap().requests.push(request);
                if s.write_all(OK).await.is_err() {
                    return;
                }
            }
            Parsed::Malformed(why) => {
                record.lock().unwrap().malformed.push(why);
                return;
            }
            Parsed::Incomplete => {
                let mut more = [0u8; 16 * 1024];
                let n = match s.read(&mut more).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                record.lock().unwrap().raw.extend_from_slice(&more[..n]);
                buf.extend_from_slice(&more[..n]);
            }
        }
    }
}

enum Parsed {
    Incomplete,
    Request(Forwarded),
    Malformed(String),
}

/// Parses what the proxy sent as strictly as the client side is held to: CRLF only, one
/// framing, a chunked body exactly per RFC 9112 §7.1. The upstream is the judge of "exactly
/// one well-formed request", so it must not be lenient itself.
fn parse_request(buf: &[u8]) -> Parsed {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Parsed::Incomplete;
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Malformed("a head that is not UTF-8".to_owned());
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    if head.split("\r\n").any(|l| l.contains(['\r', '\n', '\0'])) {
        return Parsed::Malformed(format!("a bare CR, LF or NUL in {head:?}"));
    }
    let parts: Vec<&str> = request_line.split(' ').collect();
    if parts.len() != 3 || parts[2] != "HTTP/1.1" {
        return Parsed::Malformed(format!("request line {request_line:?}"));
    }
    let (mut lengths, mut codings) = (Vec::new(), Vec::new());
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Malformed(format!("field line {line:?}"));
        };
        if name.is_empty() || name.contains([' ', '\t']) {
            return Parsed::Malformed(format!("field name {name:?}"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            lengths.push(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings.push(value);
        }
    }
    let start = end + 4;
    let (body, len) = match (&lengths[..], &codings[..]) {
        ([], []) => (Vec::new(), start),
        ([n], []) => {
            let Some(n) = n
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| n.parse::<usize>().ok())
                .flatten()
            else {
                return Parsed::Malformed(format!("content-length {n:?}"));
            };
            if buf.len() < start + n {
                return Parsed::Incomplete;
            }
            (buf[start..start + n].to_vec(), start + n)
        }
        ([], [c]) if c.eq_ignore_ascii_case("chunked") => match dechunk(&buf[start..]) {
            Parsed::Request(r) => (r.body, start + r.len),
            other => return other,
        },
        _ => {
            return Parsed::Malformed(format!(
                "framing: content-length {lengths:?}, transfer-encoding {codings:?}"
            ));
        }
    };
    Parsed::Request(Forwarded {
        head: head.to_owned(),
        body,
        len,
    })
}

/// A chunked body at the start of `buf`; the result's `len` is what it took.
fn dechunk(buf: &[u8]) -> Parsed {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(eol) = find(&buf[at..], b"\r\n") else {
            return Parsed::Incomplete;
        };
        let line = &buf[at..at + eol];
        let digits = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|d| usize::from_str_radix(d, 16).ok());
        let Some(size) = size else {
            return Parsed::Malformed(format!("chunk size line {:?}", line.escape_ascii()));
        };
        at += eol + 2;
        if size == 0 {
            // Trailer fields, then the blank line.
            loop {
                let Some(eol) = find(&buf[at..], b"\r\n") else {
                    return Parsed::Incomplete;
                };
                at += eol + 2;
                if eol == 0 {
                    return Parsed::Request(Forwarded {
                        head: String::new(),
                        body,
                        len: at,
                    });
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Parsed::Incomplete;
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Parsed::Malformed("chunk data not followed by CRLF".to_owned());
        }
        at += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---- the proxy and the client -------------------------------------------------------------

struct Env {
    proxy: RunningProxy,
    upstream: Upstream,
    _upstreams: Upstreams,
}

/// What a case expects.
enum Expect {
    /// Refused with one of these statuses, nothing forwarded.
    Refused(&'static [u16]),
    /// Answered 200 after exactly one request with this body reached the upstream.
    Forwarded(&'static [u8]),
}

struct Case {
    what: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

fn refused(what: &'static str, bytes: impl Into<Vec<u8>>, statuses: &'static [u16]) -> Case {
    Case {
        what,
        bytes: bytes.into(),
        expect: Expect::Refused(statuses),
    }
}

fn forwarded(what: &'static str, bytes: impl Into<Vec<u8>>, body: &'static [u8]) -> Case {
    Case {
        what,
        bytes: bytes.into(),
        expect: Expect::Forwarded(body),
    }
}

/// A request head up to (not including) the fields a case adds. Refused cases send no
/// `Connection: close`: closing is the proxy's own decision after a refusal.
const POST: &str = "POST /api/x HTTP/1.1\r\nHost: a.example\r\n";

/// What came back on one connection.
struct Reply {
    text: String,
    /// Whether the proxy closed the connection within [`REPLY_WITHIN`].
    closed: bool,
}

impl Reply {
    fn status(&self) -> Option<u16> {
        let line = self.text.lines().next()?;
        let code = line.strip_prefix("HTTP/1.")?.get(2..5)?;
        code.parse().ok()
    }

    /// How many responses the reply holds, each framed by its Content-Length (a response
    /// without one runs to the end). Counting status lines would miss one that follows a body
    /// with no line end, as `ok` has.
    fn responses(&self) -> usize {
        let mut rest = self.text.as_str();
        let mut count = 0;
        while !rest.is_empty() {
            count += 1;
            let Some((head, after)) = rest.split_once("\r\n\r\n") else {
                break;
            };
            let length = head.split("\r\n").find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())
                    .flatten()
            });
            rest = length.and_then(|n| after.get(n..)).unwrap_or_default();
        }
        count
    }

    fn describe(&self) -> String {
        format!(
            "got {:?} ({} response(s), connection {})",
            self.text.lines().next().unwrap_or("nothing"),
            self.responses(),
            if self.closed { "closed" } else { "left open" },
        )
    }
}

impl Env {
    async fn start() -> Env {
        let upstream = Upstream::start().await;
        let proxy = kanali_dataplane::start(detached_proxy_config("smuggling"))
            .await
            .unwrap();
        let routes = vec![route(
            "/api/",
            endpoint("http", &upstream.addr.to_string(), ""),
        )];
        let upstreams = install(&proxy, routes);
        Env {
            proxy,
            upstream,
            _upstreams: upstreams,
        }
    }

    /// Sends `bytes` on a new connection and reads until the proxy closes it.
    async fn exchange(&self, bytes: &[u8]) -> Reply {
        let mut s = TcpStream::connect(self.proxy.addr).await.unwrap();
        // A proxy may refuse and close before taking every byte (a head over the limit): the
        // failed write is not the case's concern, the answer is.
        let _ = s.write_all(bytes).await;
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(REPLY_WITHIN, s.read_to_end(&mut answer))
            .await
            .is_ok();
        Reply {
            text: String::from_utf8_lossy(&answer).into_owned(),
            closed,
        }
    }

    /// Runs `case`; the error says what differed from its expectation.
    async fn check(&self, case: &Case) -> Result<(), String> {
        self.upstream.reset();
        let reply = self.exchange(&case.bytes).await;
        if matches!(case.expect, Expect::Refused(_)) {
            tokio::time::sleep(SETTLE).await;
        }
        let received = self.upstream.received.lock().unwrap();
        let upstream = describe_received(&received);
        let fail = |why: &str| Err(format!("{why}: {}; {upstream}", reply.describe()));
        match case.expect {
            Expect::Refused(statuses) => {
                if !reply.status().is_some_and(|s| statuses.contains(&s)) {
                    return fail(&format!("expected a status in {statuses:?}"));
                }
                if reply.responses() != 1 || !reply.closed {
                    return fail("expected one answer, then the end of the connection");
                }
                if !received.raw.is_empty() {
                    return fail("expected nothing to reach the upstream");
                }
            }
            Expect::Forwarded(body) => {
                if reply.status() != Some(200) || reply.responses() != 1 || !reply.closed {
                    return fail("expected one 200, then the end of the connection");
                }
                if !reply.text.ends_with("\r\n\r\nok") {
                    return fail("expected the upstream's body");
                }
                let whole: usize = received.requests.iter().map(|r| r.len).sum();
                if received.requests.len() != 1
                    || !received.malformed.is_empty()
                    || whole != received.raw.len()
                {
                    return fail("expected exactly one well-formed request upstream");
                }
                if received.requests[0].body != body {
                    return fail(&format!(
                        "expected the body {:?} upstream",
                        body.escape_ascii().to_string()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What the upstream received, for a failure message.
fn describe_received(received: &Received) -> String {
    if received.raw.is_empty() {
        return "the upstream received nothing".to_owned();
    }
    let mut out = format!(
        "the upstream received {} bytes, {} request(s)",
        received.raw.len(),
        received.requests.len()
    );
    for why in &received.malformed {
        let _ = write!(out, ", malformed: {why}");
    }
    let shown: Vec<u8> = received.raw.iter().copied().take(300).collect();
    let _ = write!(out, ": {}", shown.escape_ascii());
    out
}

/// Runs every case on one proxy and fails listing all the cases that did not hold.
async fn run(env: &Env, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        if let Err(why) = env.check(case).await {
            failures.push(format!("- {}: {why}", case.what));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

// ---- the matrix ---------------------------------------------------------------------------

/// RFC 9112 §6.1 allows a server to process such a request as chunked only if it closes the
/// connection after it; one that forwards also has to decide which length the upstream sees.
/// Refusing is the only answer that leaves no disagreement for a front end to exploit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_beside_transfer_encoding_is_refused() {
    let env = Env::start().await;
    run(
        &env,
        &[
            refused(
                "Content-Length then Transfer-Encoding: chunked",
                format!(
                    "{POST}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                ),
                &[400],
            ),
            refused(
                "Transfer-Encoding: chunked then Content-Length",
                format!(
                    "{POST}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                ),
                &[400],
            ),
        ],
    )
    .await;
}

/// A length another parser might read as a different number (the first or last of a list,
/// a signed or trailing-garbage one) is an invalid Content-Length (RFC 9112 §6.3 item 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_that_is_not_one_plain_number_is_refused() {
    let env = Env::start().await;
    let with = |fields: &str| format!("{POST}{fields}\r\nhello");
    run(
        &env,
        &[
            refused(
                "two Content-Length fields, 5 and 6",
                with("Content-Length: 5\r\nContent-Length: 6\r\n"),
                &[400],
            ),
            refused(
                "Content-Length: 5, 6",
                with("Content-Length: 5, 6\r\n"),
                &[400],
            ),
            refused("Content-Length: +5", with("Content-Length: +5\r\n"), &[400]),
            refused("Content-Length: 5x", with("Content-Length: 5x\r\n"), &[400]),
            refused("Content-Length: -1", with("Content-Length: -1\r\n"), &[400]),
        ],
    )
    .await;
}

/// The one leniency RFC 9110 §8.6 allows: repeated identical lengths are one length. The
/// upstream must then see a single Content-Length, or it could be the one to refuse or
/// mis-split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_identical_content_length_is_one_length() {
    let env = Env::start().await;
    let case = forwarded(
        "two Content-Length: 5 fields",
        format!("{POST}Content-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"),
        b"hello",
    );
    run(&env, std::slice::from_ref(&case)).await;
    let received = env.upstream.received.lock().unwrap();
    let lengths: Vec<&str> = received.requests[0]
        .head
        .split("\r\n")
        .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
        .collect();
    assert_eq!(lengths.len(), 1, "{}", received.requests[0].head);
    assert_eq!(
        lengths[0].split_once(':').unwrap().1.trim(),
        "5",
        "{}",
        received.requests[0].head
    );
}

/// Obsolete line folding (RFC 9112 §5.2): a server may unfold it, but a folded
/// `Transfer-Encoding` or `Content-Length` is exactly what one hop reads and the next
/// does not; refusing it leaves nothing to disagree about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obs_fold_is_refused() {
    let env = Env::start().await;
    run(
        &env,
        &[
            refused(
                "a field continued on a line starting with a space",
                format!("{POST}X-A: one\r\n two\r\nContent-Length: 0\r\n\r\n"),
                &[400],
            ),
            refused(
                "a field continued on a line starting with a tab",
                format!("{POST}X-A: one\r\n\ttwo\r\nContent-Length: 0\r\n\r\n"),
                &[400],
            ),
        ],
    )
    .await;
}

/// RFC 9112 §2.2 lets a recipient accept a bare LF, but a front end that does not treats the
/// same bytes as one long line: where lines end has to be unambiguous for every hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_line_ends_are_refused() {
    let env = Env::start().await;
    run(
        &env,
        &[
            refused(
                "request line and fields ended by LF only",
                "GET /api/x HTTP/1.1\nHost: a.example\n\n",
                &[400],
            ),
            refused(
                "one field ended by LF only in a CRLF head",
                "GET /api/x HTTP/1.1\r\nHost: a.example\r\nX-A: 1\nX-B: 2\r\n\r\n",
                &[400],
            ),
        ],
    )
    .await;
}

/// RFC 9112 §6.3 item 4: in a request, a Transfer-Encoding whose final coding is not chunked
/// leaves the length undeterminable (400); codings the proxy does not implement may be 501
/// (RFC 9112 §6.1). Chunked twice is forbidden, and HTTP/1.0 has no Transfer-Encoding (both
/// §6.1): an old front end would have used the Content-Length or read to the end instead.
/// Coding names are case-insensitive, so `Chunked` must still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_one_final_chunked_are_refused() {
    let env = Env::start().await;
    let body = "5\r\nhello\r\n0\r\n\r\n";
    let te = |coding: &str| format!("{POST}Transfer-Encoding: {coding}\r\n\r\n{body}");
    run(
        &env,
        &[
            refused("Transfer-Encoding: gzip", te("gzip"), &[400, 501]),
            refused(
                "Transfer-Encoding: chunked, gzip",
                te("chunked, gzip"),
                &[400, 501],
            ),
            refused("Transfer-Encoding: xchunked", te("xchunked"), &[400, 501]),
            refused(
                "Transfer-Encoding: chunked in two fields",
                format!(
                    "{POST}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
                ),
                &[400, 501],
            ),
            refused("Transfer-Encoding: identity", te("identity"), &[400, 501]),
            refused(
                "Transfer-Encoding: chunked in HTTP/1.0",
                format!(
                    "POST /api/x HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
                ),
                &[400],
            ),
            forwarded(
                "Transfer-Encoding: Chunked",
                format!("{POST}Transfer-Encoding: Chunked\r\nConnection: close\r\n\r\n{body}"),
                b"hello",
            ),
        ],
    )
    .await;
}

/// A chunk size has exactly one reading (RFC 9112 §7.1: `1*HEXDIG`, then an optional
/// extension, then CRLF). Lenient parsers skip signs, prefixes, trailing spaces or missing
/// CRLFs in different ways, which is how chunked smuggling works. Extensions are allowed and
/// ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunk_framing_is_refused_and_extensions_are_ignored() {
    let env = Env::start().await;
    let chunked = |body: &str| format!("{POST}Transfer-Encoding: chunked\r\n\r\n{body}");
    run(
        &env,
        &[
            refused(
                "chunk size -1",
                chunked("-1\r\nhello\r\n0\r\n\r\n"),
                &[400],
            ),
            refused(
                "chunk size 0x5",
                chunked("0x5\r\nhello\r\n0\r\n\r\n"),
                &[400],
            ),
            // One hex digit past 64 bits: a parser that wraps reads 0xf1 or so.
            refused(
                "chunk size fffffffffffffffff1",
                chunked("fffffffffffffffff1\r\nhello\r\n0\r\n\r\n"),
                &[400],
            ),
            refused(
                "a space between chunk size and CRLF",
                chunked("5 \r\nhello\r\n0\r\n\r\n"),
                &[400],
            ),
            refused(
                "chunk data not followed by CRLF",
                chunked("5\r\nhelloXX0\r\n\r\n"),
                &[400],
            ),
            forwarded(
                "a chunk extension",
                format!(
                    "{POST}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n"
                ),
                b"hello",
            ),
        ],
    )
    .await;
}

/// RFC 9112 §5.1: no whitespace between a field name and its colon (a server MUST reject),
/// so `Content-Length : 5` cannot be a length to one hop and an unknown field to the next;
/// a field name is a token, and a control character in it is no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_names_are_tokens_right_up_to_the_colon() {
    let env = Env::start().await;
    run(
        &env,
        &[
            refused(
                "Content-Length : 5",
                format!("{POST}Content-Length : 5\r\n\r\nhello"),
                &[400],
            ),
            refused(
                "a control character in a field name",
                format!("{POST}X-A\x01B: 1\r\nContent-Length: 0\r\n\r\n"),
                &[400],
            ),
        ],
    )
    .await;
}

/// RFC 9110 §5.5: NUL and bare CR in a field value are dangerous; a recipient must reject
/// them or replace them with SP, and a forwarding proxy that passes them on lets the
/// upstream end the line (or the string) early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_values_hold_no_nul_or_bare_cr() {
    let env = Env::start().await;
    run(
        &env,
        &[
            refused(
                "NUL in a field value",
                format!("{POST}X-A: a\0b\r\nContent-Length: 0\r\n\r\n"),
                &[400],
            ),
            refused(
                "a bare CR in a field value",
                format!("{POST}X-A: a\rContent-Length: 5\r\nContent-Length: 0\r\n\r\n"),
                &[400],
            ),
        ],
    )
    .await;
}

/// A request line is exactly `method SP target SP HTTP/1.x` (RFC 9112 §3): a space in the
/// target makes where the target ends a guess, and a version this server does not speak
/// over cleartext HTTP/1 is not one to guess the framing of (505 is allowed, RFC 9110
/// §15.6.6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_line_is_three_clean_parts_of_http_1() {
    let env = Env::start().await;
    run(
        &env,
        &[
            refused(
                "a space inside the target",
                "GET /api/a b HTTP/1.1\r\nHost: a.example\r\n\r\n",
                &[400],
            ),
            refused(
                "HTTP/1.2",
                "GET /api/x HTTP/1.2\r\nHost: a.example\r\n\r\n",
                &[400, 505],
            ),
            refused(
                "HTTP/2.0 on a cleartext HTTP/1 request line",
                "GET /api/x HTTP/2.0\r\nHost: a.example\r\n\r\n",
                &[400, 505],
            ),
        ],
    )
    .await;
}

/// `max_header_bytes` (64 KiB by default) bounds the memory a head may hold; past it the
/// answer is 431 (RFC 6585 §5), not a truncated head forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_limit_gets_431() {
    let env = Env::start().await;
    let big = "a".repeat(70 * 1024);
    run(
        &env,
        &[refused(
            "a 70 KiB field value",
            format!("GET /api/x HTTP/1.1\r\nHost: a.example\r\nX-Big: {big}\r\n\r\n"),
            &[431],
        )],
    )
    .await;
}

/// Pipelining is legal (RFC 9112 §9.3.2): the body of the first request must end where its
/// Content-Length says, so the second is parsed from the right byte and neither carries the
/// other's bytes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_each_with_its_own_bytes() {
    let env = Env::start().await;
    let reply = env
        .exchange(
            b"POST /api/first HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nhello\
              GET /api/second HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert!(reply.closed, "{}", reply.text);
    assert_eq!(reply.responses(), 2, "{}", reply.text);
    let second = reply.text.find("HTTP/1.").and_then(|first| {
        reply.text[first + 1..]
            .find("HTTP/1.")
            .map(|i| first + 1 + i)
    });
    let (a, b) = reply.text.split_at(second.unwrap());
    assert!(
        a.starts_with("HTTP/1.1 200") && a.ends_with("\r\n\r\nok"),
        "{a}"
    );
    assert!(
        b.starts_with("HTTP/1.1 200") && b.ends_with("\r\n\r\nok"),
        "{b}"
    );

    let received = env.upstream.received.lock().unwrap();
    let upstream = describe_received(&received);
    assert_eq!(received.requests.len(), 2, "{upstream}");
    assert!(received.malformed.is_empty(), "{upstream}");
    let whole: usize = received.requests.iter().map(|r| r.len).sum();
    assert_eq!(whole, received.raw.len(), "stray bytes: {upstream}");
    let (first, second) = (&received.requests[0], &received.requests[1]);
    assert!(
        first.head.starts_with("POST ") && first.head.contains("first"),
        "{upstream}"
    );
    assert_eq!(first.body, b"hello", "{upstream}");
    assert!(
        second.head.starts_with("GET ") && second.head.contains("second"),
        "{upstream}"
    );
    assert!(second.body.is_empty(), "{upstream}");
    assert!(!second.head.contains("hello"), "{upstream}");
}

/// Once a request is refused the connection's framing is lost: whatever follows could be
/// the rest of its body or a request a front end never saw. So the bytes behind a refusal
/// are never parsed, let alone forwarded, whether the refusal came from the head, from the
/// framing fields, or from the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_behind_a_refused_request_never_reach_the_upstream() {
    let env = Env::start().await;
    let smuggled = "GET /api/smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n";
    run(
        &env,
        &[
            refused(
                "behind two different Content-Lengths",
                format!("{POST}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello{smuggled}"),
                &[400],
            ),
            // The classic CL.TE desync: a front end using the length forwards all of it as
            // one request; a back end using the chunks sees the smuggled one.
            refused(
                "behind Content-Length covering it and an empty chunked body",
                format!(
                    "{POST}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
                    5 + smuggled.len()
                ),
                &[400],
            ),
            refused(
                "behind a bad chunk size",
                format!("{POST}Transfer-Encoding: chunked\r\n\r\n-1\r\n\r\n{smuggled}"),
                &[400],
            ),
            refused(
                "behind an obs-fold",
                format!("{POST}X-A: one\r\n two\r\nContent-Length: 0\r\n\r\n{smuggled}"),
                &[400],
            ),
        ],
    )
    .await;
}
