//! The HTTP/1 server side on an in-memory stream: what a client sends, byte for byte, and
//! what it gets back. (The request-smuggling matrix runs end to end in
//! `e2e/tests/smuggling.rs`; here are the parser's decisions and the connection's behaviour.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::*;

// The bodies these tests answer with carry no raw fields.
impl ResponseBody for Full<Bytes> {}
impl<E> ResponseBody for http_body_util::combinators::BoxBody<Bytes, E> {}

fn parse(head: &[u8]) -> Result<Option<(Parsed, usize)>, Refused> {
    parse_head(head, &mut Vec::new())
}

fn refused(head: &[u8]) -> StatusCode {
    match parse(head) {
        Err(Refused::Status(status, _)) => status,
        Err(Refused::Io(e)) => panic!("io error {e}"),
        Ok(_) => panic!("accepted: {}", String::from_utf8_lossy(head)),
    }
}

#[test]
fn framing_is_read_strictly() {
    let ok = |head: &[u8]| parse(head).unwrap().unwrap().0;
    assert_eq!(
        ok(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").framing,
        Framing::None
    );
    assert_eq!(
        ok(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").framing,
        Framing::Length(5)
    );
    assert_eq!(
        ok(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").framing,
        Framing::Length(5)
    );
    assert_eq!(
        ok(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").framing,
        Framing::Chunked
    );
    for head in [
        &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
    ] {
        assert_eq!(refused(head), StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        refused(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
        StatusCode::NOT_IMPLEMENTED
    );
}

#[test]
fn connection_persistence_follows_the_version() {
    let keep = |head: &[u8]| parse(head).unwrap().unwrap().0.keep_alive;
    assert!(keep(b"GET / HTTP/1.1\r\n\r\n"));
    assert!(!keep(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
    assert!(!keep(b"GET / HTTP/1.0\r\n\r\n"));
    assert!(keep(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    // Only HTTP/1.1 clients wait for 100 Continue.
    let expect = |head: &[u8]| parse(head).unwrap().unwrap().0.expect_continue;
    assert!(expect(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"));
    assert!(!expect(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n"));
}

#[test]
fn a_partial_head_asks_for_more() {
    assert!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
}

#[test]
fn chunk_sizes_are_hex() {
    let mut buf = [0u8; 16];
    assert_eq!(hex_len(0, &mut buf), b"0");
    assert_eq!(hex_len(255, &mut buf), b"ff");
    assert_eq!(hex_len(16 * 1024, &mut buf), b"4000");
    assert_eq!(hex_len(usize::MAX, &mut buf), b"ffffffffffffffff");
}

/// A handler that echoes the request body (and the method and path) back.
async fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes());
    let text = match body {
        Ok(b) => format!(
            "{} {} {}",
            parts.method,
            parts.uri,
            String::from_utf8_lossy(&b)
        ),
        Err(e) => format!("error {e}"),
    };
    Response::new(Full::new(Bytes::from(text)))
}

const SETTINGS: Settings = Settings {
    max_head: 64 * 1024,
    half_close: false,
};

type Served = tokio::task::JoinHandle<Result<Ended<DuplexStream>, H1Error>>;

/// Serves one connection with `service`: the client's end, and the connection's task.
fn serving<S, F, B>(settings: Settings, service: S) -> (DuplexStream, Served)
where
    S: FnMut(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Response<B>> + Send,
    B: ResponseBody + Send,
    B::Error: Display,
{
    let (client, server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(async move {
        let closing = AtomicBool::new(false);
        serve(server, settings, &closing, service).await
    });
    (client, task)
}

/// Serves one connection with `echo`; the client's end.
fn connect() -> (DuplexStream, Served) {
    serving(SETTINGS, echo)
}

/// The bodies of the `200 OK` responses in `answer`, in order.
fn bodies(answer: &str) -> Vec<&str> {
    answer
        .split("HTTP/1.1 200 OK\r\n")
        .skip(1)
        .map(|r| r.split("\r\n\r\n").nth(1).unwrap())
        .collect()
}

/// Reads until the peer closes (or 5 s pass).
async fn read_all(client: &mut DuplexStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads `n` response bodies' worth: until `marker` was seen `n` times.
async fn read_until(client: &mut DuplexStream, marker: &str, n: usize) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&out).matches(marker).count() < n {
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("answer in time")
            .unwrap();
        assert!(read > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..read]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn pipelined_requests_get_their_answers_in_order() {
    let (mut client, _task) = connect();
    client
        .write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
              POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
              GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_all(&mut client).await;
    assert_eq!(
        bodies(&answer),
        ["POST /a hello", "POST /b abc", "GET /c "],
        "{answer}"
    );
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains("\r\ndate: "), "{answer}");
}

#[tokio::test]
async fn a_body_in_pieces_streams_and_100_continue_is_sent_once_it_is_wanted() {
    let (mut client, _task) = connect();
    client
        .write_all(
            b"PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_until(&mut client, "100 Continue", 1).await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"01234").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.write_all(b"56789").await.unwrap();
    let answer = read_until(&mut client, "0123456789", 1).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("PUT /up 0123456789"), "{answer}");
    // The connection stays open for the next request.
    client
        .write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let next = read_until(&mut client, "GET /next", 1).await;
    assert!(next.starts_with("HTTP/1.1 200 OK\r\n"), "{next}");
}

#[tokio::test]
async fn a_body_cut_short_reaches_the_handler_as_an_error() {
    let (mut client, _task) = connect();
    client
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let answer = read_all(&mut client).await;
    assert!(answer.contains("error"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

#[tokio::test]
async fn responses_are_framed_by_what_the_body_says() {
    async fn answer(
        req: Request<Incoming>,
    ) -> Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
        let path = req.uri().path().to_owned();
        let body = match path.as_str() {
            // Length unknown: chunked, with the declared trailer only.
            "/stream" => {
                let frames = futures_util::stream::iter([
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"wiki"))),
                    Ok(Frame::data(Bytes::from_static(b"pedia"))),
                    Ok(Frame::trailers({
                        let mut t = HeaderMap::new();
                        t.insert("x-sum", HeaderValue::from_static("9"));
                        t.insert("x-undeclared", HeaderValue::from_static("1"));
                        t
                    })),
                ]);
                BodyExt::boxed(StreamBody::new(frames))
            }
            _ => BodyExt::boxed(Full::new(Bytes::from_static(b"fixed"))),
        };
        let mut resp = Response::new(body);
        if path == "/stream" {
            resp.headers_mut()
                .insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        }
        resp
    }
    let (mut client, _task) = serving(SETTINGS, answer);
    client
        .write_all(
            b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n\
              HEAD /fixed HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /stream HTTP/1.0\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_all(&mut client).await;
    let responses: Vec<_> = answer.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
    assert_eq!(responses.len(), 3, "{answer}");
    assert!(
        responses[0].contains("transfer-encoding: chunked\r\n"),
        "{answer}"
    );
    assert!(
        responses[0].ends_with("\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\nx-sum: 9\r\n\r\n"),
        "{answer}"
    );
    // HEAD: the length a GET would get, no body.
    assert!(responses[1].contains("content-length: 5\r\n"), "{answer}");
    assert!(responses[1].ends_with("\r\n\r\n"), "{answer}");
    // HTTP/1.0 knows no chunked coding: the body runs until the connection closes.
    assert!(!responses[2].contains("transfer-encoding"), "{answer}");
    assert!(responses[2].contains("connection: close\r\n"), "{answer}");
    assert!(responses[2].ends_with("\r\n\r\nwikipedia"), "{answer}");
}

#[tokio::test]
async fn refusals_are_answered_and_the_connection_closed() {
    let (mut client, task) = connect();
    client
        .write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_all(&mut client).await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(!answer.contains("/next"), "{answer}");
    // The connection lingers until its client closes too (or goes quiet for 5 s).
    drop(client);
    assert!(matches!(
        task.await.unwrap(),
        Ok(Ended::Refused(
            StatusCode::BAD_REQUEST,
            "Content-Length values disagree\n"
        ))
    ));
}

#[tokio::test]
async fn a_head_over_the_limit_gets_431() {
    let settings = Settings {
        max_head: 1024,
        ..SETTINGS
    };
    let (mut client, _task) = serving(settings, echo);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
        "a".repeat(2000)
    );
    client.write_all(big.as_bytes()).await.unwrap();
    let answer = read_all(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

#[tokio::test]
async fn the_http2_preface_hands_the_connection_over() {
    let (mut client, server) = tokio::io::duplex(1024);
    let served = tokio::spawn(async move {
        let closing = AtomicBool::new(false);
        serve(
            server,
            Settings {
                max_head: 1024,
                ..SETTINGS
            },
            &closing,
            echo,
        )
        .await
    });
    client.write_all(&H2_PREFACE[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    client.write_all(&H2_PREFACE[10..]).await.unwrap();
    client.write_all(b"frames").await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    match served.await.unwrap() {
        Ok(Ended::Http2(_, read)) => assert!(read.starts_with(H2_PREFACE)),
        _ => panic!("not handed over"),
    }
}

#[tokio::test]
async fn closing_ends_an_idle_connection_and_a_busy_one_after_its_response() {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let closing = std::sync::Arc::new(AtomicBool::new(false));
    let flag = closing.clone();
    let served = tokio::spawn(async move {
        serve(
            server,
            SETTINGS,
            &flag,
            |req: Request<Incoming>| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                echo(req).await
            },
        )
        .await
    });
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    closing.store(true, Ordering::Relaxed);
    let answer = read_all(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(matches!(served.await.unwrap(), Ok(Ended::Closed)));
}

type Answer = std::pin::Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;

/// A handler that answers after `delay`, and says (through `dropped`) whether its future
/// was dropped before it finished.
fn slow(
    delay: Duration,
    dropped: std::sync::Arc<AtomicBool>,
) -> impl FnMut(Request<Incoming>) -> Answer {
    struct Guard(std::sync::Arc<AtomicBool>, bool);
    impl Drop for Guard {
        fn drop(&mut self) {
            if !self.1 {
                self.0.store(true, Ordering::Relaxed);
            }
        }
    }
    move |req| {
        let guard = Guard(dropped.clone(), false);
        Box::pin(async move {
            // The whole guard, not just its flag, lives in the future.
            let mut guard = guard;
            tokio::time::sleep(delay).await;
            guard.1 = true;
            echo(req).await
        })
    }
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_request() {
    let dropped = std::sync::Arc::new(AtomicBool::new(false));
    let (mut client, served) = serving(SETTINGS, slow(Duration::from_secs(3600), dropped.clone()));
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!served.is_finished());
    client.shutdown().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("the connection ends when its client does")
        .unwrap();
    assert!(matches!(ended, Ok(Ended::Closed)));
    assert!(
        dropped.load(Ordering::Relaxed),
        "the handler was not dropped"
    );
    assert_eq!(read_all(&mut client).await, "", "nothing is answered");
}

#[tokio::test]
async fn with_half_close_a_client_that_stopped_sending_still_gets_its_answer() {
    let dropped = std::sync::Arc::new(AtomicBool::new(false));
    let settings = Settings {
        half_close: true,
        ..SETTINGS
    };
    let (mut client, _task) = serving(settings, slow(Duration::from_millis(50), dropped.clone()));
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let answer = read_all(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("GET /slow "), "{answer}");
    assert!(!dropped.load(Ordering::Relaxed));
}

#[tokio::test]
async fn requests_sent_while_one_is_handled_wait_their_turn() {
    let dropped = std::sync::Arc::new(AtomicBool::new(false));
    let (mut client, _task) = serving(SETTINGS, slow(Duration::from_millis(30), dropped.clone()));
    client
        .write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Read ahead while /a is handled, then served after it.
    client
        .write_all(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_all(&mut client).await;
    assert_eq!(bodies(&answer), ["POST /a one", "GET /b "], "{answer}");
    assert!(!dropped.load(Ordering::Relaxed));
}

/// A client that writes its whole request before it reads gets the answer even when the
/// handler never read the body: the connection reads and drops the rest before it closes.
#[tokio::test]
async fn an_answer_without_reading_the_body_still_reaches_a_client_that_is_sending() {
    let (mut client, _task) = serving(SETTINGS, |_req: Request<Incoming>| async {
        Response::new(Full::new(Bytes::from_static(b"no such route")))
    });
    let size = 4 * 1024 * 1024;
    client
        .write_all(
            format!("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    // Sixty-four times what the stream buffers: only a reader on the other end lets it through.
    client.write_all(&vec![b'x'; size]).await.unwrap();
    let answer = read_all(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("no such route"), "{answer}");
}

#[tokio::test]
async fn a_refused_head_is_answered_to_a_client_that_is_still_sending() {
    let (mut client, _task) = connect();
    client
        .write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n")
        .await
        .unwrap();
    client
        .write_all(&vec![b'x'; 4 * 1024 * 1024])
        .await
        .unwrap();
    let answer = read_all(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
}

/// A request's exchange is allocated and moved once a request, so its size is a cost of every
/// request. It keeps what the response is being written with, and not the response too: a
/// binding that outlived its `await` once made it twice this size. (Sizes are the compiler's,
/// the same on every run: this is not a timing.)
#[test]
fn an_exchange_keeps_only_what_writing_the_response_needs() {
    let mut conn = Conn {
        io: tokio::io::duplex(64).1,
        read: BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..]),
        write: Vec::new(),
        max_head: 1024,
        half_close: false,
        watched: false,
    };
    let Ok(Some(head)) = conn.take_head() else {
        panic!("the head is whole");
    };
    let closing = AtomicBool::new(false);
    // Boxed, as the proxy's handler is.
    let mut service = |_: Request<Incoming>| {
        Box::pin(std::future::ready(Response::new(
            crate::body::ProxyBody::from(Bytes::new()),
        )))
    };
    let exchange = conn.exchange(head, &mut service, &closing);
    let size = std::mem::size_of_val(&exchange);
    let out = std::mem::size_of::<Out<crate::body::ProxyBody>>();
    let response = std::mem::size_of::<Response<crate::body::ProxyBody>>();
    assert!(size < out + response, "the exchange is {size} bytes");
}

/// Records that it was woken.
#[derive(Default)]
struct Woken(AtomicBool);

impl std::task::Wake for Woken {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// [`Peek`] on TCP, which lets a connection wait for its next request without a read: it
/// says "nothing to read" while a waiting read's waker is stored, and stops saying so once
/// bytes arrive (the runtime saw them and used that waker up), so that the connection reads
/// them instead of waiting for a wake-up that has come already.
#[tokio::test]
async fn a_tcp_stream_has_nothing_to_read_only_until_bytes_arrive() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    let woken = std::sync::Arc::new(Woken::default());
    let waker = std::task::Waker::from(woken.clone());
    let mut cx = Context::from_waker(&waker);
    let mut byte = [0u8; 1];
    // A read that waits, as `poll_gone`'s does while the upstream answers.
    let mut buf = ReadBuf::new(&mut byte);
    assert!(
        Pin::new(&mut server)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    );
    assert!(server.nothing_to_read());
    client.write_all(b"GET").await.unwrap();
    for _ in 0..500 {
        if woken.0.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(woken.0.load(Ordering::SeqCst), "the bytes woke the reader");
    assert!(
        !server.nothing_to_read(),
        "bytes arrived: the connection must read"
    );
    let mut read = [0u8; 3];
    server.read_exact(&mut read).await.unwrap();
    assert_eq!(&read, b"GET");
}
