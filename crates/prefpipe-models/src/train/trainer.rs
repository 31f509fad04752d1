//! The training loop: DPO (sigmoid, hinge, IPO, robust; + NLL), ORPO, SimPO or LiPO-λ (DESIGN §8) on tokenized examples, with
//! AdamW, a warmup + constant/cosine schedule, global-norm clipping, gradient
//! accumulation, optional LoRA, and checkpoints that make a killed run end
//! with the same weights as an uninterrupted one.
//!
//! Batching: an epoch is ⌈N/B⌉ micro-batches of B examples (the last may be
//! smaller) in table order, or in a permutation drawn from ChaCha8 seeded by
//! (seed, epoch) when shuffling; an optimizer step takes the next G
//! (`grad_accum`) micro-batches of its epoch. Each step's loss is the mean over
//! all its examples — micro-batches are weighted by size — so accumulating G
//! micro-batches of B equals one batch of G·B. With G = 1 and no shuffling,
//! step t reads rows (t−1)·B … t·B−1.
//!
//! Checkpoints hold the trainable tensors, the AdamW moments, the step and
//! the metrics so far; the data order is a function of (seed, step), so
//! nothing else is needed to continue exactly where the run stopped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::decoder::{Decoder, PaddedBatch};
use crate::error::{invalid_input, Error, Result};
use crate::model::Model;
use crate::train::lora::{Lora, LoraConfig};
use crate::train::loss::{self, List, LossOut, Stats};
use crate::train::optim::{clip_coef, AdamW, AdamWConfig};
use crate::train::schedule::{LrSchedule, Schedule};

/// The objective.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Pairwise DPO (Rafailov et al. 2023).
    #[default]
    Dpo,
    /// Listwise LiPO-λ (Liu et al. 2024).
    Lipo,
    /// ORPO (Hong et al. 2024), reference-free; `beta` is its λ.
    Orpo,
    /// SimPO (Meng et al. 2024), reference-free.
    Simpo,
}

impl Method {
    /// Whether the objective compares against reference log-probs (ORPO and SimPO do not).
    pub fn needs_reference(self) -> bool {
        matches!(self, Method::Dpo | Method::Lipo)
    }

    /// Whether it trains on pairs (everything but LiPO).
    pub fn pairwise(self) -> bool {
        self != Method::Lipo
    }
}

/// Everything that shapes a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub method: Method,
    /// β of DPO / LiPO / SimPO; λ of ORPO (TRL's `ORPOConfig.beta`).
    pub beta: f64,
    /// The per-pair loss of DPO.
    pub dpo_loss: loss::DpoLoss,
    /// ε of robust DPO, in [0, 0.5).
    pub label_smoothing: f64,
    /// α: DPO adds α × the mean NLL over the batch's chosen response tokens.
    pub nll_weight: f64,
    /// γ of SimPO (the target reward margin), ≥ 0.
    pub gamma: f64,
    /// Peak learning rate.
    pub lr: f64,
    pub epochs: u64,
    /// Overrides `epochs` (the data repeats as needed).
    pub max_steps: Option<u64>,
    /// Examples (pairs or lists) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub shuffle: bool,
    /// Drives shuffling and the LoRA initialisation.
    pub seed: u64,
    pub warmup_ratio: f64,
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f64>,
    pub adam: AdamWConfig,
    /// Checkpoint every this many steps (and after the last).
    pub save_every: u64,
    pub lora: Option<LoraConfig>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            method: Method::Dpo,
            beta: 0.1,
            dpo_loss: loss::DpoLoss::Sigmoid,
            label_smoothing: 0.0,
            nll_weight: 0.0,
            gamma: 0.0,
            lr: 1e-6,
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            shuffle: true,
            seed: 0,
            warmup_ratio: 0.0,
            schedule: LrSchedule::Constant,
            max_grad_norm: Some(1.0),
            adam: AdamWConfig::default(),
            save_every: 50,
            lora: None,
        }
    }
}

impl TrainOptions {
    /// Checks ranges; the message names the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, expected: &str, got: String| Err(invalid_input(what, expected, got));
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad("beta", "a number > 0", self.beta.to_string());
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad("label_smoothing", "in [0, 0.5)", self.label_smoothing.to_string());
        }
        if self.label_smoothing > 0.0 && !(self.method == Method::Dpo && self.dpo_loss == loss::DpoLoss::Robust) {
            return bad("label_smoothing", "0 unless `loss: robust`", self.label_smoothing.to_string());
        }
        if !(self.nll_weight.is_finite() && self.nll_weight >= 0.0) {
            return bad("nll_weight", "a number ≥ 0", self.nll_weight.to_string());
        }
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return bad("gamma", "a number ≥ 0", self.gamma.to_string());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "a number > 0", self.lr.to_string());
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.save_every == 0 {
            return bad("batch_size / grad_accum / save_every", "at least 1", "0".into());
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return bad("epochs / max_steps", "at least 1", "0".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "in [0, 1)", self.warmup_ratio.to_string());
        }
        Ok(())
    }
}

/// One preference example, tokenized per DESIGN §4: a pair is a list of two
/// (chosen, rejected) with rewards (1, 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub responses: Vec<Vec<u32>>,
    /// One per response (higher = better); used by LiPO.
    pub rewards: Vec<f64>,
}

impl Example {
    pub fn pair(prompt: Vec<u32>, chosen: Vec<u32>, rejected: Vec<u32>) -> Self {
        Example { prompt, responses: vec![chosen, rejected], rewards: vec![1.0, 0.0] }
    }

    pub fn list(prompt: Vec<u32>, responses: Vec<Vec<u32>>, rewards: Vec<f64>) -> Self {
        Example { prompt, responses, rewards }
    }

    /// (prompt, response) token pairs, in response order.
    pub fn sequences(&self) -> impl Iterator<Item = (Vec<u32>, Vec<u32>)> + '_ {
        self.responses.iter().map(|r| (self.prompt.clone(), r.clone()))
    }

    /// Longest prompt ⊕ response.
    pub fn max_len(&self) -> usize {
        self.prompt.len() + self.responses.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// One row of the metrics table (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    /// The step's loss before its update.
    pub loss: f64,
    /// Share of preference pairs the implicit reward orders right (ties ½).
    pub reward_accuracy: f64,
    /// Mean implicit-reward margin (LiPO: best − worst of each list).
    pub reward_margin: f64,
    /// Mean sθ of chosen (LiPO: best) responses.
    pub chosen_logp: f64,
    /// Mean sθ of rejected (LiPO: worst) responses.
    pub rejected_logp: f64,
    /// Learning rate of the step's update.
    pub lr: f64,
    /// Seconds of training so far (across resumes).
    pub elapsed_s: f64,
    /// Token-mean NLL of the objective's NLL term (DPO with `nll_weight` > 0,
    /// ORPO); NaN where there is none.
    pub nll: f64,
}

impl MetricsRow {
    fn to_bits(self) -> Vec<u64> {
        let f =
            [self.loss, self.reward_accuracy, self.reward_margin, self.chosen_logp, self.rejected_logp, self.lr, self.elapsed_s, self.nll];
        std::iter::once(self.step).chain(f.iter().map(|x| x.to_bits())).collect()
    }

    fn from_bits(b: &[u64]) -> Self {
        let f = |i: usize| b.get(i).map_or(f64::NAN, |&x| f64::from_bits(x));
        MetricsRow {
            step: b[0],
            loss: f(1),
            reward_accuracy: f(2),
            reward_margin: f(3),
            chosen_logp: f(4),
            rejected_logp: f(5),
            lr: f(6),
            elapsed_s: f(7),
            nll: f(8),
        }
    }
}

/// Reference log-probs of every example's responses, computed once.
pub fn reference_logps(reference: &Model, examples: &[Example]) -> Result<Vec<Vec<f64>>> {
    let all: Vec<(Vec<u32>, Vec<u32>)> = examples.iter().flat_map(Example::sequences).collect();
    let flat = reference.logprobs(&all)?;
    let mut out = Vec::with_capacity(examples.len());
    let mut at = 0;
    for e in examples {
        out.push(flat[at..at + e.responses.len()].to_vec());
        at += e.responses.len();
    }
    Ok(out)
}

const CACHE_MAGIC: &[u8; 8] = b"PPREFLP1";

/// blake3 of the examples' token ids (what the reference log-probs depend on).
pub fn examples_digest(examples: &[Example]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for e in examples {
        h.update(&(e.prompt.len() as u64).to_le_bytes());
        e.prompt.iter().for_each(|t| {
            h.update(&t.to_le_bytes());
        });
        h.update(&(e.responses.len() as u64).to_le_bytes());
        for r in &e.responses {
            h.update(&(r.len() as u64).to_le_bytes());
            r.iter().for_each(|t| {
                h.update(&t.to_le_bytes());
            });
        }
    }
    *h.finalize().as_bytes()
}

/// Reference log-probs from the cache file at `path` when it was written for
/// these examples, else from `compute` (then cached, atomically).
pub fn cached_reference_logps(path: &Path, examples: &[Example], compute: impl FnOnce() -> Result<Vec<Vec<f64>>>) -> Result<Vec<Vec<f64>>> {
    let digest = examples_digest(examples);
    let n: usize = examples.iter().map(|e| e.responses.len()).sum();
    if let Ok(bytes) = std::fs::read(path) {
        if bytes.len() == 8 + 32 + 8 * n && &bytes[..8] == CACHE_MAGIC && bytes[8..40] == digest {
            let flat: Vec<f64> = bytes[40..].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
            let mut out = Vec::with_capacity(examples.len());
            let mut at = 0;
            for e in examples {
                out.push(flat[at..at + e.responses.len()].to_vec());
                at += e.responses.len();
            }
            return Ok(out);
        }
    }
    let v = compute()?;
    let mut bytes = Vec::with_capacity(40 + 8 * n);
    bytes.extend_from_slice(CACHE_MAGIC);
    bytes.extend_from_slice(&digest);
    v.iter().flatten().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    write_atomic(path, &bytes)?;
    Ok(v)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Writes a file via a temp file + rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// What a checkpoint's `state.json` holds besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// Of the options and data; a checkpoint for other settings is ignored.
    fingerprint: String,
    step: u64,
    adam_steps: u64,
    elapsed_s: f64,
    /// The step each process started from (0, then one entry per resume).
    starts: Vec<u64>,
    /// Each row's fields as f64 bit patterns (JSON numbers do not round-trip every f64 exactly).
    metrics: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Latest {
    step: u64,
    dir: String,
}

/// One micro-batch's token log-probs and the token range each sequence log-prob sums.
struct TokenLogps {
    /// `[n]`, differentiable.
    tok: Tensor,
    /// One per sequence log-prob, in `LossOut::grad` order (ORPO's chosen
    /// sequences overlap their responses).
    segments: Vec<std::ops::Range<usize>>,
}

/// A DPO / LiPO trainer over a trainable [`Model`].
pub struct Trainer {
    model: Model,
    /// LoRA: the frozen base weights (detached) and the adapters.
    lora: Option<(HashMap<String, Tensor>, Lora)>,
    opt: AdamW,
    examples: Vec<Example>,
    reference: Vec<Vec<f64>>,
    opts: TrainOptions,
    schedule: Schedule,
    steps_per_epoch: u64,
    total_steps: u64,
    step: u64,
    metrics: Vec<MetricsRow>,
    elapsed_before: f64,
    started: Instant,
    starts: Vec<u64>,
    checkpoints: Option<PathBuf>,
    fingerprint: String,
    pad_id: u32,
    /// The permutation of the epoch last used.
    perm: Option<(u64, Vec<usize>)>,
}

impl Trainer {
    /// A trainer for `model` (from [`Model::load_trainable`]) on `examples`
    /// with their reference log-probs. With `checkpoints`, resumes from the
    /// last checkpoint there (if it was written for the same options and data)
    /// and saves new ones there.
    pub fn new(
        model: Model,
        examples: Vec<Example>,
        reference: Vec<Vec<f64>>,
        opts: TrainOptions,
        checkpoints: Option<PathBuf>,
    ) -> Result<Self> {
        opts.validate()?;
        let varmap =
            model.varmap().ok_or_else(|| invalid_input("model to train", "one loaded with Model::load_trainable", "an inference model"))?;
        if examples.is_empty() {
            return Err(invalid_input("training examples", "at least one", 0));
        }
        // ORPO and SimPO take no reference log-probs (an empty list).
        let reference = if opts.method.needs_reference() { reference } else { Vec::new() };
        if opts.method.needs_reference() && reference.len() != examples.len() {
            return Err(invalid_input("reference log-probs", format!("{} examples", examples.len()), reference.len()));
        }
        for (i, e) in examples.iter().enumerate() {
            let r = reference.get(i).map_or(e.responses.len(), Vec::len);
            if e.responses.len() < 2 || e.rewards.len() != e.responses.len() || r != e.responses.len() {
                return Err(invalid_input(
                    format!("example {i}"),
                    "at least 2 responses, with one reward and one reference log-prob each",
                    format!("{} responses, {} rewards, {} log-probs", e.responses.len(), e.rewards.len(), r),
                ));
            }
            if opts.method.pairwise() && e.responses.len() != 2 {
                return Err(invalid_input(
                    format!("example {i}"),
                    format!("a pair for {:?}", opts.method),
                    format!("{} responses", e.responses.len()),
                ));
            }
            if opts.method == Method::Orpo && e.prompt.is_empty() {
                return Err(invalid_input(format!("example {i}"), "a prompt of at least one token for ORPO", "an empty prompt"));
            }
            if e.max_len() > model.max_len() {
                return Err(Error::SequenceTooLong { index: i, len: e.max_len(), max: model.max_len() });
            }
        }
        let vars: Vec<(String, Var)> = {
            let data = varmap.data().lock().map_err(|_| invalid_input("VarMap", "an unpoisoned lock", "poisoned"))?;
            let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let (lora, params) = match &opts.lora {
            None => (None, vars),
            Some(cfg) => {
                let shapes: BTreeMap<String, Vec<usize>> = vars.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
                let adapters = Lora::new(&shapes, cfg, opts.seed, model.device())?;
                let base: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_detached_tensor())).collect();
                let params = adapters.vars();
                (Some((base, adapters)), params)
            }
        };
        let n = examples.len() as u64;
        let micro = n.div_ceil(opts.batch_size as u64);
        let steps_per_epoch = micro.div_ceil(opts.grad_accum as u64);
        let total_steps = opts.max_steps.unwrap_or(opts.epochs * steps_per_epoch);
        let schedule = Schedule::new(opts.schedule, opts.lr, opts.warmup_ratio, total_steps);
        let mut h = blake3::Hasher::new();
        h.update(format!("{opts:?}").as_bytes());
        h.update(&examples_digest(&examples));
        reference.iter().flatten().for_each(|x| {
            h.update(&x.to_le_bytes());
        });
        h.update(model.digest().as_bytes());
        let pad_id = model.tokenizer().pad_id().or(model.eos_id()).unwrap_or(0);
        let mut t = Trainer {
            opt: AdamW::new(params, opts.adam),
            model,
            lora,
            examples,
            reference,
            opts,
            schedule,
            steps_per_epoch,
            total_steps,
            step: 0,
            metrics: Vec::new(),
            elapsed_before: 0.0,
            started: Instant::now(),
            starts: Vec::new(),
            checkpoints,
            fingerprint: h.finalize().to_hex().to_string(),
            pad_id,
            perm: None,
        };
        t.resume()?;
        t.starts.push(t.step);
        Ok(t)
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Optimizer steps taken so far (including those before a resume).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The step each process started from: `[0]`, or `[0, k]` after one resume at step k.
    pub fn starts(&self) -> &[u64] {
        &self.starts
    }

    pub fn metrics(&self) -> &[MetricsRow] {
        &self.metrics
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref().map(|(_, l)| l)
    }

    /// The tensors the optimizer updates (all weights, or the LoRA adapters).
    pub fn trainable(&self) -> &[(String, Var)] {
        self.opt.params()
    }

    /// The policy as it is now (LoRA: base + adapters).
    pub fn decoder(&self) -> Result<Decoder> {
        match &self.lora {
            None => Ok(self.model.decoder().clone()),
            Some((base, lora)) => lora.decoder(self.model.config(), base, self.model.device()),
        }
    }

    /// Example indices of each micro-batch of optimizer step `t` (1-based).
    pub fn batches(&mut self, t: u64) -> Vec<Vec<usize>> {
        let n = self.examples.len();
        let (b, g) = (self.opts.batch_size, self.opts.grad_accum);
        let epoch = (t - 1) / self.steps_per_epoch;
        let j = ((t - 1) % self.steps_per_epoch) as usize;
        if self.perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut p: Vec<usize> = (0..n).collect();
            if self.opts.shuffle {
                let mut h = blake3::Hasher::new();
                h.update(&self.opts.seed.to_le_bytes());
                h.update(b"prefpipe/train/shuffle\0");
                h.update(&epoch.to_le_bytes());
                p.shuffle(&mut ChaCha8Rng::from_seed(*h.finalize().as_bytes()));
            }
            self.perm = Some((epoch, p));
        }
        let perm = &self.perm.as_ref().expect("set above").1;
        let micro = n.div_ceil(b);
        (j * g..((j + 1) * g).min(micro)).map(|m| perm[m * b..((m + 1) * b).min(n)].to_vec()).collect()
    }

    /// The token log-probs of one micro-batch (differentiable, f32), the
    /// sequence log-probs summed from them on the host in f64 — in token
    /// order, as [`Model::logprobs`] sums the reference's — and the loss.
    /// `LossOut::grad` aligns with the sequences: each sequence's summed
    /// response log-prob; for ORPO, then each chosen prompt ⊕ response
    /// log-prob (every token after the first).
    fn forward(&self, decoder: &Decoder, idx: &[usize]) -> Result<(TokenLogps, LossOut)> {
        let mut seqs = Vec::new();
        let mut split = Vec::new();
        for &i in idx {
            let e = &self.examples[i];
            for r in &e.responses {
                seqs.push([e.prompt.as_slice(), r].concat());
                split.push((e.prompt.len(), r.len()));
            }
        }
        let batch = PaddedBatch::right_padded(&seqs, self.pad_id, self.model.device())?;
        let mut segments = Vec::with_capacity(split.len() + idx.len());
        let tok = if self.opts.method == Method::Orpo {
            // Every token after the first; the responses, then the chosen sequences whole.
            let full: Vec<(usize, usize)> = split.iter().map(|&(p, r)| (1, p + r - 1)).collect();
            let mut whole = Vec::with_capacity(idx.len());
            let mut start = 0;
            for (row, &(p, r)) in split.iter().enumerate() {
                let len = p + r - 1;
                segments.push(start + len - r..start + len);
                if row % 2 == 0 {
                    whole.push(start..start + len);
                }
                start += len;
            }
            segments.extend(whole);
            decoder.response_token_logps(&batch, &full)?
        } else {
            let mut start = 0;
            for &(_, r) in &split {
                segments.push(start..start + r);
                start += r;
            }
            decoder.response_token_logps(&batch, &split)?
        };
        let host = tok.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let pol: Vec<f64> = segments.iter().map(|s| host[s.clone()].iter().map(|&x| f64::from(x)).sum()).collect();
        let beta = self.opts.beta;
        let lens = |i: usize, k: usize| self.examples[i].responses[k].len() as f64;
        let out = match self.opts.method {
            Method::Dpo => {
                let pairs: Vec<loss::PairLogps> = idx
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| loss::PairLogps {
                        chosen: pol[2 * k],
                        rejected: pol[2 * k + 1],
                        ref_chosen: self.reference[i][0],
                        ref_rejected: self.reference[i][1],
                        chosen_len: lens(i, 0),
                        rejected_len: lens(i, 1),
                    })
                    .collect();
                loss::dpo_objective(&pairs, self.opts.dpo_loss, beta, self.opts.label_smoothing, self.opts.nll_weight)
            }
            Method::Orpo | Method::Simpo => {
                let m = idx.len();
                let pairs: Vec<loss::FreePair> = idx
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| loss::FreePair {
                        chosen: pol[2 * k],
                        rejected: pol[2 * k + 1],
                        chosen_len: lens(i, 0),
                        rejected_len: lens(i, 1),
                        chosen_full: pol.get(2 * m + k).copied().unwrap_or(f64::NAN),
                        chosen_full_len: (self.examples[i].prompt.len() + self.examples[i].responses[0].len()) as f64 - 1.0,
                    })
                    .collect();
                if self.opts.method == Method::Orpo {
                    loss::orpo(&pairs, beta)
                } else {
                    loss::simpo(&pairs, beta, self.opts.gamma)
                }
            }
            Method::Lipo => {
                let mut at = 0;
                let lists: Vec<List> = idx
                    .iter()
                    .map(|&i| {
                        let k = self.examples[i].responses.len();
                        let l = List { policy: &pol[at..at + k], reference: &self.reference[i], rewards: &self.examples[i].rewards };
                        at += k;
                        l
                    })
                    .collect();
                loss::lipo(&lists, beta)
            }
        };
        Ok((TokenLogps { tok, segments }, out))
    }

    /// The loss and statistics of example indices `idx` under the current
    /// policy, without training (one micro-batch; for evaluation).
    pub fn evaluate(&self, idx: &[usize]) -> Result<LossOut> {
        Ok(self.forward(&self.decoder()?, idx)?.1)
    }

    /// Takes one optimizer step; returns its metrics row.
    pub fn train_step(&mut self) -> Result<MetricsRow> {
        let t = self.step + 1;
        let batches = self.batches(t);
        let decoder = self.decoder()?;
        // Examples that carry a preference (LiPO skips lists whose rewards are all equal).
        let counted = |idx: &[usize]| match self.opts.method {
            Method::Dpo | Method::Orpo | Method::Simpo => idx.len(),
            Method::Lipo => idx.iter().filter(|&&i| loss::normalised_labels(&self.examples[i].rewards).is_some()).count(),
        };
        let n: usize = batches.iter().map(|b| counted(b)).sum();
        let mut grads = self.opt.no_grads();
        let mut loss = 0.0;
        let mut stats = Stats::default();
        for idx in &batches {
            let k = counted(idx);
            if k == 0 {
                continue;
            }
            let (logps, out) = self.forward(&decoder, idx)?;
            // Weight by size so the step's loss is the mean over all its examples.
            let w = k as f64 / n as f64;
            loss += w * out.loss;
            stats.add(&out.stats);
            // Σ over sequences of (∂loss/∂sθ)·sθ = Σ over tokens of (the sum of
            // their sequences' ∂loss/∂sθ)·log p(token): the same gradient.
            let mut coef = vec![0f64; logps.tok.dim(0)?];
            for (seg, g) in logps.segments.iter().zip(&out.grad) {
                coef[seg.clone()].iter_mut().for_each(|c| *c += g * w);
            }
            let coef = Tensor::from_vec(coef.into_iter().map(|c| c as f32).collect::<Vec<f32>>(), logps.tok.dims(), logps.tok.device())?;
            let surrogate = (logps.tok * coef)?.sum_all()?;
            // The graph (every activation) goes with `surrogate` here, before the next micro-batch's forward.
            self.opt.accumulate(surrogate.backward()?, &mut grads)?;
        }
        // A non-finite loss, gradient or weight fails the step before anything
        // is applied or saved (a NaN norm would otherwise pass clipping as
        // coefficient 1 and AdamW would write NaN weights).
        let non_finite = |what: &str, value: f64| Error::NonFinite { step: t, what: what.to_string(), value: value.to_string() };
        if !loss.is_finite() {
            return Err(non_finite("the loss", loss));
        }
        let norm = grads.norm()?;
        if !norm.is_finite() {
            return Err(non_finite("the gradient norm", norm));
        }
        let clip = self.opts.max_grad_norm.and_then(|max| clip_coef(norm, max));
        let lr = self.schedule.lr(t);
        // A step with no preference at all (only all-equal lists) moves nothing.
        if n > 0 {
            self.opt.step_grads(&grads, clip, lr).map_err(|e| match e {
                Error::NonFinite { what, value, .. } => Error::NonFinite { step: t, what, value },
                e => e,
            })?;
        }
        // The gradients (a model's worth) leave memory before a checkpoint is written.
        drop(grads);
        self.step = t;
        let row = MetricsRow {
            step: t,
            loss,
            reward_accuracy: stats.accuracy(),
            reward_margin: stats.mean_margin(),
            chosen_logp: stats.mean_chosen_logp(),
            rejected_logp: stats.mean_rejected_logp(),
            lr,
            elapsed_s: self.elapsed(),
            nll: stats.nll(),
        };
        self.metrics.push(row);
        if t.is_multiple_of(self.opts.save_every) || t == self.total_steps {
            self.save_checkpoint()?;
        }
        Ok(row)
    }

    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Trains to the last step, reporting (steps done, total) after each.
    pub fn run(&mut self, progress: &dyn Fn(u64, u64)) -> Result<()> {
        progress(self.step, self.total_steps);
        while self.step < self.total_steps {
            self.train_step()?;
            progress(self.step, self.total_steps);
        }
        Ok(())
    }

    /// Writes a checkpoint for the current step (if a directory was given).
    pub fn save_checkpoint(&self) -> Result<()> {
        let Some(root) = &self.checkpoints else {
            return Ok(());
        };
        std::fs::create_dir_all(root).map_err(io(root))?;
        let name = format!("step-{:08}", self.step);
        let tmp = root.join(format!("{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let weights: HashMap<String, Tensor> = self.opt.params().iter().map(|(k, v)| (k.clone(), v.as_detached_tensor())).collect();
        candle_core::safetensors::save(&weights, tmp.join("trainable.safetensors"))?;
        self.opt.save_state(&tmp.join("optimizer.safetensors"))?;
        let state = State {
            fingerprint: self.fingerprint.clone(),
            step: self.step,
            adam_steps: self.opt.steps(),
            elapsed_s: self.elapsed(),
            starts: self.starts.clone(),
            metrics: self.metrics.iter().map(|m| m.to_bits()).collect(),
        };
        let json = serde_json::to_vec_pretty(&state).map_err(|source| Error::Json { path: tmp.join("state.json"), source })?;
        std::fs::write(tmp.join("state.json"), json).map_err(io(&tmp))?;
        let dir = root.join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        let latest = serde_json::to_vec(&Latest { step: self.step, dir: name.clone() }).expect("serializes");
        write_atomic(&root.join("latest.json"), &latest)?;
        // Older checkpoints are no longer needed.
        for e in std::fs::read_dir(root).map_err(io(root))?.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if f.starts_with("step-") && f != name {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Loads the last checkpoint, if there is one for these options and data.
    fn resume(&mut self) -> Result<()> {
        let Some(root) = &self.checkpoints else {
            return Ok(());
        };
        let Ok(bytes) = std::fs::read(root.join("latest.json")) else {
            return Ok(());
        };
        let Ok(latest) = serde_json::from_slice::<Latest>(&bytes) else {
            return Ok(());
        };
        let dir = root.join(&latest.dir);
        let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
            return Ok(());
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: dir.join("state.json"), source })?;
        if state.fingerprint != self.fingerprint {
            return Ok(());
        }
        let device = self.model.device().clone();
        let weights = candle_core::safetensors::load(dir.join("trainable.safetensors"), &device)?;
        for (name, var) in self.opt.params() {
            let t = weights.get(name).ok_or_else(|| invalid_input("checkpoint", format!("a tensor `{name}`"), "none"))?;
            var.set(t)?;
        }
        let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &device)?;
        self.opt.load_state(&moments, state.adam_steps)?;
        self.step = state.step;
        self.metrics = state.metrics.iter().map(|b| MetricsRow::from_bits(b)).collect();
        self.elapsed_before = state.elapsed_s;
        self.starts = state.starts;
        self.started = Instant::now();
        Ok(())
    }

    /// Writes the trained policy as a Hugging Face directory (LoRA merged:
    /// W + (alpha/r)·B·A) that transformers and [`Model::load`] read.
    pub fn save_pretrained(&self, out: &Path) -> Result<()> {
        self.model.save_pretrained(out)?;
        if let Some((base, lora)) = &self.lora {
            let mut tensors = BTreeMap::new();
            for (name, w) in base {
                let t = lora.merged(name, w)?.detach();
                tensors.insert(name.clone(), (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?));
            }
            crate::fixture::write_safetensors(&out.join("model.safetensors"), &tensors)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert!(TrainOptions::default().validate().is_ok());
        let e = TrainOptions { lr: 0.0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("invalid lr: expected a number > 0, got 0"), "{e}");
        assert!(TrainOptions { lr: -1e-3, ..Default::default() }.validate().is_err());
        assert!(TrainOptions { warmup_ratio: 1.0, ..Default::default() }.validate().is_err());
    }
}
