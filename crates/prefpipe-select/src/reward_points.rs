//! `reward_points`: chosen and rejected at points of the per-prompt reward
//! distribution — "Finding the Sweet Spot: Preference Data Construction for
//! Scaling Preference Optimization" (Xiao et al. 2025), whose best recipe is
//! chosen = max, rejected = μ − 2σ.
//!
//! Per prompt with rewards r₁..rₙ (n ≥ 2): μ = mean, σ = standard deviation
//! with `ddof` (0 = population, the default). The seven points are `min`,
//! `mu-2sigma`, `mu-sigma`, `mu`, `mu+sigma`, `mu+2sigma`, `max`. `min`/`max`
//! are the extremes; any other point t selects argminᵢ |rᵢ − t| (ties → lowest
//! sample_idx).

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, StringArray};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output};
use prefpipe_core::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::groups::{argmax_by, argmin_by, candidates, group_rows, Candidate};
use crate::pairs::{self, PairRows};
use crate::{one_input, DropReason, Input, Strategy, StrategyKind};

pub const KIND: StrategyKind = StrategyKind {
    name: "reward_points",
    about: "chosen/rejected at points of the reward distribution, default max vs mu-2sigma (Xiao et al. 2025, \"Finding the Sweet Spot\")",
    build: |v| {
        let c: RewardPoints = crate::build_config(v)?;
        if c.ddof > 1 {
            return Err(vec![ConfigError::at("ddof", format!("`ddof` is 0 (population) or 1 (sample); got {}", c.ddof))]);
        }
        Ok(Box::new(c))
    },
    schema: || schemars::schema_for!(RewardPoints),
};

/// A point of the reward distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Point {
    #[serde(rename = "min")]
    Min,
    #[serde(rename = "mu-2sigma")]
    MuMinus2Sigma,
    #[serde(rename = "mu-sigma")]
    MuMinusSigma,
    #[serde(rename = "mu")]
    Mu,
    #[serde(rename = "mu+sigma")]
    MuPlusSigma,
    #[serde(rename = "mu+2sigma")]
    MuPlus2Sigma,
    #[serde(rename = "max")]
    Max,
}

impl Point {
    /// All seven, lowest first.
    pub const ALL: [Point; 7] =
        [Point::Min, Point::MuMinus2Sigma, Point::MuMinusSigma, Point::Mu, Point::MuPlusSigma, Point::MuPlus2Sigma, Point::Max];

    pub fn name(self) -> &'static str {
        match self {
            Point::Min => "min",
            Point::MuMinus2Sigma => "mu-2sigma",
            Point::MuMinusSigma => "mu-sigma",
            Point::Mu => "mu",
            Point::MuPlusSigma => "mu+sigma",
            Point::MuPlus2Sigma => "mu+2sigma",
            Point::Max => "max",
        }
    }

    /// Multiple of σ added to μ, for the inner points.
    fn k(self) -> Option<f64> {
        match self {
            Point::MuMinus2Sigma => Some(-2.0),
            Point::MuMinusSigma => Some(-1.0),
            Point::Mu => Some(0.0),
            Point::MuPlusSigma => Some(1.0),
            Point::MuPlus2Sigma => Some(2.0),
            Point::Min | Point::Max => None,
        }
    }
}

/// `strategy: reward_points`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardPoints {
    /// Point the chosen response is taken at.
    #[serde(default = "default_chosen")]
    pub chosen: Point,
    /// Point the rejected response is taken at.
    #[serde(default = "default_rejected")]
    pub rejected: Point,
    /// Delta degrees of freedom of σ: 0 = population (default), 1 = sample.
    #[serde(default)]
    pub ddof: u32,
    /// Emit all 21 point pairs (higher point chosen) with a `points` column, for ablations.
    #[serde(default)]
    pub all_points: bool,
}

fn default_chosen() -> Point {
    Point::Max
}
fn default_rejected() -> Point {
    Point::MuMinus2Sigma
}

/// μ and σ (with `ddof`) of the rewards; None when n − ddof ≤ 0.
pub fn mean_std(c: &[Candidate], ddof: u32) -> Option<(f64, f64)> {
    let n = c.len() as f64;
    if c.is_empty() || n - ddof as f64 <= 0.0 {
        return None;
    }
    let mean = c.iter().map(|c| c.reward).sum::<f64>() / n;
    let ss = c.iter().map(|c| (c.reward - mean).powi(2)).sum::<f64>();
    Some((mean, (ss / (n - ddof as f64)).sqrt()))
}

/// Position in `c` of the candidate at `point`.
pub fn at_point(c: &[Candidate], point: Point, mean: f64, std: f64) -> usize {
    match point.k() {
        None if point == Point::Max => argmax_by(c, |c| c.reward),
        None => argmin_by(c, |c| c.reward),
        Some(k) => {
            let t = mean + k * std;
            argmin_by(c, |c| (c.reward - t).abs())
        }
    }
}

/// One pair: (chosen pos, rejected pos, μ, σ, `points` name when `all_points`).
pub type PointPick = (usize, usize, f64, f64, Option<String>);

/// One prompt's pair(s), or why it is dropped.
pub fn pick(c: &[Candidate], cfg: &RewardPoints) -> Vec<Result<PointPick, DropReason>> {
    if c.len() < 2 {
        return vec![Err(DropReason::TooFewSamples)];
    }
    let (mean, std) = mean_std(c, cfg.ddof).expect("n ≥ 2 > ddof");
    let one = |hi: Point, lo: Point| {
        let a = at_point(c, hi, mean, std);
        let b = at_point(c, lo, mean, std);
        if c[a].reward > c[b].reward {
            Ok((a, b, mean, std, cfg.all_points.then(|| format!("{}/{}", hi.name(), lo.name()))))
        } else {
            Err(DropReason::Tie)
        }
    };
    if !cfg.all_points {
        return vec![one(cfg.chosen, cfg.rejected)];
    }
    let mut out = Vec::with_capacity(21);
    for (i, &hi) in Point::ALL.iter().enumerate().rev() {
        for &lo in Point::ALL[..i].iter().rev() {
            out.push(one(hi, lo));
        }
    }
    out
}

impl Strategy for RewardPoints {
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("serializes")
    }
    fn mode(&self) -> Mode {
        Mode::PerPrompt
    }
    fn plan(&self, inputs: &[Input]) -> Result<SchemaRef, Vec<ConfigError>> {
        let input = one_input(KIND.name, inputs)?;
        let mut extra = vec![Field::new("reward_mean", DataType::Float64, false), Field::new("reward_std", DataType::Float64, false)];
        if self.all_points {
            extra.push(Field::new("points", DataType::Utf8, false));
        }
        pairs::pairs_schema(input.schema, input.id, extra)
    }
    fn run(&self, inputs: &[RecordBatch], schema: &SchemaRef) -> Result<Output> {
        let input = &inputs[0];
        let groups = group_rows(input)?;
        let (cands, dropped) = candidates(input, &groups, "reward")?;
        let texts = pairs::Texts::of(input)?;
        let picks: Vec<_> = cands
            .par_iter()
            .map(|c| {
                pick(c, self)
                    .into_iter()
                    .map(|r| r.and_then(|(a, b, m, s, p)| texts.distinct(c[a].row, c[b].row).map(|_| (c[a].row, c[b].row, m, s, p))))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut out = Output::default();
        dropped.record(&mut out);
        let mut rows = PairRows::default();
        let (mut means, mut stds, mut points) = (Vec::new(), Vec::new(), Vec::new());
        for p in picks.into_iter().flatten() {
            match p {
                Ok((a, b, m, s, pts)) => {
                    rows.push(a, b);
                    means.push(m);
                    stds.push(s);
                    points.extend(pts);
                }
                Err(r) => out.drop(r.as_str(), 1),
            }
        }
        let mut extra: Vec<ArrayRef> = vec![Arc::new(Float64Array::from(means)), Arc::new(Float64Array::from(stds))];
        if self.all_points {
            extra.push(Arc::new(StringArray::from(points)));
        }
        out.batches.push(pairs::build(input, schema, &rows, extra)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::testing::cands;

    fn cfg(chosen: Point, rejected: Point, ddof: u32) -> RewardPoints {
        RewardPoints { chosen, rejected, ddof, all_points: false }
    }

    #[test]
    fn default_is_max_vs_mu_minus_2_sigma() {
        // r = [1, 2, 3, 4, 10]: μ = 4, population σ = sqrt((9+4+1+0+36)/5) = sqrt(10) ≈ 3.1623,
        // μ−2σ ≈ −2.3246 lies below the minimum, so the closest reward is the minimum (idx 0).
        let c = cands(&[1.0, 2.0, 3.0, 4.0, 10.0]);
        let r = pick(&c, &cfg(Point::Max, Point::MuMinus2Sigma, 0));
        let (a, b, m, s, _) = r[0].clone().unwrap();
        assert_eq!((a, b), (4, 0));
        assert_eq!(m, 4.0);
        assert!((s - 10f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn inner_points_pick_the_closest_reward() {
        // r = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]: μ = 4.5, σ = sqrt(8.25) ≈ 2.8723.
        // μ−σ ≈ 1.6277 → closest 2 (idx 2); μ+σ ≈ 7.3723 → 7 (idx 7); μ = 4.5 is equidistant
        // from 4 and 5 → lowest sample_idx (4).
        let c = cands(&[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.]);
        let (m, s) = mean_std(&c, 0).unwrap();
        assert_eq!(at_point(&c, Point::MuMinusSigma, m, s), 2);
        assert_eq!(at_point(&c, Point::MuPlusSigma, m, s), 7);
        assert_eq!(at_point(&c, Point::Mu, m, s), 4);
        // ddof = 1: σ = sqrt(82.5/9) ≈ 3.0277; μ−σ ≈ 1.4723 → idx 1; μ+2σ ≈ 10.555 → max (idx 9).
        let (m1, s1) = mean_std(&c, 1).unwrap();
        assert!((s1 - (82.5f64 / 9.0).sqrt()).abs() < 1e-12);
        assert_eq!(at_point(&c, Point::MuMinusSigma, m1, s1), 1);
        assert_eq!(at_point(&c, Point::MuPlus2Sigma, m1, s1), 9);
    }

    #[test]
    fn ties_and_small_groups_are_dropped() {
        // All equal → σ = 0, every point is idx 0 → chosen_reward == rejected_reward → tie.
        assert_eq!(pick(&cands(&[1.0, 1.0, 1.0]), &cfg(Point::Max, Point::MuMinus2Sigma, 0))[0], Err(DropReason::Tie));
        assert_eq!(pick(&cands(&[1.0]), &cfg(Point::Max, Point::Min, 0))[0], Err(DropReason::TooFewSamples));
        // chosen below rejected (min vs max) is never emitted.
        assert_eq!(pick(&cands(&[1.0, 2.0]), &cfg(Point::Min, Point::Max, 0))[0], Err(DropReason::Tie));
    }

    #[test]
    fn signed_zeros_are_a_tie() {
        // −0.0 = +0.0 (IEEE 754): max (idx 0 by the lowest-sample_idx rule) and min are equal
        // rewards, so there is no pair — the same as two equal rewards.
        assert_eq!(pick(&cands(&[-0.0, 0.0]), &cfg(Point::Max, Point::Min, 0))[0], Err(DropReason::Tie));
        assert_eq!(pick(&cands(&[0.0, -0.0]), &cfg(Point::Max, Point::MuMinus2Sigma, 0))[0], Err(DropReason::Tie));
    }

    #[test]
    fn all_points_gives_21_pairs() {
        let c = cands(&[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.]);
        let r = pick(&c, &RewardPoints { all_points: true, ..cfg(Point::Max, Point::Min, 0) });
        // C(7, 2) = 21 ordered (higher, lower) point pairs.
        assert_eq!(r.len(), 21);
        // Picks: min→0, μ−2σ=−1.24→0, μ−σ=1.63→2, μ=4.5→4, μ+σ=7.37→7, μ+2σ=10.24→9, max→9,
        // so max/mu+2sigma and mu-2sigma/min pick the same sample: 2 ties, 19 pairs.
        assert_eq!(r[0], Err(DropReason::Tie));
        assert_eq!(r.iter().filter(|x| x.is_err()).count(), 2);
        let names: Vec<String> = r.iter().filter_map(|x| x.as_ref().ok().and_then(|p| p.4.clone())).collect();
        assert!(names.contains(&"max/min".to_string()));
    }
}
