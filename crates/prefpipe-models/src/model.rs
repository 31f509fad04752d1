//! [`Model`]: a loaded Hugging Face model directory and the operations the
//! engine's stages call — tokenization per DESIGN §4, teacher-forced
//! log-probs, hidden-state sums for CHES, reward scores and generation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;

use crate::config::{HeadKind, ModelConfig};
use crate::decoder::{Decoder, KvCache, PaddedBatch};
use crate::error::{invalid_input, Error, Result};
use crate::generate::{find_stop, rng_for, sample_token, FinishReason, Generation, SamplingParams};
use crate::tokenizer::{read_json_opt, TextTokenizer};

/// Teacher-forced micro-batches hold at most this many (padded) tokens.
const BATCH_TOKENS: usize = 4096;
/// ... and at most this many sequences.
const MAX_BATCH: usize = 32;
/// Generation decodes this many sequences together.
const GEN_BATCH: usize = 16;

/// Small files that change what a model computes besides its weights.
const DIGESTED_FILES: [&str; 5] =
    ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"];

/// A loaded model directory (causal LM or reward model) on one device, in f32.
pub struct Model {
    decoder: Decoder,
    tokenizer: TextTokenizer,
    config: ModelConfig,
    dir: PathBuf,
    digest: String,
    device: Device,
    /// Token ids that end generation (generation_config ∪ config ∪ tokenizer eos).
    stop_ids: Vec<u32>,
    /// Appended to every response (DESIGN §4).
    eos_id: Option<u32>,
    /// Filler for padded slots; never attended to by real tokens.
    pad_id: u32,
    /// The trainable weights, for a model from [`Model::load_trainable`].
    varmap: Option<VarMap>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("dir", &self.dir)
            .field("architecture", &self.config.architecture)
            .field("digest", &self.digest)
            .field("device", &self.device)
            .field("trainable", &self.varmap.is_some())
            .finish_non_exhaustive()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile { path: path.to_path_buf(), what: "a file listed by the model directory".into() }
        } else {
            Error::Io { path: path.to_path_buf(), source }
        }
    })
}

/// The safetensors files of a model directory, in a fixed order, or why there are none.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json_opt(&index)?.unwrap_or(Value::Null);
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::InvalidConfig {
            path: index.clone(),
            field: "weight_map".into(),
            expected: "an object of tensor name → shard file".into(),
            got: v.get("weight_map").map_or("nothing".into(), |w| w.to_string()),
        })?;
        let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
        files.sort();
        files.dedup();
        let mut out = vec![];
        for f in files {
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(Error::MissingFile { path: p, what: format!("shard `{f}` listed in model.safetensors.index.json") });
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    if names.iter().any(|n| n.starts_with("model-") && n.ends_with(".safetensors")) {
        return Err(Error::MissingFile { path: index, what: "the shard index for the model-*.safetensors files".into() });
    }
    if let Some(pickle) = names.iter().filter(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth")).min() {
        return Err(Error::PickleCheckpoint { path: dir.join(pickle) });
    }
    Err(Error::MissingFile {
        path: single,
        what: "weights: model.safetensors (or model-*.safetensors + model.safetensors.index.json)".into(),
    })
}

/// Incremental digest with length-framed, named entries.
struct Digest(blake3::Hasher);

impl Digest {
    fn new() -> Self {
        Self(blake3::Hasher::new())
    }

    fn add(&mut self, name: &str, len: u64) {
        self.0.update(name.as_bytes());
        self.0.update(&[0]);
        self.0.update(&len.to_le_bytes());
    }
}

/// blake3 (hex) of the model's config, tokenizer/generation files and weight
/// files, without loading the model; equals [`Model::digest`]. Remembered by
/// the files' stat in [`prefpipe_core::digest_cache`], so a second plan reads no weights.
pub fn model_digest(dir: &Path) -> Result<String> {
    let mut d = Digest::new();
    let files: Vec<PathBuf> = if dir.is_file() {
        // A GGUF file is the whole model.
        vec![dir.to_path_buf()]
    } else {
        let mut files: Vec<PathBuf> = DIGESTED_FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()).collect();
        files.extend(weight_files(dir)?);
        files
    };
    // "prefpipe model digest v1" is the domain the cache used before it moved
    // to prefpipe-core: existing entries stay valid.
    prefpipe_core::digest_cache::cached("prefpipe model digest v1", &files, || {
        for p in &files {
            let io = |source| Error::Io { path: p.clone(), source };
            let mut f = std::fs::File::open(p).map_err(io)?;
            let len = f.metadata().map_err(io)?.len();
            d.add(&p.file_name().unwrap_or_default().to_string_lossy(), len);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                d.0.update(&buf[..n]);
            }
        }
        Ok(d.0.finalize().to_hex().to_string())
    })
}

impl Model {
    /// Loads a Hugging Face model directory (see the crate docs for the files read).
    pub fn load(dir: &Path, device: &Device) -> Result<Model> {
        Self::load_inner(dir, device, false)
    }

    /// Loads a model directory with its weights as `Var`s in a [`VarMap`] (the
    /// training path): [`Model::varmap`] gives them to an optimizer, and
    /// [`Decoder::sequence_logps`] on [`Model::decoder`] is differentiable.
    pub fn load_trainable(dir: &Path, device: &Device) -> Result<Model> {
        Self::load_inner(dir, device, true)
    }

    fn load_inner(dir: &Path, device: &Device, trainable: bool) -> Result<Model> {
        let is_gguf = dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf {
            if trainable {
                return Err(Error::Unsupported {
                    path: dir.to_path_buf(),
                    what: "training from".into(),
                    got: "a GGUF file".into(),
                    supported: "Hugging Face directories with safetensors weights".into(),
                });
            }
            let g = crate::gguf::read(dir, device)?;
            let digest = model_digest(dir)?;
            return Self::assemble(dir, device, g.config, g.tensors, g.tokenizer, Some(g.stop_ids), digest, false, dir.to_path_buf());
        }
        if !dir.is_dir() {
            return Err(Error::MissingFile { path: dir.to_path_buf(), what: "model directory (or .gguf file)".into() });
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        let tokenizer = TextTokenizer::load(dir)?;

        let mut digest = Digest::new();
        for name in DIGESTED_FILES {
            let p = dir.join(name);
            if p.is_file() {
                let bytes = read_file(&p)?;
                digest.add(name, bytes.len() as u64);
                digest.0.update(&bytes);
            }
        }
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for f in &files {
            let bytes = read_file(f)?;
            digest.add(&f.file_name().unwrap_or_default().to_string_lossy(), bytes.len() as u64);
            digest.0.update(&bytes);
            let map = candle_core::safetensors::load_buffer(&bytes, device).map_err(|source| Error::Weights { path: f.clone(), source })?;
            tensors.extend(map);
        }
        let weights_path = if files.len() == 1 { files[0].clone() } else { dir.to_path_buf() };
        let digest = digest.0.finalize().to_hex().to_string();
        Self::assemble(dir, device, config, tensors, tokenizer, None, digest, trainable, weights_path)
    }

    /// Builds the decoder from checkpoint-named tensors and resolves special ids.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        dir: &Path,
        device: &Device,
        config: ModelConfig,
        tensors: HashMap<String, Tensor>,
        tokenizer: TextTokenizer,
        stop_ids: Option<Vec<u32>>,
        digest: String,
        trainable: bool,
        weights_path: PathBuf,
    ) -> Result<Model> {
        let weights_err = |source| Error::Weights { path: weights_path.clone(), source };
        let (decoder, varmap) = if trainable {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
            let decoder = Decoder::new(&config, vb).map_err(weights_err)?;
            for (name, var) in lock(&varmap)?.iter() {
                let t = tensors.get(name).ok_or_else(|| weights_err(candle_core::Error::CannotFindTensor { path: name.clone() }))?;
                if t.dims() != var.dims() {
                    return Err(weights_err(candle_core::Error::UnexpectedShape {
                        msg: format!("shape mismatch for {name}"),
                        expected: var.shape().clone(),
                        got: t.shape().clone(),
                    }));
                }
                var.set(&t.to_dtype(DType::F32)?).map_err(weights_err)?;
            }
            (decoder, Some(varmap))
        } else {
            let decoder = Decoder::new(&config, VarBuilder::from_tensors(tensors, DType::F32, device)).map_err(weights_err)?;
            (decoder.into_cpu_inference().map_err(weights_err)?, None)
        };

        // Every id the tokenizer can emit must have an embedding row.
        let needed = tokenizer.inner().get_vocab(true).values().max().map_or(0, |&m| m as usize + 1);
        if needed > config.vocab_size {
            return Err(Error::VocabMismatch {
                path: if dir.is_file() { dir.to_path_buf() } else { dir.join("tokenizer.json") },
                expected: config.vocab_size,
                got: needed,
            });
        }

        let mut stop_ids = match stop_ids {
            Some(ids) => ids,
            None => {
                let gen_path = dir.join("generation_config.json");
                let gen = read_json_opt(&gen_path)?.unwrap_or(Value::Null);
                crate::config::token_ids(gen.get("eos_token_id"), "eos_token_id", &gen_path)?
            }
        };
        if stop_ids.is_empty() {
            stop_ids = config.eos_token_ids.clone();
        }
        let eos_id = tokenizer.eos_id().or_else(|| stop_ids.first().copied());
        stop_ids.extend(eos_id);
        stop_ids.sort();
        stop_ids.dedup();
        let pad_id = tokenizer.pad_id().or(config.pad_token_id).or(eos_id).unwrap_or(0);

        Ok(Model { decoder, tokenizer, digest, config, dir: dir.to_path_buf(), device: device.clone(), stop_ids, eos_id, pad_id, varmap })
    }

    /// The trainable weights (models from [`Model::load_trainable`] only).
    pub fn varmap(&self) -> Option<&VarMap> {
        self.varmap.as_ref()
    }

    /// Writes a trainable model as a Hugging Face directory that transformers
    /// (and [`Model::load`]) can load: `model.safetensors` with the current
    /// weights, plus this model's config, tokenizer and generation files.
    pub fn save_pretrained(&self, out: &Path) -> Result<()> {
        let varmap = self
            .varmap
            .as_ref()
            .ok_or_else(|| invalid_input("model for save_pretrained", "one loaded with Model::load_trainable", "an inference model"))?;
        std::fs::create_dir_all(out).map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
        let mut tensors = std::collections::BTreeMap::new();
        for (name, var) in lock(varmap)?.iter() {
            let t = var.as_tensor().to_dtype(DType::F32)?;
            tensors.insert(name.clone(), (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?));
        }
        crate::fixture::write_safetensors(&out.join("model.safetensors"), &tensors)?;
        for name in DIGESTED_FILES {
            let src = self.dir.join(name);
            if src.is_file() {
                std::fs::copy(&src, out.join(name)).map_err(|source| Error::Io { path: src.clone(), source })?;
                crate::fixture::set_default_permissions(&out.join(name))?;
            }
        }
        Ok(())
    }

    /// blake3 (hex) of config.json, the generation/tokenizer files and the
    /// weight files: the model's identity for the content-addressed run store.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest sequence (prompt + response) the model takes: `max_position_embeddings`.
    pub fn max_len(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// The id appended to responses.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Ids that end generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Prompt ids per DESIGN §4: plain `encode(prompt, add_special_tokens=true)`;
    /// with `chat_template`, the template rendered for one user message with
    /// `add_generation_prompt=true`, encoded with `add_special_tokens=false`.
    pub fn encode_prompt(&self, prompt: &str, chat_template: bool) -> Result<Vec<u32>> {
        crate::codec::prompt_ids(&self.tokenizer, crate::codec::Prompt::Text(prompt), chat_template)
    }

    /// Response ids per DESIGN §4: `encode(response, add_special_tokens=false) + [eos_id]`.
    pub fn encode_response(&self, response: &str) -> Result<Vec<u32>> {
        crate::codec::response_ids(&self.tokenizer, self.eos_id, response, &self.dir)
    }

    /// [`crate::codec::prompt_ids`] with this model's tokenizer (DESIGN §4/§15).
    pub fn prompt_ids(&self, prompt: crate::codec::Prompt, chat_template: bool) -> Result<Vec<u32>> {
        crate::codec::prompt_ids(&self.tokenizer, prompt, chat_template)
    }

    /// [`crate::codec::pair_ids`]: (prompt ids, response ids) as TRL's DPO trainer builds them.
    pub fn pair_ids(&self, prompt: crate::codec::Prompt, response: &str, chat_template: bool) -> Result<(Vec<u32>, Vec<u32>)> {
        crate::codec::pair_ids(&self.tokenizer, self.eos_id, prompt, response, chat_template, &self.dir)
    }

    /// [`crate::codec::reward_ids`]: what a reward model reads (DESIGN §4).
    pub fn reward_ids(&self, prompt: crate::codec::Prompt, response: &str, chat_template: bool) -> Result<Vec<u32>> {
        crate::codec::reward_ids(&self.tokenizer, self.eos_id, prompt, response, chat_template, &self.dir)
    }

    /// `decode(ids, skip_special_tokens=true)`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true)
    }

    fn require_head(&self, op: &'static str, lm: bool) -> Result<()> {
        let is_lm = self.config.head == HeadKind::CausalLm;
        if is_lm == lm {
            return Ok(());
        }
        let name = |lm: bool| {
            if lm {
                "causal LM"
            } else {
                "sequence-classification (reward)"
            }
        };
        Err(Error::WrongHead { op, needs: name(lm), has: name(is_lm), architecture: self.config.architecture.clone() })
    }

    /// Checks ids are in the vocabulary and the sequence fits the context.
    fn check_sequence(&self, index: usize, what: &str, ids: &[u32], min_len: usize) -> Result<()> {
        if ids.len() < min_len {
            return Err(invalid_input(format!("{what} of item {index}"), format!("at least {min_len} token(s)"), ids.len()));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(invalid_input(
                format!("token id in {what} of item {index}"),
                format!("< vocab_size {}", self.config.vocab_size),
                bad,
            ));
        }
        Ok(())
    }

    /// Validates (prompt, response) pairs; returns the concatenated sequences.
    fn pair_sequences(&self, batch: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Vec<u32>>> {
        batch
            .iter()
            .enumerate()
            .map(|(i, (p, r))| {
                self.check_sequence(i, "prompt_ids", p, 1)?;
                self.check_sequence(i, "response_ids", r, 1)?;
                let len = p.len() + r.len();
                if len > self.max_len() {
                    return Err(Error::SequenceTooLong { index: i, len, max: self.max_len() });
                }
                Ok([p.as_slice(), r].concat())
            })
            .collect()
    }

    /// Summed log-probability of each response given its prompt (EOS included,
    /// DESIGN §4), from right-padded micro-batches.
    pub fn logprobs(&self, batch: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<f64>> {
        self.require_head("logprobs", true)?;
        let seqs = self.pair_sequences(batch)?;
        let mut out = vec![0f64; batch.len()];
        let decoder = self.inference_decoder();
        for group in micro_batches(&seqs) {
            let rows: Vec<Vec<u32>> = group.iter().map(|&i| seqs[i].clone()).collect();
            let split: Vec<(usize, usize)> = group.iter().map(|&i| (batch[i].0.len(), batch[i].1.len())).collect();
            let padded = PaddedBatch::right_padded(&rows, self.pad_id, &self.device)?;
            let tok = decoder.response_token_logps(&padded, &split)?.to_vec1::<f32>()?;
            let mut at = 0;
            for (&i, &(_, r)) in group.iter().zip(&split) {
                out[i] = tok[at..at + r].iter().map(|&x| f64::from(x)).sum();
                at += r;
            }
        }
        Ok(out)
    }

    /// S(y) per (prompt, response): the sum, accumulated in f64, of the final
    /// hidden states (after the final norm) at the |y| positions that predict
    /// the response tokens — last prompt token … second-to-last response token
    /// (DESIGN §7 `ches`).
    pub fn hidden_sums(&self, batch: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Vec<f32>>> {
        let seqs = self.pair_sequences(batch)?;
        let mut out = vec![vec![]; batch.len()];
        let decoder = self.inference_decoder();
        for group in micro_batches(&seqs) {
            let rows: Vec<Vec<u32>> = group.iter().map(|&i| seqs[i].clone()).collect();
            let split: Vec<(usize, usize)> = group.iter().map(|&i| (batch[i].0.len(), batch[i].1.len())).collect();
            let padded = PaddedBatch::right_padded(&rows, self.pad_id, &self.device)?;
            let h = decoder.response_hidden(&padded, &split)?.to_vec2::<f32>()?;
            let mut at = 0;
            for (&i, &(_, r)) in group.iter().zip(&split) {
                let mut sum = vec![0f64; self.config.hidden_size];
                for row in &h[at..at + r] {
                    sum.iter_mut().zip(row).for_each(|(s, &x)| *s += f64::from(x));
                }
                out[i] = sum.into_iter().map(|x| x as f32).collect();
                at += r;
            }
        }
        Ok(out)
    }

    /// Reward-head outputs `[num_labels]` of each sequence at its last token.
    pub fn scores(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.require_head("scores", false)?;
        for (i, s) in seqs.iter().enumerate() {
            self.check_sequence(i, "sequence", s, 1)?;
            if s.len() > self.max_len() {
                return Err(Error::SequenceTooLong { index: i, len: s.len(), max: self.max_len() });
            }
        }
        let mut out = vec![vec![]; seqs.len()];
        let decoder = self.inference_decoder();
        for group in micro_batches(seqs) {
            let rows: Vec<Vec<u32>> = group.iter().map(|&i| seqs[i].clone()).collect();
            let padded = PaddedBatch::right_padded(&rows, self.pad_id, &self.device)?;
            let s = decoder.last_token_scores(&padded)?.to_vec2::<f32>()?;
            for (&i, row) in group.iter().zip(s) {
                out[i] = row;
            }
        }
        Ok(out)
    }

    /// The reward of each (prompt, response): a one-label reward model's
    /// `score` output at the last token of prompt ⊕ response (DESIGN §4).
    pub fn rewards(&self, batch: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<f64>> {
        self.require_head("rewards", false)?;
        if let HeadKind::SequenceClassification { num_labels } = self.config.head {
            if num_labels != 1 {
                return Err(invalid_input("reward model num_labels", "1 (use `scores` for more)", num_labels));
            }
        }
        let seqs = self.pair_sequences(batch)?;
        Ok(self.scores(&seqs)?.into_iter().map(|s| f64::from(s[0])).collect())
    }

    /// Samples one response per prompt; `seeds[i]` alone drives prompt i's
    /// randomness, so results do not depend on batch composition. A prompt
    /// with no room left in the context gives [`Error::PromptTooLong`]
    /// (check with [`Model::max_len`] first to drop such prompts).
    pub fn generate(&self, prompts: &[Vec<u32>], params: &SamplingParams, seeds: &[u64]) -> Result<Vec<Generation>> {
        self.require_head("generate", true)?;
        params.validate()?;
        if prompts.len() != seeds.len() {
            return Err(invalid_input("seeds", format!("one per prompt ({})", prompts.len()), seeds.len()));
        }
        for (i, p) in prompts.iter().enumerate() {
            self.check_sequence(i, "prompt_ids", p, 1)?;
            if p.len() >= self.max_len() {
                return Err(Error::PromptTooLong { index: i, len: p.len(), max: self.max_len() });
            }
        }
        let mut out = Vec::with_capacity(prompts.len());
        let order: Vec<usize> = (0..prompts.len()).collect();
        for chunk in order.chunks(GEN_BATCH) {
            let ps: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
            let ss: Vec<u64> = chunk.iter().map(|&i| seeds[i]).collect();
            out.extend(self.generate_chunk(&ps, params, &ss)?);
        }
        Ok(out)
    }

    fn generate_chunk(&self, prompts: &[&[u32]], params: &SamplingParams, seeds: &[u64]) -> Result<Vec<Generation>> {
        struct Row {
            rng: rand_chacha::ChaCha20Rng,
            tokens: Vec<u32>,
            prompt_len: usize,
            finish: Option<FinishReason>,
            stop_at: Option<usize>,
        }
        let b = prompts.len();
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut rows: Vec<Row> = prompts
            .iter()
            .zip(seeds)
            .map(|(p, &s)| Row { rng: rng_for(s), tokens: vec![], prompt_len: p.len(), finish: None, stop_at: None })
            .collect();

        // Prefill, left-padded so every row's last prompt token is in the last column.
        let mut ids = Vec::with_capacity(b * width);
        let mut q_pos = Vec::with_capacity(b * width);
        for p in prompts {
            let pad = width - p.len();
            ids.extend(std::iter::repeat_n(self.pad_id, pad).chain(p.iter().copied()));
            q_pos.extend((0..width).map(|i| (i >= pad).then(|| (i - pad) as u32)));
        }
        let capacity = (width + params.max_new_tokens).min(self.max_len());
        let mut cache = KvCache::with_capacity(self.config.num_hidden_layers, capacity);
        let input = Tensor::from_vec(ids, (b, width), &self.device)?;
        let decoder = self.inference_decoder();
        let hidden = decoder.body().forward(&input, &q_pos, Some(&mut cache))?;
        let mut logits = last_logits(&decoder, &hidden)?;
        let mut active: Vec<usize> = (0..b).collect();

        loop {
            let mut still = vec![];
            let mut still_rows = vec![];
            for (slot, &r) in active.iter().enumerate() {
                let row = &mut rows[r];
                let tok = sample_token(&logits[slot], params, &mut row.rng);
                if self.stop_ids.contains(&tok) {
                    row.finish = Some(FinishReason::Stop);
                    continue;
                }
                row.tokens.push(tok);
                if !params.stop_strings.is_empty() {
                    let text = self.tokenizer.decode(&row.tokens, true)?;
                    if let Some(at) = find_stop(&text, &params.stop_strings) {
                        row.stop_at = Some(at);
                        row.finish = Some(FinishReason::Stop);
                        continue;
                    }
                }
                if row.tokens.len() >= params.max_new_tokens || row.prompt_len + row.tokens.len() >= self.max_len() {
                    row.finish = Some(FinishReason::Length);
                    continue;
                }
                still.push(slot);
                still_rows.push(r);
            }
            if still.is_empty() {
                break;
            }
            cache.retain_rows(&still)?;
            active = still_rows;
            let ids: Vec<u32> = active.iter().map(|&r| *rows[r].tokens.last().unwrap_or(&self.pad_id)).collect();
            let q_pos: Vec<Option<u32>> = active.iter().map(|&r| Some((rows[r].prompt_len + rows[r].tokens.len() - 1) as u32)).collect();
            let input = Tensor::from_vec(ids, (active.len(), 1), &self.device)?;
            let hidden = decoder.body().forward(&input, &q_pos, Some(&mut cache))?;
            logits = last_logits(&decoder, &hidden)?;
        }

        rows.into_iter()
            .map(|row| {
                let mut text = self.tokenizer.decode(&row.tokens, true)?;
                if let Some(at) = row.stop_at {
                    text.truncate(at);
                }
                Ok(Generation {
                    n_tokens: row.tokens.len(),
                    token_ids: row.tokens,
                    text,
                    finish_reason: row.finish.unwrap_or(FinishReason::Length),
                })
            })
            .collect()
    }

    /// The decoder for numbers only: the model's own, or for a trainable
    /// model a detached view of its weights, so nothing records a gradient
    /// graph and the fused inference kernels run (same bits as [`Model::load`]).
    fn inference_decoder(&self) -> Cow<'_, Decoder> {
        match self.varmap {
            None => Cow::Borrowed(&self.decoder),
            Some(_) => Cow::Owned(self.decoder.detached()),
        }
    }
}

/// Logits `[b][vocab]` at the last column of `hidden` `[b, t, h]`.
fn last_logits(decoder: &Decoder, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
    Ok(decoder.apply_head(&last)?.to_vec2::<f32>()?)
}

fn lock(varmap: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, candle_core::Var>>> {
    varmap.data().lock().map_err(|_| invalid_input("VarMap", "an unpoisoned lock", "poisoned by a panic"))
}

/// Groups sequence indices into micro-batches of similar length (longest
/// first) under the token budget; results are written back by index.
fn micro_batches(seqs: &[Vec<u32>]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut groups: Vec<Vec<usize>> = vec![];
    for i in order {
        match groups.last_mut() {
            Some(g) if g.len() < MAX_BATCH && (g.len() + 1) * seqs[g[0]].len() <= BATCH_TOKENS => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_every_index_once() {
        let seqs: Vec<Vec<u32>> = (0..100).map(|i| vec![0; 1 + (i * 37) % 300]).collect();
        let groups = micro_batches(&seqs);
        let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        for g in &groups {
            assert!(g.len() <= MAX_BATCH && (g.len() == 1 || g.len() * seqs[g[0]].len() <= BATCH_TOKENS));
        }
    }

    #[test]
    fn model_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Model>();
    }
}
