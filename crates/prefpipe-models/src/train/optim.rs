//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay
//! Regularization") with bias correction, global-norm gradient clipping and
//! gradient accumulation, over candle `Var`s.
//!
//! The update is torch's `torch.optim.AdamW` (single-tensor path, the CPU
//! default), operation for operation in f32:
//!
//! ```text
//! p ← p·(1 − lr·wd)
//! m ← m + (1 − β₁)·(g − m)
//! v ← v·β₂ + (1 − β₂)·g·g
//! p ← p − (lr / (1 − β₁ᵗ))·m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! One fused pass over host slices per tensor: candle's tensor ops would
//! allocate a fresh tensor for each of the ~10 element-wise steps (DESIGN §10
//! measured candle's op-by-op AdamW at 0.19× torch).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{invalid_input, Error, Result};

/// AdamW hyper-parameters (the learning rate comes with each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' `TrainingArguments` defaults (no weight decay).
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Runs `f` on the f32 values of `t` (row-major), without a copy for
/// contiguous CPU tensors.
pub fn with_host<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end)), DType::F32) = (&*storage, layout.contiguous_offsets(), t.dtype()) {
            return Ok(f(&cpu.as_slice::<f32>()?[start..end]));
        }
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(f(&v))
}

/// √Σ‖gᵢ‖², accumulated in f64.
pub fn global_norm(grads: &[Vec<f32>]) -> f64 {
    grads.iter().flat_map(|g| g.iter()).map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
}

/// Scales the gradients so their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (coefficient max_norm / (norm + 1e-6),
/// capped at 1). Returns the norm before clipping. A non-finite norm leaves
/// the gradients as they are (`f64::min` would turn a NaN coefficient into 1):
/// the caller must refuse to step on it, as the trainer does.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if !norm.is_finite() {
        return norm;
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        let c = coef as f32;
        grads.iter_mut().flat_map(|g| g.iter_mut()).for_each(|x| *x *= c);
    }
    norm
}

/// AdamW over named `Var`s, with its first and second moments on the host.
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Updates taken so far (t in the bias corrections).
    steps: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Self {
        let m: Vec<Vec<f32>> = params.iter().map(|(_, p)| vec![0f32; p.elem_count()]).collect();
        AdamW { v: m.clone(), m, params, steps: 0, cfg }
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Zeroed gradient buffers, one per parameter.
    pub fn zero_grads(&self) -> Vec<Vec<f32>> {
        self.m.iter().map(|m| vec![0f32; m.len()]).collect()
    }

    /// Adds each parameter's gradient from a backward pass into `acc`
    /// (a parameter the loss does not reach adds nothing).
    pub fn accumulate(&self, grads: &candle_core::backprop::GradStore, acc: &mut [Vec<f32>]) -> Result<()> {
        for ((_, p), a) in self.params.iter().zip(acc.iter_mut()) {
            if let Some(g) = grads.get(p.as_tensor()) {
                with_host(g, |g| a.iter_mut().zip(g).for_each(|(a, g)| *a += g))?;
            }
        }
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params()[i]`.
    /// A weight that would become non-finite fails the update with
    /// [`Error::NonFinite`] (its `step` is the optimizer's own count); the
    /// optimizer is then unusable (earlier tensors may already be updated).
    pub fn step(&mut self, grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(invalid_input("gradients", format!("{} tensors", self.params.len()), grads.len()));
        }
        self.steps += 1;
        let t = self.steps as i32;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        // The scalars torch computes in Python floats, then casts to the tensor's f32.
        let decay = (1.0 - lr * weight_decay) as f32;
        let w1 = (1.0 - beta1) as f32;
        let (b2, w2) = (beta2 as f32, (1.0 - beta2) as f32);
        let step_size = (lr / (1.0 - beta1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt() as f32;
        let eps = eps as f32;
        for (i, (name, p)) in self.params.iter().enumerate() {
            let g = &grads[i];
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            if g.len() != m.len() {
                return Err(invalid_input(format!("gradient of {name}"), format!("{} values", m.len()), g.len()));
            }
            let (new, finite) = with_host(p.as_tensor(), |p| {
                let mut out = Vec::with_capacity(p.len());
                let mut finite = true;
                for k in 0..p.len() {
                    let x = p[k] * decay;
                    let mk = m[k] + w1 * (g[k] - m[k]);
                    let vk = v[k] * b2 + w2 * g[k] * g[k];
                    m[k] = mk;
                    v[k] = vk;
                    let y = x + -step_size * mk / (vk.sqrt() / bc2_sqrt + eps);
                    finite &= y.is_finite();
                    out.push(y);
                }
                (out, finite)
            })?;
            if !finite {
                let bad = new.iter().find(|x| !x.is_finite()).copied().unwrap_or(f32::NAN);
                return Err(Error::NonFinite {
                    step: self.steps,
                    what: format!("weight `{name}` after the update"),
                    value: bad.to_string(),
                });
            }
            p.set(&Tensor::from_vec(new, p.shape(), p.device())?)?;
        }
        Ok(())
    }

    /// The moments as tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`, torch's names), for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, p)) in self.params.iter().enumerate() {
            out.insert(format!("exp_avg.{name}"), Tensor::from_slice(&self.m[i], p.shape(), &Device::Cpu)?);
            out.insert(format!("exp_avg_sq.{name}"), Tensor::from_slice(&self.v[i], p.shape(), &Device::Cpu)?);
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state`] after `steps` updates.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for (i, (name, _)) in self.params.iter().enumerate() {
            for (prefix, buf) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = state.get(&key).ok_or_else(|| invalid_input("optimizer state", format!("a tensor `{key}`"), "none"))?;
                let vals = t.flatten_all()?.to_vec1::<f32>()?;
                if vals.len() != buf.len() {
                    return Err(invalid_input(format!("optimizer state `{key}`"), format!("{} values", buf.len()), vals.len()));
                }
                *buf = vals;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_caps_the_global_norm() {
        let mut g = vec![vec![3.0f32, 0.0], vec![4.0]];
        let norm = clip_grad_norm(&mut g, 1.0);
        assert!((norm - 5.0).abs() < 1e-12);
        assert!((global_norm(&g) - 1.0).abs() < 1e-6);
        let mut small = vec![vec![0.3f32, 0.4]];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![vec![0.3f32, 0.4]]);
    }

    /// A NaN or infinite norm is not clipped into a "coefficient 1" step, and
    /// a weight the update would make non-finite fails the step.
    #[test]
    fn non_finite_gradients_are_not_clipped_or_applied() {
        let mut g = vec![vec![f32::NAN, 1.0], vec![4.0]];
        assert!(clip_grad_norm(&mut g, 1.0).is_nan());
        let mut g = vec![vec![f32::INFINITY, 1.0]];
        assert_eq!(clip_grad_norm(&mut g, 1.0), f64::INFINITY);
        assert_eq!(g, vec![vec![f32::INFINITY, 1.0]], "not scaled by 0 (inf·0 = NaN)");
        let p = Var::from_slice(&[1.0f32, 2.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], AdamWConfig::default());
        let e = opt.step(&[vec![f32::NAN, 0.5]], 0.01).unwrap_err();
        assert!(matches!(&e, Error::NonFinite { what, .. } if what.contains("`w`")), "{e}");
    }

    /// One step by hand: with m₀ = v₀ = 0 the bias-corrected first step is
    /// lr·g/(|g| + ε') = lr·sign(g) (up to ε), after the decay p·(1 − lr·wd).
    #[test]
    fn first_step_moves_by_lr() {
        let p = Var::from_slice(&[1.0f32, -2.0, 0.5], 3, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], AdamWConfig { weight_decay: 0.1, ..Default::default() });
        opt.step(&[vec![0.5, -3.0, 0.0]], 0.01).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
