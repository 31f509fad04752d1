//! `listwise`: one ranked list per prompt, for listwise objectives such as
//! LiPO ("LiPO: Listwise Preference Optimization through Learning-to-Rank",
//! Liu et al. 2024) — DESIGN §6 `lists` table, §7.
//!
//! Per prompt, the samples with a finite reward are sorted by reward, best
//! first (ties → lowest sample_idx). `list_size: k` keeps k of the n sorted
//! samples: positions p_i = round(i·(n − 1)/(k − 1)) for i = 0 … k − 1,
//! rounding halves up (so the best, p_0 = 0, and the worst, p_{k−1} = n − 1,
//! are always in, and the rest are evenly spaced); with k ≥ n, or without
//! `list_size`, all n are kept.
//!
//! Prompts with fewer than two such samples are dropped as `too_few_samples`.
//! A list whose rewards are all equal carries no preference (LiPO skips it
//! at training), so it is dropped here as `tie`.
//!
//! Columns: `prompt_id`, `prompt`, `responses`, `rewards` (DESIGN §6), then
//! `sample_idxs: list<uint32>` (which samples the list holds, in list order),
//! then the per-prompt columns carried from the input (values from the best
//! sample's row).

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Builder, ListBuilder, StringBuilder, UInt32Array, UInt32Builder};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output};
use prefpipe_core::table::{self, col, str_col};
use prefpipe_core::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::corpus::{self, cmp_f64};
use crate::groups::{candidates, group_rows, Candidate};
use crate::pairs;
use crate::{one_input, DropReason, Input, Strategy, StrategyKind};

pub const KIND: StrategyKind = StrategyKind {
    name: "listwise",
    about: "one list per prompt sorted by reward, best first; list_size keeps best, worst and evenly spaced between (for LiPO, Liu et al. 2024)",
    build: |v| Ok(Box::new(Listwise::build(v)?)),
    schema: || schemars::schema_for!(Listwise),
};

/// `strategy: listwise`. Writes a lists table (DESIGN §6) plus `sample_idxs`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listwise {
    /// Responses per list, at least 2: the best, the worst and evenly spaced
    /// ranks between (positions round(i·(n − 1)/(k − 1)) of the sorted list).
    /// Prompts with fewer samples keep them all. Leave out to keep every sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_size: Option<u32>,
}

impl Listwise {
    /// Parses and validates the config.
    pub fn build(v: &serde_json::Value) -> Result<Listwise, Vec<ConfigError>> {
        let c: Listwise = crate::build_config(v)?;
        let mut errs = Vec::new();
        if let Some(k) = c.list_size {
            if k < 2 {
                errs.push(corpus::err("list_size", format!("a list needs at least 2 responses (`list_size` ≥ 2); got {k}")));
            }
        }
        corpus::finish(c, errs)
    }
}

/// Positions kept from a sorted list of n: round(i·(n − 1)/(k − 1)), halves
/// up, for i = 0 … k − 1 (in exact integer arithmetic); all of 0 … n − 1 when
/// k ≥ n. Strictly increasing, since the step (n − 1)/(k − 1) is ≥ 1.
pub fn spaced_positions(n: usize, k: usize) -> Vec<usize> {
    if k >= n || k < 2 {
        return (0..n).collect();
    }
    (0..k).map(|i| (2 * i * (n - 1) + (k - 1)) / (2 * (k - 1))).collect()
}

/// The list of one prompt: positions in `c` (sorted by sample_idx), best first.
pub fn pick(c: &[Candidate], list_size: Option<u32>) -> Result<Vec<usize>, DropReason> {
    if c.len() < 2 {
        return Err(DropReason::TooFewSamples);
    }
    let mut order: Vec<usize> = (0..c.len()).collect();
    // Stable sort by reward descending keeps sample_idx order among ties.
    order.sort_by(|&a, &b| cmp_f64(c[b].reward, c[a].reward));
    if c[order[0]].reward <= c[order[c.len() - 1]].reward {
        return Err(DropReason::Tie);
    }
    let k = list_size.map_or(c.len(), |k| k as usize);
    Ok(spaced_positions(c.len(), k).into_iter().map(|p| order[p]).collect())
}

fn sample_idxs_field() -> Field {
    Field::new("sample_idxs", DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))), false)
}

impl Strategy for Listwise {
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("serializes")
    }
    fn mode(&self) -> Mode {
        Mode::PerPrompt
    }
    fn plan(&self, inputs: &[Input]) -> Result<SchemaRef, Vec<ConfigError>> {
        let input = one_input(KIND.name, inputs)?;
        let mut fields = table::lists_fields();
        fields.push(sample_idxs_field());
        let mut errs = pairs::require_scored(input.schema, input.id);
        errs.extend(pairs::collisions(input.schema, input.id, &fields));
        if !errs.is_empty() {
            return Err(errs);
        }
        let carry = pairs::carried(input.schema, &fields);
        fields.extend(carry);
        Ok(Arc::new(Schema::new(fields)))
    }
    fn run(&self, inputs: &[RecordBatch], schema: &SchemaRef) -> Result<Output> {
        let input = &inputs[0];
        let groups = group_rows(input)?;
        let (cands, dropped) = candidates(input, &groups, col::REWARD)?;
        let texts = pairs::Texts::of(input)?;
        // A list of copies of one text (SimPO's scripts drop such prompts) carries no preference.
        let all_same = |c: &[Candidate]| c.iter().all(|x| texts.same(x.row, c[0].row));
        let picks: Vec<_> = cands
            .par_iter()
            .map(|c| {
                if c.len() >= 2 && all_same(c) {
                    return Err(DropReason::IdenticalResponses);
                }
                pick(c, self.list_size).map(|ps| ps.into_iter().map(|p| c[p]).collect::<Vec<_>>())
            })
            .collect();
        let mut out = Output::default();
        dropped.record(&mut out);
        let response = str_col(input, col::RESPONSE)?;
        let mut responses = ListBuilder::new(StringBuilder::new());
        let mut rewards = ListBuilder::new(Float64Builder::new());
        let mut idxs = ListBuilder::new(UInt32Builder::new());
        let mut best = Vec::new();
        let mut worst = Vec::new();
        for p in picks {
            match p {
                Ok(list) => {
                    for c in &list {
                        responses.values().append_value(response.value(c.row));
                        rewards.values().append_value(c.reward);
                        idxs.values().append_value(c.sample_idx);
                    }
                    responses.append(true);
                    rewards.append(true);
                    idxs.append(true);
                    best.push(list[0].row as u32);
                    worst.push(list[list.len() - 1].row as u32);
                }
                Err(r) => out.drop(r.as_str(), 1),
            }
        }
        let best = UInt32Array::from(best);
        let [best_tokens, worst_tokens] = crate::tokens::take_tokens(input, &best, &UInt32Array::from(worst))?;
        let text = |name: &str| -> Result<ArrayRef> {
            let c = input.column_by_name(name).expect("checked at plan time");
            Ok(take(&cast(c, &DataType::Utf8)?, &best, None)?)
        };
        let mut cols: Vec<ArrayRef> = vec![
            text(col::PROMPT_ID)?,
            text(col::PROMPT)?,
            Arc::new(responses.finish()),
            Arc::new(rewards.finish()),
            best_tokens,
            worst_tokens,
            Arc::new(idxs.finish()),
        ];
        for f in schema.fields().iter().skip(cols.len()) {
            let c = input.column_by_name(f.name()).expect("carried columns exist");
            cols.push(take(c, &best, None)?);
        }
        out.batches.push(RecordBatch::try_new(schema.clone(), cols)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::testing::cands;
    use crate::testkit::{self, col_strings, drops};
    use serde_json::json;

    #[test]
    fn spaced_positions_rule() {
        // n = 5, k = 3: i·4/2 = 0, 2, 4.
        assert_eq!(spaced_positions(5, 3), [0, 2, 4]);
        // n = 6, k = 3: i·5/2 = 0, 2.5 → 3 (half up), 5.
        assert_eq!(spaced_positions(6, 3), [0, 3, 5]);
        // n = 5, k = 4: i·4/3 = 0, 1.33 → 1, 2.67 → 3, 4.
        assert_eq!(spaced_positions(5, 4), [0, 1, 3, 4]);
        // n = 10, k = 4: i·9/3 = 0, 3, 6, 9.
        assert_eq!(spaced_positions(10, 4), [0, 3, 6, 9]);
        // n = 8, k = 2: best and worst.
        assert_eq!(spaced_positions(8, 2), [0, 7]);
        // k ≥ n keeps all.
        assert_eq!(spaced_positions(3, 5), [0, 1, 2]);
        assert_eq!(spaced_positions(3, 3), [0, 1, 2]);
    }

    #[test]
    fn sorts_best_first_with_ties_by_sample_idx() {
        // rewards [0.5, 2.0, 0.5, 3.0, -1.0] sorted descending: 3.0 (idx 3), 2.0 (1),
        // 0.5 (0), 0.5 (2) — tie kept in sample_idx order — then -1.0 (4).
        let c = cands(&[0.5, 2.0, 0.5, 3.0, -1.0]);
        assert_eq!(pick(&c, None), Ok(vec![3, 1, 0, 2, 4]));
        // list_size 3 of n = 5 → sorted positions 0, 2, 4 → idx 3, 0, 4.
        assert_eq!(pick(&c, Some(3)), Ok(vec![3, 0, 4]));
        // list_size 9 > n keeps all 5.
        assert_eq!(pick(&c, Some(9)).unwrap().len(), 5);
    }

    #[test]
    fn signed_zeros_tie() {
        // −0.0 == +0.0 (IEEE 754), so rewards [−0.0, 0.0, 1.0] sort as 1.0 (idx 2), then the
        // tie −0.0, 0.0 in sample_idx order (idx 0, 1): [2, 0, 1]. `total_cmp` gave [2, 1, 0].
        assert_eq!(pick(&cands(&[-0.0, 0.0, 1.0]), None), Ok(vec![2, 0, 1]));
        // All zeros of either sign: every reward equal → tie.
        assert_eq!(pick(&cands(&[0.0, -0.0]), None), Err(DropReason::Tie));
    }

    #[test]
    fn equal_rewards_and_singletons_are_dropped() {
        assert_eq!(pick(&cands(&[1.0, 1.0, 1.0]), None), Err(DropReason::Tie));
        assert_eq!(pick(&cands(&[1.0]), None), Err(DropReason::TooFewSamples));
    }

    #[test]
    fn bad_list_size_is_a_config_error() {
        let e = Listwise::build(&json!({"list_size": 1})).unwrap_err();
        assert_eq!(e[0].message, "a list needs at least 2 responses (`list_size` ≥ 2); got 1");
        let e = Listwise::build(&json!({"list_size": -3})).unwrap_err();
        assert!(e[0].message.contains("invalid value"), "{}", e[0].message);
        let e = Listwise::build(&json!({"size": 3})).unwrap_err();
        assert!(e[0].message.contains("unknown field `size`"), "{}", e[0].message);
    }

    #[test]
    fn arrow_lists_table() {
        // p: rewards [1, 3, 2, NaN] → sorted idx 1 (3), 2 (2), 0 (1); list_size 2 → idx 1, 0.
        // q: one sample → too_few_samples. r: [4, 4] → tie.
        let b = testkit::scored(
            &[("p", 0, 1.0), ("p", 1, 3.0), ("p", 2, 2.0), ("p", 3, f64::NAN), ("q", 0, 1.0), ("r", 0, 4.0), ("r", 1, 4.0)],
            &[],
        );
        let out = testkit::run(&Listwise { list_size: Some(2) }, std::slice::from_ref(&b)).unwrap();
        let o = testkit::one(&out);
        assert_eq!(col_strings(&o, "prompt_id"), ["p"]);
        assert_eq!(col_strings(&o, "responses"), ["[p-1, p-0]"]);
        assert_eq!(col_strings(&o, "rewards"), ["[3.0, 1.0]"]);
        assert_eq!(col_strings(&o, "sample_idxs"), ["[1, 0]"]);
        assert_eq!(col_strings(&o, "category"), ["cat-p"]);
        assert_eq!((drops(&out, "non_finite_reward"), drops(&out, "too_few_samples"), drops(&out, "tie")), (1, 1, 1));
        let out = testkit::run(&Listwise { list_size: None }, &[b]).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "rewards"), ["[3.0, 2.0, 1.0]"]);
    }
}
