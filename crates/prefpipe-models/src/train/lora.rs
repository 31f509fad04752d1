//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
//! Models"): each targeted linear weight W `[out, in]` becomes
//! W + (alpha/r)·B·A with A `[r, in]`, B `[out, r]`; only A and B train.
//!
//! Initialisation follows PEFT: B = 0 (so training starts from the base
//! model exactly) and A ~ U(−1/√in, 1/√in) (`kaiming_uniform_(a=√5)`), drawn
//! from ChaCha8 seeded by (seed, tensor name) because candle's generator
//! cannot be seeded (DESIGN §10).
//!
//! The decoder is built with the adapted weights already merged
//! (W + s·B·A as a differentiable expression of A and B, the base detached),
//! so no change to the model code is needed, the gradient reaches only A and
//! B, and the saved checkpoint is the same merged sum.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ModelConfig;
use crate::decoder::Decoder;
use crate::error::{invalid_input, Result};

/// The linear layers LoRA may target (the checkpoint's module names).
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Rank, scaling and target modules.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank r of B·A.
    pub r: usize,
    /// The update is scaled by alpha / r.
    pub alpha: f64,
    /// Module names from [`LORA_TARGETS`] (e.g. `q_proj`, `v_proj`).
    pub targets: Vec<String>,
}

/// Adapters for every targeted weight of one model.
#[derive(Debug)]
pub struct Lora {
    cfg: LoraConfig,
    /// Weight name (`model.layers.0.self_attn.q_proj.weight`) → (A, B).
    adapters: BTreeMap<String, (Var, Var)>,
}

impl Lora {
    /// Adapters for the base weights named `*.<target>.weight` (`shapes`: name → `[out, in]`).
    pub fn new(shapes: &BTreeMap<String, Vec<usize>>, cfg: &LoraConfig, seed: u64, device: &Device) -> Result<Self> {
        if cfg.r == 0 {
            return Err(invalid_input("LoRA rank r", "at least 1", 0));
        }
        if let Some(bad) = cfg.targets.iter().find(|t| !LORA_TARGETS.contains(&t.as_str())) {
            return Err(invalid_input("LoRA target", format!("one of {}", LORA_TARGETS.join(", ")), bad));
        }
        let mut adapters = BTreeMap::new();
        for (name, shape) in shapes {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            if !cfg.targets.iter().any(|t| module.ends_with(&format!(".{t}"))) {
                continue;
            }
            let [out, inp] = shape[..] else {
                return Err(invalid_input(format!("shape of {name}"), "[out, in]", format!("{shape:?}")));
            };
            let mut h = blake3::Hasher::new();
            h.update(&seed.to_le_bytes());
            h.update(b"lora_A\0");
            h.update(name.as_bytes());
            let mut rng = ChaCha8Rng::from_seed(*h.finalize().as_bytes());
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..cfg.r * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
            let a = Var::from_vec(a, (cfg.r, inp), device)?;
            let b = Var::zeros((out, cfg.r), DType::F32, device)?;
            adapters.insert(name.clone(), (a, b));
        }
        if adapters.is_empty() {
            return Err(invalid_input("LoRA targets", "modules present in the model", cfg.targets.join(", ")));
        }
        Ok(Lora { cfg: cfg.clone(), adapters })
    }

    pub fn scale(&self) -> f64 {
        self.cfg.alpha / self.cfg.r as f64
    }

    /// The trainable tensors, named `<module>.lora_A.weight` / `<module>.lora_B.weight` (PEFT's names).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (name, (a, b)) in &self.adapters {
            let module = name.strip_suffix(".weight").unwrap_or(name);
            out.push((format!("{module}.lora_A.weight"), a.clone()));
            out.push((format!("{module}.lora_B.weight"), b.clone()));
        }
        out
    }

    /// Weight names that carry an adapter.
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    /// W + (alpha/r)·B·A for an adapted weight (differentiable in A and B), else W.
    pub fn merged(&self, name: &str, w: &Tensor) -> Result<Tensor> {
        Ok(match self.adapters.get(name) {
            Some((a, b)) => (w + (b.as_tensor().matmul(a.as_tensor())? * self.scale())?)?,
            None => w.clone(),
        })
    }

    /// A decoder over the frozen `base` weights with the adapters merged in.
    pub fn decoder(&self, cfg: &ModelConfig, base: &HashMap<String, Tensor>, device: &Device) -> Result<Decoder> {
        let backend = Merged { base, lora: self };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        Ok(Decoder::new(cfg, vb)?)
    }
}

/// A `VarBuilder` backend that serves base weights with adapters merged in.
struct Merged<'a> {
    base: &'a HashMap<String, Tensor>,
    lora: &'a Lora,
}

impl SimpleBackend for Merged<'_> {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            Err(candle_core::Error::UnexpectedShape { msg: format!("shape mismatch for {name}"), expected: s, got: t.shape().clone() }.bt())?
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        let w = self.base.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())?;
        self.lora.merged(name, w).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> BTreeMap<String, Vec<usize>> {
        [
            ("model.layers.0.self_attn.q_proj.weight", vec![8, 4]),
            ("model.layers.0.self_attn.k_proj.weight", vec![4, 4]),
            ("model.layers.0.mlp.up_proj.weight", vec![6, 4]),
            ("model.norm.weight", vec![4]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn adapters_start_at_zero_and_are_seeded() {
        let cfg = LoraConfig { r: 2, alpha: 4.0, targets: vec!["q_proj".into(), "up_proj".into()] };
        let a = Lora::new(&shapes(), &cfg, 7, &Device::Cpu).unwrap();
        let b = Lora::new(&shapes(), &cfg, 7, &Device::Cpu).unwrap();
        let names: Vec<&str> = a.targets().collect();
        assert_eq!(names, ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]);
        assert_eq!(a.scale(), 2.0);
        for ((n, x), (_, y)) in a.vars().iter().zip(b.vars()) {
            let (x, y) = (x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert_eq!(x, y, "{n}: same seed, same init");
            if n.contains("lora_B") {
                assert!(x.iter().all(|&v| v == 0.0), "{n}: B starts at 0");
            } else {
                assert!(x.iter().all(|&v| v.abs() <= 0.5) && x.iter().any(|&v| v != 0.0), "{n}: U(−1/√4, 1/√4)");
            }
        }
        // B = 0: the merged weight is the base weight.
        let w = Tensor::ones((8, 4), DType::F32, &Device::Cpu).unwrap();
        let m = a.merged("model.layers.0.self_attn.q_proj.weight", &w).unwrap();
        assert_eq!(m.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn bad_targets_are_refused() {
        let cfg = LoraConfig { r: 2, alpha: 4.0, targets: vec!["qproj".into()] };
        assert!(Lora::new(&shapes(), &cfg, 0, &Device::Cpu).unwrap_err().to_string().contains("one of q_proj"));
    }
}
