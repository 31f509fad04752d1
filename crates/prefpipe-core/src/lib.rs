//! prefpipe-core: the engine's spine.
//!
//! YAML as written ([`spec`]) → a checked plan ([`plan`]) → a run against the
//! content-addressed store ([`store`], [`exec`]). Stage kinds implement
//! [`stage::Stage`]; tables are Arrow ([`table`]) persisted as Parquet ([`io`]).
//! No candle, no DataFusion here.

pub mod chunk_cache;
pub mod digest_cache;
pub mod error;
pub mod exec;
pub mod io;
pub mod lease;
pub mod location;
pub mod objstore;
pub mod plan;
pub mod rechunk;
pub mod remote;
pub mod shard;
pub mod spec;
pub mod stage;
pub mod store;
pub mod table;
pub mod yaml;

pub use error::{Diagnostic, Error, Location, Result};
