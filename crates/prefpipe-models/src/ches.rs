//! CHES and length-normalised CHES scores (Razin et al. 2025, "Unintentional
//! Unalignment: Likelihood Displacement in Direct Preference Optimization",
//! DESIGN §7 `ches`). Given the summed final hidden states S(y) of the chosen
//! and rejected responses (see [`crate::Model::hidden_sums`]):
//!
//! CHES = ⟨S⁺, S⁻⟩ − ‖S⁺‖²,  ln-CHES = ⟨S⁺, S⁻⟩ / (|y⁺||y⁻|) − ‖S⁺‖² / |y⁺|².
//!
//! High scores mean similar preferences: likelihood-displacement risk.

/// `(ches, ln_ches)` for one pair, accumulated in f64. `len_pos`/`len_neg` are
/// the response lengths |y⁺|, |y⁻| in tokens (EOS included, as in `hidden_sums`).
pub fn ches(s_pos: &[f32], s_neg: &[f32], len_pos: usize, len_neg: usize) -> (f64, f64) {
    debug_assert_eq!(s_pos.len(), s_neg.len());
    let (mut cross, mut pos_sq) = (0f64, 0f64);
    for (&p, &n) in s_pos.iter().zip(s_neg) {
        let (p, n) = (f64::from(p), f64::from(n));
        cross += p * n;
        pos_sq += p * p;
    }
    let (lp, ln) = (len_pos as f64, len_neg as f64);
    (cross - pos_sq, cross / (lp * ln) - pos_sq / (lp * lp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition() {
        // S⁺ = (1, 2), S⁻ = (3, -1): ⟨S⁺,S⁻⟩ = 1, ‖S⁺‖² = 5.
        // CHES = 1 − 5 = −4; ln-CHES with |y⁺| = 2, |y⁻| = 4: 1/8 − 5/4 = −1.125.
        let (c, l) = ches(&[1.0, 2.0], &[3.0, -1.0], 2, 4);
        assert_eq!(c, -4.0);
        assert_eq!(l, -1.125);
        // Identical responses: CHES = 0 and ln-CHES = 0.
        assert_eq!(ches(&[0.5, -2.0], &[0.5, -2.0], 3, 3), (0.0, 0.0));
    }
}
