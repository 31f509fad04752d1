//! `select`: scored samples → chosen/rejected pairs or ranked lists, with a
//! strategy from `prefpipe_select::SELECT` (DESIGN §7).

use prefpipe_core::stage::{Arity, StageKind};

use crate::strategy_stage;

pub const KIND: StageKind = StageKind {
    name: "select",
    about: "groups of scored samples → pairs or lists (strategy: max_min, reward_points, ...)",
    arity: Arity::Many,
    build: |v| Ok(Box::new(strategy_stage::build(v, "select", prefpipe_select::SELECT, &[], true)?)),
    schema: || strategy_stage::schema("select", prefpipe_select::SELECT, None, true),
};
