//! Linear projections `y = x·Wᵀ + b` (HF `nn.Linear`), with a second weight
//! layout for inference on the CPU.
//!
//! Checkpoints store `W` as `[out, in]`, so `x·Wᵀ` hands gemm (through candle)
//! a row-major `W` where its kernels want the output dimension contiguous.
//! gemm then copies all of `W` into its panel layout with scalar strided
//! loads on every call: at a decoding step (8 rows) that copy was 58% of the
//! time of generation (perf, 24M Llama, 2 threads), and it recurs for every
//! layer and token. An inference model keeps `Wᵀ` as `[in, out]` contiguous
//! instead, which gemm reads in place. The microkernel, its blocking over
//! the inner dimension and hence every sum's order are unchanged, so the
//! numbers are the same bits at a real model's widths (tests below, and
//! every golden). Two small cases are exceptions: a single row (gemm's
//! matrix-vector path) and fewer than 8 rows into at most 64 outputs
//! (gemm's small-matrix path); their loop order follows the layout, so they
//! agree to rounding, not to the bit — as one row already differed from the
//! same row inside a batch.

use candle_core::{Module, Tensor};
use candle_nn::Linear;

type CResult<T> = candle_core::Result<T>;

/// A linear layer in one of two layouts.
#[derive(Debug, Clone)]
pub struct Proj {
    /// `[out, in]` as in the checkpoint (trainable or not), or `[in, out]`
    /// contiguous when `transposed`.
    weight: Tensor,
    bias: Option<Tensor>,
    transposed: bool,
}

impl From<Linear> for Proj {
    fn from(l: Linear) -> Self {
        Self { weight: l.weight().clone(), bias: l.bias().cloned(), transposed: false }
    }
}

impl Proj {
    /// The layer over `weight` `[out, in]` (e.g. a tied embedding matrix).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, transposed: false }
    }

    /// Weight and bias, in whatever layout they are kept.
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.weight).chain(&self.bias)
    }

    /// The same layer on the same storage, cut from any gradient graph.
    pub fn detach(&self) -> Self {
        Self { weight: self.weight.detach(), bias: self.bias.as_ref().map(Tensor::detach), transposed: self.transposed }
    }

    /// The layer with its weight stored `[in, out]` contiguous (a copy; the
    /// `[out, in]` storage is freed once nothing else holds it). For models
    /// that never train: a gradient would flow to the copy, not the weight.
    pub fn transposed(&self) -> CResult<Self> {
        if self.transposed {
            return Ok(self.clone());
        }
        Ok(Self { weight: self.weight.detach().t()?.contiguous()?, bias: self.bias.as_ref().map(Tensor::detach), transposed: true })
    }

    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        if !self.transposed {
            return Linear::new(self.weight.clone(), self.bias.clone()).forward(x);
        }
        // As candle's Linear on a contiguous input: all leading dims as rows of one matmul.
        let dims = x.dims();
        let (k, n) = self.weight.dims2()?;
        let rows = x.elem_count() / k.max(1);
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        let y = x.contiguous()?.reshape((rows, k))?.matmul(&self.weight)?.reshape(out)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Both layouts give the same bits for the shapes a decoder meets: one
    /// decoding step of 2 or 8 rows into a 512 → 1408 MLP, a prefill, a
    /// non-contiguous input, output widths that are and are not multiples of
    /// gemm's 16-lane panels, a one-label score head, with and without bias.
    /// (A transposed layer that summed in another order, or dropped the
    /// bias, would differ in the last bits or more.)
    #[test]
    fn both_layouts_give_the_same_bits() {
        let dev = Device::Cpu;
        for (rows, k, n, bias) in
            [(2, 512, 1408, false), (8, 64, 176, false), (3 * 37, 96, 1001, true), (2 * 5, 64, 1, false), (5, 1536, 576, true)]
        {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = bias.then(|| Tensor::randn(0f32, 1.0, n, &dev).unwrap());
            let p = Proj::new(w, b);
            let t = p.transposed().unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, 1, k), &dev).unwrap();
            let want: Vec<f32> = p.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = t.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got.len(), rows * n);
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "rows {rows} k {k} n {n}");
            // A strided view of the same input.
            let xt = Tensor::randn(0f32, 1.0, (k, rows), &dev).unwrap().t().unwrap();
            let want: Vec<f32> = p.forward(&xt.contiguous().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = t.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "strided rows {rows} k {k} n {n}");
        }
        assert_eq!(Proj::new(Tensor::zeros((3, 2), DType::F32, &dev).unwrap(), None).transposed().unwrap().weight.dims(), [2, 3]);
    }

    /// The small cases (one row; 3 rows into 48 outputs) agree to f32
    /// rounding of a k-term sum: |Δ| ≤ k · 2⁻²⁴ · Σ|xᵢ wᵢ| (the standard bound
    /// on reordering a sum, Higham §4.2).
    #[test]
    fn small_cases_agree_to_rounding() {
        let dev = Device::Cpu;
        for (rows, k, n) in [(1, 512, 1408), (3, 64, 48)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, 1, k), &dev).unwrap();
            let p = Proj::new(w.clone(), None);
            let want: Vec<f32> = p.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = p.transposed().unwrap().forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let mag: Vec<f32> =
                Proj::new(w.abs().unwrap(), None).forward(&x.abs().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let eps = k as f32 * f32::EPSILON / 2.0;
            for j in 0..rows * n {
                assert!((want[j] - got[j]).abs() <= eps * mag[j], "rows {rows}: output {j}: {} vs {}", want[j], got[j]);
            }
        }
    }
}
