//! prefpipe-stages: one file per YAML `kind`, and the one registry list.
//!
//! Adding a stage kind = one file here + one line in [`KINDS`].

use prefpipe_core::stage::StageKind;

pub mod backend;
mod ches;
pub mod export;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod judge;
pub mod lineage;
pub mod logprob;
mod model_ref;
mod rules;
pub mod score;
pub mod select;
pub mod source;
pub mod sql;
mod strategy_stage;
pub mod train;

/// Every stage kind, in the order `prefpipe` documents them.
pub const KINDS: &[StageKind] = &[
    source::KIND,
    generate::KIND,
    score::KIND,
    judge::KIND,
    logprob::KIND,
    select::KIND,
    filter::KIND,
    train::KIND,
    sql::KIND,
    export::KIND,
];
