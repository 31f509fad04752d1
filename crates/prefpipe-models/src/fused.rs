//! Fused CPU kernels for the forward pass, f32.
//!
//! Why: candle runs every element-wise op single-threaded as its own pass over
//! memory, so a teacher-forced forward spent more time in RoPE, the
//! scale/mask/softmax chain, SwiGLU and layout copies than transformers does
//! (DESIGN §10). Each kernel here is one parallel pass that does exactly the
//! arithmetic of the differentiable ops it replaces, in the same order
//! (`x·cos + rot(x)·sin`, `max`/`exp`/`sum`/`div`, `g/(1+e^−g)·u`,
//! `x·(1/√(mean x² + ε))·w`), so results differ from the training path only
//! by summation order. [`applies`] says when an inference forward may use
//! them (nothing records a gradient, CPU); a training forward ([`trains`])
//! uses [`RmsNormOp`] and [`SiluMul`] with their backward, and the training
//! ops of [`grad`] for RoPE, softmax and log-softmax.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, InplaceOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

mod grad;
pub use grad::{trains, LogSoftmaxOp, MaskedSoftmaxOp, RopeHeadsOp};

type CResult<T> = candle_core::Result<T>;

/// True when a layer with these `weights` may run these kernels on `x`: f32
/// on the CPU, and no gradient recorded through `x` or any weight.
pub fn applies(x: &Tensor, weights: &[&Tensor]) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && !x.track_op() && !weights.iter().any(|w| w.track_op())
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else { bail!("{what}: expected f32 storage") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// RMSNorm's parameters for a kernel that norms as it goes ([`HeadsRope`]'s
/// Qwen3 q/k norm): `x · (1/√(mean(x²) + ε)) · w` (HF `LlamaRMSNorm`, f32).
pub struct RmsNorm<'a> {
    pub weight: &'a [f32],
    pub eps: f32,
}

/// Σ xs in the order candle's CPU reduction adds (`sum_keepdim` over a
/// contiguous last dim, `candle_core::cpu::vec_sum` in 0.11): with AVX2, four
/// 8-lane accumulators over blocks of 32, folded (0+1, 2+3, then those two;
/// high half onto low; two horizontal adds), then the tail left to right;
/// without AVX2, left to right. So a fused kernel rounds exactly as the ops
/// it replaces and no golden moves (safe code: the workspace forbids `unsafe`).
fn candle_sum(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    if !avx2 {
        return xs.iter().fold(0f32, |a, &x| a + x);
    }
    let np = xs.len() & !31;
    let mut acc = [[0f32; 8]; 4];
    for block in xs[..np].chunks_exact(32) {
        for (j, reg) in acc.iter_mut().enumerate() {
            for (l, a) in reg.iter_mut().enumerate() {
                *a += block[j * 8 + l];
            }
        }
    }
    let lanes = |a: [f32; 8], b: [f32; 8]| std::array::from_fn::<f32, 8, _>(|l| a[l] + b[l]);
    let x = lanes(lanes(acc[0], acc[1]), lanes(acc[2], acc[3]));
    let t0: [f32; 4] = std::array::from_fn(|l| x[l] + x[l + 4]);
    let mut sum = (t0[0] + t0[1]) + (t0[2] + t0[3]);
    for &v in &xs[np..] {
        sum += v;
    }
    sum
}

/// `dst = x · (1/√(mean(x²) + ε)) · w`, with `mean` as candle's `mean_keepdim`
/// computes it (the sum times `1/n` as an affine op, not a division).
fn rms_row(src: &[f32], weight: &[f32], eps: f32, dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = x * x;
    }
    let mean = candle_sum(&dst[..src.len()]) * ((1f64 / src.len() as f64) as f32) + 0.0;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((d, &x), &w) in dst.iter_mut().zip(src).zip(weight) {
        *d = (x * inv) * w;
    }
}

/// RMSNorm `x · (1/√(mean(x²) + ε)) · w` over the last dim, args `(x, w)`:
/// the inference forward (`apply_op2_no_bwd`, which reads `w` in place) and
/// the training one (`apply_op2`, with the backward below).
pub struct RmsNormOp {
    pub eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "prefpipe-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (src, weight) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, "weight")?);
        let n = weight.len();
        if l1.dims().last() != Some(&n) {
            bail!("{}: last dim {:?} vs weight {n}", self.name(), l1.dims());
        }
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(|(d, s)| rms_row(s, weight, self.eps, d));
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    /// With `r = 1/√(mean(x²) + ε)` per row and `gw = g ⊙ w`:
    /// `∂x = r·gw − x·r³·(gw·x)/n` and `∂w = Σ_rows g ⊙ x·r`.
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (x, g) = (x.contiguous()?, g.contiguous()?);
        let n = w.dim(0)?;
        let rows = x.elem_count() / n;
        let flat = x.apply_op3_no_bwd(w, &g, &grad::RmsNormBwd { eps: self.eps })?;
        let dx = flat.narrow(0, 0, rows * n)?.reshape(x.shape())?;
        let dw = flat.narrow(0, rows * n, rows.div_ceil(grad::ROW_BLOCK) * n)?.reshape(((), n))?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// From a fused projection output `[b, t, width]` (heads of `head_dim` side by
/// side), heads `first_head..first_head + n_heads` as `[b, n_heads, t, head_dim]`,
/// optionally RMS-normed per head (Qwen3's q_norm/k_norm) and rotated
/// (rotate-half RoPE with per-token tables `cos`, `sin` `[b, 1, t, head_dim]`).
/// One pass replaces narrow + reshape + transpose + norm + RoPE + contiguous.
pub struct HeadsRope<'a> {
    pub first_head: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub rotate: bool,
    pub norm: Option<RmsNorm<'a>>,
}

impl CustomOp3 for HeadsRope<'_> {
    fn name(&self) -> &'static str {
        "prefpipe-heads-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (src, cos, sin) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, "cos")?, f32_slice(s3, l3, "sin")?);
        let &[b, t, width] = l1.dims() else { bail!("{}: expected [b, t, width], got {:?}", self.name(), l1.dims()) };
        let hd = self.head_dim;
        if (self.first_head + self.n_heads) * hd > width || (self.rotate && (cos.len() != b * t * hd || sin.len() != b * t * hd)) {
            bail!("{}: heads {}+{} of {hd} in width {width}, tables {} for {b}x{t}", self.name(), self.first_head, self.n_heads, cos.len());
        }
        let half = hd / 2;
        let mut dst = vec![0f32; b * self.n_heads * t * hd];
        dst.par_chunks_mut(t * hd).enumerate().for_each(|(bh, out)| {
            let (bi, h) = (bh / self.n_heads, bh % self.n_heads);
            let mut normed = vec![0f32; hd];
            for ti in 0..t {
                let row = bi * t + ti;
                let at = row * width + (self.first_head + h) * hd;
                let mut x = &src[at..at + hd];
                if let Some(n) = &self.norm {
                    rms_row(x, n.weight, n.eps, &mut normed);
                    x = &normed;
                }
                let o = &mut out[ti * hd..(ti + 1) * hd];
                if !self.rotate {
                    o.copy_from_slice(x);
                    continue;
                }
                let (c, s) = (&cos[row * hd..(row + 1) * hd], &sin[row * hd..(row + 1) * hd]);
                for i in 0..hd {
                    // rotate_half(x) = cat(−x[half..], x[..half])
                    let rot = if i < half { -x[i + half] } else { x[i - half] };
                    o[i] = x[i] * c[i] + rot * s[i];
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from((b, self.n_heads, t, hd))))
    }
}

/// In place on attention scores `[b, groups, t, t_keys]` (any head grouping
/// that keeps each batch row's query rows `t` apart): `softmax(s · scale + mask)`
/// over the keys, with the additive mask `[b, 1, 1, t, t_keys]` of
/// [`crate::decoder`]. One pass instead of scale, add, max, sub, exp, sum, div.
pub struct MaskedSoftmax {
    pub scale: f32,
}

impl InplaceOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "prefpipe-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<()> {
        let mask = f32_slice(s2, l2, "mask")?;
        let md = l2.dims();
        let (b, t, tk) = (md[0], md[md.len() - 2], md[md.len() - 1]);
        let CpuStorage::F32(v) = s1 else { bail!("{}: expected f32 scores", self.name()) };
        let Some((start, end)) = l1.contiguous_offsets() else { bail!("{}: scores must be contiguous", self.name()) };
        let scores = &mut v[start..end];
        if l1.dims().last() != Some(&tk) || scores.len() % (b * t * tk) != 0 || mask.len() != b * t * tk {
            bail!("{}: scores {:?} vs mask {md:?}", self.name(), l1.dims());
        }
        masked_softmax(scores, mask, b, t, tk, self.scale);
        Ok(())
    }
}

/// `softmax(s · scale + mask)` over each `tk`-long row of `scores`, in place:
/// the arithmetic of [`crate::decoder::softmax_last_dim`] on the scaled,
/// masked scores, in candle's order. `mask` is `[b, t, tk]`; `scores` holds
/// `b` batch rows of any number of heads × `t` query rows each.
fn masked_softmax(scores: &mut [f32], mask: &[f32], b: usize, t: usize, tk: usize, scale: f32) {
    let per_batch = scores.len() / b / tk; // query rows of one batch row, over all heads
    scores.par_chunks_mut(tk).enumerate().for_each(|(r, row)| {
        let (bi, qi) = (r / per_batch, r % t);
        let m = &mask[(bi * t + qi) * tk..(bi * t + qi + 1) * tk];
        let mut max = f32::NEG_INFINITY;
        for (x, &m) in row.iter_mut().zip(m) {
            *x = (*x * scale + 0.0) + m;
            max = max.max(*x);
        }
        for x in row.iter_mut() {
            // exp underflows to exactly 0 below −103.97 (f32's least subnormal):
            // skipping it there gives the same bits and keeps masked keys
            // (≈ f32::MIN) off libm's slow underflow path.
            let d = *x - max;
            *x = if d < -105.0 { 0.0 } else { d.exp() };
        }
        let sum = candle_sum(row);
        for x in row.iter_mut() {
            *x /= sum;
        }
    });
}

/// SwiGLU's product `silu(gate) · up` of two same-shaped projections, for
/// inference (`apply_op2_no_bwd`) and training (`apply_op2`).
pub struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "prefpipe-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (gate, up) = (f32_slice(s1, l1, "gate")?, f32_slice(s2, l2, "up")?);
        if l1.dims() != l2.dims() {
            bail!("{}: gate {:?} vs up {:?}", self.name(), l1.dims(), l2.dims());
        }
        let mut dst = vec![0f32; gate.len()];
        const CHUNK: usize = 4096;
        dst.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(|((d, g), u)| {
            for ((d, &g), &u) in d.iter_mut().zip(g).zip(u) {
                *d = (g / (1.0 + (-g).exp())) * u;
            }
        });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    /// With `σ = 1/(1+e^−g)`: `∂gate = grad·u·σ·(1 + g·(1−σ))`, `∂up = grad·g·σ`.
    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let flat = gate.contiguous()?.apply_op3_no_bwd(&up.contiguous()?, &g.contiguous()?, &grad::SiluMulBwd)?;
        let n = gate.elem_count();
        Ok((Some(flat.narrow(0, 0, n)?.reshape(gate.shape())?), Some(flat.narrow(0, n, n)?.reshape(gate.shape())?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Uniform values in [−2, 2) from a seeded stream (the kernels' test inputs).
    pub(super) fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// [`candle_sum`] is candle's own reduction, bit for bit, for lengths
    /// around its 32-float blocks (a head dim, a hidden size, a key count).
    #[test]
    fn candle_sum_is_candles_reduction() {
        for (n, seed) in [1usize, 7, 31, 32, 33, 64, 95, 100, 576, 1000].into_iter().zip(10u64..) {
            let x = rand(&[3, n], seed);
            let want = x.sum_keepdim(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got: Vec<f32> = x.to_vec2::<f32>().unwrap().iter().map(|r| candle_sum(r)).collect();
            assert_eq!(got, want, "n = {n}");
        }
        // A hidden size past one block through the whole RMSNorm kernel.
        let x = rand(&[4, 96], 30);
        let w = rand(&[96], 31);
        let inv = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
        let want = x.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap();
        let got = x.apply_op2_no_bwd(&w, &RmsNormOp { eps: 1e-5 }).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
    }

    /// Each kernel against the differentiable candle ops it replaces
    /// (the decoder's own formulas), bit for bit: the fused path must not move a golden.
    #[test]
    fn kernels_equal_the_composed_ops() {
        let x = rand(&[2, 5, 3 * 8], 1);
        let w = rand(&[8], 2);
        let wv = w.to_vec1::<f32>().unwrap();
        let norm = |x: &Tensor| {
            let inv = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6).unwrap().sqrt().unwrap().recip().unwrap();
            x.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap()
        };
        let h = x.narrow(2, 8, 8).unwrap().contiguous().unwrap();
        let got = h.apply_op2_no_bwd(&w, &RmsNormOp { eps: 1e-6 }).unwrap();
        assert_eq!(max_diff(&got, &norm(&h)), 0.0, "bit for bit");

        // Heads 1..3 of a [2, 5, 3·8] projection, normed and rotated.
        let (cos, sin) = (rand(&[2, 1, 5, 8], 3), rand(&[2, 1, 5, 8], 4));
        let op = HeadsRope { first_head: 1, n_heads: 2, head_dim: 8, rotate: true, norm: Some(RmsNorm { weight: &wv, eps: 1e-6 }) };
        let got = x.apply_op3_no_bwd(&cos, &sin, &op).unwrap();
        let heads = norm(&x.narrow(2, 8, 16).unwrap().reshape((2, 5, 2, 8)).unwrap()).transpose(1, 2).unwrap();
        let rot = Tensor::cat(&[&heads.narrow(3, 4, 4).unwrap().neg().unwrap(), &heads.narrow(3, 0, 4).unwrap()], 3).unwrap();
        let want = (heads.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap();
        assert_eq!(got.dims(), &[2, 2, 5, 8]);
        assert_eq!(max_diff(&got, &want), 0.0, "bit for bit");

        // Scores [b=2, groups=3, t=4, tk=6] with a mask that hides some keys.
        let s = rand(&[2, 3, 4, 6], 5);
        let mut m = vec![0f32; 2 * 4 * 6];
        m.iter_mut().enumerate().filter(|(i, _)| i % 3 == 1).for_each(|(_, x)| *x = f32::MIN);
        let mask = Tensor::from_vec(m, (2, 1, 4, 6), &Device::Cpu).unwrap();
        let want = crate::decoder::softmax_last_dim(&(&s * 0.5).unwrap().broadcast_add(&mask).unwrap()).unwrap();
        let got = s.copy().unwrap();
        got.inplace_op2(&mask, &MaskedSoftmax { scale: 0.5 }).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0, "bit for bit");

        let (g, u) = (rand(&[3, 5000], 6), rand(&[3, 5000], 7));
        let want = (g.silu().unwrap() * &u).unwrap();
        assert_eq!(g.apply_op2_no_bwd(&u, &SiluMul).unwrap().to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    }
}
