//! kanali.io/v2 types.
