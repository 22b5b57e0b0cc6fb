//! Generated types and gRPC stubs for the Kanali snapshot stream.
//!
//! The controller serves `SnapshotService`; every proxy opens one `Stream`, sends `Subscribe`,
//! then receives full snapshots and answers each with `Ack` or `Nack`. The `.proto` file is the
//! contract: `proto/kanali/snapshot/v1/snapshot.proto`. [`certs`] reads certificates the same
//! way on both sides of the stream. Proxies read the stream through [`view`], which leaves each
//! route encoded until it is known to be new.

pub mod certs;
pub mod exposition;
pub mod version;
pub mod view;

/// `kanali.snapshot.v1`: snapshot messages and the `SnapshotService` client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("kanali.snapshot.v1");
}

/// Whether `v` is a valid Kubernetes label value: at most 63 characters, empty or alphanumeric
/// at both ends with `-`, `_` and `.` allowed between. Part of the contract: the controller
/// checks fixed `LabelMatch` values with it, proxies the values taken from request headers.
pub fn is_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            b.len() <= 63
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => true,
    }
}

impl std::fmt::Debug for v1::TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("id", &self.id)
            .field("secret", &self.secret)
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field(
                "key_pem",
                &format_args!("<redacted, {} bytes>", self.key_pem.len()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values() {
        for ok in ["", "a", "A-b_c.d", "0", &"x".repeat(63)] {
            assert!(super::is_label_value(ok), "{ok:?}");
        }
        for bad in ["-", "a-", "_a", "a b", "a/b", &"x".repeat(64)] {
            assert!(!super::is_label_value(bad), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_a_private_key() {
        let m = super::v1::TlsMaterial {
            id: "ns/s#1".to_owned(),
            key_pem: b"-----BEGIN PRIVATE KEY-----\nSECRET\n".to_vec(),
            ..Default::default()
        };
        let snapshot = super::v1::Snapshot {
            tls: vec![m],
            ..Default::default()
        };
        let text = format!("{snapshot:?}");
        assert!(text.contains("ns/s#1"), "{text}");
        assert!(
            !text.contains("SECRET") && !text.contains("PRIVATE"),
            "{text}"
        );
        assert!(!text.contains("83, 69, 67"), "{text}");
    }
}
