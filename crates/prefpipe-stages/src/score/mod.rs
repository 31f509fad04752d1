//! `score`: reward columns from reward models and rule rewards, aggregated
//! into `reward` (DESIGN §5 `score`, §6 `scored`).
//!
//! Output = the input + `reward`, then one `reward_<name>` per entry of
//! `reward_models` and of `rules` (in that order). All are nullable float64.
//!
//! - **Reward models** are `*ForSequenceClassification` checkpoints (Llama,
//!   Mistral, Qwen2, Qwen3) with a `score` head. Each reads prompt_ids ⊕
//!   response_ids (DESIGN §4; `chat_template: true` renders the prompt first)
//!   and the head's output at the last token is the reward — the same index
//!   transformers reads. Rows are sorted by length and scored `batch_size` at
//!   a time, right-padded and attention-masked, so batching never changes a
//!   score. A head with `num_labels > 1` also writes each label as
//!   `reward_<name>_<label>` (names from config.json `id2label`, else the
//!   index; characters other than letters, digits and `_` become `_`), and
//!   `reward_<name>` is the one chosen with `label:`, or the weighted sum
//!   Σ wₗ·sₗ given by `labels: {label: w}`.
//! - **Rules** (`exact_match`, `regex`, `length`, `contains`): see [`crate::rules`].
//! - **`aggregate`** over the entries' `reward_<name>` (label columns do not
//!   enter): `mean` = (1/E)·Σₑ xₑ; `weighted` = Σₑ wₑ·xₑ / Σₑ wₑ over the
//!   entries with wₑ > 0 (every entry needs a `weight` ≥ 0, not all 0);
//!   `zscore_mean` = (1/E)·Σₑ (xₑ − μₑ)/σₑ, where μₑ and σₑ (population std)
//!   are taken over the stage's *whole* input, and a column whose values are
//!   all equal contributes 0. `zscore_mean` therefore runs over the whole input
//!   at once (its raw scores are cached per input chunk in the stage's scratch
//!   directory, so a crash resumes without re-scoring); the others run chunk
//!   by chunk.
//!
//! A reward model output that is NaN or ±∞ is stored as null (and so is
//! `reward` for that row), counted as `non_finite_reward`; a row whose
//! sequence is longer than a model's context is likewise null and counted as
//! `too_long`. Such rows are kept, never dropped: `select` drops them later,
//! counted again there.

mod aggregate;
mod columns;
mod config;
mod head;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, str_col, Need};
use prefpipe_core::yaml::PathSeg;
use prefpipe_core::{Error, Result};
use prefpipe_models::{HeadKind, ModelConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::{check_chat, Pair, PairOpts, Prompts, Row, Uses};
use crate::model_ref::ModelRef;
use crate::rules::{at_rule, Compiled, RowText};
pub use crate::rules::{ContainsRule, ExactMatch, LengthRule, LengthUnit, Normalize, RegexRule, Rule};
use prefpipe_core::remote::RemoteModel;

pub const KIND: StageKind = StageKind {
    name: "score",
    about: "reward columns from reward models and rules (exact_match, regex, length, contains), aggregated into `reward`",
    arity: Arity::One,
    build: |v| Ok(Box::new(Score::build(v)?)),
    schema: || schemars::schema_for!(ScoreConfig),
};

use aggregate::ColumnStats;
use columns::Raw;
use config::at_rm;
pub use config::{Aggregate, LabelRef, RewardModel, ScoreConfig};
use head::Head;

struct Score {
    c: ScoreConfig,
    models: Vec<ModelRef>,
    rules: Vec<Compiled>,
}

impl Stage for Score {
    fn mode(&self) -> Mode {
        if self.c.aggregation() == Aggregate::ZscoreMean {
            Mode::Whole
        } else {
            Mode::PerChunk
        }
    }

    fn config(&self) -> Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let s = &inputs[0];
        let input = &cx.input_ids[0];
        let mut errs = Vec::new();
        if !self.models.is_empty() {
            for c in [col::PROMPT, col::RESPONSE] {
                if let Err(e) = table::require(s, input, c, Need::Text) {
                    errs.push(ConfigError { path: vec![PathSeg::Key("reward_models".into())], ..e });
                }
            }
        }
        for (i, r) in self.c.rules.iter().enumerate() {
            for (c, field) in r.text_columns() {
                if let Err(e) = table::require(s, input, c, Need::Text) {
                    errs.push(at_rule(i, field.unwrap_or(""), e.message));
                }
            }
            if let Rule::Length(l) = r {
                if l.unit == LengthUnit::NTokens {
                    if let Err(e) = table::require(s, input, col::N_TOKENS, Need::Integer) {
                        errs.push(at_rule(i, "unit", e.message));
                    }
                }
            }
        }
        let mut heads = Vec::new();
        for i in 0..self.models.len() {
            if let Some(e) = check_chat(s, &cx.input_ids[0], self.c.reward_models[i].chat_template, "chat_template") {
                errs.push(at_rm(i, "chat_template", e.message));
            }
            match self.check_model(cx, i) {
                Ok((h, _)) => heads.push(h),
                Err(e) => {
                    errs.push(e);
                    // Keep checking the other columns as if this head had one label.
                    heads.push(Head { labels: vec!["0".into()], mix: vec![1.0] });
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (name, at) in self.added_names(&heads) {
            if s.field_with_name(&name).is_ok() {
                let how = if name == col::REWARD {
                    "drop or rename it first, e.g. with an `sql` stage"
                } else {
                    "rename the entry, or drop the column first"
                };
                errs.push(ConfigError {
                    path: at,
                    message: format!("input `{input}` already has a `{name}` column, which `score` writes; {how}"),
                });
            } else if !seen.insert(name.clone()) {
                errs.push(ConfigError {
                    path: at,
                    message: format!(
                        "two outputs are named `{name}` (an entry's name collides with a reward model's label column); rename one"
                    ),
                });
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let added = self.added(&heads);
        Ok(table::with_fields(s, added))
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        let mut f = Vec::new();
        for i in 0..self.models.len() {
            f.extend(self.check_model(cx, i)?.1.into_bytes());
            f.push(0);
        }
        Ok(f)
    }

    fn chunk_concurrency(&self, chunk_size: usize) -> usize {
        let slots = self.models.iter().filter_map(ModelRef::slots).max();
        slots.map_or(1, |s| crate::generate::overlap(s, chunk_size * 4))
    }

    fn run_info(&self) -> Option<Value> {
        let infos: Vec<Value> = self.models.iter().filter_map(|m| m.made().and_then(|b| b.run_info())).collect();
        (!infos.is_empty()).then(|| if infos.len() == 1 { infos[0].clone() } else { Value::Array(infos) })
    }

    fn output_aligned(&self, input_aligned: bool) -> bool {
        // zscore_mean writes the whole input as one chunk: every prompt is in it.
        input_aligned || self.mode() == Mode::Whole
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let t = &inputs[0];
        let heads = self.heads_at_run(cx)?;
        let added = self.added(&heads);
        let schema = table::with_fields(&t.schema, added.clone());
        let mut out = Output::default();
        let merge = |out: &mut Output, raw: &Raw| {
            for (k, v) in &raw.drops {
                out.drop(k, *v);
            }
        };
        if self.c.aggregation() != Aggregate::ZscoreMean {
            let batch = t.read_one()?;
            let raw = self.raw(cx, &batch, &heads)?;
            merge(&mut out, &raw);
            let reward = self.aggregate(&raw, None);
            out.batches.push(self.assemble(&batch, &raw, reward, &schema)?);
            return Ok(out);
        }
        // zscore_mean: raw scores of every chunk first (cached), then z-scores over all of them.
        let raw_schema = Arc::new(Schema::new(added[1..].to_vec()));
        let mut parts = Vec::new();
        for (c, f) in t.files.iter().enumerate() {
            let part = Table { id: t.id.clone(), schema: t.schema.clone(), files: vec![f.clone()] };
            let batch = part.read_one()?;
            let raw = self.cached_raw(cx, c, &batch, &heads, &raw_schema)?;
            merge(&mut out, &raw);
            parts.push((batch, raw));
        }
        let entry_at = self.entry_positions(&heads);
        let stats: Vec<ColumnStats> = entry_at.iter().map(|&at| ColumnStats::of(parts.iter().map(|(_, r)| &r.cols[at]))).collect();
        for (batch, raw) in &parts {
            let reward = self.aggregate(raw, Some(&stats));
            out.batches.push(self.assemble(batch, raw, reward, &schema)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::head::column_safe;
    use super::*;

    fn stage(v: Value) -> Score {
        Score::build(&v).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn raw(cols: Vec<Vec<Option<f64>>>) -> Raw {
        let entry_at = (0..cols.len()).collect();
        Raw { cols: cols.into_iter().map(Float64Array::from).collect(), entry_at, drops: BTreeMap::new() }
    }

    fn rules3(aggregate: &str, weights: Option<[f64; 3]>) -> Value {
        let w = |i: usize| weights.map(|w| serde_json::json!(w[i]));
        let mut rules = vec![
            serde_json::json!({"kind": "contains", "name": "a", "substrings": ["x"]}),
            serde_json::json!({"kind": "contains", "name": "b", "substrings": ["y"]}),
            serde_json::json!({"kind": "contains", "name": "c", "substrings": ["z"]}),
        ];
        for (i, r) in rules.iter_mut().enumerate() {
            if let Some(w) = w(i) {
                r["weight"] = w;
            }
        }
        serde_json::json!({"rules": rules, "aggregate": aggregate})
    }

    fn close(got: Option<f64>, want: f64) {
        let got = got.expect("a value");
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    #[test]
    fn mean_aggregate() {
        let s = stage(rules3("mean", None));
        let r = raw(vec![vec![Some(1.0), Some(-2.0), None], vec![Some(2.0), Some(0.5), Some(1.0)], vec![Some(6.0), Some(0.0), Some(1.0)]]);
        let agg = s.aggregate(&r, None);
        // (1 + 2 + 6) / 3 = 3.
        close(agg.iter().next().unwrap(), 3.0);
        // (−2 + 0.5 + 0) / 3 = −0.5.
        close(agg.value(1).into(), -0.5);
        // A null entry makes `reward` null.
        assert!(agg.is_null(2));
    }

    #[test]
    fn weighted_aggregate() {
        let s = stage(rules3("weighted", Some([2.0, 1.0, 0.0])));
        // Entry c has weight 0: it neither counts nor nulls the row.
        let r = raw(vec![vec![Some(1.0), Some(-3.0)], vec![Some(4.0), Some(0.0)], vec![Some(100.0), None]]);
        let agg = s.aggregate(&r, None);
        // (2·1 + 1·4 + 0·100) / (2 + 1 + 0) = 6/3 = 2.
        close(agg.value(0).into(), 2.0);
        // (2·(−3) + 1·0) / 3 = −2.
        close(agg.value(1).into(), -2.0);
    }

    #[test]
    fn zscore_mean_aggregate() {
        let s = stage(rules3("zscore_mean", None));
        assert_eq!(s.mode(), Mode::Whole);
        // Over the whole input (two chunks): a = [1, 2 | 3, 6], b = [0, 10 | 20, null], c = [0.1, 0.1 | 0.1, 0.1].
        let p1 = raw(vec![vec![Some(1.0), Some(2.0)], vec![Some(0.0), Some(10.0)], vec![Some(0.1), Some(0.1)]]);
        let p2 = raw(vec![vec![Some(3.0), Some(6.0)], vec![Some(20.0), None], vec![Some(0.1), Some(0.1)]]);
        let stats: Vec<ColumnStats> = (0..3).map(|e| ColumnStats::of([&p1, &p2].into_iter().map(|r| &r.cols[e]))).collect();
        // a: μ = 12/4 = 3; σ² = (4 + 1 + 0 + 9)/4 = 3.5 (population).
        assert!((stats[0].mean - 3.0).abs() < 1e-12 && (stats[0].std - 3.5f64.sqrt()).abs() < 1e-12);
        // b: nulls are left out: μ = 30/3 = 10; σ² = (100 + 0 + 100)/3 = 200/3.
        assert!((stats[1].mean - 10.0).abs() < 1e-12 && (stats[1].std - (200.0f64 / 3.0).sqrt()).abs() < 1e-12);
        // c is constant (0.1 four times; the float mean need not equal 0.1): it contributes 0.
        assert!(stats[2].constant);
        let a1 = s.aggregate(&p1, Some(&stats));
        // Row 0: ((1 − 3)/√3.5 + (0 − 10)/√(200/3) + 0) / 3.
        let want0 = (-2.0 / 3.5f64.sqrt() + -10.0 / (200.0f64 / 3.0).sqrt()) / 3.0;
        close(a1.value(0).into(), want0);
        // Row 1: ((2 − 3)/√3.5 + 0 + 0) / 3.
        close(a1.value(1).into(), (-1.0 / 3.5f64.sqrt()) / 3.0);
        let a2 = s.aggregate(&p2, Some(&stats));
        // Row 2: ((3 − 3)/√3.5 + (20 − 10)/√(200/3) + 0) / 3.
        close(a2.value(0).into(), (10.0 / (200.0f64 / 3.0).sqrt()) / 3.0);
        // Row 3: b is null → reward null.
        assert!(a2.is_null(1));
    }

    #[test]
    fn weights_without_aggregate_mean_weighted() {
        // DESIGN §5 writes `reward_models: [{name, model, weight}]` with no `aggregate`:
        // weights alone select `weighted`, with the same content key as writing it out.
        let mut v = rules3("weighted", Some([2.0, 1.0, 0.0]));
        v.as_object_mut().unwrap().remove("aggregate");
        let s = stage(v.clone());
        assert_eq!(s.c.aggregation(), Aggregate::Weighted);
        assert_eq!(s.config(), stage(rules3("weighted", Some([2.0, 1.0, 0.0]))).config());
        // (2·1 + 1·4 + 0·100) / 3 = 2, as in `weighted_aggregate`.
        let r = raw(vec![vec![Some(1.0)], vec![Some(4.0)], vec![Some(100.0)]]);
        close(s.aggregate(&r, None).value(0).into(), 2.0);
        // Without weights the default stays `mean`; a weight with an explicit `mean` is still an error.
        let mut v = rules3("mean", None);
        v.as_object_mut().unwrap().remove("aggregate");
        assert_eq!(stage(v).c.aggregation(), Aggregate::Mean);
        assert!(Score::build(&rules3("mean", Some([1.0, 1.0, 1.0]))).is_err());
    }

    #[test]
    fn weights_are_checked() {
        let errs = |v: Value| Score::build(&v).err().expect("errors").into_iter().map(|e| (e.path, e.message)).collect::<Vec<_>>();
        // weighted without a weight on entry b.
        let mut v = rules3("weighted", Some([1.0, 1.0, 1.0]));
        v["rules"][1].as_object_mut().unwrap().remove("weight");
        let e = errs(v);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, vec![PathSeg::Key("rules".into()), PathSeg::Index(1)]);
        // Negative and all-zero weights.
        let e = errs(rules3("weighted", Some([0.0, -1.0, 0.0])));
        assert!(e.iter().any(|(p, m)| p.last() == Some(&PathSeg::Key("weight".into())) && m.contains("≥ 0")), "{e:?}");
        let e = errs(rules3("weighted", Some([0.0, 0.0, 0.0])));
        assert!(e.iter().any(|(p, _)| p == &vec![PathSeg::Key("aggregate".into())]), "{e:?}");
        // A weight with `mean` is a mistake.
        let e = errs(rules3("mean", Some([1.0, 1.0, 1.0])));
        assert_eq!(e.len(), 3);
        // Duplicate and invalid names.
        let e = errs(serde_json::json!({"rules": [
            {"kind": "contains", "name": "a", "substrings": ["x"]},
            {"kind": "contains", "name": "a", "substrings": ["y"]},
            {"kind": "contains", "name": "b c", "substrings": ["y"]}]}));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(errs(serde_json::json!({})).iter().any(|(_, m)| m.contains("at least one")));
    }

    #[test]
    fn columns_and_label_names() {
        assert_eq!(column_safe("LABEL 0/x"), "LABEL_0_x");
        let s = stage(rules3("mean", None));
        let names: Vec<String> = s.added(&[]).iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["reward", "reward_a", "reward_b", "reward_c"]);
        assert_eq!(s.entry_positions(&[]), [0, 1, 2]);
    }
}
