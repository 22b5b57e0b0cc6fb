//! The gRPC side: streams the newest snapshot to every subscribed proxy and records their
//! ACK/NACK answers.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use kanali_proto::v1 as pb;
use kanali_proto::v1::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::state::{Rejection, Shared};

/// The `SnapshotService` implementation.
#[derive(Clone)]
pub struct SnapshotServer {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

impl SnapshotServer {
    /// A server over the shared state; open streams end when `shutdown` turns true, so a
    /// graceful stop does not wait for proxies that would never hang up.
    pub fn new(
        shared: Arc<Shared>,
        shutdown: watch::Receiver<bool>,
    ) -> SnapshotServiceServer<Self> {
        SnapshotServiceServer::new(SnapshotServer { shared, shutdown })
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotService for SnapshotServer {
    type StreamStream = OutStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::ProxyMessage>>,
    ) -> Result<Response<OutStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let subscribe = match inbound.message().await? {
            Some(pb::ProxyMessage {
                message: Some(pb::proxy_message::Message::Subscribe(s)),
            }) => s,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the stream must be subscribe",
                ));
            }
        };
        let id = if subscribe.proxy_id.is_empty() {
            peer.clone()
        } else {
            subscribe.proxy_id.clone()
        };
        tracing::info!(proxy = %id, %peer, current = %subscribe.current_version, "proxy subscribed");
        self.shared.update_proxy(&id, |p| {
            p.connected = true;
            p.streams += 1;
        });

        // Capacity 1 + a watch receiver = latest wins: while a slow proxy is still receiving
        // one snapshot, newer ones overwrite each other in the watch and only the newest is sent.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(forward(self.shared.subscribe(), tx, self.shutdown.clone()));

        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => record(&shared, &id, msg),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(proxy = %id, %status, "proxy stream ended with an error");
                        break;
                    }
                }
            }
            tracing::info!(proxy = %id, "proxy disconnected");
            shared.update_proxy(&id, |p| {
                p.streams = p.streams.saturating_sub(1);
                p.connected = p.streams > 0;
            });
        });

        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Outbound = mpsc::Sender<Result<pb::ControllerMessage, Status>>;

/// Sends the newest snapshot whenever it changes, until the stream or the server goes away.
/// With a capacity-1 channel, at most one snapshot waits for a slow proxy; every version
/// published meanwhile only replaces the watch value, so the proxy gets the newest next.
async fn forward(
    mut snapshots: watch::Receiver<Option<Arc<pb::Snapshot>>>,
    tx: Outbound,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next = snapshots.borrow_and_update().clone();
        if let Some(snapshot) = next {
            let msg = pb::ControllerMessage {
                snapshot: Some((*snapshot).clone()),
            };
            tokio::select! {
                sent = tx.send(Ok(msg)) => if sent.is_err() { return },
                () = stopped(&mut shutdown) => return,
            }
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            () = stopped(&mut shutdown) => return,
            () = tx.closed() => return,
        }
    }
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn record(shared: &Shared, id: &str, msg: pb::ProxyMessage) {
    use pb::proxy_message::Message;
    match msg.message {
        Some(Message::Ack(ack)) => {
            tracing::debug!(proxy = %id, version = %ack.version, "ACK");
            shared.update_proxy(id, |p| {
                p.applied_version = Some(ack.version);
                p.rejected = None;
            });
        }
        Some(Message::Nack(nack)) => {
            let errors: Vec<String> = nack
                .errors
                .iter()
                .map(|e| match &e.resource {
                    Some(r) if r.namespace.is_empty() => {
                        format!("{} {}: {}", r.kind, r.name, e.message)
                    }
                    Some(r) => format!("{} {}/{}: {}", r.kind, r.namespace, r.name, e.message),
                    None => e.message.clone(),
                })
                .collect();
            tracing::warn!(proxy = %id, version = %nack.version, ?errors, "proxy rejected a snapshot");
            shared.update_proxy(id, |p| {
                p.rejected = Some(Rejection {
                    version: nack.version,
                    errors,
                })
            });
        }
        Some(Message::Subscribe(_)) | None => {
            tracing::debug!(proxy = %id, "ignoring unexpected message on an open stream");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(version: &str) -> Option<Arc<pb::Snapshot>> {
        Some(Arc::new(pb::Snapshot {
            version: version.to_owned(),
            routes: Vec::new(),
            ..Default::default()
        }))
    }

    #[tokio::test]
    async fn a_slow_reader_skips_intermediate_versions() {
        let (publish, snapshots) = watch::channel(snapshot("v0"));
        let (_stop, shutdown) = watch::channel(false);
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(forward(snapshots, tx, shutdown));
        tokio::task::yield_now().await;
        for i in 1..=50 {
            publish.send_replace(snapshot(&format!("v{i}")));
            tokio::task::yield_now().await;
        }
        let mut got = Vec::new();
        while got.last().map(String::as_str) != Some("v50") {
            let msg = rx.recv().await.unwrap().unwrap();
            got.push(msg.snapshot.unwrap().version);
        }
        // v0 (sent at once), at most one version that was waiting in the channel's slot, v50.
        assert_eq!(got.first().map(String::as_str), Some("v0"));
        assert!(got.len() <= 3, "{got:?}");
    }

    #[tokio::test]
    async fn nothing_is_sent_before_the_first_compile_and_shutdown_ends_the_stream() {
        let (publish, snapshots) = watch::channel(None);
        let (stop, shutdown) = watch::channel(false);
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(forward(snapshots, tx, shutdown));
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        publish.send_replace(snapshot("v1"));
        assert_eq!(
            rx.recv().await.unwrap().unwrap().snapshot.unwrap().version,
            "v1"
        );
        stop.send_replace(true);
        task.await.unwrap();
        assert!(rx.recv().await.is_none());
    }
}
