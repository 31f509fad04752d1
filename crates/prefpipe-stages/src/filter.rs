//! `filter`: pairs → fewer pairs, with a strategy from `prefpipe_select::FILTER`,
//! or `ches`, which needs the model to be trained (see `ches.rs`).

use prefpipe_core::stage::{Arity, StageKind};

use crate::strategy_stage;

pub const KIND: StageKind = StageKind {
    name: "filter",
    about: "drop pairs (strategy: margin, ches)",
    arity: Arity::One,
    build: |v| {
        if v.get("strategy").and_then(|s| s.as_str()) == Some(prefpipe_select::ches::NAME) {
            let mut rest = v.clone();
            rest.as_object_mut().expect("a mapping").remove("strategy");
            return Ok(Box::new(crate::ches::build(&rest)?));
        }
        Ok(Box::new(strategy_stage::build(v, "filter", prefpipe_select::FILTER, &[prefpipe_select::ches::NAME], false)?))
    },
    schema: || {
        let ches = (prefpipe_select::ches::NAME, prefpipe_select::ches::ABOUT, prefpipe_select::ches::schema());
        strategy_stage::schema("filter", prefpipe_select::FILTER, Some(ches), false)
    },
};
