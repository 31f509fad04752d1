//! GGUF files (llama.cpp's format) for inference: the config from `{arch}.*`
//! metadata, the tokenizer rebuilt from `tokenizer.ggml.*` (byte-level BPE,
//! `tokenizer.ggml.model = gpt2`) and the weights dequantized to f32 into the
//! same [`crate::decoder::Decoder`] as safetensors checkpoints, so every
//! operation (batched generation, log-probs, hidden states, rewards) works
//! the same. Dequantizing trades memory (4 bytes per weight) for one code
//! path; a 135M model (SmolLM2) takes ~0.5 GB.
//!
//! llama.cpp's converter permutes the rows of `attn_q`/`attn_k` for the
//! `llama` architecture so that its interleaved RoPE matches; loading undoes
//! that permutation, so the decoder keeps transformers' rotate-half RoPE.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::config::{Family, HeadKind, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::tokenizer::{SpecialTokens, TextTokenizer};

/// Supported `general.architecture` values.
const ARCHITECTURES: [(&str, Family); 3] = [("llama", Family::Llama), ("qwen2", Family::Qwen2), ("qwen3", Family::Qwen3)];

/// Supported `tokenizer.ggml.pre` values (llama.cpp pre-tokenizer names).
const PRE_TOKENIZERS: [&str; 6] = ["default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2"];

/// GPT-2's split, as in llama.cpp's `smollm` / default byte-level BPE.
const LLAMA3_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What a GGUF file contributes to a [`crate::Model`].
pub(crate) struct GgufModel {
    pub config: ModelConfig,
    /// Dequantized tensors under Hugging Face checkpoint names.
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: TextTokenizer,
    /// End-of-sequence / end-of-turn ids.
    pub stop_ids: Vec<u32>,
}

/// Metadata access with errors naming the key.
struct Meta<'a> {
    md: &'a HashMap<String, GValue>,
    path: &'a Path,
}

impl Meta<'_> {
    fn invalid(&self, key: &str, expected: &str, got: String) -> Error {
        Error::InvalidConfig { path: self.path.to_path_buf(), field: key.into(), expected: expected.into(), got }
    }

    fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let n = match v {
            GValue::U8(x) => Some(u64::from(*x)),
            GValue::U16(x) => Some(u64::from(*x)),
            GValue::U32(x) => Some(u64::from(*x)),
            GValue::U64(x) => Some(*x),
            GValue::I8(x) => u64::try_from(*x).ok(),
            GValue::I16(x) => u64::try_from(*x).ok(),
            GValue::I32(x) => u64::try_from(*x).ok(),
            GValue::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| self.invalid(key, "a non-negative integer", format!("{v:?}")))
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.u64_opt(key)?.map(|n| n as usize).ok_or_else(|| self.invalid(key, "a non-negative integer", "nothing".into()))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GValue::F32(x)) => Ok(Some(f64::from(*x))),
            Some(GValue::F64(x)) => Ok(Some(*x)),
            Some(_) => Ok(self.u64_opt(key)?.map(|n| n as f64)),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.invalid(key, "a string", format!("{v:?}"))),
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<GValue>> {
        match self.md.get(key) {
            Some(GValue::Array(a)) => Ok(a),
            Some(v) => Err(self.invalid(key, "an array", format!("{v:?}"))),
            None => Err(self.invalid(key, "an array", "nothing".into())),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                GValue::String(s) => Ok(s.as_str()),
                other => Err(self.invalid(key, "an array of strings", format!("{other:?}"))),
            })
            .collect()
    }
}

/// Undoes llama.cpp's `permute(w, n_head)`: GGUF rows (head, i, pair) → HF rows (head, pair, i).
fn unpermute(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    t.reshape((n_head, rows / n_head / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// Maps a GGUF tensor name to the Hugging Face checkpoint name.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.into());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Reads a GGUF file: config, dequantized weights and tokenizer.
pub(crate) fn read(path: &Path, device: &Device) -> Result<GgufModel> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let weights = |source| Error::Weights { path: path.to_path_buf(), source };
    let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let content = Content::read(&mut file).map_err(weights)?;
    let meta = Meta { md: &content.metadata, path };

    let arch = meta.str_opt("general.architecture")?.unwrap_or("(none)").to_string();
    let family = ARCHITECTURES.iter().find(|(a, _)| *a == arch).map(|(_, f)| *f).ok_or_else(|| Error::Unsupported {
        path: path.to_path_buf(),
        what: "GGUF general.architecture".into(),
        got: arch.clone(),
        supported: ARCHITECTURES.map(|(a, _)| a).join(", "),
    })?;
    let key = |k: &str| format!("{arch}.{k}");

    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let hidden_size = meta.usize_req(&key("embedding_length"))?;
    let num_attention_heads = meta.usize_req(&key("attention.head_count"))?;
    let num_key_value_heads = meta.u64_opt(&key("attention.head_count_kv"))?.map_or(num_attention_heads, |n| n as usize);
    let head_dim = meta.u64_opt(&key("attention.key_length"))?.map_or(hidden_size / num_attention_heads.max(1), |n| n as usize);

    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut rope_factors = None;
    for name in names {
        let t = content.tensor(&mut file, name, device).and_then(|q| q.dequantize(device)).map_err(weights)?;
        if name == "rope_freqs.weight" {
            rope_factors = Some(t.to_vec1::<f32>().map_err(weights)?);
            continue;
        }
        let Some(hf) = hf_name(name) else {
            continue;
        };
        let t = match (family, name.rsplit('.').nth(1)) {
            (Family::Llama, Some("attn_q")) => unpermute(&t, num_attention_heads),
            (Family::Llama, Some("attn_k")) => unpermute(&t, num_key_value_heads),
            _ => Ok(t),
        }
        .map_err(weights)?;
        tensors.insert(hf, t);
    }
    let tie_word_embeddings = !tensors.contains_key("lm_head.weight");

    let bos = meta.u64_opt("tokenizer.ggml.bos_token_id")?.map(|n| n as u32);
    let eos = meta.u64_opt("tokenizer.ggml.eos_token_id")?.map(|n| n as u32);
    let eot = meta.u64_opt("tokenizer.ggml.eot_token_id")?.map(|n| n as u32);
    let pad = meta.u64_opt("tokenizer.ggml.padding_token_id")?.map(|n| n as u32);
    let rope_scaling = match (meta.str_opt(&key("rope.scaling.type"))?, rope_factors) {
        (_, Some(f)) => RopeScaling::FreqFactors(f),
        (Some("linear"), None) => RopeScaling::Linear { factor: meta.f64_opt(&key("rope.scaling.factor"))?.unwrap_or(1.0) },
        (None | Some("none"), None) => RopeScaling::None,
        (Some(other), None) => {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "GGUF rope.scaling.type".into(),
                got: other.into(),
                supported: "none, linear, rope_freqs.weight".into(),
            })
        }
    };
    let config = ModelConfig {
        family,
        head: HeadKind::CausalLm,
        architecture: format!("{}ForCausalLM (GGUF {arch})", family.class_prefix()),
        vocab_size: meta.u64_opt(&key("vocab_size"))?.map_or(tokens.len(), |n| n as usize),
        hidden_size,
        intermediate_size: meta.usize_req(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize_req(&key("block_count"))?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: meta.usize_req(&key("context_length"))?,
        rms_norm_eps: meta.f64_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
        rope_theta: meta.f64_opt(&key("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling,
        qkv_bias: tensors.contains_key("model.layers.0.self_attn.q_proj.bias"),
        o_bias: tensors.contains_key("model.layers.0.self_attn.o_proj.bias"),
        mlp_bias: tensors.contains_key("model.layers.0.mlp.gate_proj.bias"),
        qk_norm: family == Family::Qwen3,
        tie_word_embeddings,
        sliding_window: None,
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
        pad_token_id: pad,
        dtype: Some("gguf".into()),
    };
    let tokenizer = tokenizer(&meta, &tokens, bos, eos, pad)?;
    let mut stop_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
    stop_ids.sort();
    stop_ids.dedup();
    Ok(GgufModel { config, tensors, tokenizer, stop_ids })
}

/// Rebuilds a byte-level BPE tokenizer (`tokenizer.json` form) from GGUF metadata.
fn tokenizer(meta: &Meta, tokens: &[&str], bos: Option<u32>, eos: Option<u32>, pad: Option<u32>) -> Result<TextTokenizer> {
    let path = meta.path;
    let model = meta.str_opt("tokenizer.ggml.model")?.unwrap_or("(none)");
    if model != "gpt2" {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "GGUF tokenizer.ggml.model".into(),
            got: model.into(),
            supported: "gpt2 (byte-level BPE)".into(),
        });
    }
    let pre = meta.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    let byte_level =
        |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let (normalizer, pre_tokenizer) = match pre {
        "default" | "gpt2" => (Value::Null, byte_level(true)),
        // llama.cpp's smollm: digits one by one, then GPT-2's split.
        "smollm" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        "llama-bpe" | "llama3" => (Value::Null, json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]})),
        "qwen2" => (json!({"type": "NFC"}), json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]})),
        other => {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: "GGUF tokenizer.ggml.pre".into(),
                got: other.into(),
                supported: PRE_TOKENIZERS.join(", "),
            })
        }
    };
    let types: Vec<u64> = match meta.md.get("tokenizer.ggml.token_type") {
        Some(GValue::Array(a)) => a
            .iter()
            .map(|v| match v {
                GValue::I32(x) => *x as u64,
                GValue::U32(x) => u64::from(*x),
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    // llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special).
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
        .map(|(id, (tok, &ty))| {
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": ty != 3, "special": ty == 3})
        })
        .collect();
    let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), Value::from(i))).collect();
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let add_bos = matches!(meta.md.get("tokenizer.ggml.add_bos_token"), Some(GValue::Bool(true)));
    let token = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).map(|s| s.to_string());
    let post_processor = match (add_bos, token(bos)) {
        (true, Some(b)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}},
        }),
        _ => Value::Null,
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let tok = tokenizers::Tokenizer::from_bytes(doc.to_string())
        .map_err(|e| Error::Tokenizer { what: format!("{} (tokenizer rebuilt from GGUF metadata)", path.display()), msg: e.to_string() })?;
    let special = SpecialTokens {
        bos_token: token(bos),
        eos_token: token(eos),
        pad_token: token(pad),
        unk_token: token(meta.u64_opt("tokenizer.ggml.unknown_token_id")?.map(|n| n as u32)),
    };
    let template = meta.str_opt("tokenizer.chat_template")?.map(str::to_string);
    Ok(TextTokenizer::from_parts(tok, template, special, path))
}

#[cfg(test)]
pub(crate) mod tests {
    //! HF directory → GGUF (f32 tensors), the way llama.cpp's converter writes
    //! it, so the GGUF path can be checked against the safetensors path.

    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn permute(t: &Tensor, n_head: usize) -> Tensor {
        // llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`.
        let dims = t.dims().to_vec();
        let rest: usize = dims[1..].iter().product();
        t.reshape((n_head, 2, dims[0] / n_head / 2, rest)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape(dims).unwrap()
    }

    fn gguf_name(hf: &str) -> String {
        match hf {
            "model.embed_tokens.weight" => "token_embd.weight".into(),
            "model.norm.weight" => "output_norm.weight".into(),
            "lm_head.weight" => "output.weight".into(),
            _ => {
                let rest = hf.strip_prefix("model.layers.").unwrap();
                let (layer, part) = rest.split_once('.').unwrap();
                let (module, kind) = part.rsplit_once('.').unwrap();
                let g = match module {
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "self_attn.q_norm" => "attn_q_norm",
                    "self_attn.k_norm" => "attn_k_norm",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    other => panic!("{other}"),
                };
                format!("blk.{layer}.{g}.{kind}")
            }
        }
    }

    /// Writes `dir` (a tiny fixture) as a GGUF file; `quantize` stores the MLP weights as Q8_0.
    pub(crate) fn convert(dir: &Path, out: &Path, quantize: bool) {
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let (arch, pre) = match cfg.family {
            Family::Llama | Family::Mistral => ("llama", "gpt2"),
            Family::Qwen2 => ("qwen2", "qwen2"),
            Family::Qwen3 => ("qwen3", "qwen2"),
        };
        let tok_json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
        let vocab = tok_json["model"]["vocab"].as_object().unwrap();
        let mut tokens = vec![String::new(); vocab.len()];
        for (t, id) in vocab {
            tokens[id.as_u64().unwrap() as usize] = t.clone();
        }
        let mut types = vec![1i32; tokens.len()];
        for a in tok_json["added_tokens"].as_array().unwrap() {
            types[a["id"].as_u64().unwrap() as usize] = 3;
        }
        let merges: Vec<String> = tok_json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                Value::String(s) => s.clone(),
                Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
                _ => panic!(),
            })
            .collect();
        let tok_cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
        let id_of = |key: &str| tok_cfg[key].as_str().map(|t| tokens.iter().position(|x| x == t).unwrap() as u32);
        let k = |s: &str| format!("{arch}.{s}");
        let mut md: Vec<(String, GValue)> = vec![
            ("general.architecture".into(), GValue::String(arch.into())),
            (k("block_count"), GValue::U32(cfg.num_hidden_layers as u32)),
            (k("context_length"), GValue::U32(cfg.max_position_embeddings as u32)),
            (k("embedding_length"), GValue::U32(cfg.hidden_size as u32)),
            (k("feed_forward_length"), GValue::U32(cfg.intermediate_size as u32)),
            (k("attention.head_count"), GValue::U32(cfg.num_attention_heads as u32)),
            (k("attention.head_count_kv"), GValue::U32(cfg.num_key_value_heads as u32)),
            (k("attention.key_length"), GValue::U32(cfg.head_dim as u32)),
            (k("rope.freq_base"), GValue::F32(cfg.rope_theta as f32)),
            (k("attention.layer_norm_rms_epsilon"), GValue::F32(cfg.rms_norm_eps as f32)),
            (k("vocab_size"), GValue::U32(cfg.vocab_size as u32)),
            ("tokenizer.ggml.model".into(), GValue::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), GValue::String(pre.into())),
            ("tokenizer.ggml.tokens".into(), GValue::Array(tokens.iter().map(|t| GValue::String(t.clone())).collect())),
            ("tokenizer.ggml.token_type".into(), GValue::Array(types.iter().map(|&t| GValue::I32(t)).collect())),
            ("tokenizer.ggml.merges".into(), GValue::Array(merges.into_iter().map(GValue::String).collect())),
            ("tokenizer.ggml.add_bos_token".into(), GValue::Bool(id_of("bos_token").is_some())),
            ("tokenizer.chat_template".into(), GValue::String(tok_cfg["chat_template"].as_str().unwrap().into())),
        ];
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", id_of("bos_token")),
            ("tokenizer.ggml.eos_token_id", id_of("eos_token")),
            ("tokenizer.ggml.padding_token_id", id_of("pad_token")),
        ] {
            if let Some(id) = id {
                md.push((key.into(), GValue::U32(id)));
            }
        }
        let ts = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let mut qs: Vec<(String, QTensor)> = vec![];
        for (name, t) in &ts {
            let t = if arch == "llama" && name.ends_with("q_proj.weight") {
                permute(t, cfg.num_attention_heads)
            } else if arch == "llama" && name.ends_with("k_proj.weight") {
                permute(t, cfg.num_key_value_heads)
            } else {
                t.clone()
            };
            let dtype = if quantize && name.contains("mlp.") { GgmlDType::Q8_0 } else { GgmlDType::F32 };
            qs.push((gguf_name(name), QTensor::quantize(&t, dtype).unwrap()));
        }
        if let RopeScaling::Llama3 { .. } = cfg.rope_scaling {
            // llama.cpp stores llama3 scaling as divisors of the plain inverse frequencies.
            let plain = crate::decoder::Rope::new(&ModelConfig { rope_scaling: RopeScaling::None, ..cfg.clone() });
            let scaled = crate::decoder::Rope::new(&cfg);
            let f: Vec<f32> = plain.inv_freq().iter().zip(scaled.inv_freq()).map(|(a, b)| a / b).collect();
            let n = f.len();
            let t = Tensor::from_vec(f, n, &Device::Cpu).unwrap();
            qs.push(("rope_freqs.weight".into(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        }
        qs.sort_by(|a, b| a.0.cmp(&b.0));
        let md_refs: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let q_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(out).unwrap();
        candle_core::quantized::gguf_file::write(&mut f, &md_refs, &q_refs).unwrap();
    }

    #[test]
    fn permute_round_trips() {
        let t = Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap().reshape((16, 4)).unwrap();
        let back = unpermute(&permute(&t, 2), 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.k_norm.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.self_attn.q_proj.bias",
        ] {
            assert_eq!(hf_name(&gguf_name(hf)).as_deref(), Some(hf));
        }
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data-samples/models").join(name)
    }

    /// A fixture converted to GGUF (f32) computes what the safetensors original does:
    /// same token ids (tokenizer rebuilt from metadata), log-probs, greedy tokens.
    #[test]
    fn gguf_matches_the_safetensors_model() {
        let prompts = ["What is the capital of France?", "为什么天空是蓝色的？ 12345", "def f(x):\n    return x"];
        for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
            let tmp = tempfile::tempdir().unwrap();
            let file = tmp.path().join(format!("{name}.gguf"));
            convert(&fixture(name), &file, false);
            let st = crate::Model::load(&fixture(name), &Device::Cpu).unwrap();
            let gg = crate::Model::load(&file, &Device::Cpu).unwrap();
            assert_eq!(gg.digest(), crate::model_digest(&file).unwrap());
            let mut pairs = vec![];
            for p in prompts {
                for chat in [false, true] {
                    let ids = gg.encode_prompt(p, chat).unwrap();
                    assert_eq!(ids, st.encode_prompt(p, chat).unwrap(), "{name} {p:?} chat={chat}");
                    pairs.push((ids, st.encode_response("Paris, 2024.").unwrap()));
                }
            }
            assert_eq!(gg.encode_response("Paris, 2024.").unwrap(), pairs[0].1);
            let (a, b) = (gg.logprobs(&pairs).unwrap(), st.logprobs(&pairs).unwrap());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * y.abs(), "{name}: {x} vs {y}");
            }
            let prompts: Vec<Vec<u32>> = pairs.iter().map(|p| p.0.clone()).collect();
            let params = crate::SamplingParams::greedy(12);
            let seeds = vec![0; prompts.len()];
            assert_eq!(gg.generate(&prompts, &params, &seeds).unwrap(), st.generate(&prompts, &params, &seeds).unwrap());

            // Quantized (Q8_0) MLP weights are dequantized: close, not equal.
            let q = tmp.path().join("q8.gguf");
            convert(&fixture(name), &q, true);
            let qm = crate::Model::load(&q, &Device::Cpu).unwrap();
            for (x, y) in qm.logprobs(&pairs).unwrap().iter().zip(&b) {
                assert!((x - y).abs() <= 0.05 * y.abs(), "{name} q8: {x} vs {y}");
            }
        }
    }

    #[test]
    fn unsupported_gguf_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("m.gguf");
        convert(&fixture("tiny-qwen2"), &file, false);
        // Rewrite the architecture.
        let mut f = std::fs::File::open(&file).unwrap();
        let content = Content::read(&mut f).unwrap();
        let mut md: Vec<(String, GValue)> = content.metadata.clone().into_iter().collect();
        for (k, v) in md.iter_mut() {
            if k == "general.architecture" {
                *v = GValue::String("gptneox".into());
            }
        }
        let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        let qs: Vec<(String, QTensor)> = names.iter().map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap())).collect();
        let bad = tmp.path().join("bad.gguf");
        let md_refs: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let q_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut std::fs::File::create(&bad).unwrap(), &md_refs, &q_refs).unwrap();
        let err = crate::Model::load(&bad, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("gptneox") && err.contains("qwen2"), "{err}");
        let err = crate::Model::load_trainable(&file, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("GGUF"), "{err}");
        std::fs::write(&bad, b"GGUF garbage").unwrap();
        assert!(crate::Model::load(&bad, &Device::Cpu).is_err());
    }
}
