//! `config.json` as written by transformers 4.x (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and 5.x (`rope_parameters`, `dtype`), resolved into one
//! typed [`ModelConfig`] for the decoder families this crate runs.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The decoder families this crate implements (one decoder, small differences).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Llama 1/2/3 (incl. Llama-3 `rope_scaling`), SmolLM, TinyLlama, ...
    Llama,
    /// Mistral (Llama + optional sliding-window attention).
    Mistral,
    /// Qwen2 / Qwen2.5: bias on q/k/v projections.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k (`q_norm`, `k_norm`), explicit `head_dim`.
    Qwen3,
}

impl Family {
    /// Every family, in the order used in messages.
    pub const ALL: [Family; 4] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3];

    /// The `model_type` in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The class-name prefix in `architectures` (`LlamaForCausalLM`, ...).
    pub fn class_prefix(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Mistral => "Mistral",
            Family::Qwen2 => "Qwen2",
            Family::Qwen3 => "Qwen3",
        }
    }
}

/// Which head sits on the decoder body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// `*ForCausalLM`: `lm_head` (or the tied embedding) → next-token logits.
    CausalLm,
    /// `*ForSequenceClassification`: `score` linear head (no bias) read at the last token.
    SequenceClassification { num_labels: usize },
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: default`).
    None,
    /// `rope_type: linear`: positions divided by `factor`.
    Linear { factor: f64 },
    /// Per-frequency divisors (GGUF `rope_freqs.weight`, llama.cpp's encoding of llama3 scaling).
    FreqFactors(Vec<f32>),
    /// `rope_type: llama3` (Llama 3.1+).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// A resolved model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub head: HeadKind,
    /// The `architectures[0]` value (or the one derived from `model_type`).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on gate/up/down projections.
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm on queries and keys.
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    /// Keys further back than this many positions are not attended (Mistral).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `torch_dtype` (4.x) or `dtype` (5.x), informational: weights are computed in f32.
    pub dtype: Option<String>,
}

/// The `architectures` values this crate loads.
pub fn supported_architectures() -> Vec<String> {
    Family::ALL
        .iter()
        .flat_map(|f| [format!("{}ForCausalLM", f.class_prefix()), format!("{}ForSequenceClassification", f.class_prefix())])
        .collect()
}

impl ModelConfig {
    /// Reads and resolves `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::MissingFile { path: path.to_path_buf(), what: "config.json".into() }
            } else {
                Error::Io { path: path.to_path_buf(), source }
            }
        })?;
        Self::from_json_str(&text, path)
    }

    /// Resolves config.json text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        let raw = Raw { v: &value, path };
        if !value.is_object() {
            return Err(raw.invalid("(root)", "a JSON object", &value));
        }

        let (family, head, architecture) = raw.architecture()?;
        let hidden_size = raw.usize_req("hidden_size")?;
        let num_attention_heads = raw.usize_req("num_attention_heads")?;
        let num_key_value_heads = raw.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(raw.invalid(
                "num_key_value_heads",
                format!("a positive divisor of num_attention_heads ({num_attention_heads})"),
                &Value::from(num_key_value_heads),
            ));
        }
        let head_dim = match raw.usize_opt("head_dim")? {
            Some(d) => d,
            // Qwen3Config's default head_dim is 128, not hidden/heads.
            None if family == Family::Qwen3 => 128,
            None => hidden_size / num_attention_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(raw.invalid("head_dim", "a positive even number", &Value::from(head_dim)));
        }

        if let Some(act) = raw.get("hidden_act").or_else(|| raw.get("hidden_activation")) {
            if act.as_str() != Some("silu") {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: "hidden_act".into(),
                    got: value_text(act),
                    supported: "silu".into(),
                });
            }
        }

        let (rope_theta, rope_scaling) = raw.rope()?;

        let attention_bias = raw.bool_opt("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias, qk_norm) = match family {
            Family::Llama => (attention_bias, attention_bias, raw.bool_opt("mlp_bias")?.unwrap_or(false), false),
            Family::Mistral => (false, false, false, false),
            // Qwen2 hard-codes bias=True on q/k/v and none on o_proj.
            Family::Qwen2 => (true, false, false, false),
            Family::Qwen3 => (attention_bias, attention_bias, false, true),
        };

        let sliding_window = match family {
            Family::Mistral => raw.usize_opt("sliding_window")?,
            Family::Qwen2 | Family::Qwen3 => {
                if raw.bool_opt("use_sliding_window")?.unwrap_or(false) {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        what: "use_sliding_window".into(),
                        got: "true".into(),
                        supported: format!("false for {}", family.model_type()),
                    });
                }
                None
            }
            Family::Llama => None,
        };

        let eos_token_ids = raw.ids_opt("eos_token_id")?;
        let bos_token_id = raw.ids_opt("bos_token_id")?.first().copied();
        let pad_token_id = raw.ids_opt("pad_token_id")?.first().copied();

        let cfg = ModelConfig {
            family,
            head,
            architecture,
            vocab_size: raw.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: raw.usize_req("intermediate_size")?,
            num_hidden_layers: raw.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: raw.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            tie_word_embeddings: raw.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            sliding_window,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            dtype: raw.get("dtype").or_else(|| raw.get("torch_dtype")).and_then(|v| v.as_str()).map(str::to_string),
        };
        for (field, v) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_hidden_layers", cfg.num_hidden_layers),
            ("max_position_embeddings", cfg.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(raw.invalid(field, "a positive integer", &Value::from(0)));
            }
        }
        Ok(cfg)
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Typed access to the raw JSON with errors that name the field.
struct Raw<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Raw<'_> {
    /// A present, non-null value.
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    fn invalid(&self, field: &str, expected: impl Into<String>, got: &Value) -> Error {
        Error::InvalidConfig { path: self.path.to_path_buf(), field: field.into(), expected: expected.into(), got: got.to_string() }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| self.invalid(key, "a non-negative integer", v)))
            .transpose()
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.invalid(key, "a non-negative integer", &Value::Null))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.invalid(key, "a number", v))).transpose()
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.invalid(key, "true or false", v))).transpose()
    }

    /// A token id that may be written as an int or a list of ints.
    fn ids_opt(&self, key: &str) -> Result<Vec<u32>> {
        token_ids(self.get(key), key, self.path)
    }

    fn architecture(&self) -> Result<(Family, HeadKind, String)> {
        let unsupported = |what: &str, got: String| Error::Unsupported {
            path: self.path.to_path_buf(),
            what: what.into(),
            got,
            supported: supported_architectures().join(", "),
        };
        let arch = match self.get("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => match a[0].as_str() {
                Some(s) => Some(s.to_string()),
                None => return Err(self.invalid("architectures", "a list of class names", &a[0])),
            },
            Some(Value::Array(_)) | None => None,
            Some(other) => return Err(self.invalid("architectures", "a list of class names", other)),
        };
        let (family, head, architecture) = match arch {
            Some(arch) => {
                let family = Family::ALL
                    .into_iter()
                    .find(|f| arch.strip_prefix(f.class_prefix()).is_some_and(|rest| rest.starts_with("For")))
                    .ok_or_else(|| unsupported("architecture", arch.clone()))?;
                let head = match &arch[family.class_prefix().len()..] {
                    "ForCausalLM" => HeadKind::CausalLm,
                    "ForSequenceClassification" => HeadKind::SequenceClassification { num_labels: self.num_labels()? },
                    _ => return Err(unsupported("architecture", arch.clone())),
                };
                (family, head, arch)
            }
            None => {
                let mt = self
                    .get("model_type")
                    .ok_or_else(|| self.invalid("architectures", "a list of class names (or a model_type)", &Value::Null))?;
                let mt = mt.as_str().map(str::to_string).unwrap_or_else(|| mt.to_string());
                let family = Family::ALL.into_iter().find(|f| f.model_type() == mt).ok_or_else(|| unsupported("model_type", mt.clone()))?;
                (family, HeadKind::CausalLm, format!("{}ForCausalLM", family.class_prefix()))
            }
        };
        // A model_type that contradicts the architecture means a hand-edited or foreign config.
        if let Some(mt) = self.get("model_type").and_then(|v| v.as_str()) {
            if mt != family.model_type() {
                return Err(self.invalid(
                    "model_type",
                    format!("`{}` (from architectures `{architecture}`)", family.model_type()),
                    &Value::from(mt),
                ));
            }
        }
        Ok((family, head, architecture))
    }

    fn num_labels(&self) -> Result<usize> {
        if let Some(n) = self.usize_opt("num_labels")? {
            return Ok(n);
        }
        match self.get("id2label") {
            Some(Value::Object(m)) if !m.is_empty() => Ok(m.len()),
            Some(other) if !other.is_object() => Err(self.invalid("id2label", "an object", other)),
            // PretrainedConfig's default.
            _ => Ok(2),
        }
    }

    /// (rope_theta, scaling) from 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`.
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let (params, params_key) = match self.get("rope_parameters") {
            Some(p) => (Some(p), "rope_parameters"),
            None => (self.get("rope_scaling"), "rope_scaling"),
        };
        if let Some(p) = params {
            if !p.is_object() {
                return Err(self.invalid(params_key, "an object", p));
            }
        }
        let theta = match params.and_then(|p| p.get("rope_theta")).filter(|v| !v.is_null()) {
            Some(v) => v.as_f64().ok_or_else(|| self.invalid("rope_parameters.rope_theta", "a number", v))?,
            None => self.f64_opt("rope_theta")?.unwrap_or(10000.0),
        };
        let Some(p) = params else {
            return Ok((theta, RopeScaling::None));
        };
        let field = |k: &str| -> Result<f64> {
            let v = p.get(k).filter(|v| !v.is_null());
            v.and_then(|v| v.as_f64()).ok_or_else(|| self.invalid(&format!("{params_key}.{k}"), "a number", v.unwrap_or(&Value::Null)))
        };
        let rope_type = p.get("rope_type").or_else(|| p.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: field("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: match p.get("original_max_position_embeddings").and_then(|v| v.as_u64()) {
                    Some(n) => n as usize,
                    None => self.usize_req("max_position_embeddings")?,
                },
            },
            other => {
                return Err(Error::Unsupported {
                    path: self.path.to_path_buf(),
                    what: format!("{params_key}.rope_type"),
                    got: other.into(),
                    supported: "default, linear, llama3".into(),
                })
            }
        };
        Ok((theta, scaling))
    }
}

/// Token ids written as an int, a list of ints, or null.
pub(crate) fn token_ids(v: Option<&Value>, key: &str, path: &Path) -> Result<Vec<u32>> {
    let bad = |v: &Value| Error::InvalidConfig {
        path: path.to_path_buf(),
        field: key.into(),
        expected: "a token id or a list of token ids".into(),
        got: v.to_string(),
    };
    let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(v));
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    const LLAMA_4X: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "float32",
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": [2, 3], "hidden_act": "silu"
    }"#;

    // The same model as transformers 5.x writes it: rope_parameters carries the theta.
    const LLAMA_5X: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "dtype": "float32", "head_dim": 16,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": [2, 3], "hidden_act": "silu"
    }"#;

    #[test]
    fn transformers_4x_and_5x_configs_resolve_the_same() {
        let a = parse(LLAMA_4X).unwrap();
        let mut b = parse(LLAMA_5X).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.head_dim, 16);
        assert_eq!(a.eos_token_ids, vec![2, 3]);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { original_max_position_embeddings: 64, .. }));
        assert_eq!(b.dtype.as_deref(), Some("float32"));
        b.dtype = a.dtype.clone();
        assert_eq!(a, b);
    }

    #[test]
    fn unsupported_architecture_names_value_and_list() {
        let text = LLAMA_4X.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
        assert!(err.contains("Qwen2ForCausalLM"), "{err}");
        let err = parse(r#"{"model_type": "gpt2", "hidden_size": 8}"#).unwrap_err().to_string();
        assert!(err.contains("model_type `gpt2`"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let text = LLAMA_4X.replace(r#""num_key_value_heads": 2"#, r#""num_key_value_heads": 3"#);
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let text = LLAMA_4X.replace(r#""vocab_size": 100,"#, "");
        assert!(parse(&text).unwrap_err().to_string().contains("vocab_size"));
        let text = LLAMA_4X.replace(r#""llama3""#, r#""yarn""#);
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("yarn") && err.contains("llama3"), "{err}");
        assert!(parse("[1]").is_err());
        assert!(parse("{").is_err());
    }

    #[test]
    fn family_specific_defaults() {
        let qwen2 = LLAMA_4X.replace("LlamaForCausalLM", "Qwen2ForSequenceClassification").replace(r#""llama""#, r#""qwen2""#);
        let c = parse(&qwen2).unwrap();
        assert_eq!(c.family, Family::Qwen2);
        assert!(c.qkv_bias && !c.o_bias);
        // No id2label: PretrainedConfig's default of 2 labels.
        assert_eq!(c.head, HeadKind::SequenceClassification { num_labels: 2 });
        let qwen3 = LLAMA_4X.replace("LlamaForCausalLM", "Qwen3ForCausalLM").replace(r#""llama""#, r#""qwen3""#);
        let c = parse(&qwen3).unwrap();
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.head_dim, 128);
        let mismatch = LLAMA_4X.replace(r#""llama""#, r#""qwen2""#);
        assert!(parse(&mismatch).unwrap_err().to_string().contains("model_type"));
    }
}
