//! The `score` stage through its public surface (`KIND.build` → `Stage::plan`
//! → `Stage::run`) on the committed tiny reward models, against numbers from
//! Hugging Face transformers:
//!
//! - `tests/golden/models/tiny-llama-rm.json` (tests/reference/models_golden.py),
//! - `tests/golden/score/*.json` (tests/reference/score_golden.py: tiny-qwen2-rm
//!   and the 3-label tiny-qwen3-rm-3labels).
//!
//! Re-bless the tiny-qwen2-rm fixture with
//! `PREFPIPE_BLESS=1 cargo test -p prefpipe-stages --test score committed`,
//! then re-run the script to refresh the goldens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output, PlanCx, RunCx, Stage, Table};
use prefpipe_models::{write_reward_fixture, Family};
use prefpipe_stages::score;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn models_dir() -> PathBuf {
    repo().join("data-samples/models")
}

/// Acceptance tolerance (issue 5): 1e-4 relative to transformers.
const REL_TOL: f64 = 1e-4;

fn rel_err(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-12)
}

// ---------------------------------------------------------------------------
// Harness: build, plan and run the stage on in-memory tables.

fn build(config: Value) -> Box<dyn Stage> {
    (score::KIND.build)(&config).unwrap_or_else(|e| panic!("build failed: {e:?}"))
}

fn plan(stage: &dyn Stage, schema: &SchemaRef) -> Result<SchemaRef, Vec<ConfigError>> {
    let models = BTreeMap::new();
    let base = repo();
    let ids = ["input".to_string()];
    stage.plan(
        &PlanCx {
            base_dir: &base,
            models: &models,
            input_ids: &ids,
        },
        std::slice::from_ref(schema),
    )
}

/// Plans and runs the stage over `chunks` (one Parquet file each), the way
/// the executor feeds its mode; returns the concatenated output and drops.
fn run_chunks(config: Value, chunks: &[RecordBatch], scratch: &Path) -> (RecordBatch, BTreeMap<String, u64>) {
    let stage = build(config);
    let schema = plan(stage.as_ref(), &chunks[0].schema()).unwrap_or_else(|e| panic!("plan failed: {e:?}"));
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = chunks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let f = dir.path().join(format!("in-{i}.parquet"));
            prefpipe_core::io::write_parquet(&f, &b.schema(), std::slice::from_ref(b)).unwrap();
            f
        })
        .collect();
    let models = BTreeMap::new();
    let base = repo();
    let progress = |_: u64, _: u64| {};
    let cx = |chunk| RunCx {
        stage_id: "score",
        seed: 0,
        chunk,
        chunk_size: 256,
        scratch,
        base_dir: &base,
        models: &models,
        progress: &progress,
    };
    let table = |files: Vec<PathBuf>| Table {
        id: "input".into(),
        schema: chunks[0].schema(),
        files,
    };
    let outs: Vec<Output> = match stage.mode() {
        Mode::PerChunk => files
            .iter()
            .enumerate()
            .map(|(c, f)| stage.run(&cx(c), &[table(vec![f.clone()])]).unwrap())
            .collect(),
        Mode::Whole => vec![stage.run(&cx(0), &[table(files.clone())]).unwrap()],
        m => panic!("unexpected mode {m:?}"),
    };
    let mut drops = BTreeMap::new();
    let mut batches = Vec::new();
    for o in outs {
        for (k, v) in o.drops {
            *drops.entry(k).or_insert(0) += v;
        }
        batches.extend(o.batches);
    }
    (arrow::compute::concat_batches(&schema, &batches).unwrap(), drops)
}

fn run(config: Value, input: &RecordBatch) -> (RecordBatch, BTreeMap<String, u64>) {
    let scratch = tempfile::tempdir().unwrap();
    run_chunks(config, std::slice::from_ref(input), scratch.path())
}

/// A samples-like table: prompt_id, prompt, sample_idx, response, plus extra text columns.
fn table(rows: &[(&str, &str)], extra: &[(&str, Vec<Option<&str>>)]) -> RecordBatch {
    let mut fields = vec![
        Field::new("prompt_id", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("sample_idx", DataType::UInt32, false),
        Field::new("response", DataType::Utf8, false),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().enumerate().map(|(i, _)| format!("p{i:03}")))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(UInt32Array::from(vec![0; rows.len()])),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
    ];
    for (name, values) in extra {
        fields.push(Field::new(*name, DataType::Utf8, true));
        cols.push(Arc::new(StringArray::from(values.clone())));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

fn f64s(b: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let a = b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
    a.as_any().downcast_ref::<Float64Array>().unwrap().iter().collect()
}

fn golden(rel: &str) -> Value {
    let path = repo().join(rel);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// (prompt, response) of every pair in a golden file.
fn golden_pairs(g: &Value) -> Vec<(String, String)> {
    g["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["prompt"].as_str().unwrap().to_string(), p["response"].as_str().unwrap().to_string()))
        .collect()
}

fn pairs_table(pairs: &[(String, String)]) -> RecordBatch {
    let rows: Vec<(&str, &str)> = pairs.iter().map(|(p, r)| (p.as_str(), r.as_str())).collect();
    table(&rows, &[])
}

// ---------------------------------------------------------------------------
// Fixtures.

/// tiny-qwen2-rm is `write_reward_fixture(Qwen2, seed 6)`, byte for byte (or is rewritten when blessing).
#[test]
fn committed_qwen2_rm_fixture_is_reproducible() {
    let committed = models_dir().join("tiny-qwen2-rm");
    if std::env::var_os("PREFPIPE_BLESS").is_some() {
        write_reward_fixture(&committed, Family::Qwen2, 6).unwrap();
        return;
    }
    let fresh = tempfile::tempdir().unwrap();
    write_reward_fixture(fresh.path(), Family::Qwen2, 6).unwrap();
    for entry in std::fs::read_dir(fresh.path()).unwrap() {
        let file = entry.unwrap().file_name();
        let a = std::fs::read(fresh.path().join(&file)).unwrap();
        let b = std::fs::read(committed.join(&file)).unwrap_or_default();
        assert!(
            a == b,
            "tiny-qwen2-rm/{}: differs from write_reward_fixture output; re-bless with PREFPIPE_BLESS=1",
            file.to_string_lossy()
        );
    }
}

// ---------------------------------------------------------------------------
// Reward models vs transformers (acceptance 1).

/// (model dir, golden file, scores of pair i in mode m as a list of labels).
fn golden_scores(g: &Value, mode: &str) -> Vec<Vec<f64>> {
    g["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| match p[mode].get("logits") {
            Some(l) => l.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
            // models_golden.py stores the one-label reward as `reward`.
            None => vec![p[mode]["reward"].as_f64().unwrap()],
        })
        .collect()
}

/// Scores the 20 golden pairs through the stage, unbatched (batch_size 1) and
/// batched (batch_size 7: mixed lengths, 12–200+ tokens, padded together),
/// plain and with the chat template; both match transformers within 1e-4
/// relative and each other within f32 noise.
#[test]
fn one_label_rewards_match_transformers() {
    let cases = [
        // Llama: tests/golden/models/tiny-llama-rm.json (models_golden.py `run_reward`).
        ("tiny-llama-rm", "tests/golden/models/tiny-llama-rm.json"),
        // Qwen2: tests/golden/score/tiny-qwen2-rm.json (score_golden.py `run_reward`).
        ("tiny-qwen2-rm", "tests/golden/score/tiny-qwen2-rm.json"),
    ];
    for (name, file) in cases {
        let g = golden(file);
        let input = pairs_table(&golden_pairs(&g));
        for (mode, chat) in [("plain", false), ("chat", true)] {
            let want = golden_scores(&g, mode);
            let mut by_bs = Vec::new();
            for bs in [1, 7] {
                let model = models_dir().join(name);
                let cfg = json!({"reward_models": [{"name": "rm", "model": model, "chat_template": chat}], "batch_size": bs});
                let (out, drops) = run(cfg, &input);
                assert!(drops.is_empty(), "{drops:?}");
                let got = f64s(&out, "reward_rm");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let g = g.unwrap_or_else(|| panic!("{name} {mode} pair {i}: null"));
                    assert!(rel_err(g, w[0]) <= REL_TOL, "{name} {mode} bs {bs} pair {i}: {g} vs transformers {}", w[0]);
                }
                // One entry, `aggregate: mean`: reward = reward_rm.
                assert_eq!(f64s(&out, "reward"), got);
                by_bs.push(got);
            }
            // Padding never leaks: batched = unbatched up to f32 GEMM rounding (the
            // blocking differs with the batch shape), ~1e-7 absolute on scores of order 1.
            for (i, (a, b)) in by_bs[0].iter().zip(&by_bs[1]).enumerate() {
                let (a, b) = (a.unwrap(), b.unwrap());
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{name} {mode} pair {i}: unbatched {a} vs batched {b}");
            }
        }
    }
}

/// A 3-label head (Qwen3, pad = eos, transformers-5.x config): every label is
/// its own column, `label:` picks `reward_<name>`, `labels:` mixes them.
#[test]
fn multi_label_head_matches_transformers() {
    let g = golden("tests/golden/score/tiny-qwen3-rm-3labels.json");
    let input = pairs_table(&golden_pairs(&g));
    let model = models_dir().join("tiny-qwen3-rm-3labels");
    let cfg = json!({"reward_models": [
        {"name": "hs", "model": model, "label": "correctness"},
        {"name": "mix", "model": model, "labels": {"helpfulness": 1.0, "2": -0.5}, "chat_template": true},
        {"name": "by_index", "model": model, "label": 0},
    ], "batch_size": 5});
    let (out, _) = run(cfg, &input);
    let names: Vec<String> = out.schema().fields().iter().skip(4).map(|f| f.name().clone()).collect();
    assert_eq!(
        names,
        [
            "reward",
            "reward_hs",
            "reward_hs_helpfulness",
            "reward_hs_correctness",
            "reward_hs_verbosity",
            "reward_mix",
            "reward_mix_helpfulness",
            "reward_mix_correctness",
            "reward_mix_verbosity",
            "reward_by_index",
            "reward_by_index_helpfulness",
            "reward_by_index_correctness",
            "reward_by_index_verbosity",
        ]
    );
    let plain = golden_scores(&g, "plain");
    let chat = golden_scores(&g, "chat");
    for (l, label) in ["helpfulness", "correctness", "verbosity"].iter().enumerate() {
        for (i, got) in f64s(&out, &format!("reward_hs_{label}")).iter().enumerate() {
            assert!(rel_err(got.unwrap(), plain[i][l]) <= REL_TOL, "pair {i} {label}: {got:?} vs {}", plain[i][l]);
        }
        for (i, got) in f64s(&out, &format!("reward_mix_{label}")).iter().enumerate() {
            assert!(rel_err(got.unwrap(), chat[i][l]) <= REL_TOL, "chat pair {i} {label}: {got:?} vs {}", chat[i][l]);
        }
    }
    // `label: correctness` → reward_hs = label 1 exactly (the same number, not recomputed).
    assert_eq!(f64s(&out, "reward_hs"), f64s(&out, "reward_hs_correctness"));
    // `label: 0` → helpfulness.
    assert_eq!(f64s(&out, "reward_by_index"), f64s(&out, "reward_by_index_helpfulness"));
    // `labels: {helpfulness: 1, "2": −0.5}` → 1·helpfulness − 0.5·verbosity (transformers' chat logits).
    for (i, got) in f64s(&out, "reward_mix").iter().enumerate() {
        let want = chat[i][0] - 0.5 * chat[i][2];
        assert!(
            (got.unwrap() - want).abs() <= REL_TOL * want.abs().max(chat[i][0].abs()),
            "pair {i}: {got:?} vs {want}"
        );
    }
}
