//! The training objectives of DESIGN §8, in f64 on per-sequence log-probs.
//!
//! Each function returns the batch loss and ∂loss/∂sθ for every sequence it
//! was given. The trainer backpropagates through the policy with the
//! surrogate Σᵢ (∂loss/∂sθᵢ)·sθᵢ, whose gradient with respect to the weights
//! is exactly the loss's (chain rule), so the loss itself stays plain,
//! testable f64 arithmetic and LiPO's "no gradient through Δ" holds by
//! construction.
//!
//! - DPO: Rafailov et al. 2023, "Direct Preference Optimization".
//! - LiPO-λ: Liu et al. 2024, "LiPO: Listwise Preference Optimization through
//!   Learning-to-Rank" (the LambdaRank weights of §3.3).

/// log σ(x), without overflow for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// σ(x).
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Batch statistics for the `metrics` table (DESIGN §6).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Preference pairs compared (DPO: pairs; LiPO: labelled pairs ψᵢ > ψⱼ).
    pub pairs: f64,
    /// Pairs whose implicit reward orders them right; a tie counts ½.
    pub correct: f64,
    /// Σ implicit-reward margins β·[(sθ⁺ − s_ref⁺) − (sθ⁻ − s_ref⁻)] (LiPO: best − worst per list).
    pub margin: f64,
    /// Items the margin and log-prob sums run over (DPO: pairs; LiPO: lists).
    pub items: f64,
    /// Σ sθ of the chosen (LiPO: best-labelled) responses.
    pub chosen_logp: f64,
    /// Σ sθ of the rejected (LiPO: worst-labelled) responses.
    pub rejected_logp: f64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.pairs += o.pairs;
        self.correct += o.correct;
        self.margin += o.margin;
        self.items += o.items;
        self.chosen_logp += o.chosen_logp;
        self.rejected_logp += o.rejected_logp;
    }
    /// Share of pairs ordered right (ties ½).
    pub fn accuracy(&self) -> f64 {
        if self.pairs > 0.0 {
            self.correct / self.pairs
        } else {
            f64::NAN
        }
    }
    fn mean(&self, x: f64) -> f64 {
        if self.items > 0.0 {
            x / self.items
        } else {
            f64::NAN
        }
    }
    pub fn mean_margin(&self) -> f64 {
        self.mean(self.margin)
    }
    pub fn mean_chosen_logp(&self) -> f64 {
        self.mean(self.chosen_logp)
    }
    pub fn mean_rejected_logp(&self) -> f64 {
        self.mean(self.rejected_logp)
    }
}

/// A batch loss with the gradient with respect to each policy log-prob.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossOut {
    /// The batch loss (a mean over pairs or lists).
    pub loss: f64,
    /// ∂loss/∂sθ, one per sequence, in the order the sequences were given.
    pub grad: Vec<f64>,
    pub stats: Stats,
}

fn correct(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x == 0.0 {
        0.5
    } else {
        0.0
    }
}

/// DPO over a batch of n pairs. `policy` and `reference` hold 2n log-probs,
/// chosen then rejected for each pair: `[c₀, r₀, c₁, r₁, …]`.
///
/// ℓ = −log σ(β·[(sθ(y⁺) − s_ref(y⁺)) − (sθ(y⁻) − s_ref(y⁻))]), batch loss = mean over pairs.
pub fn dpo(policy: &[f64], reference: &[f64], beta: f64) -> LossOut {
    assert_eq!(policy.len(), reference.len());
    assert!(policy.len().is_multiple_of(2), "DPO takes chosen/rejected pairs");
    let n = (policy.len() / 2) as f64;
    let mut out = LossOut { grad: vec![0.0; policy.len()], ..Default::default() };
    for (k, (p, r)) in policy.chunks(2).zip(reference.chunks(2)).enumerate() {
        let z = beta * ((p[0] - r[0]) - (p[1] - r[1]));
        out.loss -= log_sigmoid(z) / n;
        // ∂(−log σ(z))/∂z = −σ(−z); ∂z/∂sθ(y⁺) = β, ∂z/∂sθ(y⁻) = −β.
        let g = -sigmoid(-z) * beta / n;
        out.grad[2 * k] = g;
        out.grad[2 * k + 1] = -g;
        out.stats.add(&Stats { pairs: 1.0, correct: correct(z), margin: z, items: 1.0, chosen_logp: p[0], rejected_logp: p[1] });
    }
    out
}

/// One list for LiPO: log-probs of its k responses under policy and
/// reference, and their rewards (any scale; min-max normalised here).
#[derive(Debug, Clone, Copy)]
pub struct List<'a> {
    pub policy: &'a [f64],
    pub reference: &'a [f64],
    pub rewards: &'a [f64],
}

/// ψ: rewards min-max normalised to [0, 1] within the list; `None` when they
/// are all equal (such a list carries no preference and is skipped).
pub fn normalised_labels(rewards: &[f64]) -> Option<Vec<f64>> {
    let lo = rewards.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (hi > lo).then(|| rewards.iter().map(|r| (r - lo) / (hi - lo)).collect())
}

/// τ: 1-based rank of each item when sorting `scores` descending; ties keep
/// list order (a stable sort).
pub fn ranks(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut tau = vec![0; scores.len()];
    for (pos, &i) in order.iter().enumerate() {
        tau[i] = pos + 1;
    }
    tau
}

/// The LambdaRank weights of LiPO-λ for every labelled pair (i, j) with ψᵢ > ψⱼ:
/// Δᵢⱼ = |Gᵢ − Gⱼ|·|1/D(τᵢ) − 1/D(τⱼ)|, Gᵢ = 2^ψᵢ − 1, D(τ) = ln(1 + τ),
/// τ the rank of `scores` (DESIGN §8). Pairs come in (i, j) order.
pub fn lambda_weights(scores: &[f64], psi: &[f64]) -> Vec<(usize, usize, f64)> {
    let tau = ranks(scores);
    let gain: Vec<f64> = psi.iter().map(|p| p.exp2() - 1.0).collect();
    let inv_d: Vec<f64> = tau.iter().map(|&t| 1.0 / (1.0 + t as f64).ln()).collect();
    let mut out = Vec::new();
    for i in 0..psi.len() {
        for j in 0..psi.len() {
            if psi[i] > psi[j] {
                out.push((i, j, (gain[i] - gain[j]).abs() * (inv_d[i] - inv_d[j]).abs()));
            }
        }
    }
    out
}

/// LiPO-λ over a batch of lists: sᵢ = β·(sθ(yᵢ) − s_ref(yᵢ)),
/// ℓ = Σ_{ψᵢ > ψⱼ} −Δᵢⱼ·log σ(sᵢ − sⱼ), batch loss = mean over the lists that
/// have a preference (lists whose rewards are all equal are skipped).
/// `grad` follows the concatenation of the lists' sequences.
pub fn lipo(lists: &[List], beta: f64) -> LossOut {
    let total: usize = lists.iter().map(|l| l.policy.len()).sum();
    let mut out = LossOut { grad: vec![0.0; total], ..Default::default() };
    let counted: Vec<Option<Vec<f64>>> = lists.iter().map(|l| normalised_labels(l.rewards)).collect();
    let n = counted.iter().filter(|p| p.is_some()).count() as f64;
    let mut at = 0;
    for (l, psi) in lists.iter().zip(&counted) {
        let k = l.policy.len();
        assert!(l.reference.len() == k && l.rewards.len() == k, "a list's log-probs and rewards must align");
        let Some(psi) = psi else {
            at += k;
            continue;
        };
        let s: Vec<f64> = (0..k).map(|i| beta * (l.policy[i] - l.reference[i])).collect();
        for (i, j, delta) in lambda_weights(&s, psi) {
            let d = s[i] - s[j];
            out.loss -= delta * log_sigmoid(d) / n;
            // ∂(−Δ·log σ(d))/∂d = −Δ·σ(−d); ∂d/∂sθᵢ = β, ∂d/∂sθⱼ = −β.
            let g = -delta * sigmoid(-d) * beta / n;
            out.grad[at + i] += g;
            out.grad[at + j] -= g;
            out.stats.pairs += 1.0;
            out.stats.correct += correct(d);
        }
        // The best- and worst-labelled items (first of each on ties) stand for chosen/rejected.
        let best = (0..k).find(|&i| psi[i] == 1.0).expect("ψ reaches 1");
        let worst = (0..k).find(|&i| psi[i] == 0.0).expect("ψ reaches 0");
        out.stats.items += 1.0;
        out.stats.margin += s[best] - s[worst];
        out.stats.chosen_logp += l.policy[best];
        out.stats.rejected_logp += l.policy[worst];
        at += k;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    /// Central differences of `f` at `x`.
    fn numeric_grad(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
        let h = 1e-6;
        (0..x.len())
            .map(|i| {
                let mut a = x.to_vec();
                let mut b = x.to_vec();
                a[i] += h;
                b[i] -= h;
                (f(&a) - f(&b)) / (2.0 * h)
            })
            .collect()
    }

    #[test]
    fn log_sigmoid_is_stable() {
        assert!(close(log_sigmoid(0.0), -std::f64::consts::LN_2, 1e-15));
        assert_eq!(log_sigmoid(1000.0), 0.0);
        assert!(close(log_sigmoid(-1000.0), -1000.0, 1e-15));
        assert!(close(sigmoid(3.0) + sigmoid(-3.0), 1.0, 1e-15));
    }

    /// DPO by hand: β = 0.5, margins (−1 − −3) − (−2 − −2) = 2 → z = 1,
    /// ℓ = −log σ(1) = ln(1 + e⁻¹) = 0.31326168751822286.
    #[test]
    fn dpo_by_hand_and_gradient() {
        let out = dpo(&[-1.0, -2.0], &[-3.0, -2.0], 0.5);
        assert!(close(out.loss, (1.0 + (-1.0f64).exp()).ln(), 1e-15));
        assert!(close(out.loss, 0.31326168751822286, 1e-15));
        assert_eq!(out.stats.correct, 1.0);
        assert!(close(out.stats.margin, 1.0, 1e-15));
        let policy = [-1.0, -2.0, -4.0, -1.5, -2.0, -2.0];
        let reference = [-1.2, -1.9, -3.0, -1.0, -2.0, -2.0];
        let out = dpo(&policy, &reference, 0.3);
        let num = numeric_grad(|p| dpo(p, &reference, 0.3).loss, &policy);
        for (a, b) in out.grad.iter().zip(&num) {
            assert!(close(*a, *b, 1e-7), "{a} vs {b}");
        }
        // The third pair has margin 0: a tie counts ½ (pair 2 is wrong: z < 0).
        assert_eq!(out.stats.correct, 1.5);
    }

    /// k = 2 reduces to a weighted DPO term: Δ = |G₁ − G₀|·|1/D(1) − 1/D(2)| =
    /// 1·|1/ln 2 − 1/ln 3| = 0.53245581… (DESIGN §8 with ψ = (1, 0)).
    #[test]
    fn lipo_with_two_items_is_weighted_dpo() {
        let delta = 1.0 / 2f64.ln() - 1.0 / 3f64.ln();
        assert!(close(delta, 0.5324558142621261, 1e-15));
        for (pol, refr) in [([-1.0, -2.0], [-3.0, -2.0]), ([-5.0, -1.0], [-4.0, -1.5])] {
            let lipo = lipo(&[List { policy: &pol, reference: &refr, rewards: &[2.5, -1.0] }], 0.7);
            let d = dpo(&pol, &refr, 0.7);
            assert!(close(lipo.loss, delta * d.loss, 1e-14), "{} vs {}", lipo.loss, delta * d.loss);
            for (a, b) in lipo.grad.iter().zip(&d.grad) {
                assert!(close(*a, delta * b, 1e-14));
            }
        }
    }

    /// A hand-computed list of three with a tie in the labels: rewards (1, 1, 0)
    /// → ψ = (1, 1, 0); the tied pair (0, 1) gives no term. s = β(sθ − s_ref) =
    /// (0.2, 0.6, −0.4) → τ = (2, 1, 3). G = (1, 1, 0).
    /// Δ₀₂ = |1/ln 3 − 1/ln 4| = 0.18877…, Δ₁₂ = |1/ln 2 − 1/ln 4| = 0.72134…
    #[test]
    fn lipo_by_hand_with_tied_labels() {
        let beta = 0.2;
        let pol = [1.0, 3.0, -2.0];
        let refr = [0.0, 0.0, 0.0];
        let w = lambda_weights(&[0.2, 0.6, -0.4], &[1.0, 1.0, 0.0]);
        let d02 = 1.0 / 3f64.ln() - 1.0 / 4f64.ln();
        let d12 = 1.0 / 2f64.ln() - 1.0 / 4f64.ln();
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].0, w[0].1), (0, 2));
        assert_eq!((w[1].0, w[1].1), (1, 2));
        assert!(close(w[0].2, d02, 1e-15) && close(w[1].2, d12, 1e-15));
        let out = lipo(&[List { policy: &pol, reference: &refr, rewards: &[1.0, 1.0, 0.0] }], beta);
        let expected = -d02 * log_sigmoid(0.2 - -0.4) - d12 * log_sigmoid(0.6 - -0.4);
        assert!(close(out.loss, expected, 1e-15));
        assert_eq!(out.stats.pairs, 2.0);
        // Gradient by central differences (Δ held fixed: ranks do not change nearby).
        let num = numeric_grad(|p| lipo(&[List { policy: p, reference: &refr, rewards: &[1.0, 1.0, 0.0] }], beta).loss, &pol);
        for (a, b) in out.grad.iter().zip(&num) {
            assert!(close(*a, *b, 1e-7), "{a} vs {b}");
        }
    }

    #[test]
    fn all_equal_lists_are_skipped_and_ranks_are_stable() {
        assert_eq!(normalised_labels(&[3.0, 3.0, 3.0]), None);
        assert_eq!(normalised_labels(&[1.0, 3.0, 2.0]), Some(vec![0.0, 1.0, 0.5]));
        assert_eq!(ranks(&[0.5, 0.9, 0.5, -1.0]), vec![2, 1, 3, 4]);
        let a = [-1.0, -2.0];
        let flat = [-1.0, -1.0];
        // The skipped list does not count in the mean: the loss equals the other list's.
        let both = lipo(
            &[List { policy: &a, reference: &flat, rewards: &[1.0, 1.0] }, List { policy: &a, reference: &flat, rewards: &[1.0, 0.0] }],
            1.0,
        );
        let one = lipo(&[List { policy: &a, reference: &flat, rewards: &[1.0, 0.0] }], 1.0);
        assert!(close(both.loss, one.loss, 1e-15));
        assert_eq!(&both.grad[..2], &[0.0, 0.0]);
        assert_eq!(both.stats.items, 1.0);
    }
}
