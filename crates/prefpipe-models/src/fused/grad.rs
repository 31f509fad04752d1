//! Backward kernels for training on the CPU in f32.
//!
//! Why: candle's autograd keeps every intermediate of a composite op until
//! backward (RMSNorm alone is seven tensors per layer, softmax five), and each
//! is a fresh single-threaded pass over memory — a DPO step spent more time in
//! those element-wise passes and page faults than PyTorch. The fused forward
//! kernels of [`super`] (same arithmetic, same bits as the composite ops) get
//! a backward that keeps only their inputs and output (candle's graph holds
//! those anyway): one pass forward, one pass backward. [`super::RmsNormOp`]
//! and [`super::SiluMul`] carry theirs (the kernels below); softmax (an
//! in-place op for inference), log-softmax and RoPE + head layout have
//! training ops here. Backward sums in a fixed order (per row, or per fixed
//! block of rows), so gradients do not depend on the thread count.

use super::{f32_slice, masked_softmax, HeadsRope};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// True when a training forward on `x` may use these ops: f32 on the CPU.
pub fn trains(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Rows per block whose RMSNorm weight-gradient partial is summed in one
/// piece: fixed, so the sum order (and the bits) never depend on threads.
pub(super) const ROW_BLOCK: usize = 32;

/// RMSNorm's backward: `(x, w, g)` → flat `[∂x ; one ∂w partial per ROW_BLOCK rows]`.
pub(super) struct RmsNormBwd {
    pub(super) eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "prefpipe-rms-norm-bwd"
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
        let (x, w, g) = (f32_slice(s1, l1, "x")?, f32_slice(s2, l2, "weight")?, f32_slice(s3, l3, "grad")?);
        let n = w.len();
        let rows = x.len() / n;
        let blocks = rows.div_ceil(ROW_BLOCK);
        let mut out = vec![0f32; rows * n + blocks * n];
        let (dx, dw) = out.split_at_mut(rows * n);
        dx.par_chunks_mut(ROW_BLOCK * n).zip(dw.par_chunks_mut(n)).enumerate().for_each(|(bi, (dx, dw))| {
            let at = bi * ROW_BLOCK * n;
            for (r, dx) in dx.chunks_mut(n).enumerate() {
                let (x, g) = (&x[at + r * n..at + (r + 1) * n], &g[at + r * n..at + (r + 1) * n]);
                let mean = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let inv = 1.0 / (mean + self.eps).sqrt();
                let dot: f32 = g.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
                let c = inv * inv * inv * dot / n as f32;
                for i in 0..n {
                    dx[i] = inv * g[i] * w[i] - x[i] * c;
                    dw[i] += g[i] * x[i] * inv;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(rows * n + blocks * n)))
    }
}

/// SwiGLU's backward: `(gate, up, grad)` → flat `[∂gate ; ∂up]`.
pub(super) struct SiluMulBwd;

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "prefpipe-silu-mul-bwd"
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
        let (gate, up, g) = (f32_slice(s1, l1, "gate")?, f32_slice(s2, l2, "up")?, f32_slice(s3, l3, "grad")?);
        let n = gate.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        const CHUNK: usize = 4096;
        dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
            let at = c * CHUNK;
            for i in 0..dg.len() {
                let (x, u, gr) = (gate[at + i], up[at + i], g[at + i]);
                let s = 1.0 / (1.0 + (-x).exp());
                dg[i] = gr * u * s * (1.0 + x * (1.0 - s));
                du[i] = gr * x * s;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

/// `softmax(scores · scale + mask)` over the keys, args `(scores, mask)`:
/// scores `[b, groups, rows, t_keys]`, mask `[b, 1, 1, t, t_keys]` (see
/// [`super::MaskedSoftmax`]). The mask gets no gradient.
pub struct MaskedSoftmaxOp {
    pub scale: f32,
}

impl CustomOp2 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "prefpipe-masked-softmax-train"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (src, mask) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, "mask")?);
        let md = l2.dims();
        let (b, t, tk) = (md[0], md[md.len() - 2], md[md.len() - 1]);
        if l1.dims().last() != Some(&tk) || src.len() % (b * t * tk) != 0 || mask.len() != b * t * tk {
            bail!("{}: scores {:?} vs mask {md:?}", self.name(), l1.dims());
        }
        let mut dst = src.to_vec();
        masked_softmax(&mut dst, mask, b, t, tk, self.scale);
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }

    /// With `p` the output: `∂s = scale · p ⊙ (g − Σ_k g_k p_k)` per row.
    fn bwd(&self, _s: &Tensor, _mask: &Tensor, p: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd { scale: self.scale, log: false })?;
        Ok((Some(ds), None))
    }
}

/// Log-softmax over the last dim (the per-token log-probs of training losses).
pub struct LogSoftmaxOp;

impl CustomOp1 for LogSoftmaxOp {
    fn name(&self) -> &'static str {
        "prefpipe-log-softmax-train"
    }

    /// `(x − max) − ln Σ e^(x − max)`, in the order of [`crate::decoder::log_softmax_last_dim`].
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let src = f32_slice(s, l, self.name())?;
        let Some(&n) = l.dims().last() else { bail!("{}: a scalar", self.name()) };
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(n).zip(src.par_chunks(n)).for_each(|(d, x)| {
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for (d, &v) in d.iter_mut().zip(x) {
                *d = (v - max).exp();
            }
            let lse = super::candle_sum(d).ln();
            for (d, &v) in d.iter_mut().zip(x) {
                *d = (v - max) - lse;
            }
        });
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }

    /// With `y` the output: `∂x = g − e^y · Σ_k g_k` per row.
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd { scale: 1.0, log: true })?))
    }
}

/// `(out, grad)` → the input gradient of a softmax (`log: false`, `out` = p)
/// or log-softmax (`log: true`, `out` = ln p) over the last dim.
struct SoftmaxBwd {
    scale: f32,
    log: bool,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "prefpipe-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (out, g) = (f32_slice(s1, l1, "out")?, f32_slice(s2, l2, "grad")?);
        let Some(&n) = l1.dims().last() else { bail!("{}: a scalar", self.name()) };
        let mut dst = vec![0f32; out.len()];
        dst.par_chunks_mut(n).zip(out.par_chunks(n)).zip(g.par_chunks(n)).for_each(|((d, y), g)| {
            if self.log {
                let sum: f32 = g.iter().sum();
                for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *d = g - y.exp() * sum;
                }
            } else {
                let dot: f32 = g.iter().zip(y).map(|(g, p)| g * p).sum();
                for ((d, &p), &g) in d.iter_mut().zip(y).zip(g) {
                    *d = self.scale * p * (g - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// Rotate-half RoPE plus head layout: a projection output `[b, t, heads·hd]`
/// → `[b, heads, t, hd]`, args `(x, cos, sin)` (tables `[b, 1, t, hd]`, no gradient).
pub struct RopeHeadsOp {
    pub n_heads: usize,
    pub head_dim: usize,
}

impl CustomOp3 for RopeHeadsOp {
    fn name(&self) -> &'static str {
        "prefpipe-rope-heads-train"
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
        HeadsRope { first_head: 0, n_heads: self.n_heads, head_dim: self.head_dim, rotate: true, norm: None }
            .cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    /// `y_i = x_i c_i + rot(x)_i s_i` with `rot(x) = (−x₂, x₁)`, so
    /// `∂x₁ = g₁c₁ + g₂s₂` and `∂x₂ = g₂c₂ − g₁s₁` (halves of each head),
    /// written back in the projection's `[b, t, heads·hd]` layout.
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &RopeHeadsBwd { n_heads: self.n_heads, head_dim: self.head_dim })?;
        Ok((Some(dx), None, None))
    }
}

/// RoPE's backward: `(grad [b, heads, t, hd], cos, sin)` → `[b, t, heads·hd]`.
struct RopeHeadsBwd {
    n_heads: usize,
    head_dim: usize,
}

impl CustomOp3 for RopeHeadsBwd {
    fn name(&self) -> &'static str {
        "prefpipe-rope-heads-bwd"
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
        let (g, cos, sin) = (f32_slice(s1, l1, "grad")?, f32_slice(s2, l2, "cos")?, f32_slice(s3, l3, "sin")?);
        let &[b, nh, t, hd] = l1.dims() else { bail!("{}: expected [b, heads, t, hd], got {:?}", self.name(), l1.dims()) };
        if nh != self.n_heads || hd != self.head_dim || cos.len() != b * t * hd || sin.len() != b * t * hd {
            bail!("{}: grad {:?}, tables {} for {b}x{t}", self.name(), l1.dims(), cos.len());
        }
        let half = hd / 2;
        let width = nh * hd;
        let mut dst = vec![0f32; b * t * width];
        dst.par_chunks_mut(width).enumerate().for_each(|(row, out)| {
            let (bi, ti) = (row / t, row % t);
            let (c, s) = (&cos[row * hd..(row + 1) * hd], &sin[row * hd..(row + 1) * hd]);
            for h in 0..nh {
                let at = ((bi * nh + h) * t + ti) * hd;
                let gh = &g[at..at + hd];
                let o = &mut out[h * hd..(h + 1) * hd];
                for i in 0..half {
                    o[i] = gh[i] * c[i] + gh[i + half] * s[i + half];
                    o[i + half] = gh[i + half] * c[i + half] - gh[i] * s[i];
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from((b, t, width))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::{log_softmax_last_dim, softmax_last_dim};
    use crate::fused::tests::rand;
    use candle_core::{Device, Var, D};

    /// Gradients of `Σ f(vars) ⊙ r` (a random upstream gradient `r`, so every
    /// element's weight differs and a wrong sign or dropped term shows).
    fn grads(vars: &[Var], f: impl Fn(&[Tensor]) -> Tensor, seed: u64) -> (Tensor, Vec<Tensor>) {
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&xs);
        let r = rand(y.dims(), seed);
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, xs.iter().map(|x| g.get(x).unwrap().clone()).collect())
    }

    /// The fused op equals the composite candle ops: forward bit for bit,
    /// gradients to 1e-6 relative (f32 rounding of different summation orders).
    fn check(vars: &[Var], fused: impl Fn(&[Tensor]) -> Tensor, composite: impl Fn(&[Tensor]) -> Tensor) {
        let (y1, g1) = grads(vars, fused, 99);
        let (y2, g2) = grads(vars, composite, 99);
        assert_eq!(
            y1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "forward bits"
        );
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert_eq!(a.dims(), b.dims(), "grad {i} shape");
            let err = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && err <= 1e-6 * scale, "grad {i}: max error {err} vs max |grad| {scale}");
        }
    }

    fn var(shape: &[usize], seed: u64) -> Var {
        Var::from_tensor(&rand(shape, seed)).unwrap()
    }

    /// RMSNorm (HF LlamaRMSNorm) against sqr/mean/add/sqrt/recip/mul/mul,
    /// over more rows than one ROW_BLOCK and a hidden size past 32.
    #[test]
    fn rms_norm_grad_equals_composite() {
        let vars = [var(&[3, 25, 40], 1), var(&[40], 2)];
        check(
            &vars,
            |v| v[0].apply_op2(&v[1], crate::fused::RmsNormOp { eps: 1e-5 }).unwrap(),
            |v| {
                let inv = (v[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
                v[0].broadcast_mul(&inv).unwrap().broadcast_mul(&v[1]).unwrap()
            },
        );
    }

    #[test]
    fn silu_mul_grad_equals_composite() {
        let vars = [var(&[3, 5000], 3), var(&[3, 5000], 4)];
        check(&vars, |v| v[0].apply_op2(&v[1], crate::fused::SiluMul).unwrap(), |v| (v[0].silu().unwrap() * &v[1]).unwrap());
    }

    /// Scores [b=2, groups=3, rows=2·4, tk=4] (two heads per group) with a causal-style mask.
    #[test]
    fn masked_softmax_grad_equals_composite() {
        let mut m = vec![0f32; 2 * 4 * 4];
        m.iter_mut().enumerate().filter(|(i, _)| (i % 4) > (i / 4) % 4).for_each(|(_, x)| *x = f32::MIN);
        let mask = Tensor::from_vec(m, (2, 1, 1, 4, 4), &Device::Cpu).unwrap();
        let vars = [var(&[2, 3, 8, 4], 5)];
        check(
            &vars,
            |v| v[0].apply_op2(&mask, MaskedSoftmaxOp { scale: 0.35 }).unwrap(),
            |v| {
                let s = (&v[0] * 0.35).unwrap().reshape((2, 3, 2, 4, 4)).unwrap().broadcast_add(&mask).unwrap();
                softmax_last_dim(&s).unwrap().reshape((2, 3, 8, 4)).unwrap()
            },
        );
    }

    #[test]
    fn log_softmax_grad_equals_composite() {
        let vars = [var(&[7, 513], 6)];
        check(&vars, |v| v[0].apply_op1(LogSoftmaxOp).unwrap(), |v| log_softmax_last_dim(&v[0]).unwrap());
    }

    /// RoPE + head layout against reshape/transpose/rotate_half/cat/mul/add.
    #[test]
    fn rope_heads_grad_equals_composite() {
        let (cos, sin) = (rand(&[2, 1, 5, 8], 7), rand(&[2, 1, 5, 8], 8));
        let vars = [var(&[2, 5, 3 * 8], 9)];
        check(
            &vars,
            |v| v[0].apply_op3(&cos, &sin, RopeHeadsOp { n_heads: 3, head_dim: 8 }).unwrap(),
            |v| {
                let x = v[0].reshape((2, 5, 3, 8)).unwrap().transpose(1, 2).unwrap();
                let rot = Tensor::cat(&[&x.narrow(3, 4, 4).unwrap().neg().unwrap(), &x.narrow(3, 0, 4).unwrap()], 3).unwrap();
                (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
            },
        );
    }
}
