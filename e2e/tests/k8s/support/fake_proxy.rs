//! A proxy played by the test itself over the snapshot stream.

use std::net::SocketAddr;

use kanali_proto::v1 as pb;
use kanali_proto::v1::snapshot_service_client::SnapshotServiceClient;

use super::DEADLINE;

/// A hand-driven proxy stream, to play a proxy that is slow to apply a snapshot.
pub struct FakeProxy {
    tx: tokio::sync::mpsc::Sender<pb::ProxyMessage>,
    inbound: tonic::Streaming<pb::ControllerMessage>,
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
            current_version: String::new(),
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
        FakeProxy { tx, inbound }
    }

    /// The next snapshot whose routes satisfy `want`.
    pub async fn snapshot_where(&mut self, want: impl Fn(&pb::Snapshot) -> bool) -> pb::Snapshot {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.inbound.message())
                .await
                .expect("a snapshot within the deadline")
                .unwrap()
                .expect("the stream stays open");
            if let Some(s) = msg.snapshot
                && want(&s)
            {
                return s;
            }
        }
    }

    pub async fn ack(&self, version: &str) {
        let ack = pb::proxy_message::Message::Ack(pb::Ack {
            version: version.to_owned(),
        });
        self.tx
            .send(pb::ProxyMessage { message: Some(ack) })
            .await
            .unwrap();
    }
}
