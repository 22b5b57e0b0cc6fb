//! The snapshot stream seen from a proxy's side, with a hand-driven gRPC client: a slow
//! subscriber gets the current snapshot at once and then the latest, and NACKs are recorded with the resource named.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use kanali_controller::source::watch::Debounce;
use kanali_controller::{Controller, StandaloneConfig};
use kanali_proto::v1 as pb;
use kanali_proto::v1::snapshot_service_client::SnapshotServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

async fn controller(dir: &std::path::Path) -> Controller {
    kanali_controller::start_standalone(StandaloneConfig {
        manifests: dir.to_owned(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        debounce: Debounce {
            quiet: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            resync: Duration::from_secs(5),
        },
        grpc_tls: None,
        decryption: Default::default(),
    })
    .await
    .unwrap()
}

fn proxy_yaml(path: &str) -> String {
    format!(
        "apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: p, namespace: ns}}\nspec:\n  source: {{path: {path}}}\n  target: {{backend: {{endpoint: \"http://127.0.0.1:1\"}}}}\n"
    )
}

async fn open(
    c: &Controller,
    id: &str,
) -> (
    mpsc::Sender<pb::ProxyMessage>,
    tonic::Streaming<pb::ControllerMessage>,
) {
    let mut client = SnapshotServiceClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel(8);
    let subscribe = pb::proxy_message::Message::Subscribe(pb::Subscribe {
        proxy_id: id.into(),
        ..Default::default()
    });
    tx.send(pb::ProxyMessage {
        message: Some(subscribe),
    })
    .await
    .unwrap();
    let inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

async fn eventually(mut check: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscriber_gets_the_current_snapshot_at_once_and_then_the_latest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), proxy_yaml("/v0")).unwrap();
    let c = controller(dir.path()).await;
    let (_tx, mut inbound) = open(&c, "slow").await;

    // At once: the current snapshot, in one update that commits the current version.
    let msg = inbound.message().await.unwrap().unwrap();
    assert_eq!(msg.commit.unwrap().version, c.shared.version().unwrap());
    let first = msg.snapshot.unwrap();
    assert_eq!(first.routes[0].path, "/v0");

    // Ten versions while this subscriber reads nothing.
    for i in 1..=10 {
        std::fs::write(dir.path().join("p.yaml"), proxy_yaml(&format!("/v{i}"))).unwrap();
        eventually(|| c.shared.snapshot().unwrap().routes[0].path == format!("/v{i}")).await;
    }
    let latest = c.shared.version().unwrap();

    // Reading now ends with the latest. (How many stale ones come first depends on what the
    // HTTP/2 windows buffered; the skipping itself is unit-tested in serve.rs.)
    let mut received = Vec::new();
    while received.last() != Some(&latest) {
        let msg = tokio::time::timeout(Duration::from_secs(15), inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        received.push(msg.commit.unwrap().version);
    }
    assert!(received.len() <= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_nacks_are_recorded_per_proxy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), proxy_yaml("/a")).unwrap();
    let c = controller(dir.path()).await;

    let (tx, mut inbound) = open(&c, "good").await;
    let msg = inbound.message().await.unwrap().unwrap();
    let version = msg.commit.unwrap().version;
    let ack = pb::proxy_message::Message::Ack(pb::Ack {
        version: version.clone(),
        problems: Vec::new(),
    });
    tx.send(pb::ProxyMessage { message: Some(ack) })
        .await
        .unwrap();

    let (tx2, mut inbound2) = open(&c, "picky").await;
    let msg2 = inbound2.message().await.unwrap().unwrap();
    let version2 = msg2.commit.unwrap().version;
    let snap2 = msg2.snapshot.unwrap();
    let nack = pb::proxy_message::Message::Nack(pb::Nack {
        version: version2.clone(),
        errors: vec![pb::ResourceError {
            resource: snap2.routes[0].source.clone(),
            message: "cannot apply".into(),
            reason: String::new(),
        }],
    });
    tx2.send(pb::ProxyMessage {
        message: Some(nack),
    })
    .await
    .unwrap();

    eventually(|| {
        let status = c.shared.status();
        status
            .proxies
            .get("good")
            .is_some_and(|p| p.applied_version.as_deref() == Some(&version))
            && status
                .proxies
                .get("picky")
                .is_some_and(|p| p.rejected.is_some())
    })
    .await;
    {
        let status = c.shared.status();
        let picky = &status.proxies["picky"];
        let rejected = picky.rejected.as_ref().unwrap();
        assert_eq!(rejected.version, version2);
        assert_eq!(rejected.errors, ["ApiProxy ns/p: cannot apply"]);
        assert!(picky.connected && picky.applied_version.is_none());
    }

    // Hanging up marks the proxy disconnected.
    drop(tx2);
    drop(inbound2);
    eventually(|| !c.shared.status().proxies["picky"].connected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_must_start_with_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(dir.path()).await;
    let mut client = SnapshotServiceClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel(1);
    tx.send(pb::ProxyMessage {
        message: Some(pb::proxy_message::Message::Ack(pb::Ack {
            version: "x".into(),
            problems: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let err = client.stream(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
