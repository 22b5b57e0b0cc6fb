//! A proxy played by the test itself over the snapshot stream.

use std::net::SocketAddr;

use kanali_proto::v1 as pb;
use kanali_proto::v1::snapshot_service_client::SnapshotServiceClient;

use super::DEADLINE;

/// A hand-driven proxy stream, to play a proxy that is slow to apply a snapshot.
pub struct FakeProxy {
    tx: tokio::sync::mpsc::Sender<pb::ProxyMessage>,
    inbound: tonic::Streaming<pb::ControllerMessage>,
    /// The routing snapshot as of the last message (updates resend it only when it changed).
    snapshot: Option<pb::Snapshot>,
}

/// A complete update: the routing snapshot it leaves the proxy with, and the version to Ack.
pub struct Received {
    pub snapshot: pb::Snapshot,
    pub version: String,
}

impl FakeProxy {
    pub async fn open(controller: SocketAddr, id: &str) -> FakeProxy {
        let mut client = SnapshotServiceClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{controller}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(8);
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
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        FakeProxy {
            tx,
            inbound,
            snapshot: None,
        }
    }

    /// The next complete update whose routing snapshot satisfies `want`.
    pub async fn snapshot_where(&mut self, want: impl Fn(&pb::Snapshot) -> bool) -> Received {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.inbound.message())
                .await
                .expect("a snapshot within the deadline")
                .unwrap()
                .expect("the stream stays open");
            if msg.snapshot.is_some() {
                self.snapshot = msg.snapshot;
            }
            if let (Some(commit), Some(s)) = (msg.commit, &self.snapshot)
                && want(s)
            {
                return Received {
                    snapshot: s.clone(),
                    version: commit.version,
                };
            }
        }
    }

    pub async fn ack(&self, version: &str) {
        let ack = pb::proxy_message::Message::Ack(pb::Ack {
            version: version.to_owned(),
            problems: Vec::new(),
        });
        self.tx
            .send(pb::ProxyMessage { message: Some(ack) })
            .await
            .unwrap();
    }
}
