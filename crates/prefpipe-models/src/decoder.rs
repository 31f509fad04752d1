//! One decoder-only transformer for the Llama, Mistral, Qwen2 and Qwen3
//! families, written against the checkpoint tensor names
//! (`model.layers.N.self_attn.q_proj.weight`, ...).
//!
//! Why not candle-transformers' models: they return only the last position's
//! logits, and their fused softmax / RMSNorm / rotary kernels record no
//! gradients (DESIGN §10). Everything here is composed of differentiable
//! candle ops, so the same code serves inference (a `VarBuilder` over
//! safetensors) and training (a `VarBuilder` over a `VarMap`).
//!
//! Padding: any mix of padding is handled by per-token positions and a
//! per-key validity mask. Teacher-forced batches are right-padded
//! ([`PaddedBatch::right_padded`]); generation left-pads prompts so every row's
//! next token is read at the same column. A padded query attends only to its
//! own slot, so no softmax row is ever empty, and real tokens never see pads:
//! batched results equal unbatched ones up to float summation order.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Init, VarBuilder};

use crate::config::{HeadKind, ModelConfig, RopeScaling};
use crate::fused;

mod proj;
pub use proj::Proj;

type CResult<T> = candle_core::Result<T>;

/// Additive mask value for keys a query must not see (HF uses `finfo.min` too).
const MASKED: f32 = f32::MIN;

/// RMSNorm in f32, as HF: `w * (x * rsqrt(mean(x²) + eps))`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> CResult<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }

    /// The weight on the host, for [`fused::HeadsRope`]'s q/k norm (a head dim of floats).
    fn host_weight(&self) -> CResult<Vec<f32>> {
        self.weight.to_vec1::<f32>()
    }

    fn detach(&self) -> Self {
        Self { weight: self.weight.detach(), eps: self.eps }
    }

    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let op = fused::RmsNormOp { eps: self.eps as f32 };
        if fused::applies(x, &[&self.weight]) {
            return x.contiguous()?.apply_op2_no_bwd(&self.weight, &op);
        }
        if fused::trains(x) {
            return x.contiguous()?.apply_op2(&self.weight, op);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv_rms)?.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> CResult<Proj> {
    Ok(if bias { candle_nn::linear(in_dim, out_dim, vb)? } else { candle_nn::linear_no_bias(in_dim, out_dim, vb)? }.into())
}

/// Rotary position embedding, "rotate half" layout (HF `apply_rotary_pos_emb`).
#[derive(Debug, Clone)]
pub struct Rope {
    /// Inverse frequencies in f32, computed exactly as transformers does (f32 throughout).
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.head_dim;
        let base = cfg.rope_theta as f32;
        // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in float32.
        let mut inv_freq: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect();
        match &cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= *factor as f32),
            RopeScaling::FreqFactors(factors) => inv_freq.iter_mut().zip(factors).for_each(|(f, d)| *f /= d),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // transformers `_compute_llama3_parameters`, element by element.
                let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
                let old_len = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen { *f / factor } else { *f };
                    // ~(wavelen < high) * ~(wavelen > low); inv_freq is finite, so no NaN.
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    *f = if medium {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Self { inv_freq }
    }

    /// The inverse frequencies (after any scaling).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `cos`, `sin` of shape `[b, 1, t, head_dim]` for per-token positions (row-major `b × t`).
    pub fn tables(&self, positions: &[u32], b: usize, t: usize, device: &Device) -> CResult<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * 2 * half);
        let mut sin = Vec::with_capacity(positions.len() * 2 * half);
        for &p in positions {
            let start = cos.len();
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
            // emb = cat(freqs, freqs)
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let shape = (b, 1, t, 2 * half);
        Ok((Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?))
    }
}

fn rotate_half(x: &Tensor) -> CResult<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// Softmax over the last dim from differentiable ops (the max is a constant shift).
pub fn softmax_last_dim(x: &Tensor) -> CResult<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dim from differentiable ops.
pub fn log_softmax_last_dim(x: &Tensor) -> CResult<Tensor> {
    if fused::trains(x) && x.rank() > 0 {
        return x.contiguous()?.apply_op1(fused::LogSoftmaxOp);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> CResult<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (Some(RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?), Some(RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?))
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: linear(h, nh * hd, cfg.qkv_bias, vb.pp("q_proj"))?,
            k_proj: linear(h, nkv * hd, cfg.qkv_bias, vb.pp("k_proj"))?,
            v_proj: linear(h, nkv * hd, cfg.qkv_bias, vb.pp("v_proj"))?,
            o_proj: linear(nh * hd, h, cfg.o_bias, vb.pp("o_proj"))?,
            q_norm,
            k_norm,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x`: `[b, t, hidden]`; `mask`: additive `[b, 1, 1, t, t_keys]`; `cache`: this layer's past keys/values.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor, cache: Option<&mut LayerCache>) -> CResult<Tensor> {
        if fused::applies(x, &self.weights()) {
            return self.attend_fused(x, cos, sin, mask, cache);
        }
        if fused::trains(x) && self.q_norm.is_none() && cache.is_none() {
            return self.attend_train_fused(x, cos, sin, mask);
        }
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let n_rep = nh / nkv;
        let mut q = self.q_proj.forward(x)?.reshape((b, t, nh, hd))?;
        let mut k = self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = apply_rope(&q.transpose(1, 2)?, cos, sin)?;
        let mut k = apply_rope(&k.transpose(1, 2)?, cos, sin)?.contiguous()?;
        let mut v = v.transpose(1, 2)?.contiguous()?;
        if let Some(cache) = cache {
            (k, v) = cache.append(&k, &v)?;
        }
        let tk = k.dim(2)?;
        // Heads sharing a kv head are adjacent, so grouping them into the row
        // dimension attends with no repeat_kv copy of keys and values.
        let q = q.contiguous()?.reshape((b, nkv, n_rep * t, hd))?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = scores.reshape((b, nkv, n_rep, t, tk))?.broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores)?.reshape((b, nkv, n_rep * t, tk))?;
        let out = probs.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }

    /// [`Attention::forward`] recording a graph on the CPU in f32: RoPE + head
    /// layout and scale + mask + softmax as one differentiable op each, whose
    /// backward keeps only their inputs and output (fused/grad.rs).
    fn attend_train_fused(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> CResult<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let n_rep = nh / nkv;
        let rope = |proj: &Proj, n_heads| proj.forward(x)?.contiguous()?.apply_op3(cos, sin, fused::RopeHeadsOp { n_heads, head_dim: hd });
        let q = rope(&self.q_proj, nh)?;
        let k = rope(&self.k_proj, nkv)?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let scores = q.reshape((b, nkv, n_rep * t, hd))?.matmul(&k.t()?)?;
        let probs = scores.apply_op2(&mask.contiguous()?, fused::MaskedSoftmaxOp { scale: (1.0 / (hd as f64).sqrt()) as f32 })?;
        let out = probs.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }

    fn weights(&self) -> Vec<&Tensor> {
        let linears = [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj];
        let norms = [&self.q_norm, &self.k_norm];
        linears.iter().flat_map(|l| l.tensors()).chain(norms.iter().filter_map(|n| n.as_ref().map(|n| &n.weight))).collect()
    }

    fn detach(&self) -> Self {
        Self {
            q_proj: self.q_proj.detach(),
            k_proj: self.k_proj.detach(),
            v_proj: self.v_proj.detach(),
            o_proj: self.o_proj.detach(),
            q_norm: self.q_norm.as_ref().map(RmsNorm::detach),
            k_norm: self.k_norm.as_ref().map(RmsNorm::detach),
            ..*self
        }
    }

    fn projs_mut(&mut self) -> [&mut Proj; 4] {
        [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.o_proj]
    }

    /// [`Attention::forward`] with fixed weights on the CPU: the same GEMMs,
    /// then one pass per projection for norm + RoPE + head layout, and one
    /// pass for scale + mask + softmax, written over the scores in place.
    fn attend_fused(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor, cache: Option<&mut LayerCache>) -> CResult<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let n_rep = nh / nkv;
        let heads = |proj: &Proj, n_heads, rotate, norm: &Option<RmsNorm>| {
            let w = norm.as_ref().map(RmsNorm::host_weight).transpose()?;
            let norm = norm.as_ref().zip(w.as_deref()).map(|(n, weight)| fused::RmsNorm { weight, eps: n.eps as f32 });
            proj.forward(x)?.apply_op3_no_bwd(cos, sin, &fused::HeadsRope { first_head: 0, n_heads, head_dim: hd, rotate, norm })
        };
        let q = heads(&self.q_proj, nh, true, &self.q_norm)?;
        let mut k = heads(&self.k_proj, nkv, true, &self.k_norm)?;
        let mut v = heads(&self.v_proj, nkv, false, &None)?;
        if let Some(cache) = cache {
            (k, v) = cache.append(&k, &v)?;
        }
        // [b, nh, t, hd] is [b, nkv, n_rep·t, hd]: a group's queries share one matmul.
        let scores = q.reshape((b, nkv, n_rep * t, hd))?.matmul(&k.t()?)?;
        scores.inplace_op2(mask, &fused::MaskedSoftmax { scale: (1.0 / (hd as f64).sqrt()) as f32 })?;
        let out = scores.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> CResult<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(h, i, bias, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, bias, vb.pp("up_proj"))?,
            down_proj: linear(i, h, bias, vb.pp("down_proj"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        if fused::applies(x, &[&self.gate_proj, &self.up_proj, &self.down_proj].iter().flat_map(|l| l.tensors()).collect::<Vec<_>>()) {
            return self.down_proj.forward(&gate.apply_op2_no_bwd(&up, &fused::SiluMul)?);
        }
        if fused::trains(x) {
            return self.down_proj.forward(&gate.contiguous()?.apply_op2(&up.contiguous()?, fused::SiluMul)?);
        }
        self.down_proj.forward(&(gate.silu()? * up)?)
    }

    fn detach(&self) -> Self {
        Self { gate_proj: self.gate_proj.detach(), up_proj: self.up_proj.detach(), down_proj: self.down_proj.detach() }
    }

    fn projs_mut(&mut self) -> [&mut Proj; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> CResult<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn detach(&self) -> Self {
        Self {
            input_layernorm: self.input_layernorm.detach(),
            self_attn: self.self_attn.detach(),
            post_attention_layernorm: self.post_attention_layernorm.detach(),
            mlp: self.mlp.detach(),
        }
    }

    fn projs_mut(&mut self) -> impl Iterator<Item = &mut Proj> {
        self.self_attn.projs_mut().into_iter().chain(self.mlp.projs_mut())
    }

    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor, cache: Option<&mut LayerCache>) -> CResult<Tensor> {
        let h = (x + self.self_attn.forward(&self.input_layernorm.forward(x)?, cos, sin, mask, cache)?)?;
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

/// One layer's keys and values `[b, kv_heads, capacity, head_dim]`, filled up to `len`.
///
/// Preallocated and written in place, so a decoding step copies only its new
/// token's keys/values; the buffer doubles when full.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
    len: usize,
    capacity_hint: usize,
}

impl LayerCache {
    /// Appends `[b, kv_heads, t, head_dim]` keys/values; returns all cached ones.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> CResult<(Tensor, Tensor)> {
        let (b, nkv, t, hd) = k.dims4()?;
        let cap = self.kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        if self.len + t > cap {
            let new_cap = (self.len + t).max(self.capacity_hint).max(2 * cap);
            let nk = Tensor::zeros((b, nkv, new_cap, hd), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, nkv, new_cap, hd), v.dtype(), v.device())?;
            if let Some((ok, ov)) = &self.kv {
                nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.kv = Some((nk, nv));
        }
        let (ck, cv) = self.kv.as_ref().expect("allocated above");
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((ck.narrow(2, 0, self.len)?, cv.narrow(2, 0, self.len)?))
    }
}

/// Past keys/values of every layer, plus each row's key positions (`None` = padding).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    key_pos: Vec<Vec<Option<u32>>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache that holds `capacity` positions per row before it must grow.
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        let layer = LayerCache { capacity_hint: capacity, ..LayerCache::default() };
        Self { layers: vec![layer; num_layers], key_pos: vec![] }
    }

    /// Number of cached key slots per row.
    pub fn len(&self) -> usize {
        self.key_pos.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the given batch rows (finished sequences leave the batch).
    pub fn retain_rows(&mut self, rows: &[usize]) -> CResult<()> {
        if rows.len() == self.key_pos.len() {
            return Ok(());
        }
        for layer in &mut self.layers {
            if let Some((k, v)) = &mut layer.kv {
                let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), k.device())?;
                *k = k.index_select(&idx, 0)?;
                *v = v.index_select(&idx, 0)?;
            }
        }
        self.key_pos = rows.iter().map(|&r| std::mem::take(&mut self.key_pos[r])).collect();
        Ok(())
    }
}

/// The decoder body (HF `LlamaModel`): embeddings, layers, final norm.
#[derive(Debug, Clone)]
pub struct DecoderBody {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rope: Rope,
    sliding_window: Option<usize>,
}

impl DecoderBody {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> CResult<Self> {
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i))).collect::<CResult<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            rope: Rope::new(cfg),
            sliding_window: cfg.sliding_window,
        })
    }

    fn detach(&self) -> Self {
        let e = &self.embed_tokens;
        Self {
            embed_tokens: Embedding::new(e.embeddings().detach(), e.hidden_size()),
            layers: self.layers.iter().map(DecoderLayer::detach).collect(),
            norm: self.norm.detach(),
            rope: self.rope.clone(),
            sliding_window: self.sliding_window,
        }
    }

    pub fn embed_tokens(&self) -> &Embedding {
        &self.embed_tokens
    }

    /// Final hidden states (after the final norm) `[b, t, hidden]`.
    ///
    /// `input_ids`: `[b, t]` u32; `q_pos`: per token (row-major) its position in
    /// its own sequence, `None` for padding. With a cache, the new tokens come
    /// after the cached ones and the cache is extended.
    pub fn forward(&self, input_ids: &Tensor, q_pos: &[Option<u32>], cache: Option<&mut KvCache>) -> CResult<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if q_pos.len() != b * t {
            candle_core::bail!("q_pos has {} entries for a {b}x{t} batch", q_pos.len());
        }
        let device = input_ids.device();
        let rows: Vec<&[Option<u32>]> = q_pos.chunks(t).collect();
        let (mask, mut layer_caches) = match cache {
            Some(cache) => {
                if cache.key_pos.is_empty() {
                    cache.key_pos = vec![vec![]; b];
                } else if cache.key_pos.len() != b {
                    candle_core::bail!("cache has {} rows, batch has {b}", cache.key_pos.len());
                }
                for (kp, row) in cache.key_pos.iter_mut().zip(&rows) {
                    kp.extend_from_slice(row);
                }
                let mask = attention_mask(&rows, &cache.key_pos, self.sliding_window, device)?;
                (mask, Some(&mut cache.layers))
            }
            None => {
                let keys: Vec<Vec<Option<u32>>> = rows.iter().map(|r| r.to_vec()).collect();
                (attention_mask(&rows, &keys, self.sliding_window, device)?, None)
            }
        };
        let positions: Vec<u32> = q_pos.iter().map(|p| p.unwrap_or(0)).collect();
        let (cos, sin) = self.rope.tables(&positions, b, t, device)?;
        let mut x = self.embed_tokens.forward(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let c = layer_caches.as_mut().map(|lc| &mut lc[i]);
            x = layer.forward(&x, &cos, &sin, &mask, c)?;
        }
        self.norm.forward(&x)
    }
}

/// Additive mask `[b, 1, 1, t, t_keys]`: query (pos p) sees key (pos k) iff the
/// key is a real token, k ≤ p and p − k < window. The last `t` keys are the
/// queries' own slots; a padded query sees only its own slot.
fn attention_mask(queries: &[&[Option<u32>]], keys: &[Vec<Option<u32>>], window: Option<usize>, device: &Device) -> CResult<Tensor> {
    let b = queries.len();
    let t = queries.first().map_or(0, |r| r.len());
    let tk = keys.first().map_or(0, Vec::len);
    let mut m = vec![MASKED; b * t * tk];
    for (bi, (qrow, krow)) in queries.iter().zip(keys).enumerate() {
        for (qi, q) in qrow.iter().enumerate() {
            let base = (bi * t + qi) * tk;
            let own = tk - t + qi;
            match q {
                None => m[base + own] = 0.0,
                Some(p) => {
                    for (ki, k) in krow.iter().enumerate() {
                        if let Some(k) = k {
                            let visible = k <= p && window.is_none_or(|w| ((p - k) as usize) < w);
                            if visible {
                                m[base + ki] = 0.0;
                            }
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, 1, t, tk), device)
}

/// A right-padded teacher-forcing batch of (prompt, response) token sequences.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// `[b, t]` u32.
    pub input_ids: Tensor,
    /// Row-major per-token positions, `None` for padding.
    pub q_pos: Vec<Option<u32>>,
    /// Each row's real length.
    pub lens: Vec<usize>,
    /// Padded width `t`.
    pub width: usize,
}

impl PaddedBatch {
    /// Concatenates each pair and right-pads with `pad_id` to the longest.
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> CResult<Self> {
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * width);
        let mut q_pos = Vec::with_capacity(seqs.len() * width);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad_id, width - s.len()));
            q_pos.extend((0..width).map(|i| (i < s.len()).then_some(i as u32)));
        }
        Ok(Self { input_ids: Tensor::from_vec(ids, (seqs.len(), width), device)?, q_pos, lens: seqs.iter().map(Vec::len).collect(), width })
    }
}

/// The head on the decoder body.
#[derive(Debug, Clone)]
pub enum Head {
    /// Next-token logits (`lm_head`, or the tied embedding matrix).
    Lm(Proj),
    /// Sequence-classification `score` head (no bias), read at the last real token.
    Score(Proj),
}

/// A full model: body + head (HF `*ForCausalLM` / `*ForSequenceClassification`).
#[derive(Debug, Clone)]
pub struct Decoder {
    body: DecoderBody,
    head: Head,
    cfg: ModelConfig,
}

impl Decoder {
    /// Builds the model; `vb` is at the checkpoint root (tensors `model.*`, `lm_head.*`, `score.*`).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> CResult<Self> {
        let body = DecoderBody::new(cfg, vb.pp("model"))?;
        let head = match cfg.head {
            HeadKind::CausalLm if cfg.tie_word_embeddings => Head::Lm(Proj::new(body.embed_tokens.embeddings().clone(), None)),
            HeadKind::CausalLm => Head::Lm(candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?.into()),
            HeadKind::SequenceClassification { num_labels } => {
                Head::Score(candle_nn::linear_no_bias(cfg.hidden_size, num_labels, vb.pp("score"))?.into())
            }
        };
        Ok(Self { body, head, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The same model on the same weight storage with no gradient graph: what
    /// a trainable model computes when only the numbers are wanted (log-probs,
    /// scores, generation). It runs the fused inference kernels, so a trainable
    /// model and an inference model of the same weights give the same bits.
    pub fn detached(&self) -> Decoder {
        let head = match &self.head {
            Head::Lm(l) => Head::Lm(l.detach()),
            Head::Score(l) => Head::Score(l.detach()),
        };
        Decoder { body: self.body.detach(), head, cfg: self.cfg.clone() }
    }

    /// The model for inference on the CPU: every projection's weight kept
    /// `[in, out]` contiguous ([`Proj::transposed`]) — the same bits, without
    /// gemm repacking each weight on every call. One matrix at a time, so the
    /// peak is the weights plus one matrix; a tied head gets its own copy
    /// (the embedding lookup keeps the `[vocab, hidden]` rows). Elsewhere
    /// (CUDA, Metal), the model as it is.
    pub fn into_cpu_inference(mut self) -> CResult<Decoder> {
        if !self.body.embed_tokens.embeddings().device().is_cpu() {
            return Ok(self);
        }
        let head = match &mut self.head {
            Head::Lm(l) | Head::Score(l) => l,
        };
        *head = head.transposed()?;
        for p in self.body.layers.iter_mut().flat_map(DecoderLayer::projs_mut) {
            *p = p.transposed()?;
        }
        Ok(self)
    }

    pub fn body(&self) -> &DecoderBody {
        &self.body
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Final hidden states `[b, t, hidden]` of a right-padded batch.
    pub fn hidden(&self, batch: &PaddedBatch) -> CResult<Tensor> {
        self.body.forward(&batch.input_ids, &batch.q_pos, None)
    }

    /// Applies the head to hidden states `[..., hidden]`: logits or scores.
    pub fn apply_head(&self, hidden: &Tensor) -> CResult<Tensor> {
        match &self.head {
            Head::Lm(l) | Head::Score(l) => l.forward(hidden),
        }
    }

    /// Logits `[b, t, vocab]` for every position (or scores `[b, t, num_labels]`).
    pub fn logits(&self, batch: &PaddedBatch) -> CResult<Tensor> {
        self.apply_head(&self.hidden(batch)?)
    }

    /// Hidden states `[n, hidden]` at the positions that predict the response
    /// tokens (the last prompt token … the second-to-last response token),
    /// concatenated over rows, for pairs whose prompt/response lengths are given.
    pub fn response_hidden(&self, batch: &PaddedBatch, split: &[(usize, usize)]) -> CResult<Tensor> {
        if split.len() != batch.lens.len() {
            candle_core::bail!("{} (prompt, response) splits for {} rows", split.len(), batch.lens.len());
        }
        for (row, (&(p, r), &len)) in split.iter().zip(&batch.lens).enumerate() {
            if p == 0 || r == 0 || p + r != len {
                candle_core::bail!("row {row}: prompt {p} + response {r} tokens must both be non-empty and sum to the row length {len}");
            }
        }
        let hidden = self.hidden(batch)?;
        let (b, t, h) = hidden.dims3()?;
        let idx = response_positions(split, t);
        let n = idx.len();
        let idx = Tensor::from_vec(idx, n, hidden.device())?;
        hidden.reshape((b * t, h))?.index_select(&idx, 0)
    }

    /// Log-probabilities `[n]` of each response token (EOS included), concatenated
    /// over rows; differentiable. `batch` rows are prompt ⊕ response with the
    /// given (prompt_len, response_len).
    pub fn response_token_logps(&self, batch: &PaddedBatch, split: &[(usize, usize)]) -> CResult<Tensor> {
        let h = self.response_hidden(batch, split)?;
        let logp = log_softmax_last_dim(&self.apply_head(&h)?)?;
        let (ids, t) = (batch.input_ids.flatten_all()?, batch.width);
        let targets: Vec<u32> = split.iter().enumerate().flat_map(|(row, &(p, r))| (p..p + r).map(move |i| (row * t + i) as u32)).collect();
        let targets = ids.index_select(&Tensor::from_vec(targets.clone(), targets.len(), ids.device())?, 0)?;
        logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
    }

    /// Summed response log-probabilities `[b]` (differentiable; DPO's sθ(y)).
    pub fn sequence_logps(&self, batch: &PaddedBatch, split: &[(usize, usize)]) -> CResult<Tensor> {
        let tok = self.response_token_logps(batch, split)?;
        // Segment sums as a [b, n] 0/1 matrix product, which keeps the graph simple.
        let n = tok.dim(0)?;
        let mut seg = vec![0f32; split.len() * n];
        let mut start = 0;
        for (row, &(_, r)) in split.iter().enumerate() {
            seg[row * n + start..row * n + start + r].fill(1.0);
            start += r;
        }
        let seg = Tensor::from_vec(seg, (split.len(), n), tok.device())?;
        seg.matmul(&tok.unsqueeze(1)?)?.squeeze(1)
    }

    /// Head outputs `[b, num_labels]` of each row at the index transformers'
    /// `*ForSequenceClassification` reads: the last token that is not
    /// `config.pad_token_id` (the last token when no pad id is set). Only a
    /// row's real tokens are considered, so batching never changes the result.
    /// When pad == eos, a trailing EOS is skipped, exactly as in transformers.
    pub fn last_token_scores(&self, batch: &PaddedBatch) -> CResult<Tensor> {
        let hidden = self.hidden(batch)?;
        let (b, t, h) = hidden.dims3()?;
        let ids = batch.input_ids.to_vec2::<u32>()?;
        let idx: Vec<u32> = batch
            .lens
            .iter()
            .zip(&ids)
            .enumerate()
            .map(|(row, (&l, ids))| {
                let last = match self.cfg.pad_token_id {
                    // argmax over (index · non_pad) in transformers: 0 when all are pads.
                    Some(pad) => ids[..l].iter().rposition(|&x| x != pad).unwrap_or(0),
                    None => l - 1,
                };
                (row * t + last) as u32
            })
            .collect();
        let idx = Tensor::from_vec(idx, b, hidden.device())?;
        self.apply_head(&hidden.reshape((b * t, h))?.index_select(&idx, 0)?)
    }
}

/// Flat indices (row · t + i) of the positions predicting each response token.
fn response_positions(split: &[(usize, usize)], t: usize) -> Vec<u32> {
    split.iter().enumerate().flat_map(|(row, &(p, r))| (p - 1..p - 1 + r).map(move |i| (row * t + i) as u32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Family;
    use candle_nn::VarMap;

    pub(crate) fn tiny_config(family: Family, head: HeadKind) -> ModelConfig {
        ModelConfig {
            family,
            head,
            architecture: "test".into(),
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            qkv_bias: family == Family::Qwen2,
            o_bias: false,
            mlp_bias: false,
            qk_norm: family == Family::Qwen3,
            tie_word_embeddings: family == Family::Qwen2,
            sliding_window: (family == Family::Mistral).then_some(5),
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
            dtype: None,
        }
    }

    fn seqs() -> Vec<(Vec<u32>, Vec<u32>)> {
        vec![(vec![1, 5, 7, 9], vec![3, 4, 2]), (vec![1, 8], vec![11, 12, 13, 14, 15, 16, 2]), (vec![1, 20, 21, 22, 23, 24, 25], vec![2])]
    }

    fn batch_of(pairs: &[(Vec<u32>, Vec<u32>)]) -> (PaddedBatch, Vec<(usize, usize)>) {
        let full: Vec<Vec<u32>> = pairs.iter().map(|(p, r)| [p.as_slice(), r].concat()).collect();
        let split = pairs.iter().map(|(p, r)| (p.len(), r.len())).collect();
        (PaddedBatch::right_padded(&full, 0, &Device::Cpu).unwrap(), split)
    }

    /// Every trainable tensor — embeddings, every projection and bias, every norm
    /// (incl. Qwen3's q_norm/k_norm), the LM or score head — must receive a
    /// non-zero gradient: fused kernels would silently train only a few (DESIGN §10).
    #[test]
    fn backward_reaches_every_weight() {
        for family in Family::ALL {
            for head in [HeadKind::CausalLm, HeadKind::SequenceClassification { num_labels: 1 }] {
                let cfg = tiny_config(family, head);
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
                let model = Decoder::new(&cfg, vb).unwrap();
                let (batch, split) = batch_of(&seqs());
                let loss = match head {
                    HeadKind::CausalLm => model.sequence_logps(&batch, &split).unwrap().sum_all().unwrap(),
                    _ => model.last_token_scores(&batch).unwrap().sum_all().unwrap(),
                };
                let grads = loss.backward().unwrap();
                let data = varmap.data().lock().unwrap();
                let mut names: Vec<_> = data.keys().cloned().collect();
                names.sort();
                let expected = 1
                    + 9 * cfg.num_hidden_layers
                    + usize::from(cfg.qkv_bias) * 3 * cfg.num_hidden_layers
                    + usize::from(cfg.qk_norm) * 2 * cfg.num_hidden_layers
                    + 1
                    + usize::from(!cfg.tie_word_embeddings || head != HeadKind::CausalLm);
                assert_eq!(names.len(), expected, "{family:?} {head:?}: {names:?}");
                for name in &names {
                    let g = grads.get(data[name].as_tensor()).unwrap_or_else(|| panic!("{family:?} {head:?}: no gradient for {name}"));
                    let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(norm > 0.0 && norm.is_finite(), "{family:?} {head:?}: gradient of {name} is {norm}");
                }
            }
        }
    }

    /// Right-padded batched results equal one-at-a-time results.
    #[test]
    fn batched_equals_unbatched() {
        for family in Family::ALL {
            let cfg = tiny_config(family, HeadKind::CausalLm);
            let varmap = VarMap::new();
            let model = Decoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
            let pairs = seqs();
            let (batch, split) = batch_of(&pairs);
            let together = model.sequence_logps(&batch, &split).unwrap().to_vec1::<f32>().unwrap();
            for (i, pair) in pairs.iter().enumerate() {
                let (b1, s1) = batch_of(std::slice::from_ref(pair));
                let alone = model.sequence_logps(&b1, &s1).unwrap().to_vec1::<f32>().unwrap()[0];
                assert!((alone - together[i]).abs() <= 1e-5 * alone.abs().max(1.0), "{family:?} {i}: {alone} vs {}", together[i]);
            }
        }
    }

    /// Prefill + one-token-at-a-time decoding with the cache reproduces the full
    /// forward, with the prompts left-padded as generation does.
    #[test]
    fn kv_cache_matches_full_forward() {
        for family in Family::ALL {
            let cfg = tiny_config(family, HeadKind::CausalLm);
            let varmap = VarMap::new();
            let model = Decoder::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
            let full: Vec<Vec<u32>> = vec![(1..12).collect(), (20..29).collect()];
            let unpadded: Vec<Vec<f32>> = full
                .iter()
                .map(|s| {
                    let b = PaddedBatch::right_padded(std::slice::from_ref(s), 0, &Device::Cpu).unwrap();
                    let h = model.hidden(&b).unwrap();
                    h.get(0).unwrap().get(s.len() - 1).unwrap().to_vec1::<f32>().unwrap()
                })
                .collect();
            // Prompts of 6 and 4 tokens, left-padded to 6; then decode the rest.
            let prompt_lens = [6usize, 4];
            let mut ids = vec![];
            let mut q_pos = vec![];
            for (s, &l) in full.iter().zip(&prompt_lens) {
                let pad = 6 - l;
                ids.extend(std::iter::repeat_n(0u32, pad).chain(s[..l].iter().copied()));
                q_pos.extend((0..6).map(|i| (i >= pad).then(|| (i - pad) as u32)));
            }
            let mut cache = KvCache::new(cfg.num_hidden_layers);
            let input = Tensor::from_vec(ids, (2, 6), &Device::Cpu).unwrap();
            model.body().forward(&input, &q_pos, Some(&mut cache)).unwrap();
            let mut next = prompt_lens;
            let mut last = vec![vec![]; 2];
            // Row 0 needs 5 more tokens, row 1 needs 5 more: step both together.
            for _ in 0..5 {
                let ids: Vec<u32> = (0..2).map(|r| full[r][next[r]]).collect();
                let q_pos: Vec<Option<u32>> = (0..2).map(|r| Some(next[r] as u32)).collect();
                let input = Tensor::from_vec(ids, (2, 1), &Device::Cpu).unwrap();
                let h = model.body().forward(&input, &q_pos, Some(&mut cache)).unwrap();
                for r in 0..2 {
                    last[r] = h.get(r).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
                    next[r] += 1;
                }
            }
            for r in 0..2 {
                for (a, b) in unpadded[r].iter().zip(&last[r]) {
                    assert!((a - b).abs() < 1e-4, "{family:?} row {r}: {a} vs {b}");
                }
            }
            // Dropping a row keeps the other's cache intact.
            cache.retain_rows(&[1]).unwrap();
            assert_eq!(cache.len(), 11);
        }
    }

    #[test]
    fn mask_respects_padding_causality_and_window() {
        let q: Vec<Option<u32>> = vec![None, Some(0), Some(1), Some(2)];
        let m = attention_mask(&[&q], std::slice::from_ref(&q), Some(2), &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.reshape((4, 4)).unwrap().to_vec2().unwrap();
        let seen = |r: usize| -> Vec<usize> { (0..4).filter(|&c| m[r][c] == 0.0).collect() };
        assert_eq!(seen(0), vec![0]); // a pad sees only itself
        assert_eq!(seen(1), vec![1]);
        assert_eq!(seen(2), vec![1, 2]);
        assert_eq!(seen(3), vec![2, 3]); // window 2 drops position 0
    }
}
