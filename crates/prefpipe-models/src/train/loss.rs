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
//! - SLiC (hinge): Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
//!   with Human Feedback".
//! - IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand
//!   Learning from Human Preferences".
//! - Robust DPO: Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language
//!   Models with Noisy Feedback".
//! - DPO + NLL: Pang et al. 2024, "Iterative Reasoning Preference Optimization"
//!   (TRL's `sft` loss term, formerly `rpo_alpha`).
//! - ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
//!   Reference Model".
//! - SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a
//!   Reference-Free Reward".
//!
//! The variants after DPO and LiPO follow TRL 1.16 line for line (each cites
//! the function); their goldens come from TRL itself
//! (tests/reference/objectives_golden.py).

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
    /// Pairs whose implicit reward orders them right; a tie counts 0, as in TRL.
    pub correct: f64,
    /// Σ implicit-reward margins β·[(sθ⁺ − s_ref⁺) − (sθ⁻ − s_ref⁻)] (LiPO: best − worst per list).
    pub margin: f64,
    /// Items the margin and log-prob sums run over (DPO: pairs; LiPO: lists).
    pub items: f64,
    /// Σ sθ of the chosen (LiPO: best-labelled) responses.
    pub chosen_logp: f64,
    /// Σ sθ of the rejected (LiPO: worst-labelled) responses.
    pub rejected_logp: f64,
    /// Σ of the negative log-probs the NLL term runs over (DPO + NLL: the
    /// chosen response tokens; ORPO: the prompt ⊕ chosen tokens after the first).
    pub nll_sum: f64,
    /// How many tokens `nll_sum` covers (0: no NLL term).
    pub nll_tokens: f64,
}

impl Stats {
    /// One pair's statistics: its implicit-reward margin and policy log-probs.
    fn pair(margin: f64, chosen_logp: f64, rejected_logp: f64) -> Stats {
        Stats { pairs: 1.0, correct: correct(margin), margin, items: 1.0, chosen_logp, rejected_logp, ..Default::default() }
    }

    pub fn add(&mut self, o: &Stats) {
        self.pairs += o.pairs;
        self.correct += o.correct;
        self.margin += o.margin;
        self.items += o.items;
        self.chosen_logp += o.chosen_logp;
        self.rejected_logp += o.rejected_logp;
        self.nll_sum += o.nll_sum;
        self.nll_tokens += o.nll_tokens;
    }
    /// The token-mean NLL; NaN when the objective has no NLL term.
    pub fn nll(&self) -> f64 {
        if self.nll_tokens > 0.0 {
            self.nll_sum / self.nll_tokens
        } else {
            f64::NAN
        }
    }
    /// Share of pairs ordered right (ties 0, as TRL's `rewards/accuracies`).
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

/// TRL's `(chosen_rewards > rejected_rewards).float()`: a tie counts 0.
fn correct(x: f64) -> f64 {
    if x > 0.0 {
        1.0
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
    let pairs: Vec<PairLogps> = policy
        .chunks(2)
        .zip(reference.chunks(2))
        .map(|(p, r)| PairLogps { chosen: p[0], rejected: p[1], ref_chosen: r[0], ref_rejected: r[1], chosen_len: 1.0, rejected_len: 1.0 })
        .collect();
    dpo_objective(&pairs, DpoLoss::Sigmoid, beta, 0.0, 0.0)
}

/// The per-pair loss of `method: dpo` (TRL's `DPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// −log σ(β·h) (DPO).
    #[default]
    Sigmoid,
    /// relu(1 − β·h) (SLiC).
    Hinge,
    /// (δ − 1/(2β))², δ from each side's log-ratio over its token count (IPO).
    Ipo,
    /// [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε) (robust DPO).
    Robust,
}

/// One preference pair's policy and reference log-probs, with response token counts (EOS included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_len: f64,
    pub rejected_len: f64,
}

/// `method: dpo` with every TRL 1.16 option this engine offers, over n pairs.
/// `grad` holds ∂loss/∂sθ as `[c₀, r₀, c₁, r₁, …]`.
///
/// TRL: `trl/trainer/dpo_trainer.py`, `DPOTrainer._compute_loss`, the branches
/// `loss_type == "sigmoid"`, `"hinge"`, `"ipo"` (log-ratios divided by
/// `completion_mask.sum(dim=1)`), `"robust"` (`(clean − flipped) / (1 − 2ε)`),
/// each `per_sequence_loss.mean()`; and `"sft"` (`-chosen_per_token_logps[chosen_mask].mean()`,
/// the mean over every chosen completion token of the batch), weighted by
/// `loss_weights` = `nll_weight` (`loss_type: [<loss>, "sft"]`, `loss_weights: [1, α]`).
pub fn dpo_objective(pairs: &[PairLogps], kind: DpoLoss, beta: f64, label_smoothing: f64, nll_weight: f64) -> LossOut {
    let n = pairs.len() as f64;
    let mut out = LossOut { grad: vec![0.0; 2 * pairs.len()], ..Default::default() };
    let chosen_tokens: f64 = pairs.iter().map(|p| p.chosen_len).sum();
    let eps = label_smoothing;
    for (k, p) in pairs.iter().enumerate() {
        let (lc, lr) = (p.chosen - p.ref_chosen, p.rejected - p.ref_rejected);
        let h = lc - lr;
        let z = beta * h;
        // (loss, ∂loss/∂sθ(y⁺), ∂loss/∂sθ(y⁻)) of this pair before the 1/n mean.
        let (l, gc, gr) = match kind {
            DpoLoss::Sigmoid => {
                let g = -sigmoid(-z) * beta;
                (-log_sigmoid(z), g, -g)
            }
            DpoLoss::Hinge => {
                // torch.relu's gradient is 0 at 0.
                let g = if 1.0 - z > 0.0 { -beta } else { 0.0 };
                ((1.0 - z).max(0.0), g, -g)
            }
            DpoLoss::Ipo => {
                let d = lc / p.chosen_len.max(1.0) - lr / p.rejected_len.max(1.0) - 1.0 / (2.0 * beta);
                (d * d, 2.0 * d / p.chosen_len.max(1.0), -2.0 * d / p.rejected_len.max(1.0))
            }
            DpoLoss::Robust => {
                let l = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps);
                // ∂/∂z: −(1−ε)σ(−z) − εσ(z), over (1 − 2ε).
                let g = (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)) / (1.0 - 2.0 * eps) * beta;
                (l, g, -g)
            }
        };
        out.loss += l / n;
        out.grad[2 * k] = gc / n;
        out.grad[2 * k + 1] = gr / n;
        out.stats.add(&Stats::pair(z, p.chosen, p.rejected));
    }
    if nll_weight > 0.0 {
        let nll_sum: f64 = -pairs.iter().map(|p| p.chosen).sum::<f64>();
        out.loss += nll_weight * nll_sum / chosen_tokens;
        for k in 0..pairs.len() {
            out.grad[2 * k] -= nll_weight / chosen_tokens;
        }
        out.stats.nll_sum = nll_sum;
        out.stats.nll_tokens = chosen_tokens;
    }
    out
}

/// log(1 − eˣ) for x ≤ 0, as TRL's `log1mexp` (branch at −ln 2).
pub fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// One pair for the reference-free objectives: summed response log-probs and
/// token counts (EOS included); ORPO also takes the summed log-prob of the
/// whole prompt ⊕ chosen sequence (every token after the first) and its count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreePair {
    pub chosen: f64,
    pub rejected: f64,
    pub chosen_len: f64,
    pub rejected_len: f64,
    pub chosen_full: f64,
    pub chosen_full_len: f64,
}

/// ORPO over n pairs: NLL of the prompt ⊕ chosen tokens (token mean over the
/// batch) − λ·mean log σ(log-odds), log-odds = (ā⁺ − ā⁻) − (log(1 − e^ā⁺) − log(1 − e^ā⁻)),
/// ā the length-averaged response log-probs. `grad` is `[c₀, r₀, c₁, r₁, …]`
/// followed by ∂loss/∂(chosen_full) of each pair.
///
/// TRL: `trl/experimental/orpo/orpo_trainer.py`, `ORPOTrainer.odds_ratio_loss`
/// (λ is `ORPOConfig.beta`), `concatenated_forward` (`chosen_nll_loss =
/// cross_entropy_loss(all_logits[:len_chosen], labels[:len_chosen])` over the
/// full sequence, `get_batch_logps(average_log_prob=True)`) and
/// `get_batch_loss_metrics` (`loss = policy_nll_loss - losses.mean()`).
/// The rewards TRL logs, λ·ā, give the margin and accuracy.
pub fn orpo(pairs: &[FreePair], lambda: f64) -> LossOut {
    let n = pairs.len() as f64;
    let m = pairs.len();
    let mut out = LossOut { grad: vec![0.0; 3 * m], ..Default::default() };
    let tokens: f64 = pairs.iter().map(|p| p.chosen_full_len).sum();
    let nll_sum: f64 = -pairs.iter().map(|p| p.chosen_full).sum::<f64>();
    out.loss = nll_sum / tokens;
    for (k, p) in pairs.iter().enumerate() {
        let (ac, ar) = (p.chosen / p.chosen_len, p.rejected / p.rejected_len);
        let log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
        out.loss -= lambda * log_sigmoid(log_odds) / n;
        // ∂(−λ log σ(o))/∂o = −λσ(−o); ∂o/∂ā = 1/(1 − e^ā) (chosen), −1/(1 − e^ā) (rejected).
        let g = -lambda * sigmoid(-log_odds) / n;
        out.grad[2 * k] = g / (-ac.exp_m1()) / p.chosen_len;
        out.grad[2 * k + 1] = -g / (-ar.exp_m1()) / p.rejected_len;
        out.grad[2 * m + k] = -1.0 / tokens;
        let margin = lambda * (ac - ar);
        out.stats.add(&Stats::pair(margin, p.chosen, p.rejected));
    }
    out.stats.nll_sum = nll_sum;
    out.stats.nll_tokens = tokens;
    out
}

/// SimPO over n pairs: −log σ(β(ā⁺ − ā⁻) − γ), ā the length-averaged response
/// log-probs; mean over pairs. `grad` is `[c₀, r₀, c₁, r₁, …]`.
///
/// TRL: `trl/experimental/cpo/cpo_trainer.py`, `CPOTrainer.cpo_loss` with
/// `loss_type == "simpo"` (`logits = (ā⁺ − ā⁻) − simpo_gamma / beta`, then
/// `-F.logsigmoid(beta * logits)` with `label_smoothing` 0), `cpo_alpha: 0`
/// (no NLL term) and `get_batch_logps(average_log_prob=True)`. The rewards TRL
/// logs, β·ā, give the margin and accuracy.
pub fn simpo(pairs: &[FreePair], beta: f64, gamma: f64) -> LossOut {
    let n = pairs.len() as f64;
    let mut out = LossOut { grad: vec![0.0; 2 * pairs.len()], ..Default::default() };
    for (k, p) in pairs.iter().enumerate() {
        let (ac, ar) = (p.chosen / p.chosen_len, p.rejected / p.rejected_len);
        let z = beta * ((ac - ar) - gamma / beta);
        out.loss -= log_sigmoid(z) / n;
        let g = -sigmoid(-z) * beta / n;
        out.grad[2 * k] = g / p.chosen_len;
        out.grad[2 * k + 1] = -g / p.rejected_len;
        let margin = beta * (ac - ar);
        out.stats.add(&Stats::pair(margin, p.chosen, p.rejected));
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
/// are all equal (such a list carries no preference and is skipped) or one
/// is not finite (no label for it). The best item gets exactly 1 and the
/// worst exactly 0. When hi − lo overflows (rewards near ±f64::MAX), every
/// reward is halved first — exact in binary — so ψ stays finite.
pub fn normalised_labels(rewards: &[f64]) -> Option<Vec<f64>> {
    if rewards.iter().any(|r| !r.is_finite()) {
        return None;
    }
    let lo = rewards.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // All finite here, so `<=` is the negation of `>`.
    if hi <= lo {
        return None;
    }
    let s = if (hi - lo).is_finite() { 1.0 } else { 0.5 };
    let (lo, hi) = (lo * s, hi * s);
    Some(rewards.iter().map(|r| (r * s - lo) / (hi - lo)).collect())
}

/// The order of ranks and ties: numeric, −0.0 = +0.0, NaN last — the same
/// as `prefpipe_select::corpus::cmp_f64` (this crate does not depend on it;
/// a test checks they agree).
fn cmp_f64(a: f64, b: f64) -> std::cmp::Ordering {
    a.partial_cmp(&b).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

/// τ: 1-based rank of each item when sorting `scores` descending; ties
/// (−0.0 = +0.0 included) keep list order (a stable sort).
pub fn ranks(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| cmp_f64(scores[b], scores[a]));
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
        // The third pair has margin 0: a tie counts 0, as TRL's
        // `(chosen_rewards > rejected_rewards).float()` (pair 2 is wrong: z < 0).
        assert_eq!(out.stats.correct, 1.0);
        assert_eq!(out.stats.accuracy(), 1.0 / 3.0);
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
    fn signed_zero_scores_tie_in_tau() {
        // −0.0 = +0.0 (IEEE 754), so s = (−0.0, 0.0) is a tie and the stable sort keeps list
        // order: τ = (1, 2). `total_cmp` ranked +0.0 above −0.0 by its sign bit: τ = (2, 1).
        assert_eq!(ranks(&[-0.0, 0.0]), vec![1, 2]);
        assert_eq!(ranks(&[0.0, -0.0, 1.0]), vec![2, 3, 1]);
        // The same order as every other ranking of prefpipe.
        let v = [1.0, -0.0, 0.0, -1.0, f64::NAN, f64::INFINITY, 0.5];
        for &a in &v {
            for &b in &v {
                assert_eq!(cmp_f64(a, b), prefpipe_select::corpus::cmp_f64(a, b), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn huge_rewards_normalise_without_overflow() {
        // hi − lo = 1e308 − (−1e308) = ∞ in f64; halving first gives ψ = (1, 0.5, 0) exactly:
        // (r/2 − lo/2)/(hi/2 − lo/2) with hi/2 − lo/2 = 1e308.
        assert_eq!(normalised_labels(&[1e308, 0.0, -1e308]), Some(vec![1.0, 0.5, 0.0]));
        assert_eq!(normalised_labels(&[f64::MAX, -f64::MAX]), Some(vec![1.0, 0.0]));
        assert_eq!(normalised_labels(&[1.0, f64::INFINITY]), None);
        assert_eq!(normalised_labels(&[1.0, f64::NAN]), None);
        // LiPO on such a list does not panic: ψ = (1, 0), s = (0, 0) → τ = (1, 2), G = (1, 0),
        // Δ = |1/ln 2 − 1/ln 3|, ℓ = −Δ·log σ(0) = Δ·ln 2 (DESIGN §8).
        let out = lipo(&[List { policy: &[-1.0, -2.0], reference: &[-1.0, -2.0], rewards: &[1e308, -1e308] }], 0.1);
        let delta = 1.0 / 2f64.ln() - 1.0 / 3f64.ln();
        assert!(close(out.loss, delta * std::f64::consts::LN_2, 1e-15), "{}", out.loss);
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

    /// At step 1 the policy is the reference: every implicit-reward margin is
    /// exactly 0 and TRL logs `rewards/accuracies` = `(chosen_rewards >
    /// rejected_rewards).float().mean()` = 0 (DPOTrainer, CPOTrainer/SimPO,
    /// ORPOTrainer); ½ per tie reported 0.5. LiPO's labelled pairs likewise.
    #[test]
    fn ties_count_zero_as_in_trl() {
        let same = PairLogps { chosen: -3.0, rejected: -5.0, ref_chosen: -3.0, ref_rejected: -5.0, chosen_len: 3.0, rejected_len: 5.0 };
        for kind in [DpoLoss::Sigmoid, DpoLoss::Hinge, DpoLoss::Ipo, DpoLoss::Robust] {
            let eps = if kind == DpoLoss::Robust { 0.1 } else { 0.0 };
            let out = dpo_objective(&[same, same], kind, 0.1, eps, 0.0);
            assert_eq!((out.stats.pairs, out.stats.accuracy()), (2.0, 0.0), "{kind:?}");
        }
        assert_eq!(dpo(&[-1.0, -2.0], &[-1.0, -2.0], 0.1).stats.accuracy(), 0.0);
        // Equal length-averaged log-probs: −3/3 = −5/5.
        let free = FreePair { chosen: -3.0, rejected: -5.0, chosen_len: 3.0, rejected_len: 5.0, chosen_full: -4.0, chosen_full_len: 4.0 };
        assert_eq!(simpo(&[free], 2.0, 0.5).stats.accuracy(), 0.0);
        assert_eq!(orpo(&[free], 0.1).stats.accuracy(), 0.0);
        let lists = [List { policy: &[-1.0, -2.0, -3.0], reference: &[-1.0, -2.0, -3.0], rewards: &[3.0, 2.0, 1.0] }];
        let out = lipo(&lists, 0.1);
        assert_eq!((out.stats.pairs, out.stats.accuracy()), (3.0, 0.0));
    }

    fn pairs_from(x: &[f64]) -> Vec<PairLogps> {
        let refs = [(-2.0, -1.5, 4.0, 3.0), (-3.0, -4.0, 5.0, 2.0), (-1.0, -1.0, 1.0, 6.0)];
        x.chunks(2)
            .zip(refs)
            .map(|(p, (rc, rr, lc, lr))| PairLogps {
                chosen: p[0],
                rejected: p[1],
                ref_chosen: rc,
                ref_rejected: rr,
                chosen_len: lc,
                rejected_len: lr,
            })
            .collect()
    }

    /// Every DPO variant's gradient against central differences, and the
    /// losses by hand on one pair.
    #[test]
    fn dpo_variants_by_hand_and_gradient() {
        let x = [-1.0, -2.5, -2.0, -3.5, -1.2, -0.4];
        for kind in [DpoLoss::Sigmoid, DpoLoss::Hinge, DpoLoss::Ipo, DpoLoss::Robust] {
            for (eps, alpha) in [(0.0, 0.0), (0.2, 0.0), (0.0, 0.7)] {
                let eps = if kind == DpoLoss::Robust { eps } else { 0.0 };
                let out = dpo_objective(&pairs_from(&x), kind, 0.3, eps, alpha);
                let num = numeric_grad(|p| dpo_objective(&pairs_from(p), kind, 0.3, eps, alpha).loss, &x);
                for (a, b) in out.grad.iter().zip(&num) {
                    assert!(close(*a, *b, 1e-6), "{kind:?} ε={eps} α={alpha}: {a} vs {b}");
                }
            }
        }
        // One pair: h = (−1 − −2) − (−2.5 − −1.5) = 2, β = 0.25 → z = 0.5.
        let p = [PairLogps { chosen: -1.0, rejected: -2.5, ref_chosen: -2.0, ref_rejected: -1.5, chosen_len: 4.0, rejected_len: 2.0 }];
        let l = |k, e, a| dpo_objective(&p, k, 0.25, e, a).loss;
        assert!(close(l(DpoLoss::Sigmoid, 0.0, 0.0), (1.0 + (-0.5f64).exp()).ln(), 1e-15));
        assert!(close(l(DpoLoss::Hinge, 0.0, 0.0), 0.5, 1e-15));
        // IPO: δ = 1/4 − (−1)/2 = 0.75, target 1/(2β) = 2 → (0.75 − 2)² = 1.5625.
        assert!(close(l(DpoLoss::Ipo, 0.0, 0.0), 1.5625, 1e-15));
        let robust = (-(0.9) * log_sigmoid(0.5) + 0.1 * log_sigmoid(-0.5)) / 0.8;
        assert!(close(l(DpoLoss::Robust, 0.1, 0.0), robust, 1e-15));
        assert!(close(l(DpoLoss::Robust, 0.0, 0.0), l(DpoLoss::Sigmoid, 0.0, 0.0), 1e-15));
        // NLL: α × (−sθ(y⁺) / 4 tokens).
        assert!(close(l(DpoLoss::Sigmoid, 0.0, 2.0) - l(DpoLoss::Sigmoid, 0.0, 0.0), 2.0 * 0.25, 1e-15));
        let st = dpo_objective(&p, DpoLoss::Sigmoid, 0.25, 0.0, 2.0).stats;
        assert!(close(st.nll(), 0.25, 1e-15));
        assert!(dpo_objective(&p, DpoLoss::Sigmoid, 0.25, 0.0, 0.0).stats.nll().is_nan());
        // SLiC: no gradient once the margin clears 1.
        assert_eq!(dpo_objective(&p, DpoLoss::Hinge, 1.0, 0.0, 0.0).grad, vec![0.0, 0.0]);
    }

    fn free_from(x: &[f64]) -> Vec<FreePair> {
        let lens = [(4.0, 3.0, 9.0), (2.0, 5.0, 6.0)];
        (0..2)
            .map(|k| FreePair {
                chosen: x[2 * k],
                rejected: x[2 * k + 1],
                chosen_len: lens[k].0,
                rejected_len: lens[k].1,
                chosen_full: x[4 + k],
                chosen_full_len: lens[k].2,
            })
            .collect()
    }

    #[test]
    fn orpo_and_simpo_by_hand_and_gradient() {
        let x = [-3.0, -6.0, -1.5, -2.0, -10.0, -7.0];
        let o = orpo(&free_from(&x), 0.4);
        let num = numeric_grad(|p| orpo(&free_from(p), 0.4).loss, &x);
        for (a, b) in o.grad.iter().zip(&num) {
            assert!(close(*a, *b, 1e-6), "ORPO {a} vs {b}");
        }
        let s = simpo(&free_from(&x), 2.0, 0.5);
        let num = numeric_grad(|p| simpo(&free_from(&[p, &x[4..]].concat()), 2.0, 0.5).loss, &x[..4]);
        for (a, b) in s.grad.iter().zip(&num) {
            assert!(close(*a, *b, 1e-6), "SimPO {a} vs {b}");
        }
        // One pair by hand: ā⁺ = −0.75, ā⁻ = −2.
        let one = |full: f64| FreePair {
            chosen: -3.0,
            rejected: -6.0,
            chosen_len: 4.0,
            rejected_len: 3.0,
            chosen_full: full,
            chosen_full_len: 8.0,
        };
        let odds = (-0.75 - -2.0) - ((1.0 - (-0.75f64).exp()).ln() - (1.0 - (-2.0f64).exp()).ln());
        assert!(close(orpo(&[one(-12.0)], 0.4).loss, 1.5 - 0.4 * log_sigmoid(odds), 1e-14));
        assert!(close(orpo(&[one(-12.0)], 0.4).stats.nll(), 1.5, 1e-15));
        assert!(close(simpo(&[one(0.0)], 2.0, 0.5).loss, -log_sigmoid(2.0 * 1.25 - 0.5), 1e-15));
        assert!(close(log1mexp(-0.1), (1.0 - (-0.1f64).exp()).ln(), 1e-14));
        assert!(close(log1mexp(-5.0), (1.0 - (-5.0f64).exp()).ln(), 1e-14));
    }
}
