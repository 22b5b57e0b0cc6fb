//! Where traffic comes in: the listeners and their per-connection limits ([`listener`]), the
//! per-request flow and the Kanali error contract ([`server`]), and the HTTPS listener's
//! certificate, reloaded without a restart ([`tls`]).

pub mod listener;
pub mod server;
pub mod tls;
