//! How versions are computed, where both sides of the stream must agree: the proxy checks
//! that the shards it holds add up to the version the controller committed.

use sha2::{Digest as _, Sha256};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    // A table, not `write!` per byte: a compile of 100 000 keys hexes every digest.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The version of a set of credential shards: SHA-256 of their versions in index order.
pub fn credentials_version<'a>(shard_versions: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for v in shard_versions {
        h.update(v.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// The version a proxy Acks: SHA-256 of the routing snapshot's and the credentials' versions.
pub fn combined_version(snapshot_version: &str, credentials_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(snapshot_version.as_bytes());
    h.update(b"\n");
    h.update(credentials_version.as_bytes());
    hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_stable_hex_and_order_sensitive() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        let a = credentials_version(["x", "y"]);
        assert_eq!(a.len(), 64);
        assert_eq!(a, credentials_version(["x", "y"]));
        assert_ne!(a, credentials_version(["y", "x"]));
        assert_ne!(combined_version("a", "b"), combined_version("b", "a"));
    }
}
