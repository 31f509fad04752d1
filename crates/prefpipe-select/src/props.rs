//! Property tests over seeded random tables, for every strategy:
//! - shuffling the input rows does not change the output rows (as a set;
//!   and exactly, order included, when prompts keep their order);
//! - every emitted pair prefers chosen (higher reward, or higher Borda for
//!   `repeat_ranking`), every list is sorted best first;
//! - for `PerPrompt` strategies, running prompt-aligned chunks one by one gives
//!   the same rows and drop counts as one run over everything.
//!
//! Rewards, log-probs and ranker scores come from small sets so that ties —
//! where row order could leak into results — are common.

use arrow::array::{Array, Float64Array, ListArray};
use arrow::compute::{lexsort_to_indices, take_record_batch, SortColumn};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{Mode, Output};
use prefpipe_core::table::{f64_col, str_col, u32_col};
use serde_json::json;

use crate::testkit;
use crate::Strategy;

/// Random tables per property.
const SEEDS: u64 = 200;

/// splitmix64: a tiny seeded generator, enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick(&mut self, v: &[f64], nan_pct: usize) -> f64 {
        if self.below(100) < nan_pct {
            f64::NAN
        } else {
            v[self.below(v.len())]
        }
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

#[derive(Clone, Debug)]
struct Row {
    pid: String,
    idx: u32,
    reward: f64,
    lp: f64,
    lr: f64,
    j: [f64; 3],
}

/// Prompts (ids in random order, unlike their input order), each with 0–6
/// samples with distinct sample_idx, rows grouped by prompt.
fn gen(rng: &mut Rng) -> Vec<Vec<Row>> {
    let n_prompts = rng.below(16);
    let mut ids: Vec<usize> = (0..100).collect();
    rng.shuffle(&mut ids);
    (0..n_prompts)
        .map(|p| {
            let n = rng.below(7);
            // Mostly 0..n as generated; sometimes a sparse subset (after upstream filtering).
            let mut idxs: Vec<u32> = (0..10).collect();
            if rng.below(4) == 0 {
                rng.shuffle(&mut idxs);
            }
            (0..n)
                .map(|s| Row {
                    pid: format!("p{:02}", ids[p]),
                    idx: idxs[s],
                    reward: rng.pick(&[-1.0, -0.0, 0.0, 0.5, 1.0, 2.0], 6),
                    lp: rng.pick(&[-2.0, -1.5, -1.0], 3),
                    lr: rng.pick(&[-2.0, -1.0], 3),
                    j: [rng.pick(&[1.0, 2.0, 3.0], 3), rng.pick(&[1.0, 2.0, 3.0], 3), rng.pick(&[1.0, 2.0, 3.0, 4.0], 3)],
                })
                .collect()
        })
        .collect()
}

fn batch(rows: &[Row]) -> RecordBatch {
    let base: Vec<(&str, u32, f64)> = rows.iter().map(|r| (r.pid.as_str(), r.idx, r.reward)).collect();
    let f = |g: &dyn Fn(&Row) -> f64| rows.iter().map(g).collect::<Vec<_>>();
    testkit::scored(
        &base,
        &[
            ("logp_policy", f(&|r| r.lp)),
            ("logp_reference", f(&|r| r.lr)),
            ("j1", f(&|r| r.j[0])),
            ("j2", f(&|r| r.j[1])),
            ("j3", f(&|r| r.j[2])),
        ],
    )
}

/// A rankings table for `groups`: 2–3 repeats, each ranking every sample with
/// random ranks in 1..=n (ties allowed), rows shuffled.
fn rankings(rng: &mut Rng, groups: &[Vec<Row>]) -> RecordBatch {
    let mut rows = Vec::new();
    for g in groups {
        let m = 2 + rng.below(2) as u32;
        for rep in 0..m {
            for r in g {
                rows.push((r.pid.as_str(), r.idx, rep, 1 + rng.below(g.len()) as u32));
            }
        }
    }
    rng.shuffle(&mut rows);
    testkit::rankings(&rows)
}

/// Every strategy under test, with a name for failure messages.
fn strategies() -> Vec<(&'static str, Box<dyn Strategy>)> {
    let sel = |name: &str, v: serde_json::Value| (crate::SELECT.iter().find(|k| k.name == name).unwrap().build)(&v).unwrap();
    vec![
        ("max_min", sel("max_min", json!({}))),
        ("reward_points", sel("reward_points", json!({}))),
        ("reward_points all", sel("reward_points", json!({"all_points": true, "ddof": 1}))),
        ("small_margin", sel("small_margin", json!({}))),
        ("small_margin keep", sel("small_margin", json!({"keep": 0.5}))),
        ("small_margin signed count", sel("small_margin", json!({"margin_mode": "signed", "keep_count": 3, "beta": 0.5}))),
        ("repeat_ranking", sel("repeat_ranking", json!({"rankers": ["j1", "j2", "j3"]}))),
        ("repeat_ranking min_w", sel("repeat_ranking", json!({"rankers": ["j1", "j2"], "min_w": 0.5}))),
        ("repeat_ranking keep", sel("repeat_ranking", json!({"rankers": ["j1", "j2", "j3"], "keep": 0.6}))),
        ("listwise", sel("listwise", json!({}))),
        ("listwise 3", sel("listwise", json!({"list_size": 3}))),
    ]
}

/// Output rows in a canonical order: by prompt_id, then chosen/rejected idx
/// (and `points`) for pairs.
fn canonical(b: &RecordBatch) -> RecordBatch {
    let keys: Vec<SortColumn> = ["prompt_id", "chosen_idx", "rejected_idx", "points"]
        .iter()
        .filter_map(|c| b.column_by_name(c))
        .map(|c| SortColumn { values: c.clone(), options: None })
        .collect();
    let idx = lexsort_to_indices(&keys, None).unwrap();
    take_record_batch(b, &idx).unwrap()
}

fn run(s: &dyn Strategy, inputs: &[RecordBatch]) -> (RecordBatch, Output) {
    let out = testkit::run(s, inputs).unwrap();
    (testkit::one(&out), out)
}

fn pretty(b: &RecordBatch) -> String {
    arrow::util::pretty::pretty_format_batches(std::slice::from_ref(b)).unwrap().to_string()
}

/// Asserts two batches are equal, showing both as tables when they are not.
#[track_caller]
fn assert_same(a: &RecordBatch, b: &RecordBatch, what: std::fmt::Arguments) {
    if a != b {
        panic!("{what}: outputs differ\n{}\n{}", pretty(a), pretty(b));
    }
}

/// Rows with prompts in their order but samples shuffled within each prompt.
fn shuffle_within(rng: &mut Rng, groups: &[Vec<Row>]) -> Vec<Row> {
    groups
        .iter()
        .flat_map(|g| {
            let mut g = g.clone();
            rng.shuffle(&mut g);
            g
        })
        .collect()
}

#[test]
fn shuffled_rows_give_the_same_output() {
    for seed in 0..SEEDS {
        let mut rng = Rng(seed);
        let groups = gen(&mut rng);
        let rows: Vec<Row> = groups.concat();
        let mut all = rows.clone();
        rng.shuffle(&mut all);
        let within = shuffle_within(&mut rng, &groups);
        for (name, s) in strategies() {
            let (base, base_out) = run(s.as_ref(), &[batch(&rows)]);
            let (shuf, shuf_out) = run(s.as_ref(), &[batch(&all)]);
            assert_same(&canonical(&base), &canonical(&shuf), format_args!("{name}, seed {seed}"));
            assert_eq!(base_out.drops, shuf_out.drops, "{name}, seed {seed}");
            // Prompts in the same order: the very same batch, row order included.
            let (w, _) = run(s.as_ref(), &[batch(&within)]);
            assert_same(&base, &w, format_args!("{name}, seed {seed} (within-prompt shuffle)"));
        }
    }
}

#[test]
fn shuffled_rankings_tables_give_the_same_output() {
    let s = crate::repeat_ranking::RepeatRanking::build(&json!({"keep": 0.7})).unwrap();
    for seed in 0..SEEDS {
        let mut rng = Rng(seed);
        let groups = gen(&mut rng);
        let rankings = rankings(&mut rng, &groups);
        let rows: Vec<Row> = groups.concat();
        let mut all = rows.clone();
        rng.shuffle(&mut all);
        let mut ridx: Vec<u32> = (0..rankings.num_rows() as u32).collect();
        rng.shuffle(&mut ridx);
        let shuffled_rankings = take_record_batch(&rankings, &arrow::array::UInt32Array::from(ridx)).unwrap();
        let (base, base_out) = run(&s, &[batch(&rows), rankings]);
        let (shuf, shuf_out) = run(&s, &[batch(&all), shuffled_rankings]);
        assert_same(&canonical(&base), &canonical(&shuf), format_args!("seed {seed}"));
        assert_eq!(base_out.drops, shuf_out.drops, "seed {seed}");
        assert_pairs_prefer_chosen("repeat_ranking 2 inputs", &base);
    }
}

/// Every pair prefers chosen: by Borda where the strategy ranks by Borda, else by reward.
fn assert_pairs_prefer_chosen(name: &str, b: &RecordBatch) {
    if b.column_by_name("chosen_borda").is_some() {
        let (c, r) = (f64_col(b, "chosen_borda").unwrap(), f64_col(b, "rejected_borda").unwrap());
        assert!((0..b.num_rows()).all(|i| c.value(i) > r.value(i)), "{name}: chosen_borda > rejected_borda");
    } else if b.column_by_name("chosen_reward").is_some() {
        let (c, r, m) = (f64_col(b, "chosen_reward").unwrap(), f64_col(b, "rejected_reward").unwrap(), f64_col(b, "margin").unwrap());
        for i in 0..b.num_rows() {
            assert!(c.value(i) > r.value(i) && m.value(i) > 0.0, "{name}: row {i} chosen_reward > rejected_reward");
        }
    }
}

#[test]
fn pairs_prefer_chosen_and_lists_are_sorted() {
    for seed in 0..SEEDS {
        let mut rng = Rng(seed);
        let rows: Vec<Row> = gen(&mut rng).concat();
        for (name, s) in strategies() {
            let (b, _) = run(s.as_ref(), &[batch(&rows)]);
            assert_pairs_prefer_chosen(name, &b);
            if let Some(rewards) = b.column_by_name("rewards") {
                let lists = rewards.as_any().downcast_ref::<ListArray>().unwrap();
                for i in 0..lists.len() {
                    let v = lists.value(i);
                    let v = v.as_any().downcast_ref::<Float64Array>().unwrap().values().to_vec();
                    assert!(v.len() >= 2 && v.windows(2).all(|w| w[0] >= w[1]) && v[0] > v[v.len() - 1], "{name}: {v:?}");
                }
            }
            // No sample is paired with itself, and every pair belongs to one prompt's samples.
            if b.column_by_name("chosen_idx").is_some() {
                let (c, r) = (u32_col(&b, "chosen_idx").unwrap(), u32_col(&b, "rejected_idx").unwrap());
                let ids = str_col(&b, "prompt_id").unwrap();
                for i in 0..b.num_rows() {
                    assert_ne!(c.value(i), r.value(i), "{name}");
                    assert!(rows.iter().any(|x| x.pid == ids.value(i) && x.idx == c.value(i)), "{name}");
                }
            }
        }
    }
}

#[test]
fn per_prompt_strategies_give_the_same_rows_chunk_by_chunk() {
    for seed in 0..SEEDS {
        let mut rng = Rng(seed);
        let groups = gen(&mut rng);
        let rows: Vec<Row> = groups.concat();
        // Cut the prompt-aligned input into chunks of whole prompts.
        let mut chunks: Vec<Vec<Row>> = vec![Vec::new()];
        for g in &groups {
            if rng.below(3) == 0 {
                chunks.push(Vec::new());
            }
            chunks.last_mut().unwrap().extend(g.iter().cloned());
        }
        for (name, s) in strategies() {
            if s.mode() != Mode::PerPrompt {
                continue;
            }
            let (whole, whole_out) = run(s.as_ref(), &[batch(&rows)]);
            let mut parts = Vec::new();
            let mut drops = std::collections::BTreeMap::<String, u64>::new();
            for c in &chunks {
                let (b, out) = run(s.as_ref(), &[batch(c)]);
                parts.push(b);
                for (k, v) in out.drops {
                    *drops.entry(k).or_default() += v;
                }
            }
            let joined = arrow::compute::concat_batches(&whole.schema(), &parts).unwrap();
            assert_same(&whole, &joined, format_args!("{name}, seed {seed}"));
            assert_eq!(whole_out.drops, drops, "{name}, seed {seed}");
        }
    }
}

/// The filters, on pairs tables (from `reward_points` with all points, so a
/// prompt has several pairs; max_min pairs for `ches`): shuffle invariance and chunking.
#[test]
fn filters_are_order_and_chunk_invariant() {
    let rp = (crate::reward_points::KIND.build)(&json!({"all_points": true})).unwrap();
    let filters: Vec<(&str, Box<dyn Strategy>)> = vec![
        ("margin min", Box::new(crate::margin::Margin::build(&json!({"min_margin": 1.0})).unwrap())),
        ("margin band", Box::new(crate::margin::Margin::build(&json!({"band": [0.5, 2.0]})).unwrap())),
    ];
    let ches = crate::ches::Ches::build(&json!({"model": "m", "drop": 0.3})).unwrap();
    for seed in 0..SEEDS {
        let mut rng = Rng(seed);
        let rows: Vec<Row> = gen(&mut rng).concat();
        let (pairs, _) = run(rp.as_ref(), &[batch(&rows)]);
        let mut perm: Vec<u32> = (0..pairs.num_rows() as u32).collect();
        rng.shuffle(&mut perm);
        let shuffled = take_record_batch(&pairs, &arrow::array::UInt32Array::from(perm)).unwrap();
        for (name, f) in &filters {
            let (a, ao) = run(f.as_ref(), std::slice::from_ref(&pairs));
            let (b, bo) = run(f.as_ref(), std::slice::from_ref(&shuffled));
            assert_same(&canonical(&a), &canonical(&b), format_args!("{name}, seed {seed}"));
            assert_eq!(ao.drops, bo.drops);
            // Row by row, so any split into chunks gives the same rows.
            let half = pairs.num_rows() / 2;
            let (x, _) = run(f.as_ref(), &[pairs.slice(0, half)]);
            let (y, _) = run(f.as_ref(), &[pairs.slice(half, pairs.num_rows() - half)]);
            let joined = arrow::compute::concat_batches(&a.schema(), &[x, y]).unwrap();
            assert_same(&a, &joined, format_args!("{name}, seed {seed} (chunks)"));
        }
        // ches breaks score ties by (prompt_id, chosen_idx, rejected_idx), which all_points pairs
        // can share; max_min pairs are unique per prompt. Scores are a function of the pair (few
        // values, so ties are common), permuted with the rows.
        let (pairs, _) = run(&crate::max_min::MaxMin {}, &[batch(&rows)]);
        let mut perm: Vec<u32> = (0..pairs.num_rows() as u32).collect();
        rng.shuffle(&mut perm);
        let shuffled = take_record_batch(&pairs, &arrow::array::UInt32Array::from(perm)).unwrap();
        let score = |b: &RecordBatch| -> Vec<f64> {
            let m = f64_col(b, "margin").unwrap();
            (0..b.num_rows()).map(|i| (m.value(i) * 2.0).round() / 4.0).collect()
        };
        let (s0, s1) = (score(&pairs), score(&shuffled));
        let a = crate::ches::filter_by_scores(&pairs, &s0, &s0, &ches).unwrap();
        let b = crate::ches::filter_by_scores(&shuffled, &s1, &s1, &ches).unwrap();
        assert_same(&canonical(&testkit::one(&a)), &canonical(&testkit::one(&b)), format_args!("ches, seed {seed}"));
        assert_eq!(a.drops, b.drops);
    }
}
