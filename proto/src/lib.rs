//! Generated types and gRPC stubs for the Kanali snapshot stream.
//!
//! The controller serves `SnapshotService`; every proxy opens one `Stream`, sends `Subscribe`,
//! then receives full snapshots and answers each with `Ack` or `Nack`. The `.proto` file is the
//! contract: `proto/kanali/snapshot/v1/snapshot.proto`.

/// `kanali.snapshot.v1`: snapshot messages and the `SnapshotService` client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kanali.snapshot.v1");
}
