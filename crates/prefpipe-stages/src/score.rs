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

/// `kind: score`. Adds `reward` and one `reward_<name>` per reward model and rule.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// Reward models (`*ForSequenceClassification`), each one `reward_<name>` column.
    #[serde(default)]
    pub reward_models: Vec<RewardModel>,
    /// Rule rewards, each one `reward_<name>` column.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// How the `reward_<name>` columns combine into `reward`. Default:
    /// `weighted` when any entry has a `weight` (DESIGN §5), else `mean`.
    #[serde(default)]
    pub aggregate: Option<Aggregate>,
    /// Sequences per reward-model forward pass (rows are sorted by length first).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

impl ScoreConfig {
    /// The aggregate in use (resolved by `build`: `weighted` when a weight is given).
    pub fn aggregation(&self) -> Aggregate {
        self.aggregate.unwrap_or_default()
    }
}

/// One entry of `reward_models:`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardModel {
    /// The column is `reward_<name>` (letters, digits, `_`).
    pub name: String,
    /// A name from `models:` or a model directory.
    pub model: String,
    /// Weight in `aggregate: weighted` (required there, not allowed otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Render the model's chat template around the prompt (DESIGN §4).
    #[serde(default)]
    pub chat_template: bool,
    /// For a head with several labels: the label (an `id2label` name or an
    /// index) whose score is `reward_<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<LabelRef>,
    /// For a head with several labels: `reward_<name>` = Σ weight · score
    /// over these labels (name or index → weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, f64>>,
}

/// A label of a reward head: its `id2label` name or its index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum LabelRef {
    Index(usize),
    Name(String),
}

/// How `reward` combines the entries' columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// The plain mean of every entry's `reward_<name>`.
    #[default]
    Mean,
    /// Σ weight·x / Σ weight; every entry needs `weight` (≥ 0, not all 0).
    Weighted,
    /// The mean of each column z-scored over the whole input (population
    /// std; a constant column counts 0). Runs over the whole input at once.
    ZscoreMean,
}

fn default_batch() -> usize {
    16
}

/// A config error under `reward_models[index].field`.
fn at_rm(index: usize, field: &str, message: String) -> ConfigError {
    let mut path = vec![PathSeg::Key("reward_models".into()), PathSeg::Index(index)];
    if !field.is_empty() {
        path.push(PathSeg::Key(field.into()));
    }
    ConfigError { path, message }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A label name as it appears in a column name.
fn column_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

struct Score {
    c: ScoreConfig,
    models: Vec<ModelRef>,
    rules: Vec<Compiled>,
}

/// A reward head resolved against its config.json: label names and how
/// `reward_<name>` mixes the label scores.
#[derive(Debug, Clone, PartialEq)]
struct Head {
    /// Column-safe label names, one per label.
    labels: Vec<String>,
    /// `reward_<name>` = Σ mix[l] · score[l].
    mix: Vec<f64>,
}

impl Score {
    fn build(v: &Value) -> Result<Score, Vec<ConfigError>> {
        let mut c: ScoreConfig = from_config(v)?;
        // `weight:` without `aggregate:` means `weighted`; resolved here so the content key is
        // the same as with `aggregate` written out.
        let weighted = c.reward_models.iter().any(|m| m.weight.is_some()) || c.rules.iter().any(|r| r.weight().is_some());
        c.aggregate = Some(c.aggregate.unwrap_or(if weighted { Aggregate::Weighted } else { Aggregate::Mean }));
        let mut errs = Vec::new();
        if c.reward_models.is_empty() && c.rules.is_empty() {
            errs.push(ConfigError::new("`score` needs at least one entry in `reward_models` or `rules`"));
        }
        if c.batch_size == 0 {
            errs.push(ConfigError::at("batch_size", "`batch_size` must be at least 1"));
        }
        // Every entry (reward models, then rules): its name, weight and YAML path.
        let entries: Vec<(&str, Option<f64>, Vec<PathSeg>)> = c
            .reward_models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.as_str(), m.weight, at_rm(i, "", String::new()).path))
            .chain(c.rules.iter().enumerate().map(|(i, r)| (r.name(), r.weight(), at_rule(i, "", String::new()).path)))
            .collect();
        let at = |entry: &[PathSeg], field: &str, message: String| {
            let mut path = entry.to_vec();
            path.extend((!field.is_empty()).then(|| PathSeg::Key(field.into())));
            ConfigError { path, message }
        };
        let mut seen = std::collections::HashSet::new();
        for (name, _, path) in &entries {
            if !valid_name(name) {
                errs.push(at(path, "name", format!("`name` becomes the column `reward_{name}`: use letters, digits and `_` only")));
            } else if !seen.insert(*name) {
                errs.push(at(path, "name", format!("two entries are named `{name}`; each needs its own `reward_{name}` column")));
            }
        }
        match c.aggregation() {
            Aggregate::Weighted => {
                for (_, w, path) in &entries {
                    match w {
                        None => errs.push(at(
                            path,
                            "",
                            "`aggregate: weighted` needs a `weight` on every reward model and rule; this one has none".into(),
                        )),
                        Some(w) if !(w.is_finite() && *w >= 0.0) => {
                            errs.push(at(path, "weight", format!("`weight` must be a finite number ≥ 0; got {w}")))
                        }
                        _ => {}
                    }
                }
                if !entries.is_empty() && entries.iter().all(|(_, w, _)| *w == Some(0.0)) {
                    errs.push(ConfigError::at(
                        "aggregate",
                        "every `weight` is 0: `aggregate: weighted` needs at least one positive weight",
                    ));
                }
            }
            other => {
                for (_, w, path) in &entries {
                    if w.is_some() {
                        let msg = format!(
                            "`weight` is only used by `aggregate: weighted` (this stage aggregates with `{}`)",
                            aggregate_name(other)
                        );
                        errs.push(at(path, "weight", msg));
                    }
                }
            }
        }
        for (i, m) in c.reward_models.iter().enumerate() {
            if m.label.is_some() && m.labels.is_some() {
                errs.push(at_rm(i, "labels", "give `label` (one label) or `labels` (a weighted sum), not both".into()));
            }
            if let Some(ls) = &m.labels {
                if ls.is_empty() {
                    errs.push(at_rm(i, "labels", "`labels` names no label".into()));
                }
                for (k, w) in ls {
                    if !w.is_finite() {
                        let mut e = at_rm(i, "labels", format!("the weight of label `{k}` must be finite; got {w}"));
                        e.path.push(PathSeg::Key(k.clone()));
                        errs.push(e);
                    }
                }
            }
        }
        let mut rules = Vec::new();
        for (i, r) in c.rules.iter().enumerate() {
            match r.compile(&|f, m| at_rule(i, f, m)) {
                Ok(r) => rules.push(r),
                Err(es) => errs.extend(es),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let models = c.reward_models.iter().map(|m| ModelRef::new("model", &m.model)).collect();
        Ok(Score { c, models, rules })
    }

    /// Checks reward model `i`'s directory (config, tokenizer, head, labels)
    /// without loading weights; returns its head and digest.
    fn check_model(&self, cx: &PlanCx, i: usize) -> Result<(Head, String), ConfigError> {
        let digest = self.models[i].check_for(cx, Uses::Score).map_err(|e| at_rm(i, "model", e.message))?;
        let remote = cx.remote(&self.models[i].value);
        if let Some(m) = remote {
            if self.c.reward_models[i].chat_template && m.tokenizer.is_none() {
                return Err(at_rm(
                    i,
                    "chat_template",
                    format!(
                        "model `{}`: `chat_template: true` on a server needs `tokenizer:` (the reward model's template renders here)",
                        m.name
                    ),
                ));
            }
        }
        let head = head_of(remote, &cx.resolve_model(&self.models[i].value), &self.c.reward_models[i])
            .map_err(|(field, msg)| at_rm(i, field, msg))?;
        Ok((head, digest))
    }

    /// The added columns, in order: `reward`, then per reward model
    /// `reward_<name>` and its label columns, then per rule `reward_<name>`.
    fn added(&self, heads: &[Head]) -> Vec<Field> {
        self.added_names(heads).into_iter().map(|(n, _)| Field::new(n, DataType::Float64, true)).collect()
    }

    /// [`Score::added`]'s names, each with the config path of the entry that adds it.
    fn added_names(&self, heads: &[Head]) -> Vec<(String, Vec<PathSeg>)> {
        let mut names = vec![(col::REWARD.to_string(), vec![])];
        for (i, (m, h)) in self.c.reward_models.iter().zip(heads).enumerate() {
            let at = at_rm(i, "name", String::new()).path;
            names.push((format!("reward_{}", m.name), at.clone()));
            if h.labels.len() > 1 {
                names.extend(h.labels.iter().map(|l| (format!("reward_{}_{l}", m.name), at.clone())));
            }
        }
        for (i, r) in self.c.rules.iter().enumerate() {
            names.push((format!("reward_{}", r.name()), at_rule(i, "name", String::new()).path));
        }
        names
    }

    /// Whether the length rules read `n_tokens` from this input.
    fn uses_n_tokens(&self, r: &Rule, schema: &Schema) -> bool {
        match r {
            Rule::Length(l) => match l.unit {
                LengthUnit::NTokens => true,
                LengthUnit::Words => false,
                LengthUnit::Auto => schema.field_with_name(col::N_TOKENS).is_ok_and(|f| f.data_type().is_integer()),
            },
            _ => false,
        }
    }

    /// Raw columns (everything but `reward`) of one batch, and its drop counts.
    fn raw(&self, cx: &RunCx, batch: &RecordBatch, heads: &[Head]) -> Result<Raw> {
        let n = batch.num_rows();
        let mut cols: Vec<Column> = Vec::new();
        let mut entry_at = Vec::new();
        let mut too_long = vec![false; n];
        let mut non_finite = vec![false; n];
        let mut other = BTreeMap::new();
        let total = (n * self.models.len()) as u64;
        let response = str_col(batch, col::RESPONSE).ok();
        // A row without a prompt or a response is not scored (never as ""): all its columns stay null.
        let prompts = Prompts::of(batch).ok();
        let null_prompt: Vec<bool> = (0..n).map(|r| prompts.as_ref().is_some_and(|p| p.is_null(r))).collect();
        let null_response: Vec<bool> = (0..n).map(|r| !null_prompt[r] && response.as_ref().is_some_and(|a| a.is_null(r))).collect();
        let skip: Vec<bool> = (0..n).map(|r| null_prompt[r] || null_response[r]).collect();
        for (i, head) in heads.iter().enumerate() {
            let (reward, labels) =
                self.score_model(cx, i, head, batch, &skip, &mut too_long, &mut non_finite, &mut other, (i * n) as u64, total)?;
            entry_at.push(cols.len());
            cols.push(reward);
            if head.labels.len() > 1 {
                cols.extend(labels);
            }
        }
        let schema = batch.schema();
        let mut null_n_tokens = vec![false; n];
        for (rule, cfg) in self.rules.iter().zip(&self.c.rules) {
            let column = match cfg {
                Rule::ExactMatch(r) => Some(str_col(batch, &r.column)?),
                Rule::Regex(r) => Some(str_col(batch, &r.column)?),
                Rule::Contains(r) => Some(str_col(batch, &r.column)?),
                Rule::Length(_) => None,
            };
            let n_tokens = if self.uses_n_tokens(cfg, &schema) { Some(n_tokens_col(batch)?) } else { None };
            let values = (0..n)
                .map(|r| {
                    if skip[r] {
                        return None;
                    }
                    // A null `n_tokens` is not 0 tokens: the rule has no value for the row.
                    let n_tokens = match &n_tokens {
                        Some(a) if a.is_null(r) => {
                            null_n_tokens[r] = true;
                            return None;
                        }
                        Some(a) => Some(a.value(r)),
                        None => None,
                    };
                    let row = RowText {
                        response: response.as_ref().and_then(|a| text_at(a, r)).unwrap_or(""),
                        column: column.as_ref().and_then(|a| text_at(a, r)),
                        n_tokens,
                    };
                    Some(rule.eval(&row))
                })
                .collect();
            entry_at.push(cols.len());
            cols.push(values);
        }
        let mut drops = other;
        for (reason, flags) in [
            ("null_prompt", &null_prompt),
            ("null_response", &null_response),
            ("null_n_tokens", &null_n_tokens),
            ("too_long", &too_long),
            ("non_finite_reward", &non_finite),
        ] {
            let k = flags.iter().filter(|&&f| f).count() as u64;
            if k > 0 {
                drops.insert(reason.to_string(), k);
            }
        }
        Ok(Raw { cols: cols.into_iter().map(Float64Array::from).collect(), entry_at, drops })
    }

    /// `reward_<name>` and the label columns of reward model `i` over `batch`.
    #[allow(clippy::too_many_arguments)]
    fn score_model(
        &self,
        cx: &RunCx,
        i: usize,
        head: &Head,
        batch: &RecordBatch,
        skip: &[bool],
        too_long: &mut [bool],
        non_finite: &mut [bool],
        other: &mut BTreeMap<String, u64>,
        done0: u64,
        total: u64,
    ) -> Result<(Column, Vec<Column>)> {
        let n = batch.num_rows();
        let nl = head.labels.len();
        let mut reward = vec![None; n];
        let mut labels = vec![vec![None; n]; nl];
        if n == 0 {
            return Ok((reward, labels));
        }
        let chat = self.c.reward_models[i].chat_template;
        let ids = str_col(batch, col::PROMPT_ID).ok();
        let prompts = Prompts::of(batch)?;
        let responses = str_col(batch, col::RESPONSE)?;
        let rows: Vec<usize> = (0..n).filter(|&r| !skip[r]).collect();
        if rows.is_empty() {
            return Ok((reward, labels));
        }
        let pairs: Vec<Pair> = rows
            .iter()
            .map(|&r| Pair {
                prompt_id: ids.as_ref().and_then(|a| text_at(a, r)).unwrap_or(""),
                prompt: prompts.get(r),
                response: responses.value(r),
            })
            .collect();
        let progress = |done: u64, _: u64| (cx.progress)(done0 + done, total);
        let sub = RunCx { progress: &progress, ..*cx };
        let tag = format!("rm{i}");
        let results =
            self.models[i].backend(cx).scores(&sub, &tag, &pairs, PairOpts { chat_template: chat, batch_size: self.c.batch_size })?;
        for (&r, res) in rows.iter().zip(results) {
            let s = match res {
                Row::Ok(s) => s,
                Row::Drop("too_long") => {
                    too_long[r] = true;
                    continue;
                }
                Row::Drop(why) => {
                    *other.entry(why.to_string()).or_default() += 1;
                    continue;
                }
            };
            if s.len() != nl {
                return Err(Error::Runtime(format!(
                    "reward model `{}` returned {} scores per row; its head has {nl} labels",
                    self.c.reward_models[i].name,
                    s.len()
                )));
            }
            let mix: f64 = s.iter().zip(&head.mix).filter(|(_, &w)| w != 0.0).map(|(&x, &w)| w * f64::from(x)).sum();
            let finite = mix.is_finite() && s.iter().zip(&head.mix).all(|(x, &w)| w == 0.0 || x.is_finite());
            if finite {
                reward[r] = Some(mix);
            } else {
                non_finite[r] = true;
            }
            for (l, &x) in s.iter().enumerate() {
                if x.is_finite() {
                    labels[l][r] = Some(f64::from(x));
                } else {
                    non_finite[r] = true;
                }
            }
        }
        Ok((reward, labels))
    }

    /// The heads of every reward model, from their config.json files.
    fn heads_at_run(&self, cx: &RunCx) -> Result<Vec<Head>> {
        (0..self.models.len())
            .map(|i| {
                head_of(cx.remote(&self.models[i].value), &self.models[i].dir(cx), &self.c.reward_models[i])
                    .map_err(|(_, m)| Error::Input(m))
            })
            .collect()
    }

    /// `reward` per row from the entries' raw columns; `stats` = (μ, σ, constant) per entry for z-scores.
    fn aggregate(&self, raw: &Raw, stats: Option<&[ColumnStats]>) -> Float64Array {
        let n = raw.cols.first().map_or(0, |c| c.len());
        let weights: Vec<f64> = match self.c.aggregation() {
            Aggregate::Weighted => self
                .c
                .reward_models
                .iter()
                .map(|m| m.weight)
                .chain(self.c.rules.iter().map(Rule::weight))
                .map(|w| w.unwrap_or(0.0))
                .collect(),
            _ => vec![1.0; raw.entry_at.len()],
        };
        let wsum: f64 = weights.iter().sum();
        (0..n)
            .map(|r| {
                let mut acc = 0.0;
                for (e, (&at, &w)) in raw.entry_at.iter().zip(&weights).enumerate() {
                    if w == 0.0 {
                        continue;
                    }
                    let c = &raw.cols[at];
                    if c.is_null(r) {
                        return None;
                    }
                    let x = c.value(r);
                    let x = match stats {
                        Some(s) => s[e].z(x),
                        None => x,
                    };
                    acc += w * x;
                }
                Some(acc / wsum)
            })
            .collect()
    }

    fn assemble(&self, batch: &RecordBatch, raw: &Raw, reward: Float64Array, schema: &SchemaRef) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols.push(Arc::new(reward));
        cols.extend(raw.cols.iter().map(|c| Arc::new(c.clone()) as ArrayRef));
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }

    /// Raw scores of input chunk `c`, from the scratch cache when an earlier
    /// (interrupted) run already computed them. The stage's scratch directory
    /// is per stage key, so a cache never outlives its config, models or input.
    fn cached_raw(&self, cx: &RunCx, c: usize, batch: &RecordBatch, heads: &[Head], raw_schema: &SchemaRef) -> Result<Raw> {
        let data = cx.scratch.join(format!("raw-{c:06}.parquet"));
        let drops_file = cx.scratch.join(format!("raw-{c:06}.drops.json"));
        // Anything unreadable or of another shape is recomputed, never trusted.
        let cached = || -> Option<Raw> {
            let drops: BTreeMap<String, u64> = serde_json::from_slice(&std::fs::read(&drops_file).ok()?).ok()?;
            let all = arrow::compute::concat_batches(raw_schema, &prefpipe_core::io::read_parquet(&data).ok()?).ok()?;
            let cols: Option<Vec<Float64Array>> =
                all.columns().iter().map(|a| a.as_any().downcast_ref::<Float64Array>().cloned()).collect();
            (all.num_rows() == batch.num_rows()).then_some(Raw { cols: cols?, entry_at: self.entry_positions(heads), drops })
        };
        if let Some(raw) = cached() {
            return Ok(raw);
        }
        let raw = self.raw(cx, batch, heads)?;
        // The drop counts first: the Parquet file's presence marks the chunk done.
        let bytes = serde_json::to_vec(&raw.drops).expect("drops serialize");
        prefpipe_core::io::write_atomic(&drops_file, |f| {
            use std::io::Write;
            f.write_all(&bytes).map_err(|e| Error::io(&drops_file, e))
        })?;
        let cols: Vec<ArrayRef> = raw.cols.iter().map(|c| Arc::new(c.clone()) as ArrayRef).collect();
        prefpipe_core::io::write_parquet(&data, raw_schema, &[RecordBatch::try_new(raw_schema.clone(), cols)?])?;
        Ok(raw)
    }

    fn entry_positions(&self, heads: &[Head]) -> Vec<usize> {
        let mut at = Vec::new();
        let mut k = 0;
        for h in heads {
            at.push(k);
            k += 1 + if h.labels.len() > 1 { h.labels.len() } else { 0 };
        }
        for _ in &self.rules {
            at.push(k);
            k += 1;
        }
        at
    }
}

/// `n_tokens` as UInt32, nulls kept (a negative or too-large count is bad input).
fn n_tokens_col(batch: &RecordBatch) -> Result<arrow::array::UInt32Array> {
    let src = batch.column_by_name(col::N_TOKENS).ok_or_else(|| Error::Input(format!("missing column `{}`", col::N_TOKENS)))?;
    let opts = arrow::compute::CastOptions { safe: false, ..Default::default() };
    let a =
        arrow::compute::cast_with_options(src, &DataType::UInt32, &opts).map_err(|e| Error::Input(format!("column `n_tokens`: {e}")))?;
    Ok(a.as_any().downcast_ref::<arrow::array::UInt32Array>().expect("cast to u32").clone())
}

fn text_at(a: &StringArray, r: usize) -> Option<&str> {
    if a.is_null(r) {
        None
    } else {
        Some(a.value(r))
    }
}

fn aggregate_name(a: Aggregate) -> &'static str {
    match a {
        Aggregate::Mean => "mean",
        Aggregate::Weighted => "weighted",
        Aggregate::ZscoreMean => "zscore_mean",
    }
}

/// One added column while it is computed (null = no finite value).
type Column = Vec<Option<f64>>;

/// The non-`reward` added columns of a batch, and why rows hold nulls.
struct Raw {
    cols: Vec<Float64Array>,
    /// Index in `cols` of each entry's `reward_<name>` (reward models, then rules).
    entry_at: Vec<usize>,
    drops: BTreeMap<String, u64>,
}

/// μ and σ (population) of one entry over the whole input, ignoring nulls.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ColumnStats {
    mean: f64,
    std: f64,
    /// Every value equal (or none at all): the column contributes 0.
    constant: bool,
}

impl ColumnStats {
    fn of<'a>(parts: impl Iterator<Item = &'a Float64Array> + Clone) -> ColumnStats {
        let vals = || parts.clone().flat_map(|a| a.iter().flatten());
        let n = vals().count();
        let (lo, hi) = vals().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
        if n == 0 || lo == hi {
            return ColumnStats { mean: if n == 0 { 0.0 } else { lo }, std: 0.0, constant: true };
        }
        let mean = vals().sum::<f64>() / n as f64;
        let var = vals().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        ColumnStats { mean, std: var.sqrt(), constant: false }
    }

    fn z(&self, x: f64) -> f64 {
        if self.constant {
            0.0
        } else {
            (x - self.mean) / self.std
        }
    }
}

/// Resolves a reward model's head from its directory: the architecture must
/// be `*ForSequenceClassification`, the safetensors must hold `score.weight`
/// of shape [num_labels, hidden_size], and `label`/`labels` must name labels
/// the head has. Errors are (field of the entry, message).
fn resolve_head(dir: &Path, m: &RewardModel, check_weights: bool) -> std::result::Result<Head, (&'static str, String)> {
    let cfg_path = dir.join("config.json");
    let cfg = ModelConfig::from_file(&cfg_path).map_err(|e| ("model", e.to_string()))?;
    let HeadKind::SequenceClassification { num_labels } = cfg.head else {
        return Err((
            "model",
            format!(
                "{}: `{}` is a language model; `score` needs a reward model (a *ForSequenceClassification checkpoint with a `score` head)",
                dir.display(),
                cfg.architecture
            ),
        ));
    };
    let raw: Value = std::fs::read(&cfg_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
    let declared = raw.get("num_labels").is_some() || raw.get("id2label").is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty()));
    let shape =
        if check_weights { tensor_shape(dir, "score.weight").map_err(|e| ("model", e))? } else { Some(vec![num_labels, cfg.hidden_size]) };
    match shape {
        None => {
            return Err((
                "model",
                format!(
                    "{}: config.json says `{}` but the weights have no `score.weight`: the reward head is missing (a base or causal-LM checkpoint saved under a reward-model config?)",
                    dir.display(),
                    cfg.architecture
                ),
            ))
        }
        Some(shape) if shape != [num_labels, cfg.hidden_size] => {
            let why = if declared {
                format!("config.json declares num_labels {num_labels}")
            } else {
                format!("config.json declares neither `num_labels` nor `id2label`, so transformers assumes {num_labels} labels; add \"num_labels\": {}", shape.first().copied().unwrap_or(0))
            };
            return Err(("model", format!("{}: `score.weight` has shape {shape:?}, expected [{num_labels}, {}]: {why}", dir.display(), cfg.hidden_size)));
        }
        Some(_) => {}
    }
    // Label names by index: id2label, else the index itself.
    let mut names: Vec<String> = (0..num_labels).map(|l| l.to_string()).collect();
    if let Some(map) = raw.get("id2label").and_then(Value::as_object) {
        for (k, v) in map {
            match (k.parse::<usize>(), v.as_str()) {
                (Ok(l), Some(name)) if l < num_labels => names[l] = name.to_string(),
                _ => {
                    return Err((
                        "model",
                        format!("{}: config.json `id2label` entry {k:?}: {v} does not name one of the {num_labels} labels", dir.display()),
                    ))
                }
            }
        }
    }
    let labels: Vec<String> = names.iter().map(|n| column_safe(n)).collect();
    for (a, la) in labels.iter().enumerate() {
        if labels[..a].contains(la) && num_labels > 1 {
            return Err(("model", format!("{}: two labels become the column suffix `{la}`; rename them in `id2label`", dir.display())));
        }
    }
    let listed = || names.iter().enumerate().map(|(i, n)| format!("{i}: {n}")).collect::<Vec<_>>().join(", ");
    let find = |key: &str| -> Option<usize> {
        names.iter().position(|n| n == key).or_else(|| key.parse::<usize>().ok().filter(|&i| i < num_labels))
    };
    let mut mix = vec![0.0; num_labels];
    match (&m.label, &m.labels) {
        (Some(l), _) => {
            let idx = match l {
                LabelRef::Index(i) => (*i < num_labels).then_some(*i),
                LabelRef::Name(s) => find(s),
            };
            let Some(idx) = idx else {
                let shown = match l {
                    LabelRef::Index(i) => i.to_string(),
                    LabelRef::Name(s) => format!("`{s}`"),
                };
                return Err(("label", format!("the reward model has no label {shown}; its labels are {}", listed())));
            };
            mix[idx] = 1.0;
        }
        (None, Some(ls)) => {
            for (k, w) in ls {
                let Some(idx) = find(k) else {
                    return Err(("labels", format!("the reward model has no label `{k}`; its labels are {}", listed())));
                };
                mix[idx] += w;
            }
        }
        (None, None) if num_labels == 1 => mix[0] = 1.0,
        (None, None) => {
            return Err((
                "model",
                format!(
                    "{}: the head has {num_labels} labels ({}); say which one is `reward_{}` with `label:`, or mix them with `labels: {{label: weight}}`",
                    dir.display(),
                    listed(),
                    m.name
                ),
            ))
        }
    }
    Ok(Head { labels, mix })
}

/// The head of reward model entry `m`: from its directory, or for a server
/// from its `tokenizer:` directory's config.json (labels only; the weights
/// are on the server), else one label.
fn head_of(remote: Option<&Arc<RemoteModel>>, dir: &Path, m: &RewardModel) -> std::result::Result<Head, (&'static str, String)> {
    let Some(rm) = remote else { return resolve_head(dir, m, true) };
    match &rm.tokenizer {
        Some(t) if t.join("config.json").is_file() => resolve_head(t, m, false),
        _ if m.label.is_some() || m.labels.is_some() => Err((
            "label",
            format!(
                "model `{}`: the labels of a served reward model come from its `tokenizer:` directory's config.json; add `tokenizer:`",
                rm.name
            ),
        )),
        _ => Ok(Head { labels: vec!["0".into()], mix: vec![1.0] }),
    }
}

/// Shape of tensor `name` from the safetensors headers of a model directory
/// (8-byte little-endian header length, then a JSON header): no weights are read.
fn tensor_shape(dir: &Path, name: &str) -> std::result::Result<Option<Vec<usize>>, String> {
    let files: Vec<PathBuf> = prefpipe_models::model::weight_files(dir).map_err(|e| e.to_string())?;
    for f in files {
        let bad = |what: String| format!("{}: not a safetensors file ({what})", f.display());
        let mut file = std::fs::File::open(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(bad(format!("a header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
        let header: Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        if let Some(t) = header.get(name) {
            let shape = t
                .get("shape")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect())
                .ok_or_else(|| bad(format!("`{name}` has no shape")))?;
            return Ok(Some(shape));
        }
    }
    Ok(None)
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
