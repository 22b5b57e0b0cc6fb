//! What the proxy tells its operators about the traffic it serves: Prometheus [`metrics`] and
//! the access log.

pub(crate) mod access_log;
pub mod metrics;
