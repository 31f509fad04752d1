//! `generate`: N sampled responses per prompt from a policy model, in-process
//! (candle) or on a server (DESIGN §11), through [`crate::backend`].
//!
//! Each sample's randomness comes from (pipeline seed or `seed`, stage id,
//! prompt_id, sample_idx) alone, so outputs do not depend on batch size,
//! chunk size or thread count. Resumes chunk by chunk.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, str_col, Need};
use prefpipe_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::backend::{check_chat, GenJob, GenParams, Prompts, Row, Uses};
use crate::model_ref::{sample_seed, ModelRef};

pub const KIND: StageKind = StageKind {
    name: "generate",
    about: "N sampled responses per prompt from a policy model",
    arity: Arity::One,
    build: |v| {
        let c: GenerateConfig = from_config(v)?;
        let mut errs = Vec::new();
        if c.n == 0 {
            errs.push(ConfigError::at("n", "`n` must be at least 1"));
        }
        if !(c.temperature.is_finite() && c.temperature >= 0.0) {
            errs.push(ConfigError::at("temperature", "`temperature` must be ≥ 0 (0 = greedy)"));
        }
        if !(c.top_p > 0.0 && c.top_p <= 1.0) {
            errs.push(ConfigError::at("top_p", "`top_p` must be in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&c.min_p) {
            errs.push(ConfigError::at("min_p", "`min_p` must be in [0, 1]"));
        }
        if c.max_new_tokens == 0 {
            errs.push(ConfigError::at("max_new_tokens", "`max_new_tokens` must be at least 1"));
        }
        if c.batch_size == 0 {
            errs.push(ConfigError::at("batch_size", "`batch_size` must be at least 1"));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let model = ModelRef::new("model", &c.model);
        Ok(Box::new(Generate { c, model }))
    },
    schema: || schemars::schema_for!(GenerateConfig),
};

/// `kind: generate`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// A name from `models:` or a model directory.
    pub model: String,
    /// Samples per prompt.
    #[serde(default = "default_n")]
    pub n: u32,
    /// Softmax temperature; 0 = greedy.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    #[serde(default = "one")]
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    #[serde(default)]
    pub top_k: usize,
    /// Drop tokens below min_p × the top probability (0 = off).
    #[serde(default)]
    pub min_p: f64,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Extra stop strings; the response is cut before them.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Overrides the pipeline seed for this stage.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Render the model's chat template around the prompt (DESIGN §4).
    #[serde(default)]
    pub chat_template: bool,
    /// Sequences decoded together.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_n() -> u32 {
    4
}
fn one() -> f64 {
    1.0
}
fn default_max_new_tokens() -> usize {
    128
}
fn default_batch() -> usize {
    16
}

struct Generate {
    c: GenerateConfig,
    model: ModelRef,
}

impl Stage for Generate {
    fn mode(&self) -> Mode {
        Mode::PerChunk
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let s = &inputs[0];
        let mut errs = Vec::new();
        for (c, need) in [(col::PROMPT_ID, Need::Text), (col::PROMPT, Need::Text)] {
            if let Err(e) = table::require(s, &cx.input_ids[0], c, need) {
                errs.push(e);
            }
        }
        for c in [col::SAMPLE_IDX, col::RESPONSE, col::N_TOKENS, col::FINISH_REASON] {
            if s.field_with_name(c).is_ok() {
                errs.push(ConfigError::at(
                    "input",
                    format!("input `{}` already has a `{c}` column; `generate` reads a prompts table", cx.input_ids[0]),
                ));
            }
        }
        if let Err(e) = self.model.check_for(cx, Uses::Generate) {
            errs.push(e);
        }
        errs.extend(check_chat(s, &cx.input_ids[0], self.c.chat_template, "chat_template"));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(table::with_fields(
            s,
            [
                Field::new(col::SAMPLE_IDX, DataType::UInt32, false),
                Field::new(col::RESPONSE, DataType::Utf8, false),
                Field::new(col::N_TOKENS, DataType::UInt32, false),
                Field::new(col::FINISH_REASON, DataType::Utf8, false),
            ],
        ))
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        Ok(self.model.check_for(cx, Uses::Generate)?.into_bytes())
    }

    fn chunk_concurrency(&self, chunk_size: usize) -> usize {
        self.model.slots().map_or(1, |slots| overlap(slots, chunk_size * self.c.n as usize))
    }

    fn run_info(&self) -> Option<serde_json::Value> {
        self.model.made().and_then(|b| b.run_info())
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let input = inputs[0].read_one()?;
        let backend = self.model.backend(cx);
        let ids = str_col(&input, col::PROMPT_ID)?;
        let prompts = Prompts::of(&input)?;
        let seed = self.c.seed.unwrap_or(cx.seed);
        let mut out = Output::default();

        let mut jobs: Vec<GenJob> = Vec::with_capacity(input.num_rows() * self.c.n as usize);
        let mut rows: Vec<u32> = Vec::with_capacity(jobs.capacity());
        // A prompt twice would get two sets of samples with the same sample_idx.
        let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for r in 0..input.num_rows() {
            if ids.is_null(r) {
                return Err(Error::Input(format!("input `{}` has a row with a null `prompt_id`", inputs[0].id)));
            }
            if !seen.insert(ids.value(r)) {
                return Err(Error::Input(format!(
                    "input `{}` has prompt `{}` twice; each prompt must appear once (`dedup: true` on the source drops repeats)",
                    inputs[0].id,
                    ids.value(r)
                )));
            }
            // A null prompt is not generated from as "".
            if prompts.is_null(r) {
                out.drop("null_prompt", 1);
                continue;
            }
            for s in 0..self.c.n {
                let (prompt_id, prompt) = (ids.value(r), prompts.get(r));
                jobs.push(GenJob { prompt_id, sample_idx: s, prompt, seed: sample_seed(seed, cx.stage_id, prompt_id, s) });
                rows.push(r as u32);
            }
        }
        let params = GenParams {
            temperature: self.c.temperature,
            top_p: self.c.top_p,
            top_k: self.c.top_k,
            min_p: self.c.min_p,
            max_new_tokens: self.c.max_new_tokens,
            stop: self.c.stop.clone(),
            chat_template: self.c.chat_template,
            batch_size: self.c.batch_size,
            response_format: None,
        };
        let results = backend.generate(cx, "samples", &jobs, &params)?;
        let mut kept_rows = Vec::with_capacity(jobs.len());
        let (mut sample_idx, mut texts, mut n_tokens, mut finish) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // A prompt with any sample dropped for its length is dropped whole (one count per prompt).
        let mut dropped_prompt: Option<u32> = None;
        for ((job, &row), res) in jobs.iter().zip(&rows).zip(results) {
            match res {
                Row::Ok(g) => {
                    kept_rows.push(row);
                    sample_idx.push(job.sample_idx);
                    texts.push(g.text);
                    n_tokens.push(g.n_tokens);
                    finish.push(g.finish_reason);
                }
                Row::Drop(reason) if reason == "prompt_too_long" => {
                    if dropped_prompt != Some(row) {
                        out.drop(reason, 1);
                        dropped_prompt = Some(row);
                    }
                }
                Row::Drop(reason) => out.drop(reason, 1),
            }
        }
        let take_rows = UInt32Array::from(kept_rows);
        let mut cols: Vec<ArrayRef> = input.columns().iter().map(|a| take(a, &take_rows, None)).collect::<std::result::Result<_, _>>()?;
        cols.push(Arc::new(UInt32Array::from(sample_idx)));
        cols.push(Arc::new(StringArray::from(texts)));
        cols.push(Arc::new(UInt32Array::from(n_tokens)));
        cols.push(Arc::new(StringArray::from(finish)));
        let schema = self.plan_schema(&input);
        out.batches.push(RecordBatch::try_new(schema, cols)?);
        Ok(out)
    }
}

/// Chunks in flight so that `slots` requests stay busy while chunks wait for
/// their slowest answers: enough queued work for 16× the slots (a 10× slower
/// tail request must not drain the queue), plus the chunk in its tail. A chunk
/// in flight costs a thread and its rows, nothing on the server.
pub fn overlap(slots: usize, per_chunk: usize) -> usize {
    (16 * slots).div_ceil(per_chunk.max(1)).clamp(1, 64) + 1
}

impl Generate {
    fn plan_schema(&self, input: &RecordBatch) -> SchemaRef {
        table::with_fields(
            &input.schema(),
            [
                Field::new(col::SAMPLE_IDX, DataType::UInt32, false),
                Field::new(col::RESPONSE, DataType::Utf8, false),
                Field::new(col::N_TOKENS, DataType::UInt32, false),
                Field::new(col::FINISH_REASON, DataType::Utf8, false),
            ],
        )
    }
}
