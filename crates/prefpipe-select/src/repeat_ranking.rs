//! `repeat_ranking`: keep the prompts whose repeated rankings agree, pair
//! their Borda winner and loser — "Are You Sure? Rank Them Again: Repeated
//! Ranking For Better Preference Datasets" (Devine 2024).
//!
//! Per prompt with m rankings (ballots) of n items, each ballot in competition
//! ranks (1 = best, ties share the lowest rank: 1, 1, 3):
//! - Kendall's W: Rᵢ = Σ_b rank_b(i), R̄ = mean of the Rᵢ, S = Σᵢ (Rᵢ − R̄)²,
//!   W = 12·S / (m²·(n³ − n)), no tie correction. W = 1 when every ballot
//!   agrees, 0 when they cancel out. With ties, competition ranks spread the
//!   rank sums, so W can exceed 1 (ballots [1,1,3] and [1,2,3] give 13/12).
//! - Borda: a ballot gives item i `n − fractional_rank + 1` points, where tied
//!   items share the mean of the positions they occupy (a tie of t items at
//!   competition rank c has fractional rank c + (t − 1)/2). Chosen = highest
//!   total, rejected = lowest, ties → lowest sample_idx; equal totals → `tie`.
//!
//! Prompts are kept when W ≥ `min_w`, or when W ≥ the (1 − `keep`) quantile
//! (linear interpolation, numpy's default) of W over all prompts with n ≥ 2;
//! the rest are dropped as `below_threshold`. With neither, every prompt with
//! a Borda winner is kept.
//!
//! The rankings come from either
//! - one scored table and `rankers: [col, ...]`: each column is one ballot,
//!   higher = better, converted to competition ranks; or
//! - two inputs `[scored, rankings]` (no `rankers`): the rankings table
//!   (DESIGN §6: `prompt_id, sample_idx, repeat, rank`) holds the ballots, one
//!   per `repeat`; the scored table gives texts and rewards. Every sample of a
//!   prompt must be ranked in every repeat that prompt has, and a prompt needs
//!   at least two repeats, else the run fails with an input error naming them.
//!   Rankings of prompts or samples that are not in the scored table are ignored.
//!
//! Items are the prompt's scored samples with a finite `reward` (and, with
//! `rankers`, finite ranker values): the others are dropped first as
//! `non_finite_reward` and the ballots are re-ranked over the rest. `reward` is
//! required and only carried into `chosen_reward`/`rejected_reward`/`margin`:
//! the pair is decided by Borda, so `margin` may be ≤ 0 where the reward
//! disagrees with the rankers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output};
use prefpipe_core::table::{self, col, f64_col, str_col, u32_col, Need};
use prefpipe_core::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::corpus::{self, quantile_linear};
use crate::groups::{candidates, group_rows, Candidate, Groups};
use crate::pairs::{self, PairRows};
use crate::{DropReason, Input, Strategy, StrategyKind};

pub const KIND: StrategyKind = StrategyKind {
    name: "repeat_ranking",
    about: "keep prompts whose repeated rankings agree (Kendall's W), pair the Borda winner and loser (Devine 2024, \"Are You Sure? Rank Them Again\")",
    build: |v| Ok(Box::new(RepeatRanking::build(v)?)),
    schema: || schemars::schema_for!(RepeatRanking),
};

/// `strategy: repeat_ranking`. Adds `kendall_w`, `chosen_borda`, `rejected_borda`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepeatRanking {
    /// Numeric columns of the scored input, each one ranking (higher = better);
    /// at least 2. Leave out to read a rankings table as the second input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rankers: Option<Vec<String>>,
    /// Keep prompts with Kendall's W ≥ `min_w` (in [0, 1]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_w: Option<f64>,
    /// Keep the most consistent fraction of prompts, in (0, 1]: W ≥ the
    /// (1 − keep) quantile of W over all prompts with at least 2 samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<f64>,
}

impl RepeatRanking {
    /// Parses and validates the config, reporting every problem.
    pub fn build(v: &serde_json::Value) -> Result<RepeatRanking, Vec<ConfigError>> {
        let c: RepeatRanking = crate::build_config(v)?;
        let mut errs = Vec::new();
        if let Some(r) = &c.rankers {
            if r.len() < 2 {
                errs.push(corpus::err("rankers", format!("Kendall's W needs at least 2 rankings (m ≥ 2); `rankers` names {}", r.len())));
            }
        }
        if let Some(w) = c.min_w {
            if !(0.0..=1.0).contains(&w) {
                errs.push(corpus::err("min_w", format!("`min_w` is a Kendall's W in [0, 1]; got {w}")));
            }
        }
        corpus::check_keep("keep", c.keep, &mut errs);
        corpus::check_exclusive(("min_w", c.min_w.is_some()), ("keep", c.keep.is_some()), &mut errs);
        corpus::finish(c, errs)
    }

    fn keep_cut(&self) -> bool {
        self.keep.is_some_and(|k| k < 1.0)
    }
}

/// Competition ranks (1 = best, ties share the lowest rank) of `n` items,
/// where `better(i, j)` orders item i before item j (Less = i is better).
pub fn competition_ranks(n: usize, better: impl Fn(usize, usize) -> std::cmp::Ordering) -> Vec<u32> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| better(a, b));
    let mut ranks = vec![0u32; n];
    let mut start = 0;
    for k in 0..n {
        if k > 0 && better(order[k - 1], order[k]).is_lt() {
            start = k;
        }
        ranks[order[k]] = start as u32 + 1;
    }
    ranks
}

/// Competition ranks of scores, higher = better.
pub fn ranks_from_scores(scores: &[f64]) -> Vec<u32> {
    competition_ranks(scores.len(), |i, j| scores[j].total_cmp(&scores[i]))
}

/// Kendall's W of m ballots over n items (`ranks[b][i]`, competition ranks),
/// without tie correction. None when n < 2 or m = 0.
pub fn kendall_w(ranks: &[Vec<u32>]) -> Option<f64> {
    let m = ranks.len();
    let n = ranks.first().map_or(0, Vec::len);
    if m == 0 || n < 2 {
        return None;
    }
    let r: Vec<f64> = (0..n).map(|i| ranks.iter().map(|b| b[i] as f64).sum()).collect();
    let mean = r.iter().sum::<f64>() / n as f64;
    let s: f64 = r.iter().map(|x| (x - mean).powi(2)).sum();
    let (m, n) = (m as f64, n as f64);
    Some(12.0 * s / (m * m * (n * n * n - n)))
}

/// Borda totals: each ballot gives item i `n − fractional_rank + 1` points.
pub fn borda(ranks: &[Vec<u32>]) -> Vec<f64> {
    let n = ranks.first().map_or(0, Vec::len);
    let mut total = vec![0.0; n];
    for b in ranks {
        let mut tied: HashMap<u32, usize> = HashMap::new();
        for &r in b {
            *tied.entry(r).or_default() += 1;
        }
        for (i, &r) in b.iter().enumerate() {
            let frac = r as f64 + (tied[&r] as f64 - 1.0) / 2.0;
            total[i] += n as f64 - frac + 1.0;
        }
    }
    total
}

/// One prompt's pick, or why it is dropped (with its W when it has one, for the quantile).
pub type Outcome = Result<Pick, (DropReason, Option<f64>)>;

/// One prompt's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// Positions of chosen and rejected among the items.
    pub chosen: usize,
    pub rejected: usize,
    pub w: f64,
    pub chosen_borda: f64,
    pub rejected_borda: f64,
}

/// Kendall's W and the Borda pair of one prompt. `ranks[b][i]` is the rank
/// of item i in ballot b; items are ordered by sample_idx, so the lowest
/// position wins ties. Returns W alongside a tie, for the quantile.
pub fn pick(ranks: &[Vec<u32>]) -> Outcome {
    let Some(w) = kendall_w(ranks) else {
        return Err((DropReason::TooFewSamples, None));
    };
    let b = borda(ranks);
    let (mut hi, mut lo) = (0, 0);
    for i in 1..b.len() {
        if b[i] > b[hi] {
            hi = i;
        }
        if b[i] < b[lo] {
            lo = i;
        }
    }
    if b[hi] > b[lo] {
        Ok(Pick { chosen: hi, rejected: lo, w, chosen_borda: b[hi], rejected_borda: b[lo] })
    } else {
        Err((DropReason::Tie, Some(w)))
    }
}

/// The W threshold of `keep`: the (1 − keep) linear quantile of `ws`.
pub fn keep_threshold(ws: &mut [f64], keep: f64) -> Option<f64> {
    if ws.is_empty() {
        return None;
    }
    ws.sort_by(|a, b| a.total_cmp(b));
    Some(quantile_linear(ws, 1.0 - keep))
}

/// Ballots of one prompt from a rankings table: repeat → (sample_idx → rank).
type Ballots = BTreeMap<u32, HashMap<u32, u32>>;

/// Reads a rankings table into prompt_id → ballots, rejecting duplicates and rank 0.
fn read_rankings(b: &RecordBatch) -> Result<HashMap<String, Ballots>> {
    let ids = str_col(b, col::PROMPT_ID)?;
    let idx = u32_col(b, col::SAMPLE_IDX)?;
    let rep = u32_col(b, "repeat")?;
    let rank = u32_col(b, "rank")?;
    let mut out: HashMap<String, Ballots> = HashMap::new();
    for r in 0..b.num_rows() {
        let id = if ids.is_null(r) { "" } else { ids.value(r) };
        let (s, k, v) = (idx.value(r), rep.value(r), rank.value(r));
        if v == 0 {
            return Err(Error::Input(format!(
                "rankings row {r}: prompt `{id}` repeat {k} gives sample_idx {s} rank 0; ranks start at 1 (= best)"
            )));
        }
        let ballots = out.entry(id.to_string()).or_default();
        if ballots.entry(k).or_default().insert(s, v).is_some() {
            return Err(Error::Input(format!("rankings: prompt `{id}` repeat {k} ranks sample_idx {s} more than once")));
        }
    }
    Ok(out)
}

/// The ballots of one prompt's items from the rankings table, re-ranked over the items.
fn ballots_from_table(id: &str, c: &[Candidate], table: &HashMap<String, Ballots>) -> Result<Vec<Vec<u32>>> {
    let Some(ballots) = table.get(id) else {
        return Err(Error::Input(format!("the rankings table has no rows for prompt `{id}` ({} scored samples)", c.len())));
    };
    if ballots.len() < 2 {
        let reps: Vec<String> = ballots.keys().map(u32::to_string).collect();
        return Err(Error::Input(format!(
            "rankings: prompt `{id}` has {} repeat ({}); Kendall's W needs at least 2",
            ballots.len(),
            reps.join(", ")
        )));
    }
    ballots
        .iter()
        .map(|(k, ranks)| {
            let given = c
                .iter()
                .map(|x| {
                    ranks.get(&x.sample_idx).copied().ok_or_else(|| {
                        Error::Input(format!("rankings: prompt `{id}` repeat {k} does not rank sample_idx {}", x.sample_idx))
                    })
                })
                .collect::<Result<Vec<u32>>>()?;
            Ok(competition_ranks(given.len(), |i, j| given[i].cmp(&given[j])))
        })
        .collect()
}

/// Where the ballots come from, resolved at run time.
enum Source<'a> {
    Columns(Vec<Float64Array>),
    Table(&'a HashMap<String, Ballots>),
}

impl Strategy for RepeatRanking {
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("serializes")
    }
    fn mode(&self) -> Mode {
        if self.rankers.is_none() || self.keep_cut() {
            Mode::Whole
        } else {
            Mode::PerPrompt
        }
    }
    fn plan(&self, inputs: &[Input]) -> Result<SchemaRef, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let scored = match (&self.rankers, inputs) {
            (Some(rankers), [one]) => {
                for (i, r) in rankers.iter().enumerate() {
                    if let Err(e) = table::require(one.schema, one.id, r, Need::Number) {
                        errs.push(corpus::err_at("rankers", i, e.message));
                    }
                }
                one
            }
            (Some(_), _) => {
                return Err(vec![corpus::err(
                    "rankers",
                    format!(
                        "with `rankers` the strategy reads one scored table; got {} inputs (leave out `rankers` to read [scored, rankings])",
                        inputs.len()
                    ),
                )]);
            }
            (None, [scored, rankings]) => {
                for (c, need) in
                    [(col::PROMPT_ID, Need::Text), (col::SAMPLE_IDX, Need::Integer), ("repeat", Need::Integer), ("rank", Need::Integer)]
                {
                    if let Err(e) = table::require(rankings.schema, rankings.id, c, need) {
                        errs.push(ConfigError::at("input", e.message));
                    }
                }
                scored
            }
            (None, _) => {
                return Err(vec![ConfigError::at(
                    "input",
                    format!(
                        "strategy `repeat_ranking` reads either one scored table with `rankers: [col, ...]`, or two inputs [scored, rankings]; got {} input(s) and no `rankers`",
                        inputs.len()
                    ),
                )]);
            }
        };
        errs.extend(pairs::require_scored(scored.schema, scored.id));
        if !errs.is_empty() {
            return Err(errs);
        }
        let mut fields = table::pairs_fields();
        fields.extend(["kendall_w", "chosen_borda", "rejected_borda"].map(|n| Field::new(n, DataType::Float64, false)));
        let mut taken = fields.clone();
        for r in self.rankers.iter().flatten() {
            taken.push(Field::new(r, DataType::Null, true));
        }
        let carry = pairs::carried(scored.schema, &taken);
        fields.extend(carry);
        Ok(Arc::new(Schema::new(fields)))
    }
    fn run(&self, inputs: &[RecordBatch], schema: &SchemaRef) -> Result<Output> {
        let input = &inputs[0];
        let groups = group_rows(input)?;
        let (cands, mut non_finite) = candidates(input, &groups, col::REWARD)?;
        let table;
        let source = match &self.rankers {
            Some(r) => Source::Columns(r.iter().map(|c| f64_col(input, c)).collect::<Result<_>>()?),
            None => {
                let Some(rankings) = inputs.get(1) else {
                    return Err(Error::Runtime("repeat_ranking without `rankers` needs a rankings table as the second input".into()));
                };
                table = read_rankings(rankings)?;
                Source::Table(&table)
            }
        };
        // With rankers, a row with a non-finite ballot value is dropped like a non-finite reward.
        let cands: Vec<Vec<Candidate>> = match &source {
            Source::Columns(cols) => cands
                .into_iter()
                .map(|cs| {
                    let before = cs.len();
                    let kept: Vec<Candidate> =
                        cs.into_iter().filter(|c| cols.iter().all(|a| !a.is_null(c.row) && a.value(c.row).is_finite())).collect();
                    non_finite += (before - kept.len()) as u64;
                    kept
                })
                .collect(),
            Source::Table(_) => cands,
        };
        let results: Vec<Result<Outcome>> = cands
            .par_iter()
            .enumerate()
            .map(|(g, c)| {
                if c.len() < 2 {
                    return Ok(Err((DropReason::TooFewSamples, None)));
                }
                let ballots = match &source {
                    Source::Columns(cols) => {
                        cols.iter().map(|a| ranks_from_scores(&c.iter().map(|x| a.value(x.row)).collect::<Vec<_>>())).collect()
                    }
                    Source::Table(t) => ballots_from_table(prompt_id(&groups, g), c, t)?,
                };
                Ok(pick(&ballots))
            })
            .collect();
        // The first error in prompt order, so the message does not depend on thread timing.
        let picks: Vec<_> = results.into_iter().collect::<Result<_>>()?;
        let threshold = match (self.min_w, self.keep) {
            (Some(w), _) => Some(w),
            (None, Some(k)) => {
                let mut ws: Vec<f64> = picks
                    .iter()
                    .filter_map(|p| match p {
                        Ok(p) => Some(p.w),
                        Err((_, w)) => *w,
                    })
                    .collect();
                keep_threshold(&mut ws, k)
            }
            (None, None) => None,
        };
        let mut out = Output::default();
        out.drop(DropReason::NonFiniteReward.as_str(), non_finite);
        let mut rows = PairRows::default();
        let (mut ws, mut cb, mut rb) = (Vec::new(), Vec::new(), Vec::new());
        for (g, p) in picks.into_iter().enumerate() {
            let w = match &p {
                Ok(p) => Some(p.w),
                Err((_, w)) => *w,
            };
            if let (Some(t), Some(w)) = (threshold, w) {
                if w < t {
                    out.drop(DropReason::BelowThreshold.as_str(), 1);
                    continue;
                }
            }
            match p {
                Ok(p) => {
                    rows.push(cands[g][p.chosen].row, cands[g][p.rejected].row);
                    ws.push(p.w);
                    cb.push(p.chosen_borda);
                    rb.push(p.rejected_borda);
                }
                Err((r, _)) => out.drop(r.as_str(), 1),
            }
        }
        let extra: Vec<ArrayRef> =
            vec![Arc::new(Float64Array::from(ws)), Arc::new(Float64Array::from(cb)), Arc::new(Float64Array::from(rb))];
        out.batches.push(pairs::build(input, schema, &rows, extra)?);
        Ok(out)
    }
}

fn prompt_id(groups: &Groups, g: usize) -> &str {
    let r = groups.rows[g][0];
    if groups.prompt_ids.is_null(r) {
        ""
    } else {
        groups.prompt_ids.value(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, col_strings, drops};
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> RepeatRanking {
        RepeatRanking::build(&v).unwrap()
    }

    #[test]
    fn competition_ranks_share_the_lowest_rank() {
        // scores [0.9, 0.5, 0.9, 0.1] (higher = better): the two 0.9s tie for 1st, 0.5 is 3rd, 0.1 4th.
        assert_eq!(ranks_from_scores(&[0.9, 0.5, 0.9, 0.1]), [1, 3, 1, 4]);
        // Dense given ranks [1, 2, 2, 3] re-ranked (lower = better) → [1, 2, 2, 4].
        let g = [1u32, 2, 2, 3];
        assert_eq!(competition_ranks(4, |i, j| g[i].cmp(&g[j])), [1, 2, 2, 4]);
    }

    #[test]
    fn kendall_w_of_agreeing_and_opposite_rankings() {
        // Identical, m = 2, n = 3: R = (2, 4, 6), R̄ = 4, S = 4 + 0 + 4 = 8,
        // W = 12·8 / (2²·(27 − 3)) = 96 / 96 = 1.
        assert_eq!(kendall_w(&[vec![1, 2, 3], vec![1, 2, 3]]), Some(1.0));
        // A ranking and its reverse, m = 2: R = (4, 4, 4), S = 0, W = 0.
        assert_eq!(kendall_w(&[vec![1, 2, 3], vec![3, 2, 1]]), Some(0.0));
        // m = 3, n = 4: [1,2,3,4], [2,1,3,4], [1,3,2,4]: R = (4, 6, 8, 12), R̄ = 7.5,
        // S = 12.25 + 2.25 + 0.25 + 20.25 = 35, W = 12·35 / (9·(64 − 4)) = 420/540 = 7/9.
        let w = kendall_w(&[vec![1, 2, 3, 4], vec![2, 1, 3, 4], vec![1, 3, 2, 4]]).unwrap();
        assert!((w - 7.0 / 9.0).abs() < 1e-15);
        // With ties, competition ranks, no correction: [1,1,3], [1,2,3]: R = (2, 3, 6),
        // R̄ = 11/3, S = (−5/3)² + (−2/3)² + (7/3)² = (25 + 4 + 49)/9 = 78/9,
        // W = 12·(78/9) / (4·24) = 104/96 = 13/12 — the uncorrected W can exceed 1 with ties.
        let w = kendall_w(&[vec![1, 1, 3], vec![1, 2, 3]]).unwrap();
        assert!((w - 13.0 / 12.0).abs() < 1e-15);
        assert_eq!(kendall_w(&[vec![1]]), None);
    }

    #[test]
    fn borda_shares_tied_positions() {
        // n = 3. Ballot [1, 1, 3]: items 0, 1 tie at positions 1–2 → fractional rank 1.5 →
        // 3 − 1.5 + 1 = 2.5 points each; item 2 gets 3 − 3 + 1 = 1.
        // Ballot [2, 1, 3]: 2, 3, 1 points. Totals: (4.5, 5.5, 2).
        assert_eq!(borda(&[vec![1, 1, 3], vec![2, 1, 3]]), [4.5, 5.5, 2.0]);
    }

    #[test]
    fn picks_borda_winner_and_loser() {
        // Ballots over 4 items: [1,2,3,4], [2,1,4,3]. Borda points n − r + 1:
        // (4,3,2,1) + (3,4,1,2) = (7, 7, 3, 3). Max 7 at items 0 and 1 → lowest idx 0;
        // min 3 at 2 and 3 → 2. W: R = (3, 3, 7, 7), R̄ = 5, S = 16, W = 12·16/(4·60) = 0.8.
        let p = pick(&[vec![1, 2, 3, 4], vec![2, 1, 4, 3]]).unwrap();
        assert_eq!((p.chosen, p.rejected, p.chosen_borda, p.rejected_borda), (0, 2, 7.0, 3.0));
        assert!((p.w - 0.8).abs() < 1e-15);
        // Reversed ballots: Borda (4, 4, 4) → tie, W = 0 still reported for the quantile.
        assert_eq!(pick(&[vec![1, 2, 3], vec![3, 2, 1]]), Err((DropReason::Tie, Some(0.0))));
    }

    #[test]
    fn keep_uses_the_linear_quantile_of_w() {
        // W = [0.2, 1.0, 0.6, 0.4], keep 0.5 → q = 0.5 over sorted [0.2, 0.4, 0.6, 1.0]:
        // h = 1.5 → 0.4 + 0.5·0.2 = 0.5. Prompts with W ≥ 0.5: 1.0 and 0.6.
        let mut ws = [0.2, 1.0, 0.6, 0.4];
        assert!((keep_threshold(&mut ws, 0.5).unwrap() - 0.5).abs() < 1e-15);
    }

    /// Three prompts, two ranker columns `j1`, `j2` (higher = better):
    /// a: j1 = j2 = [3, 2, 1] → ranks [1,2,3] twice → W = 1, Borda (6, 4, 2): chosen 0, rejected 2.
    /// b: j1 = [3, 2, 1], j2 = [1, 2, 3] → W = 0, Borda (4, 4, 4) → tie.
    /// c: j1 = [1, 2, 3, 4], j2 = [2, 1, 4, 3] → ranks [4,3,2,1], [3,4,1,2] → R = (7, 7, 3, 3),
    ///    S = 16, W = 12·16/(4·60) = 0.8; Borda (3, 3, 7, 7) → chosen 2, rejected 0.
    fn three_prompts() -> RecordBatch {
        let rows = [
            ("a", 0, 0.1),
            ("a", 1, 0.2),
            ("a", 2, 0.3),
            ("b", 0, 1.0),
            ("b", 1, 1.0),
            ("b", 2, 1.0),
            ("c", 0, 0.5),
            ("c", 1, 0.6),
            ("c", 2, 0.7),
            ("c", 3, 0.8),
        ];
        let j1 = vec![3., 2., 1., 3., 2., 1., 1., 2., 3., 4.];
        let j2 = vec![3., 2., 1., 1., 2., 3., 2., 1., 4., 3.];
        testkit::scored(&rows, &[("j1", j1), ("j2", j2)])
    }

    #[test]
    fn rankers_columns_end_to_end() {
        let b = three_prompts();
        let out = testkit::run(&cfg(json!({"rankers": ["j1", "j2"]})), std::slice::from_ref(&b)).unwrap();
        let o = testkit::one(&out);
        assert_eq!(col_strings(&o, "prompt_id"), ["a", "c"]);
        assert_eq!(col_strings(&o, "chosen_idx"), ["0", "2"]);
        assert_eq!(col_strings(&o, "rejected_idx"), ["2", "0"]);
        assert_eq!(col_strings(&o, "kendall_w"), ["1.0", "0.8"]);
        assert_eq!(col_strings(&o, "chosen_borda"), ["6.0", "7.0"]);
        assert_eq!(col_strings(&o, "category"), ["cat-a", "cat-c"]);
        assert!(o.column_by_name("j1").is_none());
        assert_eq!(drops(&out, "tie"), 1);
        // min_w 0.9 keeps a only (W: a 1, b 0, c 0.8); b and c are below_threshold.
        let out = testkit::run(&cfg(json!({"rankers": ["j1", "j2"], "min_w": 0.9})), std::slice::from_ref(&b)).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["a"]);
        assert_eq!(drops(&out, "below_threshold"), 2);
        // keep 0.5: W over a, b, c = sorted [0, 0.8, 1], q = 0.5 → h = 1 → 0.8. Keep a and c.
        let out = testkit::run(&cfg(json!({"rankers": ["j1", "j2"], "keep": 0.5})), &[b]).unwrap();
        assert_eq!(col_strings(&testkit::one(&out), "prompt_id"), ["a", "c"]);
        assert_eq!(drops(&out, "below_threshold"), 1);
    }

    #[test]
    fn rankings_table_matches_rankers_columns() {
        // The same ballots as `three_prompts` written as a rankings table (repeat 0 = j1, 1 = j2).
        let b = three_prompts();
        let r = testkit::rankings(&[
            ("a", 0, 0, 1),
            ("a", 1, 0, 2),
            ("a", 2, 0, 3),
            ("a", 0, 1, 1),
            ("a", 1, 1, 2),
            ("a", 2, 1, 3),
            ("b", 0, 0, 1),
            ("b", 1, 0, 2),
            ("b", 2, 0, 3),
            ("b", 0, 1, 3),
            ("b", 1, 1, 2),
            ("b", 2, 1, 1),
            ("c", 0, 0, 4),
            ("c", 1, 0, 3),
            ("c", 2, 0, 2),
            ("c", 3, 0, 1),
            ("c", 0, 1, 3),
            ("c", 1, 1, 4),
            ("c", 2, 1, 1),
            ("c", 3, 1, 2),
            ("zz", 0, 0, 1),
        ]);
        let s = cfg(json!({}));
        assert_eq!(s.mode(), Mode::Whole);
        let two = testkit::one(&testkit::run(&s, &[b.clone(), r]).unwrap());
        let cols = testkit::one(&testkit::run(&cfg(json!({"rankers": ["j1", "j2"]})), &[b]).unwrap());
        assert_eq!(two.num_rows(), 2);
        for c in ["prompt_id", "chosen_idx", "rejected_idx", "kendall_w", "chosen_borda", "rejected_borda", "margin", "category"] {
            assert_eq!(col_strings(&two, c), col_strings(&cols, c), "{c}");
        }
    }

    #[test]
    fn non_finite_rewards_are_dropped_and_ballots_re_ranked() {
        // Prompt a, rewards [1, NaN, 2, 3]; rankings repeat 0: [1, 2, 3, 4], repeat 1: [2, 1, 3, 4].
        // Without idx 1 the given ranks are [1, 3, 4] and [2, 3, 4] → re-ranked [1, 2, 3] twice:
        // W = 1, Borda (6, 4, 2) → chosen idx 0, rejected idx 3.
        let b = testkit::scored(&[("a", 0, 1.0), ("a", 1, f64::NAN), ("a", 2, 2.0), ("a", 3, 3.0)], &[]);
        let mut rows = Vec::new();
        for (s, r0, r1) in [(0, 1, 2), (1, 2, 1), (2, 3, 3), (3, 4, 4)] {
            rows.push(("a", s, 0, r0));
            rows.push(("a", s, 1, r1));
        }
        let out = testkit::run(&cfg(json!({})), &[b, testkit::rankings(&rows)]).unwrap();
        let o = testkit::one(&out);
        assert_eq!((col_strings(&o, "chosen_idx"), col_strings(&o, "rejected_idx")), (vec!["0".into()], vec!["3".into()]));
        assert_eq!(col_strings(&o, "kendall_w"), ["1.0"]);
        // chosen_reward 1 < rejected_reward 3: the pair follows the rankings, margin = 1 − 3 = −2.
        assert_eq!(col_strings(&o, "margin"), ["-2.0"]);
        assert_eq!(drops(&out, "non_finite_reward"), 1);
    }

    #[test]
    fn bad_rankings_tables_are_input_errors() {
        let b = testkit::scored(&[("p", 0, 1.0), ("p", 1, 2.0)], &[]);
        let run =
            |rows: &[(&str, u32, u32, u32)]| testkit::run(&cfg(json!({})), &[b.clone(), testkit::rankings(rows)]).unwrap_err().to_string();
        // Repeat 1 does not rank sample 1.
        let e = run(&[("p", 0, 0, 1), ("p", 1, 0, 2), ("p", 0, 1, 1)]);
        assert_eq!(e, "rankings: prompt `p` repeat 1 does not rank sample_idx 1");
        let e = run(&[("p", 0, 0, 1), ("p", 1, 0, 2)]);
        assert_eq!(e, "rankings: prompt `p` has 1 repeat (0); Kendall's W needs at least 2");
        let e = run(&[("q", 0, 0, 1)]);
        assert!(e.contains("no rows for prompt `p`"), "{e}");
        let e = run(&[("p", 0, 0, 1), ("p", 0, 0, 2)]);
        assert!(e.contains("ranks sample_idx 0 more than once"), "{e}");
        let e = run(&[("p", 0, 0, 0)]);
        assert!(e.contains("rank 0; ranks start at 1"), "{e}");
    }

    #[test]
    fn bad_parameters_are_config_errors() {
        let e = RepeatRanking::build(&json!({"rankers": ["j1"], "keep": 0.0, "min_w": 2.0})).unwrap_err();
        let msgs: Vec<String> = e.iter().map(|e| format!("{:?}: {}", e.path, e.message)).collect();
        assert_eq!(e.len(), 4, "{msgs:?}");
        assert!(msgs[0].contains("needs at least 2 rankings (m ≥ 2)"), "{msgs:?}");
        assert!(msgs[1].contains("`min_w` is a Kendall's W in [0, 1]; got 2"), "{msgs:?}");
        assert!(msgs[2].contains("(0, 1]"), "{msgs:?}");
        assert!(msgs[3].contains("not both"), "{msgs:?}");
        // Rankers naming absent columns: errors at rankers[i], with a hint.
        let s = three_prompts().schema();
        let e = cfg(json!({"rankers": ["j1", "j3", "jx2"]})).plan(&[Input { id: "scored", schema: &s }]).unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].path, vec![prefpipe_core::yaml::PathSeg::Key("rankers".into()), prefpipe_core::yaml::PathSeg::Index(1)]);
        assert!(e[0].message.contains("no column `j3`; did you mean"), "{}", e[0].message);
        // No rankers and one input; rankers and two inputs.
        let e = cfg(json!({})).plan(&[Input { id: "scored", schema: &s }]).unwrap_err();
        assert!(e[0].message.contains("or two inputs [scored, rankings]"), "{}", e[0].message);
        let r = table::rankings_schema();
        let e = cfg(json!({"rankers": ["j1", "j2"]}))
            .plan(&[Input { id: "scored", schema: &s }, Input { id: "ranks", schema: &r }])
            .unwrap_err();
        assert!(e[0].message.contains("leave out `rankers`"), "{}", e[0].message);
        // A rankings input without `repeat`.
        let r = Schema::new(vec![Field::new("prompt_id", DataType::Utf8, false), Field::new("sample_idx", DataType::UInt32, false)]);
        let e = cfg(json!({})).plan(&[Input { id: "scored", schema: &s }, Input { id: "ranks", schema: &r }]).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].message.contains("input `ranks` has no column `repeat`"), "{}", e[0].message);
    }
}
