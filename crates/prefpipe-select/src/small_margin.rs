//! `small_margin`: the pair of each prompt whose DPO implicit rewards are
//! closest, then the corpus-wide smallest margins — "Not All Preference Pairs
//! Are Created Equal: A Recipe for Annotation-Efficient Iterative Preference
//! Learning" (Yang et al. 2024), whose finding is that pairs the current
//! policy finds hard to tell apart (small implicit margin) teach the most.
//!
//! The implicit reward of a sample is r̂ = β·(logp_policy − logp_reference).
//! Per prompt, among all pairs of its samples whose `reward`s differ, the
//! pair with the smallest |r̂ᵢ − r̂ⱼ| is taken (`margin_mode: abs`, default), or
//! the smallest r̂_chosen − r̂_rejected (`signed`: pairs the policy gets most
//! wrong first); the pair is oriented by `reward`, the annotation. Ties between
//! pairs break toward (chosen_idx, rejected_idx) ascending.
//!
//! Across prompts, `keep` (a fraction, ⌈keep·count⌉ pairs) or `keep_count`
//! keeps the pairs with the smallest margin (same measure as above), ties
//! toward (prompt_id, chosen_idx, rejected_idx); the rest are dropped as
//! `below_threshold`. Output rows stay in input prompt order.
//!
//! Rows whose `logp_policy` or `logp_reference` is not finite (or null) are
//! dropped before pairing, like non-finite rewards, and counted as
//! `non_finite_logp` (in rows).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output};
use prefpipe_core::table::{self, col, f64_col, Need};
use prefpipe_core::Result;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::corpus::{self, ceil_count, cmp_f64};
use crate::groups::{candidates, group_rows, Candidate};
use crate::pairs::{self, PairRows};
use crate::{one_input, DropReason, Input, Strategy, StrategyKind};

pub const KIND: StrategyKind = StrategyKind {
    name: "small_margin",
    about: "per prompt the pair with the smallest DPO implicit-reward margin, then the corpus-wide smallest (Yang et al. 2024, \"Not All Preference Pairs Are Created Equal\")",
    build: |v| Ok(Box::new(SmallMargin::build(v)?)),
    schema: || schemars::schema_for!(SmallMargin),
};

/// How a pair's implicit margin m = r̂_chosen − r̂_rejected is ranked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MarginMode {
    /// Smallest |m| first: the pairs the policy cannot tell apart.
    #[default]
    Abs,
    /// Smallest m first: the pairs the policy ranks most wrongly.
    Signed,
}

/// `strategy: small_margin`. Reads `reward`, `logp_policy` and `logp_reference`
/// (the `logprob` stage's output). Adds `implicit_margin` = r̂_chosen − r̂_rejected
/// (signed, in both modes). With neither `keep` nor `keep_count`, every
/// prompt's pair is kept.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SmallMargin {
    /// β of the implicit reward r̂ = β·(logp_policy − logp_reference); > 0.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `abs` (default): rank pairs by |r̂_chosen − r̂_rejected|; `signed`: by r̂_chosen − r̂_rejected.
    #[serde(default)]
    pub margin_mode: MarginMode,
    /// Fraction of pairs to keep across prompts, in (0, 1]: the ⌈keep·count⌉ smallest margins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<f64>,
    /// Number of pairs to keep across prompts (≥ 1), instead of `keep`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_count: Option<u64>,
}

fn default_beta() -> f64 {
    0.1
}

impl SmallMargin {
    /// Parses and validates the config, reporting every problem.
    pub fn build(v: &serde_json::Value) -> Result<SmallMargin, Vec<ConfigError>> {
        let c: SmallMargin = crate::build_config(v)?;
        let mut errs = Vec::new();
        if !(c.beta > 0.0 && c.beta.is_finite()) {
            errs.push(corpus::err("beta", format!("`beta` must be a finite number > 0; got {}", c.beta)));
        }
        corpus::check_keep("keep", c.keep, &mut errs);
        if c.keep_count == Some(0) {
            errs.push(corpus::err("keep_count", "`keep_count` must be at least 1"));
        }
        corpus::check_exclusive(("keep", c.keep.is_some()), ("keep_count", c.keep_count.is_some()), &mut errs);
        corpus::finish(c, errs)
    }

    /// Whether a corpus-level cut applies (then the strategy needs every prompt at once).
    fn cuts(&self) -> bool {
        self.keep_count.is_some() || self.keep.is_some_and(|k| k < 1.0)
    }

    /// How many of `n` pairs the corpus cut keeps.
    pub fn keep_of(&self, n: usize) -> usize {
        match (self.keep, self.keep_count) {
            (_, Some(k)) => (k as usize).min(n),
            (Some(f), None) => ceil_count(f, n),
            (None, None) => n,
        }
    }
}

/// One prompt's pick: positions in the candidates and the signed implicit margin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub chosen: usize,
    pub rejected: usize,
    /// r̂_chosen − r̂_rejected.
    pub implicit_margin: f64,
}

/// The ranking value of a signed margin under `mode` (smaller = kept first).
pub fn rank_value(m: f64, mode: MarginMode) -> f64 {
    match mode {
        MarginMode::Abs => m.abs(),
        MarginMode::Signed => m,
    }
}

/// The pair of one prompt. `rhat[i]` is the implicit reward of `c[i]`;
/// `c` is sorted by sample_idx (as [`candidates`] returns it).
pub fn pick(c: &[Candidate], rhat: &[f64], mode: MarginMode) -> Result<Pick, DropReason> {
    pick_distinct(c, rhat, mode, |_, _| false)
}

/// [`pick`] among the pairs whose texts differ (`same(i, j)` says when
/// `c[i]` and `c[j]` are copies of one text): two copies have the same
/// log-probs, so their margin would be 0, the smallest of all. A prompt
/// whose only pairs with differing rewards are copies is dropped as
/// `identical_responses`.
pub fn pick_distinct(c: &[Candidate], rhat: &[f64], mode: MarginMode, same: impl Fn(usize, usize) -> bool) -> Result<Pick, DropReason> {
    debug_assert_eq!(c.len(), rhat.len());
    if c.len() < 2 {
        return Err(DropReason::TooFewSamples);
    }
    let mut best: Option<(f64, u32, u32, Pick)> = None;
    let mut copies = false;
    for i in 0..c.len() {
        for j in i + 1..c.len() {
            let (hi, lo) = if c[i].reward > c[j].reward {
                (i, j)
            } else if c[j].reward > c[i].reward {
                (j, i)
            } else {
                continue;
            };
            if same(i, j) {
                copies = true;
                continue;
            }
            let m = rhat[hi] - rhat[lo];
            let key = (rank_value(m, mode), c[hi].sample_idx, c[lo].sample_idx);
            let better = match &best {
                None => true,
                Some((k, a, b, _)) => cmp_f64(key.0, *k).then(key.1.cmp(a)).then(key.2.cmp(b)).is_lt(),
            };
            if better {
                best = Some((key.0, key.1, key.2, Pick { chosen: hi, rejected: lo, implicit_margin: m }));
            }
        }
    }
    best.map(|b| b.3).ok_or(if copies { DropReason::IdenticalResponses } else { DropReason::Tie })
}

/// A pair competing in the corpus cut.
pub struct Ranked<'a> {
    pub prompt_id: &'a str,
    pub chosen_idx: u32,
    pub rejected_idx: u32,
    pub implicit_margin: f64,
}

/// Which of `pairs` the corpus cut keeps: the `keep` smallest by
/// [`rank_value`], ties toward (prompt_id, chosen_idx, rejected_idx).
pub fn corpus_keep(pairs: &[Ranked], keep: usize, mode: MarginMode) -> Vec<bool> {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&pairs[a], &pairs[b]);
        cmp_f64(rank_value(x.implicit_margin, mode), rank_value(y.implicit_margin, mode))
            .then_with(|| x.prompt_id.cmp(y.prompt_id))
            .then(x.chosen_idx.cmp(&y.chosen_idx))
            .then(x.rejected_idx.cmp(&y.rejected_idx))
    });
    let mut kept = vec![false; pairs.len()];
    for &i in order.iter().take(keep) {
        kept[i] = true;
    }
    kept
}

impl Strategy for SmallMargin {
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("serializes")
    }
    fn mode(&self) -> Mode {
        if self.cuts() {
            Mode::Whole
        } else {
            Mode::PerPrompt
        }
    }
    fn plan(&self, inputs: &[Input]) -> Result<SchemaRef, Vec<ConfigError>> {
        let input = one_input(KIND.name, inputs)?;
        let mut errs: Vec<ConfigError> = [col::LOGP_POLICY, col::LOGP_REFERENCE]
            .into_iter()
            .filter_map(|c| table::require(input.schema, input.id, c, Need::Number).err())
            .collect();
        match pairs::pairs_schema(input.schema, input.id, vec![Field::new("implicit_margin", DataType::Float64, false)]) {
            Ok(s) if errs.is_empty() => Ok(s),
            Ok(_) => Err(errs),
            Err(e) => {
                errs.extend(e);
                Err(errs)
            }
        }
    }
    fn run(&self, inputs: &[RecordBatch], schema: &SchemaRef) -> Result<Output> {
        let input = &inputs[0];
        let groups = group_rows(input)?;
        let (cands, dropped) = candidates(input, &groups, col::REWARD)?;
        let texts = pairs::Texts::of(input)?;
        let lp = f64_col(input, col::LOGP_POLICY)?;
        let lr = f64_col(input, col::LOGP_REFERENCE)?;
        let value = |a: &Float64Array, r: usize| if a.is_null(r) { f64::NAN } else { a.value(r) };
        let mut bad_logp = 0u64;
        let scored: Vec<(Vec<Candidate>, Vec<f64>)> = cands
            .into_iter()
            .map(|cs| {
                let (mut keep, mut rhat) = (Vec::with_capacity(cs.len()), Vec::with_capacity(cs.len()));
                for c in cs {
                    let r = self.beta * (value(&lp, c.row) - value(&lr, c.row));
                    if r.is_finite() {
                        keep.push(c);
                        rhat.push(r);
                    } else {
                        bad_logp += 1;
                    }
                }
                (keep, rhat)
            })
            .collect();
        let picks: Vec<Result<(Candidate, Candidate, f64), DropReason>> = scored
            .par_iter()
            .map(|(c, r)| {
                pick_distinct(c, r, self.margin_mode, |i, j| texts.same(c[i].row, c[j].row))
                    .map(|p| (c[p.chosen], c[p.rejected], p.implicit_margin))
            })
            .collect();
        let mut out = Output::default();
        dropped.record(&mut out);
        out.drop(DropReason::NonFiniteLogp.as_str(), bad_logp);
        let mut found = Vec::new();
        let mut ranked = Vec::new();
        for (g, p) in picks.into_iter().enumerate() {
            match p {
                Ok((a, b, m)) => {
                    ranked.push(Ranked {
                        prompt_id: groups.prompt_ids.value(groups.rows[g][0]),
                        chosen_idx: a.sample_idx,
                        rejected_idx: b.sample_idx,
                        implicit_margin: m,
                    });
                    found.push((a.row, b.row, m));
                }
                Err(r) => out.drop(r.as_str(), 1),
            }
        }
        let kept = corpus_keep(&ranked, self.keep_of(ranked.len()), self.margin_mode);
        out.drop(DropReason::BelowThreshold.as_str(), kept.iter().filter(|k| !**k).count() as u64);
        let mut rows = PairRows::default();
        let mut margins = Vec::new();
        for ((a, b, m), k) in found.into_iter().zip(kept) {
            if k {
                rows.push(a, b);
                margins.push(m);
            }
        }
        let extra: Vec<ArrayRef> = vec![Arc::new(Float64Array::from(margins))];
        out.batches.push(pairs::build(input, schema, &rows, extra)?);
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::groups::testing::cands;
    use crate::testkit;
    use arrow::datatypes::Schema;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> SmallMargin {
        SmallMargin::build(&v).unwrap()
    }

    #[test]
    fn picks_the_smallest_abs_implicit_margin() {
        // rewards [3, 1, 2, 1], r̂ [0.5, 0.45, −0.2, 0.9]. Pairs with differing rewards
        // (chosen/rejected by reward) and |r̂c − r̂r|:
        //   0/1: |0.5 − 0.45| = 0.05   0/2: 0.7   0/3: 0.4   2/1: |−0.2 − 0.45| = 0.65   2/3: 1.1
        // (1/3 have equal reward 1: skipped, although |0.45 − 0.9| would be 0.45.)
        // Smallest: chosen 0, rejected 1, implicit_margin = 0.5 − 0.45 = 0.05.
        let c = cands(&[3.0, 1.0, 2.0, 1.0]);
        let p = pick(&c, &[0.5, 0.45, -0.2, 0.9], MarginMode::Abs).unwrap();
        assert_eq!((p.chosen, p.rejected), (0, 1));
        assert!((p.implicit_margin - 0.05).abs() < 1e-12);
    }

    #[test]
    fn signed_mode_picks_the_most_negative_margin() {
        // Same vectors; signed margins r̂c − r̂r: 0/1: 0.05, 0/2: 0.7, 0/3: −0.4, 2/1: −0.65, 2/3: −1.1.
        // Smallest signed: chosen 2, rejected 3, −0.2 − 0.9 = −1.1.
        let c = cands(&[3.0, 1.0, 2.0, 1.0]);
        let p = pick(&c, &[0.5, 0.45, -0.2, 0.9], MarginMode::Signed).unwrap();
        assert_eq!((p.chosen, p.rejected), (2, 3));
        assert!((p.implicit_margin + 1.1).abs() < 1e-12);
    }

    #[test]
    fn pair_ties_break_toward_lowest_chosen_then_rejected_idx() {
        // rewards [1, 2, 3], r̂ [0, 1, 2]: |margins| 1/0 = 1, 2/0 = 2, 2/1 = 1.
        // Pairs (chosen 1, rejected 0) and (2, 1) tie at 1 → (1, 0) comes first.
        let c = cands(&[1.0, 2.0, 3.0]);
        let p = pick(&c, &[0.0, 1.0, 2.0], MarginMode::Abs).unwrap();
        assert_eq!((p.chosen, p.rejected), (1, 0));
        // All r̂ equal: every margin 0; orientations 1/0, 2/0, 2/1 → (1, 0).
        let p = pick(&c, &[0.3, 0.3, 0.3], MarginMode::Abs).unwrap();
        assert_eq!((p.chosen, p.rejected, p.implicit_margin), (1, 0, 0.0));
    }

    #[test]
    fn signed_zero_margins_tie() {
        // rewards [3, 2, 1], r̂ [0.0, −0.0, 0.0]: signed margins 0/1: 0.0 − (−0.0) = 0.0,
        // 0/2: 0.0, 1/2: −0.0 − 0.0 = −0.0. All equal under IEEE 754 (−0 = +0), so the tie
        // goes to (chosen 0, rejected 1); `total_cmp` ranked −0.0 first and picked (1, 2).
        let c = cands(&[3.0, 2.0, 1.0]);
        let p = pick(&c, &[0.0, -0.0, 0.0], MarginMode::Signed).unwrap();
        assert_eq!((p.chosen, p.rejected), (0, 1));
        // Across prompts: b's −0.0 and a's 0.0 tie → prompt_id order keeps a.
        let r = |p, m| Ranked { prompt_id: p, chosen_idx: 0, rejected_idx: 1, implicit_margin: m };
        assert_eq!(corpus_keep(&[r("b", -0.0), r("a", 0.0)], 1, MarginMode::Signed), [false, true]);
    }

    #[test]
    fn equal_rewards_and_singletons_are_dropped() {
        // No pair has differing rewards → tie.
        assert_eq!(pick(&cands(&[1.0, 1.0]), &[0.0, 5.0], MarginMode::Abs), Err(DropReason::Tie));
        assert_eq!(pick(&cands(&[1.0]), &[0.0], MarginMode::Abs), Err(DropReason::TooFewSamples));
    }

    #[test]
    fn corpus_keeps_the_smallest_margins_with_ties_by_prompt_id() {
        // margins: a 0.3, b −0.1, c 0.1, d 0.5. abs ranks b (0.1), c (0.1) tie → prompt_id
        // order b < c; then a (0.3), d (0.5). keep 2 → b, c.
        let r = |p, m| Ranked { prompt_id: p, chosen_idx: 0, rejected_idx: 1, implicit_margin: m };
        let pairs = [r("a", 0.3), r("b", -0.1), r("c", 0.1), r("d", 0.5)];
        assert_eq!(corpus_keep(&pairs, 2, MarginMode::Abs), [false, true, true, false]);
        // signed ranks b (−0.1), c (0.1), a (0.3), d (0.5): keep 3 → b, c, a.
        assert_eq!(corpus_keep(&pairs, 3, MarginMode::Signed), [true, true, true, false]);
        // keep: 0.5 of 4 pairs = ⌈2⌉ = 2; keep 0.6 → ⌈2.4⌉ = 3; keep_count 9 of 4 → 4.
        assert_eq!(cfg(json!({"keep": 0.5})).keep_of(4), 2);
        assert_eq!(cfg(json!({"keep": 0.6})).keep_of(4), 3);
        assert_eq!(cfg(json!({"keep_count": 9})).keep_of(4), 4);
        assert_eq!(cfg(json!({})).keep_of(4), 4);
    }

    #[test]
    fn bad_parameters_are_located() {
        let e = SmallMargin::build(&json!({"keep": 1.5, "beta": 0.0})).unwrap_err();
        let msgs: Vec<String> = e.iter().map(|e| format!("{:?}: {}", e.path, e.message)).collect();
        assert_eq!(e.len(), 2, "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("`keep` is a fraction in (0, 1]; got 1.5")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("`beta` must be a finite number > 0")), "{msgs:?}");
        let e = SmallMargin::build(&json!({"keep": 0.0})).unwrap_err();
        assert!(e[0].message.contains("(0, 1]"));
        let e = SmallMargin::build(&json!({"keep": 0.5, "keep_count": 3})).unwrap_err();
        assert!(e[0].message.contains("not both"), "{}", e[0].message);
        let e = SmallMargin::build(&json!({"keep_count": 0})).unwrap_err();
        assert!(e[0].message.contains("at least 1"));
        let e = SmallMargin::build(&json!({"margin_mode": "absolute"})).unwrap_err();
        assert!(e[0].message.contains("expected `abs` or `signed`"), "{}", e[0].message);
        assert_eq!(cfg(json!({})).mode(), Mode::PerPrompt);
        assert_eq!(cfg(json!({"keep": 1.0})).mode(), Mode::PerPrompt);
        assert_eq!(cfg(json!({"keep": 0.5})).mode(), Mode::Whole);
    }

    /// A scored table with logp columns: (prompt_id, sample_idx, reward, logp_policy, logp_reference).
    pub(crate) fn batch(rows: &[(&str, u32, f64, f64, f64)]) -> RecordBatch {
        let base: Vec<(&str, u32, f64)> = rows.iter().map(|r| (r.0, r.1, r.2)).collect();
        let lp = (col::LOGP_POLICY, rows.iter().map(|r| r.3).collect());
        let lr = (col::LOGP_REFERENCE, rows.iter().map(|r| r.4).collect());
        testkit::scored(&base, &[lp, lr])
    }

    fn run(c: &SmallMargin, b: &RecordBatch) -> Output {
        testkit::run(c, std::slice::from_ref(b)).unwrap()
    }

    #[test]
    fn arrow_adapter_cuts_across_prompts_and_keeps_input_order() {
        // β = 0.1. Prompt z: rewards [2, 1], logp diff [1, −1] → r̂ [0.1, −0.1], margin 0.2.
        // Prompt y: rewards [1, 2, NaN], r̂ [0, 0.05, ·] → chosen 1, rejected 0, margin 0.05.
        // Prompt x: rewards [1, 0], logp_reference NaN on idx 1 → one sample left → too_few_samples.
        // keep_count 1 keeps y (|0.05| < |0.2|); z is below_threshold.
        let b = batch(&[
            ("z", 0, 2.0, -1.0, -2.0),
            ("z", 1, 1.0, -3.0, -2.0),
            ("y", 0, 1.0, -1.0, -1.0),
            ("y", 1, 2.0, -0.5, -1.0),
            ("y", 2, f64::NAN, -0.5, -1.0),
            ("x", 0, 1.0, -1.0, -1.0),
            ("x", 1, 0.0, -1.0, f64::NAN),
        ]);
        let out = run(&cfg(json!({"keep_count": 1})), &b);
        let o = &out.batches[0];
        assert_eq!(o.num_rows(), 1);
        assert_eq!(table::str_col(o, "prompt_id").unwrap().value(0), "y");
        assert!((table::f64_col(o, "implicit_margin").unwrap().value(0) - 0.05).abs() < 1e-12);
        let d = |k: &str| testkit::drops(&out, k);
        assert_eq!((d("non_finite_reward"), d("non_finite_logp"), d("too_few_samples"), d("below_threshold")), (1, 1, 1, 1));
        // Without a cut both pairs come out in input prompt order: z, y.
        let out = run(&cfg(json!({})), &b);
        let ids = table::str_col(&out.batches[0], "prompt_id").unwrap();
        assert_eq!(ids.iter().flatten().collect::<Vec<_>>(), ["z", "y"]);
    }

    #[test]
    fn plan_requires_logp_columns() {
        let s = Schema::new(table::scored_fields());
        let e = cfg(json!({})).plan(&[Input { id: "scored", schema: &s }]).unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(e[0].message.contains("no column `logp_policy`"), "{}", e[0].message);
    }
}
