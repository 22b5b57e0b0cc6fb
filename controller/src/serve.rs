//! The gRPC side: streams the newest configuration to every subscribed proxy and records their
//! ACK/NACK answers and key usage.
//!
//! Each stream remembers what its proxy holds — the routing snapshot's version and each
//! credential shard's — starting from what the proxy said in `Subscribe`, and sends only what
//! differs: a route edit does not resend the keys, a key edit not the routes. Shards go in
//! messages of at most [`MAX_MESSAGE_BYTES`], and the last message of an update carries the
//! `Commit`.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use kanali_proto::v1 as pb;
use kanali_proto::v1::snapshot_service_server::{SnapshotService, SnapshotServiceServer};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::state::{Problem, Published, Rejection, Shared};

/// The most shard bytes put in one message: well under gRPC's default 4 MiB limit.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

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
        let holds = Holds::from(&subscribe);
        tokio::spawn(forward(
            self.shared.subscribe(),
            holds,
            tx,
            self.shutdown.clone(),
        ));

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

/// What a proxy holds, as far as its stream knows.
#[derive(Debug, Default)]
pub struct Holds {
    /// `Snapshot.version` of its routing section.
    pub snapshot: String,
    /// `CredentialShard.version` by index.
    pub shards: Vec<String>,
}

impl From<&pb::Subscribe> for Holds {
    fn from(s: &pb::Subscribe) -> Self {
        Holds {
            snapshot: s.snapshot_version.clone(),
            shards: s.credential_versions.clone(),
        }
    }
}

/// The messages that bring a proxy holding `holds` to `published`, the last with the
/// commit, and what it holds afterwards.
pub fn update(published: &Published, holds: &mut Holds) -> Vec<pb::ControllerMessage> {
    use prost::Message as _;
    let mut messages = Vec::new();
    let mut current = pb::ControllerMessage::default();
    if holds.snapshot != published.snapshot.version {
        current.snapshot = Some((*published.snapshot).clone());
        holds.snapshot = published.snapshot.version.clone();
    }
    holds
        .shards
        .resize(published.credentials.len(), String::new());
    let mut bytes = 0;
    for (held, shard) in holds.shards.iter_mut().zip(published.credentials.iter()) {
        if *held == shard.version {
            continue;
        }
        let len = shard.encoded_len();
        if bytes > 0 && bytes + len > MAX_MESSAGE_BYTES {
            messages.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.credentials.push(shard.clone());
        bytes += len;
        held.clone_from(&shard.version);
    }
    current.commit = Some(pb::Commit {
        version: published.version.clone(),
        snapshot_version: published.snapshot.version.clone(),
        credentials_version: published.credentials_version.clone(),
    });
    messages.push(current);
    messages
}

/// Sends the newest configuration whenever it changes, until the stream or the server goes
/// away. With a capacity-1 channel, a slow proxy holds back at most one message; every
/// version published meanwhile only replaces the watch value, so the proxy gets the newest
/// next, as the difference from what it was last sent.
async fn forward(
    mut published: watch::Receiver<Option<Arc<Published>>>,
    mut holds: Holds,
    tx: Outbound,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next = published.borrow_and_update().clone();
        if let Some(next) = next {
            for msg in update(&next, &mut holds) {
                tokio::select! {
                    sent = tx.send(Ok(msg)) => if sent.is_err() { return },
                    () = stopped(&mut shutdown) => return,
                }
            }
        }
        tokio::select! {
            changed = published.changed() => if changed.is_err() { return },
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
            let problems: Vec<Problem> = ack
                .problems
                .iter()
                .filter_map(|e| {
                    Some(Problem {
                        object: object_name(e.resource.as_ref()?),
                        reason: e.reason.clone(),
                        message: e.message.clone(),
                    })
                })
                .collect();
            if problems.is_empty() {
                tracing::debug!(proxy = %id, version = %ack.version, "ACK");
            } else {
                tracing::warn!(proxy = %id, version = %ack.version, ?problems, "proxy applied a snapshot, but parts of it do not work there");
            }
            shared.update_proxy(id, |p| {
                p.applied_version = Some(ack.version);
                p.rejected = None;
                p.problems = problems;
            });
        }
        Some(Message::Nack(nack)) => {
            let errors: Vec<String> = nack
                .errors
                .iter()
                .map(|e| match &e.resource {
                    Some(r) => format!("{}: {}", object_name(r), e.message),
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
        Some(Message::Usage(usage)) => {
            tracing::debug!(proxy = %id, keys = usage.keys.len(), "key usage");
            shared.record_usage(&usage);
        }
        Some(Message::Subscribe(_)) | None => {
            tracing::debug!(proxy = %id, "ignoring unexpected message on an open stream");
        }
    }
}

/// `Kind ns/name` (`Kind name` when cluster-scoped), as `ObjectRef` displays it, so status
/// can match what proxies report to the objects it describes.
fn object_name(r: &pb::ResourceRef) -> String {
    if r.namespace.is_empty() {
        format!("{} {}", r.kind, r.name)
    } else {
        format!("{} {}/{}", r.kind, r.namespace, r.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_carry_problems_and_the_next_ack_replaces_them() {
        let shared = Shared::default();
        let problem = pb::ResourceError {
            resource: Some(pb::ResourceRef {
                kind: "ApiProxy".into(),
                namespace: "shop".into(),
                name: "orders".into(),
                generation: 3,
            }),
            message: "plugin \"auth\": auth.wasm does not exist".into(),
            reason: "PluginNotFound".into(),
        };
        let ack = |problems| pb::ProxyMessage {
            message: Some(pb::proxy_message::Message::Ack(pb::Ack {
                version: "v1".into(),
                problems,
            })),
        };
        record(&shared, "p1", ack(vec![problem]));
        let state = shared.status().proxies["p1"].clone();
        assert_eq!(state.applied_version.as_deref(), Some("v1"));
        assert_eq!(
            state.problems,
            [Problem {
                object: "ApiProxy shop/orders".into(),
                reason: "PluginNotFound".into(),
                message: "plugin \"auth\": auth.wasm does not exist".into(),
            }]
        );
        // Reports to the Lease holder carry them.
        let json = serde_json::to_string(&state).unwrap();
        let back: crate::state::ProxyState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.problems, state.problems);
        // The module was fixed: the same version, Acked again without problems.
        record(&shared, "p1", ack(Vec::new()));
        assert!(shared.status().proxies["p1"].problems.is_empty());
        // A report from a replica that predates problems still reads.
        let old: crate::state::ProxyState =
            serde_json::from_str(r#"{"connected":true,"streams":1,"last_seen_unix":0}"#).unwrap();
        assert!(old.problems.is_empty());
    }

    fn shard(index: u32, version: &str, entries: usize) -> pb::CredentialShard {
        pb::CredentialShard {
            index,
            version: version.to_owned(),
            entries: (0..entries)
                .map(|i| pb::Credential {
                    digest: vec![0; 32],
                    key: format!("key-{i}"),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn published(routes: &str, shards: Vec<pb::CredentialShard>) -> Published {
        Published {
            version: format!(
                "{routes}+{}",
                shards
                    .iter()
                    .map(|s| s.version.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            snapshot: Arc::new(pb::Snapshot {
                version: routes.to_owned(),
                ..Default::default()
            }),
            credentials: Arc::new(shards),
            credentials_version: String::new(),
        }
    }

    fn snapshot(version: &str) -> Option<Arc<Published>> {
        Some(Arc::new(published(version, vec![shard(0, "s", 1)])))
    }

    #[test]
    fn only_what_differs_is_sent_and_the_last_message_commits() {
        let shards = |v: &str| (0..4).map(|i| shard(i, &format!("{v}{i}"), 1)).collect();
        let mut holds = Holds::default();
        let first = update(&published("r1", shards("a")), &mut holds);
        assert_eq!(first.len(), 1);
        assert!(first[0].snapshot.is_some());
        assert_eq!(first[0].credentials.len(), 4);
        assert!(first[0].commit.is_some());

        // A route edit: the snapshot, no shard.
        let edit = update(&published("r2", shards("a")), &mut holds);
        assert!(edit[0].snapshot.is_some());
        assert!(edit[0].credentials.is_empty());
        // One shard changed: that shard, no snapshot.
        let mut changed: Vec<pb::CredentialShard> = shards("a");
        changed[2] = shard(2, "b2", 1);
        let key = update(&published("r2", changed.clone()), &mut holds);
        assert!(key[0].snapshot.is_none());
        assert_eq!(key[0].credentials.len(), 1);
        assert_eq!(key[0].credentials[0].index, 2);
        // Nothing changed: an empty update that still commits (a new stream, say).
        let same = update(&published("r2", changed), &mut holds);
        assert!(same[0].snapshot.is_none() && same[0].credentials.is_empty());
        assert!(same[0].commit.is_some());

        // A proxy that resubscribes says what it holds and gets only the rest.
        let mut holds = Holds::from(&pb::Subscribe {
            snapshot_version: "r2".into(),
            credential_versions: vec!["a0".into(), "a1".into(), "x".into(), "a3".into()],
            ..Default::default()
        });
        let again = update(&published("r2", shards("a")), &mut holds);
        assert_eq!(again[0].credentials.len(), 1);
        assert!(again[0].snapshot.is_none());
    }

    #[test]
    fn large_credential_sets_are_split_under_the_message_limit() {
        use prost::Message as _;
        // 256 shards of ~8 000 entries, about 100 000 keys' worth of bytes in all.
        let shards: Vec<pb::CredentialShard> =
            (0..256).map(|i| shard(i, &format!("v{i}"), 400)).collect();
        let total: usize = shards.iter().map(|s| s.encoded_len()).sum();
        let messages = update(&published("r", shards), &mut Holds::default());
        assert!(messages.len() > 1);
        for m in &messages {
            assert!(
                m.encoded_len() <= MAX_MESSAGE_BYTES + 64 * 1024,
                "{}",
                m.encoded_len()
            );
        }
        assert!(
            messages[..messages.len() - 1]
                .iter()
                .all(|m| m.commit.is_none())
        );
        assert!(messages.last().unwrap().commit.is_some());
        let sent: usize = messages.iter().map(|m| m.credentials.len()).sum();
        assert_eq!(sent, 256);
        assert!(total > MAX_MESSAGE_BYTES);
    }

    #[tokio::test]
    async fn a_slow_reader_skips_intermediate_versions() {
        let (publish, snapshots) = watch::channel(snapshot("v0"));
        let (_stop, shutdown) = watch::channel(false);
        let (tx, mut rx) = mpsc::channel(1);
        tokio::spawn(forward(snapshots, Holds::default(), tx, shutdown));
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
        let task = tokio::spawn(forward(snapshots, Holds::default(), tx, shutdown));
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
