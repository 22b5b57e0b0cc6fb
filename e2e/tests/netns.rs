//! The test hosts the suites put their non-loopback upstreams on: reachable from here, and
//! gone — namespace and veth pair — once dropped.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

use kanali_e2e::netns::TestHost;
use kanali_e2e::start_echo_on;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_test_host_serves_from_its_namespace_and_leaves_nothing_behind() {
    let host = TestHost::create().unwrap();
    let netns = host.netns().to_owned();
    assert!(ip(&["netns", "list"]).contains(&netns));
    assert!(host.ip().to_string().starts_with("198.1"), "{}", host.ip());
    // The listener lives in the namespace: only the namespace has the address.
    assert!(ip(&["-n", &netns, "-o", "addr"]).contains(&format!("{}/30", host.ip())));
    assert!(!ip(&["-o", "addr"]).contains(&format!("{}/30", host.ip())));

    let echo = start_echo_on(host.listen(0).unwrap(), "in-ns").unwrap();
    let mut s = tokio::net::TcpStream::connect(echo.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains("\"upstream\":\"in-ns\""), "{answer}");

    drop(echo);
    drop(host);
    assert!(!ip(&["netns", "list"]).contains(&netns));
}
