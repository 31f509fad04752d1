//! `reward` from the entries' columns: `mean`, `weighted` and `zscore_mean`
//! (whole-input μ and σ per entry).

use super::*;

impl Score {
    /// `reward` per row from the entries' raw columns; `stats` = (μ, σ, constant) per entry for z-scores.
    pub(super) fn aggregate(&self, raw: &Raw, stats: Option<&[ColumnStats]>) -> Float64Array {
        let n = raw.cols.first().map_or(0, |c| c.len());
        let weights: Vec<f64> = match self.c.aggregation() {
            Aggregate::Weighted => self
                .c
                .reward_models
                .iter()
                .map(|m| m.weight)
                .chain(self.c.rules.iter().map(Rule::weight))
                .map(|w| w.unwrap_or(0.0))
                .collect(),
            _ => vec![1.0; raw.entry_at.len()],
        };
        let wsum: f64 = weights.iter().sum();
        (0..n)
            .map(|r| {
                let mut acc = 0.0;
                for (e, (&at, &w)) in raw.entry_at.iter().zip(&weights).enumerate() {
                    if w == 0.0 {
                        continue;
                    }
                    let c = &raw.cols[at];
                    if c.is_null(r) {
                        return None;
                    }
                    let x = c.value(r);
                    let x = match stats {
                        Some(s) => s[e].z(x),
                        None => x,
                    };
                    acc += w * x;
                }
                Some(acc / wsum)
            })
            .collect()
    }
}

/// μ and σ (population) of one entry over the whole input, ignoring nulls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ColumnStats {
    pub(super) mean: f64,
    pub(super) std: f64,
    /// Every value equal (or none at all): the column contributes 0.
    pub(super) constant: bool,
}

impl ColumnStats {
    pub(super) fn of<'a>(parts: impl Iterator<Item = &'a Float64Array> + Clone) -> ColumnStats {
        let vals = || parts.clone().flat_map(|a| a.iter().flatten());
        let n = vals().count();
        let (lo, hi) = vals().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
        if n == 0 || lo == hi {
            return ColumnStats { mean: if n == 0 { 0.0 } else { lo }, std: 0.0, constant: true };
        }
        let mean = vals().sum::<f64>() / n as f64;
        let var = vals().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        ColumnStats { mean, std: var.sqrt(), constant: false }
    }

    pub(super) fn z(&self, x: f64) -> f64 {
        if self.constant {
            0.0
        } else {
            (x - self.mean) / self.std
        }
    }
}
