//! Kanali proxy.
