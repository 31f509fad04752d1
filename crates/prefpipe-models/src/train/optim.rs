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
//! One fused pass per tensor, written over the weight's own storage (an
//! in-place op): candle's tensor ops would allocate a fresh tensor for each of
//! the ~10 element-wise steps (DESIGN §10 measured candle's op-by-op AdamW at
//! 0.19× torch), and a new weight tensor per step would cost a copy and a
//! model-sized allocation. The pass runs over fixed-size chunks on the rayon
//! pool; each element's arithmetic is independent of the split, so the result
//! does not depend on the thread count.
//!
//! Gradients ([`Grads`]) stay the backward pass's own tensors: no host copy
//! and no zeroed accumulator for the usual one micro-batch per step, and a
//! clipping coefficient is applied inside the update (`g·c`, the f32 product
//! `clip_grad_norm_` would have written) instead of a pass that rewrites them.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::error::{invalid_input, Error, Result};

/// Elements per unit of parallel work (256 KiB of f32): large enough that the
/// pool's overhead is negligible, small enough to split the smallest matrix.
const CHUNK: usize = 1 << 16;

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

/// Σx² in f64, over fixed chunks summed in order: the same bits for any
/// number of threads.
fn sum_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>()).collect();
    parts.iter().sum()
}

/// √Σ‖gᵢ‖², accumulated in f64.
pub fn global_norm(grads: &[Vec<f32>]) -> f64 {
    grads.iter().map(|g| sum_squares(g)).sum::<f64>().sqrt()
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales the gradients by for a
/// global norm `norm`: max_norm / (norm + 1e-6), capped at 1. None when
/// nothing is scaled — the norm is within bounds, or it is not finite
/// (`f64::min` would turn a NaN coefficient into 1): the caller must refuse
/// to step on a non-finite norm, as the trainer does.
pub fn clip_coef(norm: f64, max_norm: f64) -> Option<f32> {
    let coef = max_norm / (norm + 1e-6);
    (norm.is_finite() && coef < 1.0).then_some(coef as f32)
}

/// Scales the gradients so their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does ([`clip_coef`]). Returns the norm
/// before clipping; a non-finite norm leaves the gradients as they are.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if let Some(c) = clip_coef(norm, max_norm) {
        grads.iter_mut().flat_map(|g| g.iter_mut()).for_each(|x| *x *= c);
    }
    norm
}

/// One optimizer step's gradients, in [`AdamW::params`] order: each the
/// backward pass's own tensor while one micro-batch has contributed, their
/// sum once more have; None for a parameter no loss reached (a zero gradient).
pub struct Grads(Vec<Option<Tensor>>);

impl Grads {
    /// √Σ‖gᵢ‖², accumulated in f64 (as [`global_norm`]).
    pub fn norm(&self) -> Result<f64> {
        let mut sum = 0.0;
        for g in self.0.iter().flatten() {
            sum += with_host(g, sum_squares)?;
        }
        Ok(sum.sqrt())
    }
}

/// The scalars of one update, computed as torch does (Python floats, then
/// cast to the tensor's f32), and the clipping factor of the gradients.
#[derive(Debug, Clone, Copy)]
struct Coefs {
    decay: f32,
    w1: f32,
    b2: f32,
    w2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    /// 1 when the gradients are not clipped (`x·1 = x` exactly).
    scale: f32,
}

/// The AdamW update of one tensor in place; returns the first weight that
/// came out non-finite, if any.
fn update(c: &Coefs, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) -> Option<f32> {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .map(|(((p, m), v), g)| update_chunk(c, p, m, v, g))
        .reduce(|| None, |a, b| a.or(b))
}

/// [`update`] on one chunk, serially.
fn update_chunk(c: &Coefs, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) -> Option<f32> {
    let mut finite = true;
    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let x = *p * c.decay;
        let g = g * c.scale;
        *m += c.w1 * (g - *m);
        *v = *v * c.b2 + c.w2 * g * g;
        let y = x + -c.step_size * *m / (v.sqrt() / c.bc2_sqrt + c.eps);
        finite &= y.is_finite();
        *p = y;
    }
    if finite {
        None
    } else {
        p.iter().copied().find(|x| !x.is_finite())
    }
}

/// [`update`] as an in-place candle op on a weight's storage (a contiguous
/// f32 CPU tensor); the moments and gradient come along, borrowed.
struct InPlace<'a> {
    c: Coefs,
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    g: &'a [f32],
    bad: Cell<Option<f32>>,
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("adamw: expected a contiguous f32 weight")
        };
        let bad = update(&self.c, &mut data[start..end], &mut self.m.borrow_mut(), &mut self.v.borrow_mut(), self.g);
        self.bad.set(bad);
        Ok(())
    }
}

/// Updates `p` by [`update`]: in place for a contiguous f32 CPU weight, else
/// on a host copy written back with `Var::set` (other devices and dtypes).
fn update_var(c: &Coefs, p: &Var, m: &mut [f32], v: &mut [f32], g: &[f32]) -> Result<Option<f32>> {
    if p.device().is_cpu() && p.dtype() == DType::F32 && p.layout().is_contiguous() {
        let op = InPlace { c: *c, m: RefCell::new(m), v: RefCell::new(v), g, bad: Cell::new(None) };
        p.as_tensor().inplace_op1(&op)?;
        return Ok(op.bad.get());
    }
    let mut host = p.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let bad = update(c, &mut host, m, v, g);
    p.set(&Tensor::from_vec(host, p.shape(), p.device())?.to_dtype(p.dtype())?)?;
    Ok(bad)
}

/// An f32 slice as a safetensors tensor, serialised one tensor at a time
/// (no copy of the whole state up front).
struct F32View<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        4 * self.data.len()
    }
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

    /// No gradients yet: every one zero.
    pub fn no_grads(&self) -> Grads {
        Grads(vec![None; self.params.len()])
    }

    /// Adds each parameter's gradient from a backward pass into `acc` (a
    /// parameter the loss does not reach adds nothing). The store is consumed:
    /// the first gradient of a parameter is kept as it is, later ones are
    /// added to it (f32, in micro-batch order).
    pub fn accumulate(&self, mut store: GradStore, acc: &mut Grads) -> Result<()> {
        for ((_, p), a) in self.params.iter().zip(acc.0.iter_mut()) {
            if let Some(g) = store.remove(p.as_tensor()) {
                *a = Some(match a.take() {
                    None => g,
                    Some(sum) => (sum + g)?,
                });
            }
        }
        Ok(())
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params()[i]`.
    /// A weight that would become non-finite fails the update with
    /// [`Error::NonFinite`] (its `step` is the optimizer's own count); the
    /// optimizer is then unusable (this and earlier tensors may already be updated).
    pub fn step(&mut self, grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(invalid_input("gradients", format!("{} tensors", self.params.len()), grads.len()));
        }
        let c = self.begin(lr, None);
        for (i, g) in grads.iter().enumerate() {
            self.update_one(i, &c, g)?;
        }
        Ok(())
    }

    /// [`AdamW::step`] on accumulated gradients, each multiplied by `clip`
    /// first when given (the [`clip_coef`] of their norm).
    pub fn step_grads(&mut self, grads: &Grads, clip: Option<f32>, lr: f64) -> Result<()> {
        if grads.0.len() != self.params.len() {
            return Err(invalid_input("gradients", format!("{} tensors", self.params.len()), grads.0.len()));
        }
        let c = self.begin(lr, clip);
        for (i, g) in grads.0.iter().enumerate() {
            match g {
                Some(g) => with_host(g, |g| self.update_one(i, &c, g))??,
                None => self.update_one(i, &c, &vec![0f32; self.m[i].len()])?,
            }
        }
        Ok(())
    }

    /// Counts the update and returns its scalars.
    fn begin(&mut self, lr: f64, clip: Option<f32>) -> Coefs {
        self.steps += 1;
        let t = self.steps as i32;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        Coefs {
            decay: (1.0 - lr * weight_decay) as f32,
            w1: (1.0 - beta1) as f32,
            b2: beta2 as f32,
            w2: (1.0 - beta2) as f32,
            step_size: (lr / (1.0 - beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
            eps: eps as f32,
            scale: clip.unwrap_or(1.0),
        }
    }

    /// Updates parameter `i` with gradient `g`.
    fn update_one(&mut self, i: usize, c: &Coefs, g: &[f32]) -> Result<()> {
        let (name, p) = &self.params[i];
        let (m, v) = (&mut self.m[i], &mut self.v[i]);
        if g.len() != m.len() {
            return Err(invalid_input(format!("gradient of {name}"), format!("{} values", m.len()), g.len()));
        }
        match update_var(c, p, m, v, g)? {
            None => Ok(()),
            Some(bad) => {
                Err(Error::NonFinite { step: self.steps, what: format!("weight `{name}` after the update"), value: bad.to_string() })
            }
        }
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

    /// Writes [`AdamW::state`] to a safetensors file at `path`, one tensor
    /// at a time from the moments themselves (the state is twice the
    /// trainable weights: building it as tensors first would hold a second copy).
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut views = Vec::with_capacity(2 * self.params.len());
        for (i, (name, p)) in self.params.iter().enumerate() {
            views.push((format!("exp_avg.{name}"), F32View { shape: p.dims().to_vec(), data: &self.m[i] }));
            views.push((format!("exp_avg_sq.{name}"), F32View { shape: p.dims().to_vec(), data: &self.v[i] }));
        }
        safetensors::tensor::serialize_to_file(views, None, path)
            .map_err(|e| Error::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })
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
