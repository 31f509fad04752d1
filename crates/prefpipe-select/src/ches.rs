//! `ches` filter: drop the pairs most likely to cause likelihood displacement —
//! "Unintentional Unalignment: Likelihood Displacement in Direct Preference
//! Optimization" (Razin et al. 2025), DESIGN §7.
//!
//! For a pair (x, y⁺, y⁻) and the model to be trained, hₜ is the final-layer
//! hidden state (after the final norm: the LM head's input) of the sequence
//! prompt_ids ⊕ response_ids (DESIGN §4), and S(y) = Σ hₜ over the |y|
//! positions that predict the response tokens (last prompt token …
//! second-to-last response token; `prefpipe_models::Model::hidden_sums`). Then
//!
//!   CHES(x, y⁺, y⁻)    = ⟨S⁺, S⁻⟩ − ‖S⁺‖²
//!   ln-CHES(x, y⁺, y⁻) = ⟨S⁺, S⁻⟩/(|y⁺|·|y⁻|) − ‖S⁺‖²/|y⁺|²
//!
//! A high score means the model embeds the two responses alike, so DPO on
//! the pair tends to push probability mass off the chosen response. The
//! corpus rule orders pairs by the score (`by: ln_ches`, the default, or
//! `ches`) descending, then (prompt_id, chosen_idx, rejected_idx) ascending,
//! and drops the first ⌈drop·count⌉ (or `drop_count`) as `above_threshold`;
//! the survivors keep their input order and gain `ches` and `ln_ches` columns.
//! With neither `drop` nor `drop_count`, no pair is dropped (scores only).
//!
//! This module is the math and the table logic only: the `filter` stage
//! computes the hidden-state sums with the model and calls [`ches`] and
//! [`filter_by_scores`]. It is not in [`crate::FILTER`], whose strategies run
//! without a model.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output};
use prefpipe_core::table::{self, col, str_col, u32_col, Need};
use prefpipe_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::corpus::{self, ceil_count, cmp_f64};
use crate::{one_input, DropReason, Input};

/// The strategy name, as written in `strategy: ches`.
pub const NAME: &str = "ches";
/// One line for `prefpipe` docs.
pub const ABOUT: &str =
    "drop the pairs with the highest (length-normalised) CHES score, the likelihood-displacement risk (Razin et al. 2025, \"Unintentional Unalignment\")";

/// Which score orders the pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChesBy {
    /// ⟨S⁺, S⁻⟩ − ‖S⁺‖².
    Ches,
    /// ⟨S⁺, S⁻⟩/(|y⁺||y⁻|) − ‖S⁺‖²/|y⁺|² (the paper's recommended score).
    #[default]
    LnChes,
}

/// `strategy: ches` (filter). Reads a pairs table (`prompt_id`, `prompt`,
/// `chosen`, `rejected`); adds `ches` and `ln_ches`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ches {
    /// The model to be trained: a name from `models:` or a Hugging Face directory.
    pub model: String,
    /// Score that orders the pairs: `ln_ches` (default) or `ches`.
    #[serde(default)]
    pub by: ChesBy,
    /// Fraction of pairs to drop, in [0, 1): the ⌈drop·count⌉ highest scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<f64>,
    /// Number of pairs to drop (the highest scores), instead of `drop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_count: Option<u64>,
    /// Sequences per forward pass (≥ 1).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Render prompts with the model's chat template (DESIGN §4).
    #[serde(default)]
    pub chat_template: bool,
}

fn default_batch_size() -> u32 {
    8
}

/// JSON Schema of the config (without `strategy`).
pub fn schema() -> schemars::Schema {
    schemars::schema_for!(Ches)
}

impl Ches {
    /// Parses and validates the config (the stage config minus `strategy`), reporting every problem.
    pub fn build(v: &serde_json::Value) -> Result<Ches, Vec<ConfigError>> {
        let c: Ches = crate::build_config(v)?;
        let mut errs = Vec::new();
        if let Some(d) = c.drop {
            if !(0.0..1.0).contains(&d) {
                errs.push(corpus::err("drop", format!("`drop` is a fraction in [0, 1); got {d}")));
            }
        }
        corpus::check_exclusive(("drop", c.drop.is_some()), ("drop_count", c.drop_count.is_some()), &mut errs);
        if c.batch_size == 0 {
            errs.push(corpus::err("batch_size", "`batch_size` must be at least 1"));
        }
        if c.model.trim().is_empty() {
            errs.push(corpus::err("model", "`model` is empty; name a model from `models:` or a directory"));
        }
        corpus::finish(c, errs)
    }

    /// The typed config with defaults, for the stage's content key.
    pub fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("serializes")
    }

    /// Corpus-level: the stage must see every pair at once.
    pub fn mode(&self) -> Mode {
        Mode::Whole
    }

    /// Plan-time check of the pairs input; returns the output schema (the
    /// input's columns, then `ches` and `ln_ches`).
    pub fn plan(&self, inputs: &[Input]) -> Result<SchemaRef, Vec<ConfigError>> {
        let input = one_input(NAME, inputs)?;
        let mut errs: Vec<ConfigError> = [col::PROMPT_ID, col::PROMPT, "chosen", "rejected"]
            .into_iter()
            .filter_map(|c| table::require(input.schema, input.id, c, Need::Text).err())
            .collect();
        for c in ["ches", "ln_ches"] {
            if input.schema.field_with_name(c).is_ok() {
                errs.push(ConfigError::new(format!("input `{}` already has a `{c}` column (from an earlier ches filter?)", input.id)));
            }
        }
        corpus::finish(output_schema(input.schema), errs)
    }

    /// How many of `n` pairs are dropped.
    pub fn drop_of(&self, n: usize) -> usize {
        match (self.drop, self.drop_count) {
            (_, Some(k)) => (k as usize).min(n),
            (Some(f), None) => ceil_count(f, n),
            (None, None) => 0,
        }
    }
}

/// The output schema: `input`'s columns, then `ches` and `ln_ches` (Float64).
pub fn output_schema(input: &Schema) -> SchemaRef {
    table::with_fields(input, [Field::new("ches", DataType::Float64, false), Field::new("ln_ches", DataType::Float64, false)])
}

/// (CHES, ln-CHES) of a pair from S⁺ = `s_pos`, S⁻ = `s_neg` and the response
/// lengths |y⁺| = `len_pos`, |y⁻| = `len_neg` (tokens, EOS included), in f64.
/// Panics if the two sums have different lengths (different models).
pub fn ches(s_pos: &[f32], s_neg: &[f32], len_pos: usize, len_neg: usize) -> (f64, f64) {
    assert_eq!(s_pos.len(), s_neg.len(), "S⁺ and S⁻ must come from the same model");
    let (mut dot, mut sq) = (0f64, 0f64);
    for (&p, &n) in s_pos.iter().zip(s_neg) {
        let (p, n) = (p as f64, n as f64);
        dot += p * n;
        sq += p * p;
    }
    let (lp, ln) = (len_pos as f64, len_neg as f64);
    (dot - sq, dot / (lp * ln) - sq / (lp * lp))
}

/// Which pairs the corpus rule drops: the `n_drop` first when ordered by
/// `score` descending, then (prompt_id, chosen_idx, rejected_idx) ascending,
/// then row order.
pub fn dropped(score: &[f64], prompt_id: &[&str], pair_idx: &[(u32, u32)], n_drop: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..score.len()).collect();
    order.sort_by(|&a, &b| cmp_f64(score[b], score[a]).then_with(|| prompt_id[a].cmp(prompt_id[b])).then(pair_idx[a].cmp(&pair_idx[b])));
    let mut out = vec![false; score.len()];
    for &i in order.iter().take(n_drop) {
        out[i] = true;
    }
    out
}

/// Applies the corpus rule to a pairs batch given each row's scores (aligned
/// with its rows): drops the highest-scoring pairs (counted as
/// `above_threshold`) and returns the survivors in input order with `ches`
/// and `ln_ches` appended (the schema of [`output_schema`]). A non-finite
/// score is a run-time error.
pub fn filter_by_scores(batch: &RecordBatch, ches: &[f64], ln_ches: &[f64], cfg: &Ches) -> Result<Output> {
    let n = batch.num_rows();
    if ches.len() != n || ln_ches.len() != n {
        return Err(Error::Runtime(format!(
            "ches: {} ches and {} ln_ches scores for {n} pairs; there must be one of each per pair",
            ches.len(),
            ln_ches.len()
        )));
    }
    let ids = str_col(batch, col::PROMPT_ID)?;
    let id = |r: usize| if arrow::array::Array::is_null(&ids, r) { "" } else { ids.value(r) };
    if let Some(r) = (0..n).find(|&r| !ches[r].is_finite() || !ln_ches[r].is_finite()) {
        return Err(Error::Runtime(format!(
            "ches: the score of the pair at row {r} (prompt `{}`) is not finite (ches {}, ln_ches {}); the model's hidden states overflowed",
            id(r),
            ches[r],
            ln_ches[r]
        )));
    }
    let idx = |name: &str| -> Result<Option<Vec<u32>>> {
        Ok(match batch.column_by_name(name) {
            Some(_) => Some(u32_col(batch, name)?.values().to_vec()),
            None => None,
        })
    };
    let (ci, ri) = (idx("chosen_idx")?, idx("rejected_idx")?);
    let pair_idx: Vec<(u32, u32)> = (0..n).map(|r| (ci.as_ref().map_or(0, |v| v[r]), ri.as_ref().map_or(0, |v| v[r]))).collect();
    let prompt_ids: Vec<&str> = (0..n).map(id).collect();
    let score = match cfg.by {
        ChesBy::Ches => ches,
        ChesBy::LnChes => ln_ches,
    };
    let gone = dropped(score, &prompt_ids, &pair_idx, cfg.drop_of(n));
    let mask: BooleanArray = gone.iter().map(|g| Some(!g)).collect();
    let mut out = Output::default();
    out.drop(DropReason::AboveThreshold.as_str(), gone.iter().filter(|g| **g).count() as u64);
    let kept = filter_record_batch(batch, &mask)?;
    let keep_f = |v: &[f64]| -> ArrayRef {
        Arc::new(Float64Array::from(v.iter().zip(&gone).filter(|(_, g)| !**g).map(|(x, _)| *x).collect::<Vec<_>>()))
    };
    let mut cols = kept.columns().to_vec();
    cols.push(keep_f(ches));
    cols.push(keep_f(ln_ches));
    out.batches.push(RecordBatch::try_new(output_schema(&batch.schema()), cols)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, col_strings, drops};
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> Ches {
        let mut v = v;
        v["model"] = json!("policy");
        Ches::build(&v).unwrap()
    }

    #[test]
    fn ches_of_identical_sums_is_zero() {
        // S⁺ = S⁻ = S: CHES = ‖S‖² − ‖S‖² = 0; ln-CHES with |y⁺| = |y⁻| = L is
        // ‖S‖²/L² − ‖S‖²/L² = 0 too.
        let s = [1.0f32, -2.0, 0.5];
        assert_eq!(ches(&s, &s, 4, 4), (0.0, 0.0));
    }

    #[test]
    fn ches_by_hand() {
        // S⁺ = (1, 2), S⁻ = (3, −1): ⟨S⁺, S⁻⟩ = 3 − 2 = 1, ‖S⁺‖² = 1 + 4 = 5.
        // CHES = 1 − 5 = −4. With |y⁺| = 2, |y⁻| = 4: ln-CHES = 1/8 − 5/4 = −1.125.
        assert_eq!(ches(&[1.0, 2.0], &[3.0, -1.0], 2, 4), (-4.0, -1.125));
        // Equal lengths L = 2: ln-CHES = CHES / L² = −4/4 = −1.
        assert_eq!(ches(&[1.0, 2.0], &[3.0, -1.0], 2, 2), (-4.0, -1.0));
        // S⁻ = 2·S⁺ = (2, 4): ⟨S⁺, S⁻⟩ = 10, CHES = 10 − 5 = 5 (similar responses score high).
        assert_eq!(ches(&[1.0, 2.0], &[2.0, 4.0], 1, 1).0, 5.0);
    }

    #[test]
    fn ches_accumulates_in_f64() {
        // S⁺ = (1e7, 1), S⁻ = (1e7, 2): ⟨S⁺, S⁻⟩ = 1e14 + 2, ‖S⁺‖² = 1e14 + 1, both exact in f64
        // (< 2⁵³), so CHES = 1. In f32 (spacing 2²³ near 1e14) both round alike and CHES would be 0.
        assert_eq!(ches(&[1e7, 1.0], &[1e7, 2.0], 1, 1).0, 1.0);
    }

    #[test]
    fn corpus_rule_drops_the_highest_scores() {
        // scores [0.5, 2.0, 2.0, −1.0], prompts [a, c, b, d]: descending 2.0 (b before c by
        // prompt_id), 2.0, 0.5, −1.0. Drop 1 → b (row 2); drop 3 → rows 2, 1, 0.
        let s = [0.5, 2.0, 2.0, -1.0];
        let p = ["a", "c", "b", "d"];
        let idx = [(0, 1); 4];
        assert_eq!(dropped(&s, &p, &idx, 1), [false, false, true, false]);
        assert_eq!(dropped(&s, &p, &idx, 3), [true, true, true, false]);
        // −0.0 = +0.0 (IEEE 754): scores [0.0, −0.0] tie, and the tie goes by prompt_id, so
        // dropping 1 drops prompt `a` (row 1); `total_cmp` put +0.0 first and dropped `b`.
        assert_eq!(dropped(&[0.0, -0.0], &["b", "a"], &idx[..2], 1), [false, true]);
        // drop 0.5 of 4 → ⌈2⌉ = 2; drop 0.3 of 4 → ⌈1.2⌉ = 2; drop_count 9 → 4; neither → 0.
        assert_eq!(cfg(json!({"drop": 0.5})).drop_of(4), 2);
        assert_eq!(cfg(json!({"drop": 0.3})).drop_of(4), 2);
        assert_eq!(cfg(json!({"drop_count": 9})).drop_of(4), 4);
        assert_eq!(cfg(json!({})).drop_of(4), 0);
    }

    #[test]
    fn filter_by_scores_keeps_survivors_in_input_order() {
        // max_min pairs of p, q, r (in that order). ln_ches [0.1, 0.9, 0.5], ches [3, 1, 2].
        // by ln_ches, drop_count 1 → q (0.9) goes; by ches → p (3) goes.
        let b = testkit::scored(&[("p", 0, 1.0), ("p", 1, 3.0), ("q", 0, 0.5), ("q", 1, 0.25), ("r", 0, 0.0), ("r", 1, 1.0)], &[]);
        let pairs = testkit::one(&testkit::run(&crate::max_min::MaxMin {}, &[b]).unwrap());
        let c = cfg(json!({"drop_count": 1}));
        let schema = c.plan(&[Input { id: "pairs", schema: &pairs.schema() }]).unwrap();
        let out = filter_by_scores(&pairs, &[3.0, 1.0, 2.0], &[0.1, 0.9, 0.5], &c).unwrap();
        let o = testkit::one(&out);
        assert_eq!(o.schema(), schema);
        assert_eq!(col_strings(&o, "prompt_id"), ["p", "r"]);
        assert_eq!(col_strings(&o, "ln_ches"), ["0.1", "0.5"]);
        assert_eq!(col_strings(&o, "ches"), ["3.0", "2.0"]);
        assert_eq!(drops(&out, "above_threshold"), 1);
        let out = filter_by_scores(&pairs, &[3.0, 1.0, 2.0], &[0.1, 0.9, 0.5], &cfg(json!({"drop_count": 1, "by": "ches"}))).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["q", "r"]);
        // Non-finite scores and misaligned lengths are errors, not panics.
        let e = filter_by_scores(&pairs, &[3.0, f64::NAN, 2.0], &[0.1, 0.9, 0.5], &c).unwrap_err();
        assert!(e.to_string().contains("row 1 (prompt `q`) is not finite"), "{e}");
        let e = filter_by_scores(&pairs, &[3.0], &[0.1], &c).unwrap_err();
        assert!(e.to_string().contains("1 ches and 1 ln_ches scores for 3 pairs"), "{e}");
    }

    #[test]
    fn bad_parameters() {
        let e = Ches::build(&json!({"model": "m", "by": "chess"})).unwrap_err();
        assert_eq!(e[0].message, "unknown variant `chess`, expected `ches` or `ln_ches`");
        assert_eq!(e[0].path, vec![prefpipe_core::yaml::PathSeg::Key("by".into())]);
        let e = Ches::build(&json!({"model": "m", "drop": 1.0, "drop_count": 2, "batch_size": 0})).unwrap_err();
        let msgs: Vec<&str> = e.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            msgs,
            ["`drop` is a fraction in [0, 1); got 1", "give `drop` or `drop_count`, not both", "`batch_size` must be at least 1"]
        );
        let e = Ches::build(&json!({"drop": 0.1})).unwrap_err();
        assert!(e[0].message.contains("missing field `model`"), "{}", e[0].message);
        // Defaults: by ln_ches, batch_size 8, no chat template.
        let c = cfg(json!({}));
        assert_eq!((c.by, c.batch_size, c.chat_template), (ChesBy::LnChes, 8, false));
        assert_eq!(c.config(), json!({"model": "policy", "by": "ln_ches", "batch_size": 8, "chat_template": false}));
        // The pairs input must have the texts the model reads.
        let s = Schema::new(vec![Field::new("prompt_id", DataType::Utf8, false)]);
        let e = c.plan(&[Input { id: "pairs", schema: &s }]).unwrap_err();
        assert_eq!(e.len(), 3);
    }
}
