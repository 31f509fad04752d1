//! Building a pairs table (DESIGN §6) from chosen/rejected row indices.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, StringArray, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::ConfigError;
use prefpipe_core::table::{self, col, is_per_sample, str_col, Need};
use prefpipe_core::Result;

use crate::DropReason;

/// Plan-time check of a scored table; the columns every pairs strategy reads.
pub fn require_scored(input: &Schema, input_id: &str) -> Vec<ConfigError> {
    let mut errs = require_samples(input, input_id);
    errs.extend(table::require(input, input_id, col::REWARD, Need::Number).err());
    errs
}

/// Plan-time check of a samples table (a scored one without `reward`).
pub fn require_samples(input: &Schema, input_id: &str) -> Vec<ConfigError> {
    [(col::PROMPT_ID, Need::Text), (col::PROMPT, Need::Text), (col::RESPONSE, Need::Text), (col::SAMPLE_IDX, Need::Integer)]
        .into_iter()
        .filter_map(|(c, need)| table::require(input, input_id, c, need).err())
        .collect()
}

/// Per-prompt columns carried into pairs: every input column that does not
/// describe one sample (DESIGN §6), except floats (scores are per sample).
/// Values come from the chosen sample's row.
pub fn carried(input: &Schema, taken: &[Field]) -> Vec<Field> {
    input
        .fields()
        .iter()
        .filter(|f| {
            !is_per_sample(f.name())
                && !matches!(f.data_type(), DataType::Float16 | DataType::Float32 | DataType::Float64)
                && !taken.iter().any(|t| t.name() == f.name())
        })
        .map(|f| f.as_ref().clone())
        .collect()
}

/// Plan-time check that the input has none of the columns a strategy writes
/// (`written`; `prompt_id` and `prompt` are the input's own): a `chosen` or
/// `margin` column of the input would otherwise be replaced without a word.
pub fn collisions(input: &Schema, input_id: &str, written: &[Field]) -> Vec<ConfigError> {
    written
        .iter()
        .map(|f| f.name().as_str())
        .filter(|n| *n != col::PROMPT_ID && *n != col::PROMPT && input.field_with_name(n).is_ok())
        .map(|n| {
            ConfigError::at(
                "input",
                format!("input `{input_id}` already has a column `{n}`, which this strategy writes; rename or drop it upstream (a `sql` stage) so it is not replaced"),
            )
        })
        .collect()
}

/// The pairs schema: DESIGN §6 columns, then the strategy's, then carried ones.
pub fn pairs_schema(input: &Schema, input_id: &str, extra: Vec<Field>) -> Result<SchemaRef, Vec<ConfigError>> {
    let mut fields = table::pairs_fields();
    fields.extend(extra);
    let mut errs = require_scored(input, input_id);
    errs.extend(collisions(input, input_id, &fields));
    if !errs.is_empty() {
        return Err(errs);
    }
    let carry = carried(input, &fields);
    fields.extend(carry);
    Ok(Arc::new(Schema::new(fields)))
}

/// The responses of a scored batch, to tell a pair of two copies of one
/// text (sampled duplicates): such a pair teaches nothing and is dropped as
/// `identical_responses`.
pub struct Texts(StringArray);

impl Texts {
    pub fn of(input: &RecordBatch) -> Result<Texts> {
        Ok(Texts(str_col(input, col::RESPONSE)?))
    }
    /// Whether rows `a` and `b` hold the same text.
    pub fn same(&self, a: usize, b: usize) -> bool {
        self.0.value(a) == self.0.value(b)
    }
    /// `Err(identical_responses)` when rows `a` and `b` hold the same text.
    pub fn distinct(&self, a: usize, b: usize) -> Result<(), DropReason> {
        if self.same(a, b) {
            Err(DropReason::IdenticalResponses)
        } else {
            Ok(())
        }
    }
}

/// Rows of the pairs table: chosen and rejected row indices into the input
/// batch, and the strategy's extra columns (aligned with them).
#[derive(Default)]
pub struct PairRows {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl PairRows {
    pub fn push(&mut self, chosen: usize, rejected: usize) {
        self.chosen.push(chosen as u32);
        self.rejected.push(rejected as u32);
    }
    pub fn len(&self) -> usize {
        self.chosen.len()
    }
    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }
}

/// Assembles the output batch with `schema` from [`pairs_schema`].
pub fn build(input: &RecordBatch, schema: &SchemaRef, rows: &PairRows, extra: Vec<ArrayRef>) -> Result<RecordBatch> {
    let ci = UInt32Array::from(rows.chosen.clone());
    let ri = UInt32Array::from(rows.rejected.clone());
    let col_as = |name: &str, t: &DataType| -> Result<ArrayRef> {
        let c = input.column_by_name(name).expect("checked at plan time");
        Ok(cast(c, t)?)
    };
    let prompt_id = col_as(col::PROMPT_ID, &DataType::Utf8)?;
    let prompt = col_as(col::PROMPT, &DataType::Utf8)?;
    let response = col_as(col::RESPONSE, &DataType::Utf8)?;
    let idx = col_as(col::SAMPLE_IDX, &DataType::UInt32)?;
    let reward = col_as(col::REWARD, &DataType::Float64)?;
    let chosen_reward = take(&reward, &ci, None)?;
    let rejected_reward = take(&reward, &ri, None)?;
    let cr = chosen_reward.as_any().downcast_ref::<Float64Array>().expect("f64");
    let rr = rejected_reward.as_any().downcast_ref::<Float64Array>().expect("f64");
    let margin: Float64Array = cr.iter().zip(rr.iter()).map(|(a, b)| Some(a? - b?)).collect();
    let mut cols: Vec<ArrayRef> = vec![
        take(&prompt_id, &ci, None)?,
        take(&prompt, &ci, None)?,
        take(&response, &ci, None)?,
        take(&response, &ri, None)?,
        take(&idx, &ci, None)?,
        take(&idx, &ri, None)?,
        chosen_reward.clone(),
        rejected_reward.clone(),
        Arc::new(margin),
    ];
    cols.extend(crate::tokens::take_tokens(input, &ci, &ri)?);
    cols.extend(extra);
    for f in schema.fields().iter().skip(cols.len()) {
        let c = input.column_by_name(f.name()).expect("carried columns exist");
        cols.push(take(c, &ci, None)?);
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::testkit::{self, col_strings, drops, with_responses};
    use crate::{Input, Strategy};

    fn strategy(name: &str, v: serde_json::Value) -> Box<dyn Strategy> {
        (crate::SELECT.iter().find(|k| k.name == name).unwrap().build)(&v).unwrap()
    }

    #[test]
    fn identical_chosen_and_rejected_texts_are_dropped_in_every_strategy() {
        // p: rewards [3, 1, 0] with texts [A, B, A]: max (idx 0) and min (idx 2) are two copies
        // of A, so max_min's pair is dropped; q: rewards [2, 1], texts [C, D] → pair (0, 1).
        let b = testkit::scored(&[("p", 0, 3.0), ("p", 1, 1.0), ("p", 2, 0.0), ("q", 0, 2.0), ("q", 1, 1.0)], &[]);
        let b = with_responses(&b, &["A", "B", "A", "C", "D"]);
        let out = testkit::run(strategy("max_min", json!({})).as_ref(), std::slice::from_ref(&b)).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["q"]);
        assert_eq!(drops(&out, "identical_responses"), 1);
        // reward_points max vs mu-2sigma: p's μ = 4/3, σ = √(14/9) ≈ 1.247, μ − 2σ ≈ −1.16 →
        // closest reward 0 (idx 2) — the copy of the max: dropped. min/max likewise.
        for v in [json!({}), json!({"chosen": "max", "rejected": "min"})] {
            let out = testkit::run(strategy("reward_points", v).as_ref(), std::slice::from_ref(&b)).unwrap();
            assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["q"]);
            assert_eq!(drops(&out, "identical_responses"), 1);
        }
        // repeat_ranking with rankers j1 = j2 = reward: Borda winner idx 0, loser idx 2 (copies).
        let r = vec![3.0, 1.0, 0.0, 2.0, 1.0];
        let b2 = with_responses(
            &testkit::scored(&[("p", 0, 3.0), ("p", 1, 1.0), ("p", 2, 0.0), ("q", 0, 2.0), ("q", 1, 1.0)], &[("j1", r.clone()), ("j2", r)]),
            &["A", "B", "A", "C", "D"],
        );
        let out = testkit::run(strategy("repeat_ranking", json!({"rankers": ["j1", "j2"]})).as_ref(), &[b2]).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["q"]);
        assert_eq!(drops(&out, "identical_responses"), 1);
        // listwise drops a list only when all its texts are one: r has texts [E, E].
        let b3 = testkit::scored(&[("p", 0, 3.0), ("p", 1, 1.0), ("p", 2, 0.0), ("r", 0, 2.0), ("r", 1, 1.0)], &[]);
        let b3 = with_responses(&b3, &["A", "B", "A", "E", "E"]);
        let out = testkit::run(strategy("listwise", json!({})).as_ref(), &[b3]).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["p"]);
        assert_eq!(drops(&out, "identical_responses"), 1);
    }

    #[test]
    fn small_margin_skips_pairs_of_copies() {
        // rewards [3, 1, 2], texts [A, A, B], r̂ = 0.1·(logp_policy − logp_reference) = [0, 0, 0.5]:
        // pair 0/1 (two copies of A, margin 0) is skipped; of 0/2 (|0 − 0.5| = 0.5) and
        // 2/1 (|0.5 − 0| = 0.5), the tie goes to chosen_idx 0 → (0, 2).
        let rows = [
            ("p", 0, 3.0, -1.0, -1.0),
            ("p", 1, 1.0, -1.0, -1.0),
            ("p", 2, 2.0, 4.0, -1.0),
            ("q", 0, 1.0, 0.0, 0.0),
            ("q", 1, 2.0, 0.0, 0.0),
        ];
        let b = with_responses(&crate::small_margin::tests::batch(&rows), &["A", "A", "B", "C", "C"]);
        let out = testkit::run(strategy("small_margin", json!({})).as_ref(), &[b]).unwrap();
        let o = testkit::one(&out);
        assert_eq!(col_strings(&o, "prompt_id"), ["p"]);
        assert_eq!((col_strings(&o, "chosen_idx"), col_strings(&o, "rejected_idx")), (vec!["0".to_string()], vec!["2".to_string()]));
        // q's only pair is two copies of C.
        assert_eq!(drops(&out, "identical_responses"), 1);
    }

    #[test]
    fn input_columns_the_strategy_writes_are_refused() {
        // A scored table with its own `chosen` column: the pairs table's `chosen` would replace it.
        let b = testkit::scored(&[("p", 0, 1.0), ("p", 1, 2.0)], &[]);
        let b = testkit::with_text_column(&b, "chosen", &["x", "y"]);
        for (name, v) in
            [("max_min", json!({})), ("reward_points", json!({})), ("repeat_ranking", json!({"rankers": ["reward", "reward"]}))]
        {
            let e = strategy(name, v).plan(&[Input { id: "scored", schema: &b.schema() }]).unwrap_err();
            assert!(
                e.iter().any(|e| e.message.contains("input `scored` already has a column `chosen`, which this strategy writes")),
                "{name}: {e:?}"
            );
        }
        // Lists write `responses`, `rewards` and `sample_idxs`.
        let b = testkit::with_text_column(&testkit::scored(&[("p", 0, 1.0)], &[]), "rewards", &["x"]);
        let e = strategy("listwise", json!({})).plan(&[Input { id: "scored", schema: &b.schema() }]).unwrap_err();
        assert!(e[0].message.contains("already has a column `rewards`"), "{e:?}");
    }
}
