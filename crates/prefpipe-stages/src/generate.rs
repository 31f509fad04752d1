//! `generate`: N sampled responses per prompt from a decoder model (candle).
//!
//! Each sample's randomness comes from (pipeline seed or `seed`, stage id,
//! prompt_id, sample_idx) alone, so outputs do not depend on batch size,
//! chunk size or thread count. Resumes chunk by chunk.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, str_col, Need};
use prefpipe_core::Result;
use prefpipe_models::SamplingParams;
use serde::{Deserialize, Serialize};

use crate::model_ref::{model_err, sample_seed, ModelRef};

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
        if let Err(e) = self.model.check(cx) {
            errs.push(e);
        }
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
        Ok(self.model.check(cx)?.into_bytes())
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let input = inputs[0].read_one()?;
        let model = self.model.get(cx)?;
        let ids = str_col(&input, col::PROMPT_ID)?;
        let prompts = str_col(&input, col::PROMPT)?;
        let seed = self.c.seed.unwrap_or(cx.seed);
        let mut out = Output::default();

        // (row, sample_idx, prompt ids, seed) for every prompt that fits the context.
        let mut jobs: Vec<(u32, u32, Arc<Vec<u32>>, u64)> = Vec::new();
        for r in 0..input.num_rows() {
            let p = model.encode_prompt(prompts.value(r), self.c.chat_template).map_err(model_err)?;
            if p.len() >= model.max_len() {
                out.drop("prompt_too_long", 1);
                continue;
            }
            let p = Arc::new(p);
            for s in 0..self.c.n {
                jobs.push((r as u32, s, p.clone(), sample_seed(seed, cx.stage_id, ids.value(r), s)));
            }
        }
        let params = SamplingParams {
            temperature: self.c.temperature,
            top_p: self.c.top_p,
            top_k: self.c.top_k,
            min_p: self.c.min_p,
            max_new_tokens: self.c.max_new_tokens,
            stop_strings: self.c.stop.clone(),
        };
        let mut texts = Vec::with_capacity(jobs.len());
        let mut n_tokens = Vec::with_capacity(jobs.len());
        let mut finish = Vec::with_capacity(jobs.len());
        for (done, batch) in jobs.chunks(self.c.batch_size).enumerate() {
            let ps: Vec<Vec<u32>> = batch.iter().map(|j| j.2.as_ref().clone()).collect();
            let seeds: Vec<u64> = batch.iter().map(|j| j.3).collect();
            for g in model.generate(&ps, &params, &seeds).map_err(model_err)? {
                texts.push(g.text);
                n_tokens.push(g.n_tokens as u32);
                finish.push(g.finish_reason.as_str());
            }
            (cx.progress)(((done + 1) * self.c.batch_size).min(jobs.len()) as u64, jobs.len() as u64);
        }
        let rows = UInt32Array::from(jobs.iter().map(|j| j.0).collect::<Vec<_>>());
        let mut cols: Vec<ArrayRef> = input.columns().iter().map(|a| take(a, &rows, None)).collect::<std::result::Result<_, _>>()?;
        cols.push(Arc::new(UInt32Array::from(jobs.iter().map(|j| j.1).collect::<Vec<_>>())));
        cols.push(Arc::new(StringArray::from(texts)));
        cols.push(Arc::new(UInt32Array::from(n_tokens)));
        cols.push(Arc::new(StringArray::from(finish)));
        let schema = self.plan_schema(&input);
        out.batches.push(RecordBatch::try_new(schema, cols)?);
        Ok(out)
    }
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
