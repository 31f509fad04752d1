//! Sampling parameters, per-sequence seeded sampling, and the batched
//! KV-cached decoding loop behind [`crate::Model::generate`].
//!
//! Determinism: each sequence draws from its own ChaCha20 stream seeded with
//! its own `u64` seed (one draw per sampled token), and batch rows never see
//! each other (left padding + masks), so a sequence's output does not depend
//! on what else is in the batch, the batch size or the thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{invalid_input, Result};

/// How to pick each next token. Filters apply in transformers' order:
/// temperature, top-k, top-p, min-p.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` = greedy (argmax, first index on ties).
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose mass reaches `top_p` (1 = off).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f64,
    /// Upper bound on generated tokens (the stop token not counted).
    pub max_new_tokens: usize,
    /// Generation stops when the decoded text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, min_p: 0.0, max_new_tokens: 256, stop_strings: vec![] }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, max_new_tokens, ..Self::default() }
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(invalid_input("temperature", "a finite number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid_input("top_p", "a number in (0, 1]", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(invalid_input("min_p", "a number in [0, 1]", self.min_p));
        }
        if self.max_new_tokens == 0 {
            return Err(invalid_input("max_new_tokens", "at least 1", 0));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(invalid_input("stop_strings", "non-empty strings", "\"\""));
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` or the model's context was reached.
    Length,
}

impl FinishReason {
    /// The `finish_reason` column value (DESIGN §6).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated response.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids; the end-of-sequence token that stopped generation
    /// is not included. With a stop string, ids run up to the token that
    /// completed it.
    pub token_ids: Vec<u32>,
    /// `decode(token_ids, skip_special_tokens=true)`, cut before a matched stop string.
    pub text: String,
    /// `token_ids.len()`.
    pub n_tokens: usize,
    pub finish_reason: FinishReason,
}

/// A sequence's own random stream.
pub(crate) fn rng_for(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Picks the next token from one row of logits.
pub(crate) fn sample_token(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha20Rng) -> u32 {
    let value = |x: f32| {
        if x.is_nan() {
            f64::NEG_INFINITY
        } else {
            f64::from(x)
        }
    };
    if params.temperature == 0.0 {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if value(x) > value(logits[best]) {
                best = i;
            }
        }
        return best as u32;
    }
    let scaled: Vec<f64> = logits.iter().map(|&x| value(x) / params.temperature).collect();
    let mut keep = vec![true; scaled.len()];
    if params.top_k > 0 && params.top_k < scaled.len() {
        let mut sorted = scaled.clone();
        let (_, &mut kth, _) = sorted.select_nth_unstable_by(params.top_k - 1, |a, b| b.total_cmp(a));
        // Like transformers: every token tied with the k-th survives.
        keep.iter_mut().zip(&scaled).for_each(|(k, &x)| *k &= x >= kth);
    }
    let max = scaled.iter().zip(&keep).filter(|(_, &k)| k).map(|(&x, _)| x).fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<f64> = scaled.iter().zip(&keep).map(|(&x, &k)| if k { (x - max).exp() } else { 0.0 }).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        // The nucleus is usually a few tokens: sort only the top m, doubling m
        // until their mass reaches top_p, instead of sorting the whole vocabulary.
        let by_prob = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
        let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
        let mut m = 64.min(order.len());
        let cut = loop {
            if m < order.len() {
                order.select_nth_unstable_by(m - 1, by_prob);
            }
            order[..m].sort_unstable_by(by_prob);
            let mut cum = 0.0;
            let found = order[..m].iter().position(|&i| {
                cum += probs[i];
                cum >= params.top_p
            });
            match found {
                Some(n) => break n + 1,
                None if m == order.len() => break m,
                None => m = (2 * m).min(order.len()),
            }
        };
        for &i in &order[cut..] {
            probs[i] = 0.0;
        }
    }
    if params.min_p > 0.0 {
        let top = probs.iter().copied().fold(0.0, f64::max);
        probs.iter_mut().for_each(|p| {
            if *p < params.min_p * top {
                *p = 0.0
            }
        });
    }
    let total: f64 = probs.iter().sum();
    let u = rng.random::<f64>() * total;
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last = i;
            if u < cum {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Byte offset of the earliest stop string in `text`, if any.
pub(crate) fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(params: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut rng = rng_for(3);
        (0..n).map(|_| sample_token(logits, params, &mut rng)).collect()
    }

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(draws(&SamplingParams::greedy(1), &[0.0, 2.0, f32::NAN, 2.0], 1), vec![1]);
    }

    #[test]
    fn filters_restrict_the_support() {
        let logits = [3.0f32, 2.9, 2.8, -1.0, -2.0];
        let top_k = SamplingParams { top_k: 2, ..Default::default() };
        assert!(draws(&top_k, &logits, 200).iter().all(|&t| t < 2));
        // softmax ≈ (0.36, 0.33, 0.30, 0.007, 0.002): top_p 0.5 keeps two tokens.
        let top_p = SamplingParams { top_p: 0.5, ..Default::default() };
        assert!(draws(&top_p, &logits, 200).iter().all(|&t| t < 2));
        // min_p 0.1 drops tokens below 0.1 × 0.36.
        let min_p = SamplingParams { min_p: 0.1, ..Default::default() };
        let d = draws(&min_p, &logits, 500);
        assert!(d.iter().all(|&t| t < 3) && d.contains(&2));
        // A very low temperature is almost greedy.
        let cold = SamplingParams { temperature: 1e-3, ..Default::default() };
        assert!(draws(&cold, &logits, 50).iter().all(|&t| t == 0));
    }

    /// The partial-sort nucleus equals the full-sort definition.
    #[test]
    fn top_p_partial_sort_is_exact() {
        let mut rng = rng_for(9);
        for trial in 0..20 {
            let v = 50 + trial * 37;
            let logits: Vec<f32> = (0..v).map(|_| (rng.random::<f32>() - 0.5) * (trial as f32 + 1.0)).collect();
            let top_p = 0.3 + 0.035 * trial as f64;
            let probs: Vec<f64> = {
                let m = logits.iter().fold(f32::MIN, |a, &b| a.max(b));
                let e: Vec<f64> = logits.iter().map(|&x| f64::from(x - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|x| x / s).collect()
            };
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let mut cum = 0.0;
            let n = order
                .iter()
                .position(|&i| {
                    cum += probs[i];
                    cum >= top_p
                })
                .map_or(v, |n| n + 1);
            let nucleus: std::collections::BTreeSet<u32> = order[..n].iter().map(|&i| i as u32).collect();
            let params = SamplingParams { top_p, ..Default::default() };
            let mut r = rng_for(trial as u64);
            let drawn: std::collections::BTreeSet<u32> = (0..400).map(|_| sample_token(&logits, &params, &mut r)).collect();
            assert!(drawn.is_subset(&nucleus), "trial {trial}: {drawn:?} outside {nucleus:?}");
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams::default();
        assert_eq!(draws(&p, &logits, 100), draws(&p, &logits, 100));
        let mut other = rng_for(4);
        let d2: Vec<u32> = (0..100).map(|_| sample_token(&logits, &p, &mut other)).collect();
        assert_ne!(draws(&p, &logits, 100), d2);
    }

    #[test]
    fn bad_params_are_rejected() {
        for p in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { min_p: 1.5, ..Default::default() },
            SamplingParams { max_new_tokens: 0, ..Default::default() },
            SamplingParams { stop_strings: vec![String::new()], ..Default::default() },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
    }

    #[test]
    fn stop_strings_find_earliest() {
        assert_eq!(find_stop("abc\n\nUser: x", &["User:".into(), "\n\n".into()]), Some(3));
        assert_eq!(find_stop("abc", &["x".into()]), None);
    }
}
