//! `logprob`: teacher-forced log-probs of each response under a policy
//! (and optionally a reference) model, per DESIGN §4: the sum over
//! `response_ids` (EOS included) of log-softmax at the positions predicting them.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, str_col, Need};
use prefpipe_core::Result;
use serde::{Deserialize, Serialize};

use crate::backend::{check_chat, Pair, PairOpts, Prompts, Row, Uses};
use crate::model_ref::ModelRef;

pub const KIND: StageKind = StageKind {
    name: "logprob",
    about: "teacher-forced log-probs of responses (logp_policy, logp_reference)",
    arity: Arity::One,
    build: |v| {
        let c: LogprobConfig = from_config(v)?;
        if c.batch_size == 0 {
            return Err(vec![ConfigError::at("batch_size", "`batch_size` must be at least 1")]);
        }
        let model = ModelRef::new("model", &c.model);
        let reference = c.reference.as_deref().map(|r| ModelRef::new("reference", r));
        Ok(Box::new(Logprob { c, model, reference }))
    },
    schema: || schemars::schema_for!(LogprobConfig),
};

/// `kind: logprob`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogprobConfig {
    /// The policy: a name from `models:` or a model directory.
    pub model: String,
    /// The reference model; adds `logp_reference`.
    #[serde(default)]
    pub reference: Option<String>,
    /// Render the chat template around the prompt (DESIGN §4).
    #[serde(default)]
    pub chat_template: bool,
    /// Sequences per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_batch() -> usize {
    16
}

struct Logprob {
    c: LogprobConfig,
    model: ModelRef,
    reference: Option<ModelRef>,
}

impl Logprob {
    fn added(&self, input: &arrow::datatypes::Schema) -> Vec<Field> {
        let mut f = vec![Field::new(col::LOGP_POLICY, DataType::Float64, false)];
        if self.reference.is_some() {
            f.push(Field::new(col::LOGP_REFERENCE, DataType::Float64, false));
        }
        if input.field_with_name(col::N_TOKENS).is_err() {
            f.push(Field::new(col::N_TOKENS, DataType::UInt32, false));
        }
        f
    }
}

impl Stage for Logprob {
    fn mode(&self) -> Mode {
        Mode::PerChunk
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let s = &inputs[0];
        let mut errs: Vec<ConfigError> = [(col::PROMPT, Need::Text), (col::RESPONSE, Need::Text)]
            .into_iter()
            .filter_map(|(c, n)| table::require(s, &cx.input_ids[0], c, n).err())
            .collect();
        for c in [col::LOGP_POLICY, col::LOGP_REFERENCE] {
            if s.field_with_name(c).is_ok() {
                errs.push(ConfigError::new(format!("input `{}` already has `{c}`", cx.input_ids[0])));
            }
        }
        errs.extend(check_chat(s, &cx.input_ids[0], self.c.chat_template, "chat_template"));
        for m in std::iter::once(&self.model).chain(self.reference.as_ref()) {
            if let Err(e) = m.check_for(cx, Uses::Logprob) {
                errs.push(e);
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(table::with_fields(s, self.added(s)))
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        let mut f = self.model.check_for(cx, Uses::Logprob)?.into_bytes();
        if let Some(r) = &self.reference {
            f.extend(r.check_for(cx, Uses::Logprob)?.into_bytes());
        }
        Ok(f)
    }

    fn chunk_concurrency(&self, chunk_size: usize) -> usize {
        let slots = self.models().filter_map(ModelRef::slots).max();
        // A chunk is `chunk_size` prompts of a few samples each.
        slots.map_or(1, |s| crate::generate::overlap(s, chunk_size * 4))
    }

    fn run_info(&self) -> Option<serde_json::Value> {
        let infos: Vec<serde_json::Value> = self.models().filter_map(|m| m.made().and_then(|b| b.run_info())).collect();
        (!infos.is_empty()).then(|| if infos.len() == 1 { infos[0].clone() } else { serde_json::Value::Array(infos) })
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let input = inputs[0].read_one()?;
        let ids = str_col(&input, col::PROMPT_ID).ok();
        let prompts = Prompts::of(&input)?;
        let responses = str_col(&input, col::RESPONSE)?;
        let mut out = Output::default();
        // A null prompt or response is dropped and counted, never read as "".
        let mut rows: Vec<usize> = Vec::with_capacity(input.num_rows());
        for r in 0..input.num_rows() {
            if prompts.is_null(r) {
                out.drop("null_prompt", 1);
            } else if responses.is_null(r) {
                out.drop("null_response", 1);
            } else {
                rows.push(r);
            }
        }
        let pairs: Vec<Pair> = rows
            .iter()
            .map(|&r| Pair { prompt_id: ids.as_ref().map_or("", |a| a.value(r)), prompt: prompts.get(r), response: responses.value(r) })
            .collect();
        let opts = PairOpts { chat_template: self.c.chat_template, batch_size: self.c.batch_size };
        // Each model tokenizes for itself (the reference may use another tokenizer).
        let policy = self.model.backend(cx).logprobs(cx, "policy", &pairs, opts)?;
        (cx.progress)(1, 2);
        let reference = match &self.reference {
            Some(r) => Some(r.backend(cx).logprobs(cx, "reference", &pairs, opts)?),
            None => None,
        };
        (cx.progress)(2, 2);
        // Rows either model drops (too long for its context, a failed request) are dropped and counted.
        let mut keep: Vec<u32> = Vec::new();
        let (mut lp, mut lr, mut nt) = (Vec::new(), Vec::new(), Vec::new());
        for (k, &r) in rows.iter().enumerate() {
            let refr = reference.as_ref().map(|v| &v[k]);
            match (&policy[k], refr) {
                (Row::Ok((p, n)), None) => {
                    keep.push(r as u32);
                    lp.push(*p);
                    nt.push(*n);
                }
                (Row::Ok((p, n)), Some(Row::Ok((q, _)))) => {
                    keep.push(r as u32);
                    lp.push(*p);
                    lr.push(*q);
                    nt.push(*n);
                }
                (Row::Drop(why), _) | (_, Some(Row::Drop(why))) => out.drop(why, 1),
            }
        }
        let idx = UInt32Array::from(keep);
        let mut cols: Vec<ArrayRef> = input.columns().iter().map(|a| take(a, &idx, None)).collect::<std::result::Result<_, _>>()?;
        cols.push(Arc::new(Float64Array::from(lp)));
        if self.reference.is_some() {
            cols.push(Arc::new(Float64Array::from(lr)));
        }
        if input.schema().field_with_name(col::N_TOKENS).is_err() {
            cols.push(Arc::new(UInt32Array::from(nt)));
        }
        let schema = table::with_fields(&input.schema(), self.added(&input.schema()));
        out.batches.push(RecordBatch::try_new(schema, cols)?);
        Ok(out)
    }
}

impl Logprob {
    fn models(&self) -> impl Iterator<Item = &ModelRef> {
        std::iter::once(&self.model).chain(self.reference.as_ref())
    }
}
