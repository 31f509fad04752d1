//! Corpus-level cuts shared by the strategies that rank prompts or pairs
//! against each other (`small_margin`, `repeat_ranking`, `ches`): how many a
//! fraction keeps, numpy's linear quantile, and the config checks for
//! "a fraction or a count, not both".

use prefpipe_core::stage::ConfigError;
use prefpipe_core::yaml::PathSeg;

/// How many of `n` items a fraction selects: ⌈frac·n⌉, capped at `n`.
///
/// A product within 1e-9 (relative) of an integer counts as that integer, so
/// that binary rounding does not add an item: 0.07·100 is 7.000000000000001
/// in f64, and `keep: 0.07` of 100 pairs keeps 7, not 8.
pub fn ceil_count(frac: f64, n: usize) -> usize {
    let x = frac * n as f64;
    let r = x.round();
    let k = if (x - r).abs() <= 1e-9 * r.abs().max(1.0) { r } else { x.ceil() };
    (k.max(0.0) as usize).min(n)
}

/// The `q` quantile of `sorted` (ascending, non-empty) with linear
/// interpolation between closest ranks — numpy's default `method="linear"`,
/// including its two-sided `lerp`, so values agree bit for bit.
pub fn quantile_linear(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of an empty set");
    let h = (sorted.len() - 1) as f64 * q;
    let lo = (h.floor() as usize).min(sorted.len() - 1);
    let hi = (lo + 1).min(sorted.len() - 1);
    let t = h - lo as f64;
    let (a, b) = (sorted[lo], sorted[hi]);
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

/// A located error at `field` (a top-level key of the strategy config).
pub fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::at(field, message)
}

/// A located error at `field[index]`.
pub fn err_at(field: &str, index: usize, message: impl Into<String>) -> ConfigError {
    ConfigError { path: vec![PathSeg::Key(field.to_string()), PathSeg::Index(index)], message: message.into() }
}

/// Checks a fraction in (0, 1] (`keep`).
pub fn check_keep(field: &str, v: Option<f64>, errs: &mut Vec<ConfigError>) {
    if let Some(v) = v {
        if !(v > 0.0 && v <= 1.0) {
            errs.push(err(field, format!("`{field}` is a fraction in (0, 1]; got {v}")));
        }
    }
}

/// Checks that at most one of two alternatives is given.
pub fn check_exclusive(a: (&str, bool), b: (&str, bool), errs: &mut Vec<ConfigError>) {
    if a.1 && b.1 {
        errs.push(err(b.0, format!("give `{}` or `{}`, not both", a.0, b.0)));
    }
}

/// `Ok(v)` when there is no error, else every error found.
pub fn finish<T>(v: T, errs: Vec<ConfigError>) -> Result<T, Vec<ConfigError>> {
    if errs.is_empty() {
        Ok(v)
    } else {
        Err(errs)
    }
}

/// The one order on f64 keys that every ranking, tie and sort of prefpipe
/// uses: numeric order, with −0.0 = +0.0 as `==` has it (`total_cmp` alone
/// puts −0.0 before +0.0, so a judge score rounded to −0.0 would lose a tie
/// it should share), and NaN after every number. A total order, so it is
/// safe for `sort_by`.
pub fn cmp_f64(a: f64, b: f64) -> std::cmp::Ordering {
    a.partial_cmp(&b).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_count_rounds_up_but_not_on_binary_noise() {
        // ⌈0.25·10⌉ = ⌈2.5⌉ = 3; ⌈0.5·10⌉ = 5; ⌈1.0·7⌉ = 7; ⌈0.01·3⌉ = ⌈0.03⌉ = 1.
        assert_eq!(ceil_count(0.25, 10), 3);
        assert_eq!(ceil_count(0.5, 10), 5);
        assert_eq!(ceil_count(1.0, 7), 7);
        assert_eq!(ceil_count(0.01, 3), 1);
        // 0.07·100 = 7.000000000000001 in f64; the intended ⌈7⌉ = 7.
        assert!(std::hint::black_box(0.07) * 100.0 > 7.0);
        assert_eq!(ceil_count(0.07, 100), 7);
        assert_eq!(ceil_count(0.0, 5), 0);
        assert_eq!(ceil_count(0.5, 0), 0);
    }

    #[test]
    fn cmp_f64_ties_signed_zeros_and_puts_nan_last() {
        use std::cmp::Ordering::*;
        // IEEE 754 §5.11: −0 and +0 compare equal; `total_cmp` (its totalOrder) would say Less.
        assert_eq!((-0.0f64).total_cmp(&0.0), Less);
        assert_eq!(cmp_f64(-0.0, 0.0), Equal);
        assert_eq!(cmp_f64(0.0, -0.0), Equal);
        assert_eq!(cmp_f64(-1.0, -0.0), Less);
        assert_eq!(cmp_f64(f64::NAN, f64::INFINITY), Greater);
        assert_eq!(cmp_f64(f64::NEG_INFINITY, -f64::NAN), Less);
        assert_eq!(cmp_f64(f64::NAN, -f64::NAN), Equal);
        // A stable sort keeps −0.0 and +0.0 in input order.
        let mut v = [0.0, 1.0, -0.0, f64::NAN, -1.0];
        v.sort_by(|a, b| cmp_f64(*a, *b));
        assert_eq!(format!("{v:?}"), "[-1.0, 0.0, -0.0, 1.0, NaN]");
    }

    #[test]
    fn quantile_matches_numpy_linear() {
        let w = [0.1, 0.4, 0.5, 0.9];
        // numpy.quantile([0.1, 0.4, 0.5, 0.9], 0.5): h = 3·0.5 = 1.5 → 0.4 + 0.5·(0.5 − 0.4) = 0.45.
        assert!((quantile_linear(&w, 0.5) - 0.45).abs() < 1e-15);
        // q = 0.25: h = 0.75 → 0.1 + 0.75·0.3 = 0.325 (numpy: 0.325).
        assert!((quantile_linear(&w, 0.25) - 0.325).abs() < 1e-15);
        // q = 0 → min, q = 1 → max, exactly.
        assert_eq!(quantile_linear(&w, 0.0), 0.1);
        assert_eq!(quantile_linear(&w, 1.0), 0.9);
        // One value: every quantile is it.
        assert_eq!(quantile_linear(&[0.3], 0.7), 0.3);
    }
}
