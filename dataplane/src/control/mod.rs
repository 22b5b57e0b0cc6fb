//! The proxy's side of the control plane: the snapshot subscription to the controller
//! ([`client`]).

pub mod client;
