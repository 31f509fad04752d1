//! `filter`: pairs → fewer pairs, with a strategy from `prefpipe_select::FILTER`.

use prefpipe_core::stage::{Arity, StageKind};

use crate::strategy_stage;

pub const KIND: StageKind = StageKind {
    name: "filter",
    about: "drop pairs (strategy: margin, ches, ...)",
    arity: Arity::One,
    build: |v| Ok(Box::new(strategy_stage::build(v, "filter", prefpipe_select::FILTER)?)),
    schema: || strategy_stage::schema("filter", prefpipe_select::FILTER),
};
