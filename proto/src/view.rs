//! How a proxy reads the controller's messages: as [`v1`](crate::v1) says, except that each
//! route of a routing snapshot stays encoded.
//!
//! A one-route edit sends the whole routes section again, and decoding a thousand routes costs
//! a proxy more than building the one that changed. Left encoded, a route that comes again
//! unchanged is recognised by its bytes and keeps what the proxy built for it; only new or
//! changed routes are decoded. This reads the same bytes on the wire: a `repeated bytes` field
//! and a `repeated Route` field are both length-delimited records, so nothing about the
//! protocol changes and the controller is the same for every proxy.
//!
//! The messages are written by hand, mirroring `snapshot.proto` field by field. The tests
//! below check that a message with every field set reads and writes back to the same bytes, so
//! a field added to the `.proto` and not here fails them instead of being dropped.

use prost::bytes::Bytes;

use crate::v1;

/// `ControllerMessage`, with its snapshot as a [`Snapshot`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ControllerMessage {
    /// The routing section, when it differs from the one the proxy holds.
    #[prost(message, optional, tag = "1")]
    pub snapshot: Option<Snapshot>,
    /// Credential shards that differ from the ones the proxy holds.
    #[prost(message, repeated, tag = "2")]
    pub credentials: Vec<v1::CredentialShard>,
    /// Ends an update (see `v1::ControllerMessage::commit`).
    #[prost(message, optional, tag = "3")]
    pub commit: Option<v1::Commit>,
}

/// `Snapshot`, with each route left encoded (a `v1::Route` each).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Snapshot {
    /// `v1::Snapshot::version`.
    #[prost(string, tag = "1")]
    pub version: String,
    /// `v1::Snapshot::routes`, each as it came on the wire.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub routes: Vec<Bytes>,
    /// `v1::Snapshot::tls`.
    #[prost(message, repeated, tag = "3")]
    pub tls: Vec<v1::TlsMaterial>,
    /// `v1::Snapshot::services`.
    #[prost(message, repeated, tag = "4")]
    pub services: Vec<v1::ServiceEndpoints>,
    /// `v1::Snapshot::routes_version`.
    #[prost(string, tag = "5")]
    pub routes_version: String,
}

impl From<&v1::Snapshot> for Snapshot {
    /// What a proxy receives for `snapshot` (for tests and benchmarks that build snapshots).
    fn from(snapshot: &v1::Snapshot) -> Self {
        use prost::Message as _;
        Snapshot {
            version: snapshot.version.clone(),
            routes: snapshot
                .routes
                .iter()
                .map(|r| Bytes::from(r.encode_to_vec()))
                .collect(),
            tls: snapshot.tls.clone(),
            services: snapshot.services.clone(),
            routes_version: snapshot.routes_version.clone(),
        }
    }
}

/// Opens `SnapshotService/Stream` as the generated client does, reading the answers as
/// [`ControllerMessage`]s.
pub async fn stream<T>(
    grpc: &mut tonic::client::Grpc<T>,
    request: impl tonic::IntoStreamingRequest<Message = v1::ProxyMessage>,
) -> Result<tonic::Response<tonic::codec::Streaming<ControllerMessage>>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {}", e.into())))?;
    let codec = tonic_prost::ProstCodec::<v1::ProxyMessage, ControllerMessage>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/kanali.snapshot.v1.SnapshotService/Stream",
    );
    let mut request = request.into_streaming_request();
    request.extensions_mut().insert(tonic::GrpcMethod::new(
        "kanali.snapshot.v1.SnapshotService",
        "Stream",
    ));
    grpc.streaming(request, path, codec).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use prost::Message as _;

    fn source(name: &str) -> Option<v1::ResourceRef> {
        Some(v1::ResourceRef {
            kind: "ApiProxy".into(),
            namespace: "shop".into(),
            name: name.into(),
            generation: 3,
        })
    }

    /// Every field of the snapshot and its route set, written without `..Default::default()`
    /// so that a field added to the `.proto` does not compile here until it is set.
    fn full() -> v1::ControllerMessage {
        let route = v1::Route {
            source: source("orders"),
            path: "/orders".into(),
            virtual_host: "shop.example".into(),
            target_path: "/v1".into(),
            backend: Some(v1::route::Backend::Endpoint(v1::Endpoint {
                scheme: "https".into(),
                authority: "orders:443".into(),
                tls: "shop/ca#1".into(),
            })),
            timeout_ms: 250,
            plugins: vec![v1::Plugin {
                kind: Some(v1::plugin::Kind::ApiKey(v1::ApiKeyPlugin {
                    binding: "b".into(),
                    header: "x-key".into(),
                    check_options: true,
                })),
            }],
        };
        let mut other = route.clone();
        other.path = "/other".into();
        v1::ControllerMessage {
            snapshot: Some(v1::Snapshot {
                version: "v1".into(),
                routes: vec![route, other],
                tls: vec![v1::TlsMaterial {
                    id: "shop/ca#1".into(),
                    secret: source("ca"),
                    ca_pem: b"ca".to_vec(),
                    cert_pem: b"cert".to_vec(),
                    key_pem: b"key".to_vec(),
                }],
                services: vec![v1::ServiceEndpoints {
                    namespace: "shop".into(),
                    name: "orders".into(),
                    port: 80,
                    cluster_ip: "10.96.0.10".into(),
                    addresses: vec!["10.0.0.1:8080".into()],
                    external_name: "orders.example".into(),
                }],
                routes_version: "r1".into(),
            }),
            credentials: vec![v1::CredentialShard {
                index: 7,
                version: "c7".into(),
                entries: vec![v1::Credential {
                    digest: vec![7; 32],
                    key: "k".into(),
                    revision: 1,
                    active: true,
                    grants: Vec::new(),
                }],
            }],
            commit: Some(v1::Commit {
                version: "v".into(),
                snapshot_version: "v1".into(),
                credentials_version: "c".into(),
            }),
        }
    }

    #[test]
    fn the_view_reads_and_writes_the_same_bytes() {
        let message = full();
        let wire = message.encode_to_vec();
        let view = ControllerMessage::decode(&wire[..]).unwrap();
        assert_eq!(view.encode_to_vec(), wire);
        let snapshot = view.snapshot.as_ref().unwrap();
        let sent = message.snapshot.as_ref().unwrap();
        assert_eq!(snapshot.routes.len(), 2);
        for (bytes, route) in snapshot.routes.iter().zip(&sent.routes) {
            assert_eq!(&v1::Route::decode(&bytes[..]).unwrap(), route);
        }
        assert_eq!(Snapshot::from(sent), *snapshot);
    }
}
