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
    if params.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    let probs = filter_weights(logits, params);
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

/// A logit as f64, NaN as −∞ (never drawn).
fn value(x: f32) -> f64 {
    if x.is_nan() {
        f64::NEG_INFINITY
    } else {
        f64::from(x)
    }
}

/// The first index of the largest logit (NaN never wins).
fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if value(x) > value(logits[best]) {
            best = i;
        }
    }
    best
}

/// The distribution [`sample_token`] draws from: temperature, then top-k,
/// top-p and min-p as transformers' `TemperatureLogitsWarper`,
/// `TopKLogitsWarper`, `TopPLogitsWarper` and `MinPLogitsWarper` apply them
/// (in that order, `min_tokens_to_keep` = 1), then softmax; greedy is the
/// argmax's point mass. Tests compare it with transformers itself
/// (tests/golden/sampling).
pub fn filtered_probs(logits: &[f32], params: &SamplingParams) -> Vec<f64> {
    if params.temperature == 0.0 {
        let mut p = vec![0.0; logits.len()];
        if !p.is_empty() {
            p[argmax(logits)] = 1.0;
        }
        return p;
    }
    let mut p = filter_weights(logits, params);
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    p
}

/// Unnormalised [`filtered_probs`] (temperature > 0): the weights the draw
/// walks, kept as they are so draws stay bit-for-bit reproducible.
fn filter_weights(logits: &[f32], params: &SamplingParams) -> Vec<f64> {
    let scaled: Vec<f64> = logits.iter().map(|&x| value(x) / params.temperature).collect();
    let mut keep = vec![true; scaled.len()];
    if params.top_k > 0 && params.top_k < scaled.len() {
        let mut sorted = scaled.clone();
        let (_, &mut kth, _) = sorted.select_nth_unstable_by(params.top_k - 1, |a, b| b.total_cmp(a));
        // Like transformers (`scores < topk(scores)[-1]` are removed): every token tied with the k-th survives.
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
    probs
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

    /// The filtered distribution equals transformers' warpers on the same
    /// float32 logits (tests/golden/sampling/golden.json, written by
    /// tests/reference/sampling_golden.py with transformers 5.23 in float64):
    /// the same support and the same probabilities up to summation order.
    #[test]
    fn filtered_probs_match_transformers_warpers() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/sampling/golden.json");
        let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let rows: Vec<Vec<f32>> = g["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .collect();
        let cases = g["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 48);
        for c in cases {
            let params = SamplingParams {
                temperature: c["temperature"].as_f64().unwrap(),
                top_k: c["top_k"].as_u64().unwrap() as usize,
                top_p: c["top_p"].as_f64().unwrap(),
                min_p: c["min_p"].as_f64().unwrap(),
                ..Default::default()
            };
            let got = filtered_probs(&rows[c["row"].as_u64().unwrap() as usize], &params);
            let want: Vec<f64> = c["probs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(*a == 0.0, *b == 0.0, "row {} {params:?}: token {i} is {a} here, {b} in transformers", c["row"]);
                assert!((a - b).abs() <= 1e-12 * b.max(1e-300), "row {} {params:?}: token {i}: {a} vs transformers {b}", c["row"]);
            }
        }
    }

    /// The sampler draws from that distribution: 20,000 draws (seed 3) per
    /// case give each token's frequency within 5 binomial standard deviations
    /// √(p(1−p)/n) of its filtered probability, and never a filtered-out token.
    /// (An argmax sampler, or one that ignores a filter, fails: it puts
    /// frequency 1 on the top token, whose probability here is at most 0.53.)
    #[test]
    fn draws_follow_the_filtered_distribution() {
        let logits = [3.0f32, 2.9, 2.8, -1.0, -2.0, 1.5, 0.3];
        let n = 20_000;
        for params in [
            SamplingParams::default(),
            SamplingParams { top_k: 2, ..Default::default() },
            SamplingParams { top_k: 3, temperature: 0.5, ..Default::default() },
            SamplingParams { top_p: 0.5, ..Default::default() },
            SamplingParams { top_p: 0.9, temperature: 1.5, ..Default::default() },
            SamplingParams { min_p: 0.1, ..Default::default() },
            SamplingParams { top_k: 4, top_p: 0.8, min_p: 0.05, temperature: 0.8, ..Default::default() },
        ] {
            let p = filtered_probs(&logits, &params);
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(p.iter().copied().fold(0.0, f64::max) < 0.9, "{params:?}: a case that tells a sampler from argmax");
            let mut count = vec![0usize; logits.len()];
            for t in draws(&params, &logits, n) {
                count[t as usize] += 1;
            }
            for (i, (&c, &p)) in count.iter().zip(&p).enumerate() {
                let freq = c as f64 / n as f64;
                if p == 0.0 {
                    assert_eq!(c, 0, "{params:?}: token {i} is filtered out but drawn {c} times");
                } else {
                    let sd = (p * (1.0 - p) / n as f64).sqrt();
                    assert!((freq - p).abs() <= 5.0 * sd, "{params:?}: token {i}: frequency {freq} vs p = {p} (sd {sd})");
                }
            }
        }
    }

    /// The hand-computable cases: softmax(3, 2.9, 2.8, −1, −2) ≈ (0.364,
    /// 0.329, 0.298, 0.0067, 0.0025); top_k 2 or top_p 0.5 renormalise the
    /// first two: (e⁰, e^−0.1)/(1 + e^−0.1) = (0.52498, 0.47502); min_p 0.1
    /// drops tokens below 0.0364; a temperature near 0 is the argmax.
    #[test]
    fn filters_by_hand() {
        let logits = [3.0f32, 2.9, 2.8, -1.0, -2.0];
        let two = [1.0 / (1.0 + (-0.1f64).exp()), (-0.1f64).exp() / (1.0 + (-0.1f64).exp())];
        for params in [SamplingParams { top_k: 2, ..Default::default() }, SamplingParams { top_p: 0.5, ..Default::default() }] {
            let p = filtered_probs(&logits, &params);
            assert!((p[0] - two[0]).abs() < 1e-6 && (p[1] - two[1]).abs() < 1e-6 && p[2..].iter().all(|&x| x == 0.0), "{params:?}: {p:?}");
        }
        let p = filtered_probs(&logits, &SamplingParams { min_p: 0.1, ..Default::default() });
        assert!(p[..3].iter().all(|&x| x > 0.29) && p[3..].iter().all(|&x| x == 0.0), "{p:?}");
        assert_eq!(filtered_probs(&logits, &SamplingParams::greedy(1)), [1.0, 0.0, 0.0, 0.0, 0.0]);
        let cold = SamplingParams { temperature: 1e-3, ..Default::default() };
        assert!(filtered_probs(&logits, &cold)[0] > 1.0 - 1e-12);
    }

    /// The partial-sort nucleus is exactly the full-sort definition: the
    /// support of the filtered distribution, not merely a superset of draws.
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
            let nucleus: std::collections::BTreeSet<usize> = order[..n].iter().copied().collect();
            let params = SamplingParams { top_p, ..Default::default() };
            let p = filtered_probs(&logits, &params);
            let support: std::collections::BTreeSet<usize> = (0..v).filter(|&i| p[i] > 0.0).collect();
            assert_eq!(support, nucleus, "trial {trial}");
            let mass: f64 = nucleus.iter().map(|&i| probs[i]).sum();
            for &i in &nucleus {
                assert!((p[i] - probs[i] / mass).abs() < 1e-12, "trial {trial}: token {i}");
            }
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
