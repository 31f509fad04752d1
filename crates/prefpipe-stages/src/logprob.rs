//! `logprob`: teacher-forced log-probs of each response under a policy
//! (and optionally a reference) model, per DESIGN §4: the sum over
//! `response_ids` (EOS included) of log-softmax at the positions predicting them.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, str_col, Need};
use prefpipe_core::Result;
use prefpipe_models::Model;
use serde::{Deserialize, Serialize};

use crate::model_ref::{model_err, ModelRef};

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

/// Sum log-probs for `pairs` in batches of `bs`.
fn score(model: &Model, pairs: &[(Vec<u32>, Vec<u32>)], bs: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(pairs.len());
    for b in pairs.chunks(bs) {
        out.extend(model.logprobs(b).map_err(model_err)?);
    }
    Ok(out)
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
        for m in std::iter::once(&self.model).chain(self.reference.as_ref()) {
            if let Err(e) = m.check(cx) {
                errs.push(e);
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(table::with_fields(s, self.added(s)))
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        let mut f = self.model.check(cx)?.into_bytes();
        if let Some(r) = &self.reference {
            f.extend(r.check(cx)?.into_bytes());
        }
        Ok(f)
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let input = inputs[0].read_one()?;
        let prompts = str_col(&input, col::PROMPT)?;
        let responses = str_col(&input, col::RESPONSE)?;
        let mut out = Output::default();
        let policy = self.model.get(cx)?;
        let reference = self.reference.as_ref().map(|r| r.get(cx)).transpose()?;
        // Tokenize once per model (the reference may use another tokenizer).
        let encode = |m: &Model| -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
            (0..input.num_rows())
                .map(|r| {
                    Ok((
                        m.encode_prompt(prompts.value(r), self.c.chat_template).map_err(model_err)?,
                        m.encode_response(responses.value(r)).map_err(model_err)?,
                    ))
                })
                .collect()
        };
        let pol_pairs = encode(&policy)?;
        let ref_pairs = reference.as_deref().map(encode).transpose()?;
        // Rows too long for either model's context are dropped and counted.
        let fits = |m: &Model, p: &(Vec<u32>, Vec<u32>)| p.0.len() + p.1.len() <= m.max_len();
        let keep: Vec<u32> = (0..input.num_rows())
            .filter(|&r| fits(&policy, &pol_pairs[r]) && ref_pairs.as_ref().is_none_or(|rp| fits(reference.as_ref().expect("ref"), &rp[r])))
            .map(|r| r as u32)
            .collect();
        out.drop("too_long", (input.num_rows() - keep.len()) as u64);
        let pick = |pairs: &[(Vec<u32>, Vec<u32>)]| keep.iter().map(|&r| pairs[r as usize].clone()).collect::<Vec<_>>();
        let pol_kept = pick(&pol_pairs);
        let lp = score(&policy, &pol_kept, self.c.batch_size)?;
        (cx.progress)(1, 2);
        let idx = UInt32Array::from(keep.clone());
        let mut cols: Vec<ArrayRef> = input.columns().iter().map(|a| take(a, &idx, None)).collect::<std::result::Result<_, _>>()?;
        cols.push(Arc::new(Float64Array::from(lp)));
        if let (Some(m), Some(rp)) = (&reference, &ref_pairs) {
            cols.push(Arc::new(Float64Array::from(score(m, &pick(rp), self.c.batch_size)?)));
        }
        if input.schema().field_with_name(col::N_TOKENS).is_err() {
            cols.push(Arc::new(UInt32Array::from(pol_kept.iter().map(|p| p.1.len() as u32).collect::<Vec<_>>())));
        }
        (cx.progress)(2, 2);
        let schema = table::with_fields(&input.schema(), self.added(&input.schema()));
        out.batches.push(RecordBatch::try_new(schema, cols)?);
        Ok(out)
    }
}
