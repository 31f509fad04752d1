//! `train`: DPO (sigmoid, SLiC hinge, IPO, robust; optionally + NLL), ORPO,
//! SimPO or LiPO-λ (DESIGN §8) on the pipeline's own pairs or lists.
//!
//! Input: a pairs table (`prompt`, `chosen`, `rejected`) for `method: dpo`,
//! `orpo` and `simpo`, or a lists table (`prompt`, `responses: list<utf8>`, `rewards:
//! list<f64>`) for `method: lipo`. Output: the metrics table (DESIGN §6), one
//! row per optimizer step, also written to `metrics:` when given. The trained
//! policy is written to `output:` as a Hugging Face directory (safetensors +
//! config + tokenizer files; LoRA adapters merged) that transformers and
//! later stages (`model: <output path>`) load.
//!
//! Rows whose prompt ⊕ longest response exceeds `max_length` (default: the
//! model's context) are dropped and counted (`too_long`); lists whose rewards
//! are all equal stay in their batch but carry no preference (`tie`). The
//! reference log-probs are computed once and cached in the stage's scratch
//! directory, before the policy trains, so the reference model is not in
//! memory during training; ORPO and SimPO are reference-free and load none. Checkpoints (weights, AdamW moments, step) go to
//! scratch every `save_every` steps: a killed run resumes from the last one and
//! ends with the same weights as an uninterrupted run. They are deleted once
//! the output is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, ListArray, StringArray, UInt64Array};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col, str_col, Need};
use prefpipe_core::yaml::PathSeg;
use prefpipe_core::{io, Error, Result};
use prefpipe_models::train::{self as tr, Example, LoraConfig, LORA_TARGETS};
use prefpipe_models::{HeadKind, Model, ModelConfig, TextTokenizer};
use serde::{Deserialize, Serialize};

use crate::model_ref::{device, model_err, sample_seed, ModelRef};

pub const KIND: StageKind = StageKind {
    name: "train",
    about: "DPO (sigmoid/hinge/ipo/robust, + NLL), ORPO, SimPO or LiPO-λ training on a pairs or lists table; writes a Hugging Face checkpoint, outputs metrics",
    arity: Arity::One,
    build: |v| {
        let mut c: TrainConfig = from_config(v)?;
        c.check()?;
        c.fill_defaults();
        let model = ModelRef::new("model", &c.model);
        let reference = c.reference.as_deref().map(|r| ModelRef::new("reference", r));
        Ok(Box::new(Train { c, model, reference }))
    },
    schema: || schemars::schema_for!(TrainConfig),
};

/// `kind: train`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `dpo`, `orpo` or `simpo` (pairs table), or `lipo` (LiPO-λ, lists table).
    #[serde(default)]
    pub method: TrainMethod,
    /// `method: dpo` only: the per-pair loss — `sigmoid` (DPO, default), `hinge` (SLiC),
    /// `ipo` (IPO) or `robust` (robust DPO, with `label_smoothing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<DpoLossKind>,
    /// `method: dpo`, `loss: robust`: ε, the assumed share of flipped labels, in [0, 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// `method: dpo`: adds this × the mean NLL over the chosen response tokens of the batch (TRL's `sft` term).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nll_weight: Option<f64>,
    /// `method: orpo`: λ, the weight of the odds-ratio term (TRL's `ORPOConfig.beta`; default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda: Option<f64>,
    /// `method: simpo`: γ, the target reward margin (default 0.5; TRL's `simpo_gamma`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// The policy to train: a name from `models:` or a model directory.
    pub model: String,
    /// The reference model (same vocabulary); default: the initial policy. Not for `orpo` / `simpo`.
    #[serde(default)]
    pub reference: Option<String>,
    /// β: the strength of the KL anchor to the reference (SimPO: the reward scale). Default 0.1; not for `orpo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// Peak learning rate of AdamW.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Passes over the data (ignored when `max_steps` is set).
    #[serde(default = "one_u64")]
    pub epochs: u64,
    /// Train for exactly this many optimizer steps (the data repeats as needed).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Pairs (or lists) per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (the effective batch is batch_size × grad_accum).
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// Shuffle the rows each epoch (seeded); `false` keeps table order.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Seed of the shuffling and the LoRA initialisation; default: derived from the pipeline seed and stage id.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Share of the steps spent warming the learning rate up linearly from 0.
    #[serde(default)]
    pub warmup_ratio: f64,
    /// After the warmup: `constant`, or `cosine` decay to 0.
    #[serde(default)]
    pub lr_schedule: LrScheduleKind,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[serde(default = "one_f64")]
    pub max_grad_norm: f64,
    /// Longest prompt ⊕ response in tokens; longer rows are dropped (`too_long`). Default: the model's context.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Decoupled weight decay of AdamW (applied to every weight).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW β₁.
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    /// AdamW β₂.
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// Checkpoint (to the store, for resuming) every this many steps, and after the last.
    #[serde(default = "default_save_every")]
    pub save_every: u64,
    /// The trained model's directory, relative to the pipeline file (a Hugging Face directory).
    pub output: String,
    /// Also write the metrics table to this Parquet file.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Render the chat template around the prompt (DESIGN §4).
    #[serde(default)]
    pub chat_template: bool,
    /// Train LoRA adapters instead of every weight; they are merged into the saved checkpoint.
    #[serde(default)]
    pub lora: Option<LoraSpec>,
}

/// The training objective.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainMethod {
    /// Direct Preference Optimization on pairs (Rafailov et al. 2023).
    #[default]
    Dpo,
    /// LiPO-λ on ranked lists (Liu et al. 2024).
    Lipo,
    /// ORPO on pairs, reference-free (Hong et al. 2024).
    Orpo,
    /// SimPO on pairs, reference-free (Meng et al. 2024).
    Simpo,
}

/// The per-pair loss of `method: dpo` (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossKind {
    /// −log σ(β·h): DPO (Rafailov et al. 2023).
    #[default]
    Sigmoid,
    /// relu(1 − β·h): SLiC (Zhao et al. 2023).
    Hinge,
    /// (δ − 1/(2β))² on length-normalised log-ratios: IPO (Azar et al. 2023).
    Ipo,
    /// Label-smoothed, unbiased: robust DPO (Chowdhury et al. 2024).
    Robust,
}

/// The learning-rate schedule after the warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    /// Keep the peak learning rate.
    #[default]
    Constant,
    /// Half a cosine down to 0 at the last step.
    Cosine,
}

/// `lora:` — low-rank adapters W + (alpha/r)·B·A on the targeted linear layers.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank r.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator: the update is (alpha/r)·B·A.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Linear layers to adapt: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
}

fn default_beta() -> f64 {
    0.1
}
fn default_lr() -> f64 {
    1e-6
}
fn one_u64() -> u64 {
    1
}
fn one_usize() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_batch() -> usize {
    8
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_save_every() -> u64 {
    50
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

/// The marker a checkpoint directory written by this stage carries.
const MARKER: &str = "prefpipe_train.json";

impl TrainConfig {
    /// Value checks, every problem at once, each at its field.
    fn check(&self) -> Result<(), Vec<ConfigError>> {
        let mut errs = Vec::new();
        let mut need = |ok: bool, field: &str, msg: String| {
            if !ok {
                errs.push(ConfigError::at(field, msg));
            }
        };
        need(self.lr.is_finite() && self.lr > 0.0, "lr", format!("`lr` must be > 0 (got {})", self.lr));
        if let Some(b) = self.beta {
            let why = if self.loss == Some(DpoLossKind::Ipo) { " (IPO's target margin is 1/(2β))" } else { "" };
            need(b.is_finite() && b > 0.0, "beta", format!("`beta` must be > 0{why} (got {b})"));
        }
        let m = self.method_name();
        let only = |what: &str, methods: &str| format!("`{what}` applies to {methods} only, not `method: {m}`");
        let dpo = self.method == TrainMethod::Dpo;
        need(self.loss.is_none() || dpo, "loss", only("loss", "`method: dpo`"));
        need(self.nll_weight.is_none() || dpo, "nll_weight", only("nll_weight", "`method: dpo`"));
        need(self.lambda.is_none() || self.method == TrainMethod::Orpo, "lambda", only("lambda", "`method: orpo`"));
        need(self.gamma.is_none() || self.method == TrainMethod::Simpo, "gamma", only("gamma", "`method: simpo`"));
        need(
            self.beta.is_none() || self.method != TrainMethod::Orpo,
            "beta",
            "`method: orpo` has no β; its odds-ratio weight is `lambda`".into(),
        );
        if let Some(e) = self.label_smoothing {
            need(
                dpo && self.loss == Some(DpoLossKind::Robust),
                "label_smoothing",
                "`label_smoothing` applies to `method: dpo` with `loss: robust` only".into(),
            );
            need((0.0..0.5).contains(&e), "label_smoothing", format!("`label_smoothing` must be in [0, 0.5) (got {e})"));
        }
        if let Some(a) = self.nll_weight {
            need(a.is_finite() && a >= 0.0, "nll_weight", format!("`nll_weight` must be ≥ 0 (got {a})"));
        }
        if let Some(l) = self.lambda {
            need(l.is_finite() && l > 0.0, "lambda", format!("`lambda` must be > 0 (got {l})"));
        }
        if let Some(g) = self.gamma {
            need(g.is_finite() && g >= 0.0, "gamma", format!("`gamma` must be ≥ 0 (got {g})"));
        }
        need(self.reference.is_none() || !self.reference_free(), "reference", format!("`method: {m}` is reference-free: drop `reference`"));
        need(self.max_steps.is_some() || self.epochs >= 1, "epochs", "`epochs` must be at least 1".into());
        need(self.max_steps != Some(0), "max_steps", "`max_steps` must be at least 1".into());
        need(self.batch_size >= 1, "batch_size", "`batch_size` must be at least 1".into());
        need(self.grad_accum >= 1, "grad_accum", "`grad_accum` must be at least 1".into());
        need(self.save_every >= 1, "save_every", "`save_every` must be at least 1".into());
        need(
            (0.0..1.0).contains(&self.warmup_ratio),
            "warmup_ratio",
            format!("`warmup_ratio` must be in [0, 1) (got {})", self.warmup_ratio),
        );
        need(
            self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
            "max_grad_norm",
            "`max_grad_norm` must be ≥ 0 (0 = no clipping)".into(),
        );
        need(self.weight_decay.is_finite() && self.weight_decay >= 0.0, "weight_decay", "`weight_decay` must be ≥ 0".into());
        need((0.0..1.0).contains(&self.adam_beta1), "adam_beta1", "`adam_beta1` must be in [0, 1)".into());
        need((0.0..1.0).contains(&self.adam_beta2), "adam_beta2", "`adam_beta2` must be in [0, 1)".into());
        need(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0, "adam_epsilon", "`adam_epsilon` must be > 0".into());
        need(self.max_length.is_none_or(|l| l >= 2), "max_length", "`max_length` must be at least 2".into());
        need(!self.output.trim().is_empty(), "output", "`output` must name a directory".into());
        if let Some(l) = &self.lora {
            let at = |field: &str| vec![PathSeg::Key("lora".into()), PathSeg::Key(field.into())];
            if l.r == 0 {
                errs.push(ConfigError { path: at("r"), message: "`r` must be at least 1".into() });
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                errs.push(ConfigError { path: at("alpha"), message: "`alpha` must be > 0".into() });
            }
            if l.targets.is_empty() {
                errs.push(ConfigError { path: at("targets"), message: format!("name at least one of {}", LORA_TARGETS.join(", ")) });
            }
            for (i, t) in l.targets.iter().enumerate() {
                if !LORA_TARGETS.contains(&t.as_str()) {
                    let mut path = at("targets");
                    path.push(PathSeg::Index(i));
                    errs.push(ConfigError { path, message: format!("unknown LoRA target `{t}`; targets: {}", LORA_TARGETS.join(", ")) });
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    fn reference_free(&self) -> bool {
        matches!(self.method, TrainMethod::Orpo | TrainMethod::Simpo)
    }

    fn method_name(&self) -> &'static str {
        match self.method {
            TrainMethod::Dpo => "dpo",
            TrainMethod::Lipo => "lipo",
            TrainMethod::Orpo => "orpo",
            TrainMethod::Simpo => "simpo",
        }
    }

    /// Writes each default the method uses into the config (so the config shows them).
    fn fill_defaults(&mut self) {
        match self.method {
            TrainMethod::Dpo => {
                self.beta.get_or_insert(default_beta());
                self.loss.get_or_insert_default();
                self.nll_weight.get_or_insert(0.0);
                if self.loss == Some(DpoLossKind::Robust) {
                    self.label_smoothing.get_or_insert(0.0);
                }
            }
            TrainMethod::Lipo => {
                self.beta.get_or_insert(default_beta());
            }
            TrainMethod::Orpo => {
                self.lambda.get_or_insert(0.1);
            }
            TrainMethod::Simpo => {
                self.beta.get_or_insert(default_beta());
                self.gamma.get_or_insert(0.5);
            }
        }
    }

    fn options(&self, seed: u64) -> tr::TrainOptions {
        tr::TrainOptions {
            method: match self.method {
                TrainMethod::Dpo => tr::Method::Dpo,
                TrainMethod::Lipo => tr::Method::Lipo,
                TrainMethod::Orpo => tr::Method::Orpo,
                TrainMethod::Simpo => tr::Method::Simpo,
            },
            beta: match self.method {
                TrainMethod::Orpo => self.lambda.unwrap_or(0.1),
                _ => self.beta.unwrap_or(default_beta()),
            },
            dpo_loss: match self.loss.unwrap_or_default() {
                DpoLossKind::Sigmoid => tr::DpoLoss::Sigmoid,
                DpoLossKind::Hinge => tr::DpoLoss::Hinge,
                DpoLossKind::Ipo => tr::DpoLoss::Ipo,
                DpoLossKind::Robust => tr::DpoLoss::Robust,
            },
            label_smoothing: self.label_smoothing.unwrap_or(0.0),
            nll_weight: self.nll_weight.unwrap_or(0.0),
            gamma: self.gamma.unwrap_or(0.0),
            lr: self.lr,
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            shuffle: self.shuffle,
            seed,
            warmup_ratio: self.warmup_ratio,
            schedule: match self.lr_schedule {
                LrScheduleKind::Constant => tr::LrSchedule::Constant,
                LrScheduleKind::Cosine => tr::LrSchedule::Cosine,
            },
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            adam: tr::AdamWConfig {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
            save_every: self.save_every,
            lora: self.lora.as_ref().map(|l| LoraConfig { r: l.r, alpha: l.alpha, targets: l.targets.clone() }),
        }
    }
}

struct Train {
    c: TrainConfig,
    model: ModelRef,
    reference: Option<ModelRef>,
}

/// A directory's config and tokenizer, when it exists now (not a checkpoint still to be written).
fn read_model(cx: &PlanCx, r: &ModelRef) -> Option<(PathBuf, ModelConfig, TextTokenizer)> {
    let dir = cx.resolve_model(&r.value);
    if cx.producer_of(&dir).is_some() {
        return None;
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json")).ok()?;
    let tok = TextTokenizer::load(&dir).ok()?;
    Some((dir, cfg, tok))
}

fn is_text_list(schema: &arrow::datatypes::Schema, name: &str, text: bool) -> bool {
    match schema.field_with_name(name).map(|f| f.data_type().clone()) {
        Ok(DataType::List(item) | DataType::LargeList(item)) => {
            if text {
                matches!(item.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
            } else {
                item.data_type().is_numeric()
            }
        }
        _ => false,
    }
}

impl Train {
    fn output_dir(&self, base: &Path) -> PathBuf {
        let p = Path::new(&self.c.output);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    }

    /// Reads the input into examples tokenized by `m`; rows that do not fit are counted.
    fn examples(&self, input: &RecordBatch, m: &Model, out: &mut Output) -> Result<Vec<Example>> {
        let prompts = str_col(input, col::PROMPT)?;
        let convs = crate::backend::Prompts::of(input)?;
        let ids = input.column_by_name(col::PROMPT_ID).map(|_| str_col(input, col::PROMPT_ID)).transpose()?;
        let row_name = |r: usize| match &ids {
            Some(ids) => format!("row {r} (prompt_id {})", ids.value(r)),
            None => format!("row {r}"),
        };
        let max_len = self.c.max_length.unwrap_or(usize::MAX).min(m.max_len());
        let mut examples = Vec::new();
        let mut too_long = 0;
        let mut ties = 0;
        let pairs = match self.c.method {
            TrainMethod::Lipo => None,
            _ => Some((str_col(input, "chosen")?, str_col(input, "rejected")?)),
        };
        let lists = match self.c.method {
            TrainMethod::Lipo => Some((list_col(input, "responses", DataType::Utf8)?, list_col(input, "rewards", DataType::Float64)?)),
            _ => None,
        };
        for r in 0..input.num_rows() {
            if prompts.is_null(r) {
                return Err(Error::Input(format!("{}: `prompt` is null", row_name(r))));
            }
            let enc = |s: &str| m.pair_ids(convs.get(r), s, self.c.chat_template).map_err(model_err);
            let e = if let Some((chosen, rejected)) = &pairs {
                if chosen.is_null(r) || rejected.is_null(r) {
                    return Err(Error::Input(format!("{}: `chosen` or `rejected` is null", row_name(r))));
                }
                let (prompt, mut rs) = crate::backend::shared_prompt(vec![enc(chosen.value(r))?, enc(rejected.value(r))?]);
                let rejected = rs.pop().expect("two");
                Example::pair(prompt, rs.pop().expect("two"), rejected)
            } else {
                let (responses, rewards) = lists.as_ref().expect("lipo");
                let (responses, rewards) = list_row(responses, rewards, r).map_err(|e| Error::Input(format!("{}: {e}", row_name(r))))?;
                if responses.len() < 2 {
                    return Err(Error::Input(format!(
                        "{}: a list needs at least 2 responses to rank, got {}",
                        row_name(r),
                        responses.len()
                    )));
                }
                if tr::loss::normalised_labels(&rewards).is_none() {
                    ties += 1;
                }
                let encoded = responses.iter().map(|s| enc(s)).collect::<Result<Vec<_>>>()?;
                let (prompt, responses) = crate::backend::shared_prompt(encoded);
                Example::list(prompt, responses, rewards)
            };
            if e.max_len() > max_len {
                too_long += 1;
                continue;
            }
            examples.push(e);
        }
        out.drop("too_long", too_long);
        out.drop("tie", ties);
        if examples.is_empty() {
            return Err(Error::Input(format!(
                "no rows to train on: the input has {} rows, {too_long} longer than max_length {max_len}",
                input.num_rows()
            )));
        }
        Ok(examples)
    }

    /// Writes the checkpoint to `<output>`: saved into a private temp directory
    /// beside it, then each file renamed into place (atomic per file, so a
    /// reader — or a concurrent run — never sees a half-written file). The
    /// marker goes first: a directory with any of our files in it is ours.
    fn save(&self, trainer: &tr::Trainer, out: &Path, cx: &RunCx) -> Result<()> {
        let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let parent = out.parent().unwrap_or(Path::new("."));
        let tmp = parent.join(format!(".{name}.prefpipe-tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        trainer.save_pretrained(&tmp).map_err(model_err)?;
        let marker = serde_json::json!({
            "written_by": format!("prefpipe {} `train` stage `{}`", env!("CARGO_PKG_VERSION"), cx.stage_id),
            "base_model": self.model.dir(cx),
            "reference": if self.c.reference_free() {
                serde_json::Value::Null
            } else {
                self.reference.as_ref().map_or_else(|| self.model.dir(cx), |r| r.dir(cx)).to_string_lossy().into_owned().into()
            },
            "steps": trainer.step(),
            "config": self.c,
        });
        let bytes = serde_json::to_vec_pretty(&marker).expect("serializes");
        std::fs::write(tmp.join(MARKER), bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let mut files: Vec<String> = std::fs::read_dir(&tmp)
            .map_err(|e| Error::io(&tmp, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        files.sort_by_key(|f| (f != MARKER, f.clone()));
        for f in files {
            std::fs::rename(tmp.join(&f), out.join(&f)).map_err(|e| Error::io(out.join(&f), e))?;
        }
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))
    }
}

/// A list column cast to `list<item>`.
fn list_col(b: &RecordBatch, name: &str, item: DataType) -> Result<ListArray> {
    let a = b.column_by_name(name).ok_or_else(|| Error::Input(format!("missing column `{name}`")))?;
    let a = arrow::compute::cast(a, &DataType::List(Arc::new(arrow::datatypes::Field::new("item", item, true))))
        .map_err(|e| Error::Input(format!("column `{name}`: {e}")))?;
    Ok(a.as_any().downcast_ref::<ListArray>().expect("cast to a list").clone())
}

/// Row `r` of the `responses` and `rewards` lists.
fn list_row(responses: &ListArray, rewards: &ListArray, r: usize) -> std::result::Result<(Vec<String>, Vec<f64>), String> {
    if responses.is_null(r) || rewards.is_null(r) {
        return Err("`responses` or `rewards` is null".into());
    }
    let (y, w) = (responses.value(r), rewards.value(r));
    let y = y.as_any().downcast_ref::<StringArray>().expect("utf8 items");
    let w = w.as_any().downcast_ref::<Float64Array>().expect("f64 items");
    if y.len() != w.len() {
        return Err(format!("{} responses but {} rewards", y.len(), w.len()));
    }
    if y.null_count() > 0 || w.null_count() > 0 || w.values().iter().any(|x| !x.is_finite()) {
        return Err("a null response, or a null or non-finite reward, in the list".into());
    }
    Ok((y.iter().map(|s| s.unwrap_or_default().to_string()).collect(), w.values().to_vec()))
}

fn metrics_batch(rows: &[tr::MetricsRow]) -> Result<RecordBatch> {
    let f = |g: fn(&tr::MetricsRow) -> f64| -> ArrayRef { Arc::new(Float64Array::from(rows.iter().map(g).collect::<Vec<_>>())) };
    Ok(RecordBatch::try_new(
        Arc::new(table::metrics_schema()),
        vec![
            Arc::new(UInt64Array::from(rows.iter().map(|m| m.step).collect::<Vec<_>>())),
            f(|m| m.loss),
            f(|m| m.reward_accuracy),
            f(|m| m.reward_margin),
            f(|m| m.chosen_logp),
            f(|m| m.rejected_logp),
            f(|m| m.lr),
            f(|m| m.elapsed_s),
            Arc::new(Float64Array::from(rows.iter().map(|m| (!m.nll.is_nan()).then_some(m.nll)).collect::<Vec<_>>())),
        ],
    )?)
}

impl Stage for Train {
    fn mode(&self) -> Mode {
        Mode::Whole
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let s = &inputs[0];
        let input = &cx.input_ids[0];
        let mut errs: Vec<ConfigError> = Vec::new();
        let mut require = |c: &str| {
            if let Err(mut e) = table::require(s, input, c, Need::Text) {
                e.message = format!("{} (`method: {}` needs a {} table)", e.message, self.method_name(), self.table_name());
                errs.push(e);
            }
        };
        require(col::PROMPT);
        match self.c.method {
            TrainMethod::Dpo | TrainMethod::Orpo | TrainMethod::Simpo => {
                require("chosen");
                require("rejected");
            }
            TrainMethod::Lipo => {
                for (c, text) in [("responses", true), ("rewards", false)] {
                    if !is_text_list(s, c, text) {
                        errs.push(ConfigError::at(
                            "method",
                            format!(
                                "`method: lipo` needs a lists table: input `{input}` has no {} column `{c}` (a `select` with `strategy: listwise` makes one)",
                                if text { "list<utf8>" } else { "list<float64>" }
                            ),
                        ));
                    }
                }
            }
        }
        errs.extend(crate::backend::check_chat(&inputs[0], &cx.input_ids[0], self.c.chat_template, "chat_template"));
        for m in std::iter::once(&self.model).chain(self.reference.as_ref()) {
            if let Err(e) = m.check_for(cx, crate::backend::Uses::Train) {
                errs.push(e);
            }
        }
        let policy = read_model(cx, &self.model);
        if let Some((dir, cfg, _)) = &policy {
            if cfg.head != HeadKind::CausalLm {
                errs.push(ConfigError::at(
                    "model",
                    format!("{}: {} is not a causal LM; `train` needs a *ForCausalLM model", dir.display(), cfg.architecture),
                ));
            }
        }
        if let (Some((pdir, pcfg, ptok)), Some((rdir, rcfg, rtok))) = (&policy, self.reference.as_ref().and_then(|r| read_model(cx, r))) {
            let mut diffs = Vec::new();
            if pcfg.vocab_size != rcfg.vocab_size {
                diffs.push(format!("vocab_size {} vs {}", rcfg.vocab_size, pcfg.vocab_size));
            }
            if ptok.inner().get_vocab(true) != rtok.inner().get_vocab(true) {
                diffs.push("the tokenizers map tokens to different ids".to_string());
            }
            if !diffs.is_empty() {
                errs.push(ConfigError::at(
                    "reference",
                    format!(
                        "{} has a different vocabulary from the policy {} ({}); DPO compares log-probs of the same tokens, so both need the same tokenizer",
                        rdir.display(),
                        pdir.display(),
                        diffs.join("; ")
                    ),
                ));
            }
        }
        let out = self.output_dir(cx.base_dir);
        if out.is_file() {
            errs.push(ConfigError::at("output", format!("{} is a file; `output` names the checkpoint directory", out.display())));
        } else if out.is_dir() && !out.join(MARKER).is_file() && std::fs::read_dir(&out).map(|mut d| d.next().is_some()).unwrap_or(false) {
            errs.push(ConfigError::at(
                "output",
                format!("{} exists and is not a checkpoint this stage wrote (no {MARKER}); pick a new directory", out.display()),
            ));
        }
        let same = |r: &ModelRef| cx.resolve_model(&r.value) == out;
        if same(&self.model) || self.reference.as_ref().is_some_and(same) {
            errs.push(ConfigError::at("output", "`output` must not be the model or reference directory"));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Arc::new(table::metrics_schema()))
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        let mut f = self.model.check_for(cx, crate::backend::Uses::Train)?.into_bytes();
        if let Some(r) = &self.reference {
            f.extend(r.check_for(cx, crate::backend::Uses::Train)?.into_bytes());
        }
        Ok(f)
    }

    fn external_output(&self, cx: &PlanCx) -> Option<PathBuf> {
        Some(self.output_dir(cx.base_dir).join("model.safetensors"))
    }

    fn model_output(&self, cx: &PlanCx) -> Option<PathBuf> {
        Some(self.output_dir(cx.base_dir))
    }

    fn output_aligned(&self, _input_aligned: bool) -> bool {
        false
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let input = inputs[0].read_one()?;
        let mut out = Output { rows_in: input.num_rows() as u64, ..Default::default() };
        let dev = device();
        (cx.device)(&crate::model_ref::device_label(&dev));
        let policy = Model::load_trainable(&self.model.dir(cx), &dev).map_err(model_err)?;
        let examples = self.examples(&input, &policy, &mut out)?;
        // Reference log-probs once, cached in scratch; the reference leaves memory before training.
        // The default reference (the initial policy) is loaded again for inference: the trainable
        // copy's weights are tracked variables, so a forward through them keeps every activation.
        // ORPO and SimPO are reference-free: no reference model is loaded or cached.
        let reference = if self.c.reference_free() {
            Vec::new()
        } else {
            let ref_dir = self.reference.as_ref().map_or_else(|| self.model.dir(cx), |r| r.dir(cx));
            tr::cached_reference_logps(&cx.scratch.join("reference_logps.bin"), &examples, || {
                tr::reference_logps(&Model::load(&ref_dir, &dev)?, &examples)
            })
            .map_err(model_err)?
        };
        let seed = self.c.seed.unwrap_or_else(|| sample_seed(cx.seed, cx.stage_id, "train", 0));
        let mut trainer =
            tr::Trainer::new(policy, examples, reference, self.c.options(seed), Some(cx.scratch.join("checkpoints"))).map_err(model_err)?;
        trainer.run(cx.progress).map_err(|e| Error::Runtime(format!("training: {e}")))?;
        let base = cx.base_dir;
        self.save(&trainer, &self.output_dir(base), cx)?;
        // The resume checkpoints (weights + AdamW moments: 3× the model) are no longer needed;
        // should the output be deleted, the stage trains again, to the same weights.
        let ckpts = cx.scratch.join("checkpoints");
        if ckpts.exists() {
            std::fs::remove_dir_all(&ckpts).map_err(|e| Error::io(&ckpts, e))?;
        }
        let batch = metrics_batch(trainer.metrics())?;
        if let Some(p) = &self.c.metrics {
            let path = cx.resolve(p);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            io::write_parquet(&path, &batch.schema(), std::slice::from_ref(&batch))?;
        }
        out.batches.push(batch);
        Ok(out)
    }
}

impl Train {
    fn method_name(&self) -> &'static str {
        self.c.method_name()
    }
    fn table_name(&self) -> &'static str {
        match self.c.method {
            TrainMethod::Lipo => "lists (prompt, responses, rewards)",
            _ => "pairs (prompt, chosen, rejected)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(yaml: serde_json::Value) -> std::result::Result<Box<dyn Stage>, Vec<ConfigError>> {
        (KIND.build)(&yaml)
    }

    #[test]
    fn config_errors_name_their_field() {
        let errs = build(serde_json::json!({"model": "m", "output": "o", "lr": 0.0, "beta": -1.0, "lora": {"targets": ["q_proj", "qkv"]}}))
            .err()
            .unwrap();
        let msgs: Vec<String> = errs.iter().map(|e| format!("{:?}: {}", e.path, e.message)).collect();
        assert!(msgs.iter().any(|m| m.contains("Key(\"lr\")") && m.contains("`lr` must be > 0 (got 0)")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("Key(\"beta\")")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("Index(1)") && m.contains("unknown LoRA target `qkv`")), "{msgs:?}");
        let errs = build(serde_json::json!({"model": "m", "output": "o", "learning_rate": 1e-5})).err().unwrap();
        assert!(errs[0].message.contains("unknown field `learning_rate`"), "{}", errs[0].message);
    }

    #[test]
    fn defaults_are_explicit_in_the_config() {
        let s = build(serde_json::json!({"model": "m", "output": "o"})).ok().unwrap();
        let c = s.config();
        assert_eq!(c["method"], "dpo");
        assert_eq!(c["beta"], 0.1);
        assert_eq!(c["lr_schedule"], "constant");
        assert_eq!(c["save_every"], 50);
    }

    /// The objectives' bad inputs each fail at their key (exit 2 in the CLI).
    #[test]
    fn objective_errors_name_their_key() {
        let key_of = |yaml: serde_json::Value| -> Vec<(String, String)> {
            build(yaml).err().expect("refused").iter().map(|e| (format!("{:?}", e.path), e.message.clone())).collect()
        };
        let has = |errs: &[(String, String)], key: &str, text: &str| {
            assert!(errs.iter().any(|(p, m)| p.contains(&format!("Key(\"{key}\")")) && m.contains(text)), "{key}/{text}: {errs:?}")
        };
        let base = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"model": "m", "output": "o"});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            v
        };
        has(&key_of(base(serde_json::json!({"loss": "ipo", "beta": 0.0}))), "beta", "IPO's target margin is 1/(2β)");
        for e in [-0.1, 0.5, 0.7] {
            has(&key_of(base(serde_json::json!({"loss": "robust", "label_smoothing": e}))), "label_smoothing", "[0, 0.5)");
        }
        has(&key_of(base(serde_json::json!({"label_smoothing": 0.1}))), "label_smoothing", "`loss: robust` only");
        has(&key_of(base(serde_json::json!({"method": "orpo", "reference": "r"}))), "reference", "reference-free");
        has(&key_of(base(serde_json::json!({"method": "simpo", "reference": "r"}))), "reference", "reference-free");
        has(&key_of(base(serde_json::json!({"method": "simpo", "gamma": -0.5}))), "gamma", "must be ≥ 0");
        has(&key_of(base(serde_json::json!({"method": "orpo", "beta": 0.2}))), "beta", "`lambda`");
        has(&key_of(base(serde_json::json!({"method": "orpo", "lambda": 0.0}))), "lambda", "must be > 0");
        has(&key_of(base(serde_json::json!({"method": "lipo", "loss": "hinge"}))), "loss", "`method: dpo` only");
        has(&key_of(base(serde_json::json!({"gamma": 1.0}))), "gamma", "`method: simpo` only");
        has(&key_of(base(serde_json::json!({"nll_weight": -1.0}))), "nll_weight", "≥ 0");
        has(&key_of(base(serde_json::json!({"loss": "dpo"}))), "loss", "unknown variant");
    }

    #[test]
    fn objective_defaults_are_explicit_and_mapped() {
        let cfg = |yaml: serde_json::Value| {
            let mut c: TrainConfig = serde_json::from_value(yaml).unwrap();
            c.check().unwrap();
            c.fill_defaults();
            c
        };
        let c = cfg(serde_json::json!({"model": "m", "output": "o", "method": "orpo"}));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["lambda"], 0.1);
        assert!(v.get("beta").is_none() && v.get("loss").is_none(), "{v}");
        let o = c.options(0);
        assert_eq!((o.method, o.beta), (tr::Method::Orpo, 0.1));
        let c = cfg(serde_json::json!({"model": "m", "output": "o", "method": "simpo", "beta": 2.0}));
        let o = c.options(0);
        assert_eq!((o.method, o.beta, o.gamma), (tr::Method::Simpo, 2.0, 0.5));
        let c = cfg(serde_json::json!({"model": "m", "output": "o", "loss": "robust", "label_smoothing": 0.2, "nll_weight": 1.0}));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!((v["loss"].as_str(), v["label_smoothing"].as_f64(), v["nll_weight"].as_f64()), (Some("robust"), Some(0.2), Some(1.0)));
        let o = c.options(0);
        assert_eq!((o.dpo_loss, o.label_smoothing, o.nll_weight, o.beta), (tr::DpoLoss::Robust, 0.2, 1.0, 0.1));
        assert!(o.validate().is_ok());
    }
}
