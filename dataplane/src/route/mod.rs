//! Which route a request takes: the immutable table built from a snapshot ([`table`]), the
//! longest-prefix match ([`router`]), the path normalisation and upstream rewrite ([`path`]),
//! and MockTarget responses ([`mock`]).

pub mod mock;
pub mod path;
pub mod router;
pub mod table;
