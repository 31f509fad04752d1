//! `max_min`: chosen = argmax reward, rejected = argmin reward — the
//! RLHFlow recipe and SimPO's baseline (DESIGN §7).

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output};
use prefpipe_core::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::groups::{argmax_by, argmin_by, candidates, group_rows, Candidate};
use crate::pairs::{self, PairRows};
use crate::{one_input, DropReason, Input, Strategy, StrategyKind};

pub const KIND: StrategyKind = StrategyKind {
    name: "max_min",
    about: "chosen = highest reward, rejected = lowest (RLHFlow; SimPO baseline)",
    build: |v| Ok(Box::new(crate::build_config::<MaxMin>(v)?)),
    schema: || schemars::schema_for!(MaxMin),
};

/// `strategy: max_min` takes no parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaxMin {}

/// Picks (chosen, rejected) positions in `c`, or why the prompt is dropped.
pub fn pick(c: &[Candidate]) -> Result<(usize, usize), DropReason> {
    if c.len() < 2 {
        return Err(DropReason::TooFewSamples);
    }
    let hi = argmax_by(c, |c| c.reward);
    let lo = argmin_by(c, |c| c.reward);
    if c[hi].reward > c[lo].reward {
        Ok((hi, lo))
    } else {
        Err(DropReason::Tie)
    }
}

impl Strategy for MaxMin {
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("serializes")
    }
    fn mode(&self) -> Mode {
        Mode::PerPrompt
    }
    fn plan(&self, inputs: &[Input]) -> Result<SchemaRef, Vec<ConfigError>> {
        let input = one_input(KIND.name, inputs)?;
        pairs::pairs_schema(input.schema, input.id, Vec::new())
    }
    fn run(&self, inputs: &[RecordBatch], schema: &SchemaRef) -> Result<Output> {
        let input = &inputs[0];
        let groups = group_rows(input)?;
        let (cands, dropped) = candidates(input, &groups, "reward")?;
        let texts = pairs::Texts::of(input)?;
        let picks: Vec<_> = cands
            .par_iter()
            .map(|c| pick(c).map(|(a, b)| (c[a].row, c[b].row)).and_then(|(a, b)| texts.distinct(a, b).map(|_| (a, b))))
            .collect();
        let mut out = Output::default();
        dropped.record(&mut out);
        let mut rows = PairRows::default();
        for p in picks {
            match p {
                Ok((a, b)) => rows.push(a, b),
                Err(r) => out.drop(r.as_str(), 1),
            }
        }
        out.batches.push(pairs::build(input, schema, &rows, Vec::new())?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::testing::cands;

    #[test]
    fn picks_extremes() {
        // rewards [0.2, 1.5, -0.7, 1.5]: max 1.5 at idx 1 and 3 → lowest idx 1; min -0.7 at idx 2.
        assert_eq!(pick(&cands(&[0.2, 1.5, -0.7, 1.5])), Ok((1, 2)));
    }

    #[test]
    fn arrow_counts_every_drop_reason() {
        use std::sync::Arc;

        use arrow::array::{Float64Array, StringArray, UInt32Array};
        use arrow::datatypes::{DataType, Field, Schema};

        // Prompt a: [NaN, 1, 3] → NaN dropped (1 row), pair (idx 2 > idx 1).
        // Prompt b: [null, 5]   → null dropped (1 row), one sample left → too_few_samples.
        // Prompt c: [2, 2]      → all equal → tie.
        // Prompt d: [inf, -1, 0] → inf dropped (1 row), pair (idx 2 > idx 1).
        let ids = ["a", "a", "a", "b", "b", "c", "c", "d", "d", "d"];
        let idx = [0u32, 1, 2, 0, 1, 0, 1, 0, 1, 2];
        let reward =
            [Some(f64::NAN), Some(1.0), Some(3.0), None, Some(5.0), Some(2.0), Some(2.0), Some(f64::INFINITY), Some(-1.0), Some(0.0)];
        let schema = Arc::new(Schema::new(vec![
            Field::new("prompt_id", DataType::Utf8, false),
            Field::new("prompt", DataType::Utf8, false),
            Field::new("sample_idx", DataType::UInt32, false),
            Field::new("response", DataType::Utf8, false),
            Field::new("reward", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(UInt32Array::from(idx.to_vec())),
                Arc::new(StringArray::from(idx.iter().map(|i| format!("r{i}")).collect::<Vec<_>>())),
                Arc::new(Float64Array::from(reward.to_vec())),
            ],
        )
        .unwrap();
        let s = MaxMin {};
        let out_schema = s.plan(&[Input { id: "scored", schema: &schema }]).unwrap();
        let out = s.run(&[batch], &out_schema).unwrap();
        assert_eq!(out.drops.get("non_finite_reward"), Some(&3));
        assert_eq!(out.drops.get("too_few_samples"), Some(&1));
        assert_eq!(out.drops.get("tie"), Some(&1));
        let b = &out.batches[0];
        assert_eq!(b.num_rows(), 2);
        let got = arrow::util::pretty::pretty_format_batches(&[b.project(&[0, 4, 5, 8]).unwrap()]).unwrap().to_string();
        let want = "\
+-----------+------------+--------------+--------+
| prompt_id | chosen_idx | rejected_idx | margin |
+-----------+------------+--------------+--------+
| a         | 2          | 1            | 2.0    |
| d         | 2          | 1            | 1.0    |
+-----------+------------+--------------+--------+";
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn drops_ties_and_singletons() {
        // all equal: argmax = argmin = idx 0, chosen_reward > rejected_reward fails → tie.
        assert_eq!(pick(&cands(&[2.0, 2.0, 2.0])), Err(DropReason::Tie));
        // n = 1 → too_few_samples.
        assert_eq!(pick(&cands(&[2.0])), Err(DropReason::TooFewSamples));
        assert_eq!(pick(&cands(&[])), Err(DropReason::TooFewSamples));
    }
}
