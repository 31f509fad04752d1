//! `margin` filter: keep pairs whose reward gap `margin` (= chosen_reward −
//! rejected_reward, DESIGN §6) is large enough, or inside a band — the
//! reward-gap filters of RLHFlow and of "Finding the Sweet Spot" ablations.
//!
//! `min_margin: t` keeps pairs with margin ≥ t (others: `below_threshold`);
//! `band: [lo, hi]` keeps lo ≤ margin ≤ hi (others: `outside_band`). Exactly
//! one of the two. Pairs with a null or NaN margin are dropped as
//! `non_finite_reward`. Counts are in pairs; the output keeps the input's
//! columns and row order.

use arrow::array::{Array, BooleanArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output};
use prefpipe_core::table::{self, f64_col, Need};
use prefpipe_core::Result;
use serde::{Deserialize, Serialize};

use crate::corpus;
use crate::{one_input, DropReason, Input, Strategy, StrategyKind};

pub const KIND: StrategyKind = StrategyKind {
    name: "margin",
    about: "keep pairs with margin ≥ min_margin, or inside band: [lo, hi]",
    build: |v| Ok(Box::new(Margin::build(v)?)),
    schema: || schemars::schema_for!(Margin),
};

/// `strategy: margin` (filter). Give exactly one of `min_margin` and `band`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Margin {
    /// Keep pairs with `margin` ≥ this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_margin: Option<f64>,
    /// Keep pairs with lo ≤ `margin` ≤ hi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub band: Option<[f64; 2]>,
}

impl Margin {
    /// Parses and validates the config, reporting every problem.
    pub fn build(v: &serde_json::Value) -> Result<Margin, Vec<ConfigError>> {
        let c: Margin = crate::build_config(v)?;
        let mut errs = Vec::new();
        if c.min_margin.is_none() && c.band.is_none() {
            errs.push(ConfigError::new("strategy `margin` needs `min_margin: <number>` or `band: [lo, hi]`"));
        }
        corpus::check_exclusive(("min_margin", c.min_margin.is_some()), ("band", c.band.is_some()), &mut errs);
        if let Some([lo, hi]) = c.band {
            if lo > hi {
                errs.push(corpus::err("band", format!("`band: [lo, hi]` needs lo ≤ hi; got [{lo}, {hi}]")));
            }
        }
        corpus::finish(c, errs)
    }

    /// Whether a pair with this margin is kept, or why not.
    pub fn keep(&self, m: f64) -> Result<(), DropReason> {
        if m.is_nan() {
            return Err(DropReason::NonFiniteReward);
        }
        match (self.min_margin, self.band) {
            (Some(t), _) if m < t => Err(DropReason::BelowThreshold),
            (_, Some([lo, hi])) if m < lo || m > hi => Err(DropReason::OutsideBand),
            _ => Ok(()),
        }
    }
}

impl Strategy for Margin {
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("serializes")
    }
    fn mode(&self) -> Mode {
        Mode::PerPrompt
    }
    fn plan(&self, inputs: &[Input]) -> Result<SchemaRef, Vec<ConfigError>> {
        let input = one_input(KIND.name, inputs)?;
        table::require(input.schema, input.id, "margin", Need::Number).map_err(|e| vec![e])?;
        Ok(std::sync::Arc::new(input.schema.clone()))
    }
    fn run(&self, inputs: &[RecordBatch], schema: &SchemaRef) -> Result<Output> {
        let input = &inputs[0];
        let m = f64_col(input, "margin")?;
        let mut out = Output::default();
        let mask: BooleanArray = (0..m.len())
            .map(|r| {
                let v = if m.is_null(r) { f64::NAN } else { m.value(r) };
                let k = self.keep(v);
                if let Err(d) = k {
                    out.drop(d.as_str(), 1);
                }
                Some(k.is_ok())
            })
            .collect();
        let kept = filter_record_batch(input, &mask)?;
        out.batches.push(kept.with_schema(schema.clone())?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, col_strings, drops};
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> Margin {
        Margin::build(&v).unwrap()
    }

    #[test]
    fn threshold_and_band() {
        // min_margin 0.5: 0.5 ≥ 0.5 kept (inclusive), 0.49 dropped.
        let c = cfg(json!({"min_margin": 0.5}));
        assert_eq!(c.keep(0.5), Ok(()));
        assert_eq!(c.keep(0.49), Err(DropReason::BelowThreshold));
        assert_eq!(c.keep(f64::NAN), Err(DropReason::NonFiniteReward));
        // band [1, 2]: both ends inclusive.
        let c = cfg(json!({"band": [1.0, 2.0]}));
        assert_eq!((c.keep(1.0), c.keep(2.0)), (Ok(()), Ok(())));
        assert_eq!((c.keep(0.99), c.keep(2.01)), (Err(DropReason::OutsideBand), Err(DropReason::OutsideBand)));
    }

    #[test]
    fn bad_parameters() {
        let e = Margin::build(&json!({})).unwrap_err();
        assert!(e[0].message.contains("needs `min_margin: <number>` or `band: [lo, hi]`"));
        let e = Margin::build(&json!({"min_margin": 1, "band": [2.0, 1.0]})).unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(e[0].message.contains("not both"));
        assert!(e[1].message.contains("lo ≤ hi; got [2, 1]"), "{}", e[1].message);
        let e = Margin::build(&json!({"band": [1.0]})).unwrap_err();
        assert!(e[0].message.contains("invalid length 1"), "{}", e[0].message);
    }

    #[test]
    fn filters_a_pairs_table() {
        // max_min pairs of p (margin 3 − 1 = 2), q (0.5 − 0.25 = 0.25), r (1 − 0 = 1), in that order.
        let b = testkit::scored(&[("p", 0, 1.0), ("p", 1, 3.0), ("q", 0, 0.5), ("q", 1, 0.25), ("r", 0, 0.0), ("r", 1, 1.0)], &[]);
        let pairs = testkit::one(&testkit::run(&crate::max_min::MaxMin {}, &[b]).unwrap());
        // min_margin 1 keeps p (2) and r (1): input order.
        let out = testkit::run(&cfg(json!({"min_margin": 1.0})), std::slice::from_ref(&pairs)).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["p", "r"]);
        assert_eq!(drops(&out, "below_threshold"), 1);
        // band [0.2, 1.5] keeps q (0.25) and r (1).
        let out = testkit::run(&cfg(json!({"band": [0.2, 1.5]})), &[pairs]).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["q", "r"]);
        assert_eq!(drops(&out, "outside_band"), 1);
    }
}
