//! Where objects come from: a manifests directory (standalone mode) or the cluster (issue #3).

pub mod file;
pub mod kube;
pub mod watch;
