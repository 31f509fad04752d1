//! The `score` stage through its public surface (`KIND.build` → `Stage::plan`
//! → `Stage::run`) on the committed tiny reward models, against numbers from
//! Hugging Face transformers:
//!
//! - `tests/golden/models/tiny-llama-rm.json` (tests/reference/models_golden.py),
//! - `tests/golden/score/*.json` (tests/reference/score_golden.py: tiny-qwen2-rm,
//!   tiny-mistral-rm and the 3-label tiny-qwen3-rm-3labels).
//!
//! Re-bless the tiny-qwen2-rm and tiny-mistral-rm fixtures with
//! `PREFPIPE_BLESS=1 cargo test -p prefpipe-stages --test score committed`,
//! then re-run the script to refresh the goldens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{ConfigError, Mode, Output, PlanCx, RunCx, Stage, Table};
use prefpipe_core::yaml::PathSeg;
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
        &PlanCx { base_dir: &base, models: &models, remotes: &Default::default(), input_ids: &ids, produced: &Default::default() },
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
    let remotes = BTreeMap::new();
    let base = repo();
    let progress = |_: u64, _: u64| {};
    let device = |_: &str| {};
    let cx = |chunk| RunCx {
        stage_id: "score",
        seed: 0,
        chunk,
        chunk_size: 256,
        scratch,
        base_dir: &base,
        models: &models,
        remotes: &remotes,
        store_root: scratch,
        stage_key: "k",
        progress: &progress,
        device: &device,
    };
    let table = |files: Vec<PathBuf>| Table { id: "input".into(), schema: chunks[0].schema(), files };
    let outs: Vec<Output> = match stage.mode() {
        Mode::PerChunk => files.iter().enumerate().map(|(c, f)| stage.run(&cx(c), &[table(vec![f.clone()])]).unwrap()).collect(),
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

/// The reward-model fixtures this crate commits: (directory, family, seed of `write_reward_fixture`).
const RM_FIXTURES: [(&str, Family, u64); 2] = [("tiny-qwen2-rm", Family::Qwen2, 6), ("tiny-mistral-rm", Family::Mistral, 7)];

/// Each committed fixture is `write_reward_fixture`'s output byte for byte (or is rewritten when blessing).
#[test]
fn committed_rm_fixtures_are_reproducible() {
    for (name, family, seed) in RM_FIXTURES {
        let committed = models_dir().join(name);
        if std::env::var_os("PREFPIPE_BLESS").is_some() {
            write_reward_fixture(&committed, family, seed).unwrap();
            continue;
        }
        let fresh = tempfile::tempdir().unwrap();
        write_reward_fixture(fresh.path(), family, seed).unwrap();
        for entry in std::fs::read_dir(fresh.path()).unwrap() {
            let file = entry.unwrap().file_name();
            let a = std::fs::read(fresh.path().join(&file)).unwrap();
            let b = std::fs::read(committed.join(&file)).unwrap_or_default();
            assert!(a == b, "{name}/{}: differs from write_reward_fixture output; re-bless with PREFPIPE_BLESS=1", file.to_string_lossy());
        }
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
        // Qwen2 and Mistral (48-token sliding window: the long pairs exercise it, batched and not):
        // tests/golden/score/*.json (score_golden.py `run_reward`).
        ("tiny-qwen2-rm", "tests/golden/score/tiny-qwen2-rm.json"),
        ("tiny-mistral-rm", "tests/golden/score/tiny-mistral-rm.json"),
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
        assert!((got.unwrap() - want).abs() <= REL_TOL * want.abs().max(chat[i][0].abs()), "pair {i}: {got:?} vs {want}");
    }
}

// ---------------------------------------------------------------------------
// Plan-time errors, located at the YAML field (acceptance 4). No weights load.

/// Copies a committed model directory into `dst` and edits its config.json.
fn model_copy(src: &str, dst: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(models_dir().join(src)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let path = dst.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dst.to_path_buf()
}

fn key(k: &str) -> PathSeg {
    PathSeg::Key(k.into())
}

/// The errors `plan` reports, as (path, message).
fn plan_errors(config: Value, input: &RecordBatch) -> Vec<(Vec<PathSeg>, String)> {
    let stage = build(config);
    let errs = plan(stage.as_ref(), &input.schema()).expect_err("plan should fail");
    errs.into_iter().map(|e| (e.path, e.message)).collect()
}

fn samples() -> RecordBatch {
    table(&[("What is 6 times 7?", "It is 42."), ("Hi", "Hello!")], &[("reference_answer", vec![Some("42"), Some("")])])
}

#[test]
fn reward_model_without_a_head_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A causal LM's weights under a reward-model config: no `score.weight`.
    let headless = model_copy("tiny-llama", &tmp.path().join("headless"), |c| {
        c.insert("architectures".into(), json!(["LlamaForSequenceClassification"]));
        c.insert("num_labels".into(), json!(1));
    });
    let e = plan_errors(json!({"reward_models": [{"name": "rm", "model": headless}]}), &samples());
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].0, [key("reward_models"), PathSeg::Index(0), key("model")]);
    assert!(e[0].1.contains("no `score.weight`") && e[0].1.contains("reward head is missing"), "{}", e[0].1);

    // A causal LM as it is.
    let e = plan_errors(json!({"reward_models": [{"name": "rm", "model": models_dir().join("tiny-qwen2")}]}), &samples());
    assert_eq!(e[0].0, [key("reward_models"), PathSeg::Index(0), key("model")]);
    assert!(e[0].1.contains("`Qwen2ForCausalLM` is a language model"), "{}", e[0].1);

    // No directory at all.
    let e = plan_errors(json!({"reward_models": [{"name": "rm", "model": "no/such/dir"}]}), &samples());
    assert_eq!(e[0].0, [key("reward_models"), PathSeg::Index(0), key("model")]);
    assert!(e[0].1.contains("no such model directory"), "{}", e[0].1);
}

#[test]
fn num_labels_must_agree_with_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    // config.json says 3 labels; score.weight is [1, 64].
    let three = model_copy("tiny-llama-rm", &tmp.path().join("three"), |c| {
        c.insert("num_labels".into(), json!(3));
        c.insert("id2label".into(), json!({"0": "a", "1": "b", "2": "c"}));
    });
    let e = plan_errors(json!({"reward_models": [{"name": "rm", "model": three, "label": "a"}]}), &samples());
    assert_eq!(e[0].0, [key("reward_models"), PathSeg::Index(0), key("model")]);
    assert!(e[0].1.contains("`score.weight` has shape [1, 64], expected [3, 64]: config.json declares num_labels 3"), "{}", e[0].1);

    // config.json declares no label count: transformers (and prefpipe) assume 2.
    let undeclared = model_copy("tiny-llama-rm", &tmp.path().join("undeclared"), |c| {
        c.remove("id2label");
        c.remove("label2id");
    });
    let e = plan_errors(json!({"reward_models": [{"name": "rm", "model": undeclared}]}), &samples());
    assert!(
        e[0].1.contains("declares neither `num_labels` nor `id2label`, so transformers assumes 2 labels; add \"num_labels\": 1"),
        "{}",
        e[0].1
    );
}

#[test]
fn labels_must_exist() {
    let m = models_dir().join("tiny-qwen3-rm-3labels");
    let at = |i: usize, f: &str| vec![key("reward_models"), PathSeg::Index(i), key(f)];
    let e = plan_errors(
        json!({"reward_models": [
            {"name": "a", "model": m, "label": "harmlessness"},
            {"name": "b", "model": m, "label": 3},
            {"name": "c", "model": m, "labels": {"helpfulness": 1.0, "honesty": 1.0}},
            {"name": "d", "model": m},
        ]}),
        &samples(),
    );
    assert_eq!(e.len(), 4, "every problem at once: {e:?}");
    let listed = "its labels are 0: helpfulness, 1: correctness, 2: verbosity";
    assert_eq!(e[0].0, at(0, "label"));
    assert!(e[0].1.contains("no label `harmlessness`") && e[0].1.contains(listed), "{}", e[0].1);
    assert_eq!(e[1].0, at(1, "label"));
    assert!(e[1].1.contains("no label 3;"), "{}", e[1].1);
    assert_eq!(e[2].0, at(2, "labels"));
    assert!(e[2].1.contains("no label `honesty`"), "{}", e[2].1);
    // Several labels and no choice: which one is `reward_d`?
    assert_eq!(e[3].0, at(3, "model"));
    assert!(e[3].1.contains("the head has 3 labels") && e[3].1.contains("`label:`"), "{}", e[3].1);
}

#[test]
fn rule_columns_and_patterns_are_checked() {
    let no_ref = table(&[("q", "a")], &[]);
    let e = plan_errors(
        json!({"rules": [
            {"kind": "exact_match", "name": "em"},
            {"kind": "contains", "name": "c", "substrings": ["x"], "column": "answer"},
            {"kind": "length", "name": "len", "target": 10, "per_token": 0.1, "unit": "n_tokens"},
        ]}),
        &no_ref,
    );
    assert_eq!(e.len(), 3, "{e:?}");
    assert_eq!(e[0].0, [key("rules"), PathSeg::Index(0), key("column")]);
    assert!(e[0].1.contains("has no column `reference_answer`"), "{}", e[0].1);
    assert_eq!(e[1].0, [key("rules"), PathSeg::Index(1), key("column")]);
    assert_eq!(e[2].0, [key("rules"), PathSeg::Index(2), key("unit")]);
    assert!(e[2].1.contains("no column `n_tokens`"), "{}", e[2].1);

    // A bad regex is refused when the config is built (before any plan).
    let errs = (score::KIND.build)(&json!({"rules": [{"kind": "regex", "name": "r", "pattern": "([a-z]+"}]})).err().expect("refused");
    assert_eq!(errs[0].path, [key("rules"), PathSeg::Index(0), key("pattern")]);
    assert!(errs[0].message.starts_with("not a valid regular expression:") && !errs[0].message.contains('\n'), "{}", errs[0].message);
    // An unknown rule kind and an unknown field.
    assert!((score::KIND.build)(&json!({"rules": [{"kind": "bleu", "name": "b"}]})).is_err());
    let errs = (score::KIND.build)(&json!({"reward_models": [{"name": "a", "model": "m", "weigth": 1}]})).err().unwrap();
    assert!(errs[0].message.contains("unknown field `weigth`"), "{:?}", errs);
}

#[test]
fn existing_reward_columns_are_refused() {
    let mut b = samples();
    let mut fields: Vec<Field> = b.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("reward", DataType::Float64, true));
    let mut cols = b.columns().to_vec();
    cols.push(Arc::new(Float64Array::from(vec![1.0, 2.0])));
    b = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let m = models_dir().join("tiny-qwen3-rm-3labels");
    let e = plan_errors(
        json!({
            "reward_models": [{"name": "hs", "model": m, "label": 0}, {"name": "lm", "model": models_dir().join("tiny-llama")}],
            "rules": [{"kind": "exact_match", "name": "em", "column": "prompt"}, {"kind": "contains", "name": "hs_verbosity", "substrings": ["x"]}],
        }),
        &b,
    );
    // Every problem at once: the causal LM, the existing `reward`, and a rule
    // whose column collides with a label column of `hs`.
    assert_eq!(e.len(), 3, "{e:?}");
    assert_eq!(e[0].0, [key("reward_models"), PathSeg::Index(1), key("model")]);
    assert_eq!(e[1].0, Vec::<PathSeg>::new());
    assert!(e[1].1.contains("already has a `reward` column, which `score` writes"), "{e:?}");
    assert_eq!(e[2].0, [key("rules"), PathSeg::Index(1), key("name")]);
    assert!(e[2].1.contains("two outputs are named `reward_hs_verbosity`"), "{e:?}");
}

// ---------------------------------------------------------------------------
// Run-time behaviour.

/// Rule values and the weighted aggregate through the stage, by hand.
#[test]
fn rules_and_weighted_aggregate_through_the_stage() {
    let input = table(
        &[
            ("What is 6 times 7?", "6 times 7 is 42."),
            ("What is 6 times 7?", "I think it is 41, or maybe 43"),
            ("Say hi", "Hi there, how are you doing on this fine day?"),
        ],
        &[("reference_answer", vec![Some("42"), Some("42"), Some("")])],
    );
    let cfg = json!({
        "aggregate": "weighted",
        "rules": [
            {"kind": "exact_match", "name": "correct", "normalize": "last_number", "weight": 3.0},
            {"kind": "length", "name": "short", "target": 5, "per_token": 0.5, "weight": 1.0},
            {"kind": "regex", "name": "polite", "pattern": "(?i)\\bhow are you\\b", "value": 2.0, "weight": 0.0},
        ]
    });
    let (out, drops) = run(cfg, &input);
    assert!(drops.is_empty());
    // Row 0: last number 42 = "42" → 1; 5 words ≤ 5 → 0. Row 1: 43 ≠ 42 → 0; 8 words → −0.5·3 = −1.5.
    // Row 2: empty reference → no_reference 0; 10 words → −0.5·5 = −2.5.
    assert_eq!(f64s(&out, "reward_correct"), [Some(1.0), Some(0.0), Some(0.0)]);
    assert_eq!(f64s(&out, "reward_short"), [Some(0.0), Some(-1.5), Some(-2.5)]);
    assert_eq!(f64s(&out, "reward_polite"), [Some(0.0), Some(0.0), Some(2.0)]);
    // reward = (3·correct + 1·short + 0·polite) / (3 + 1 + 0):
    // row 0: 3/4 = 0.75; row 1: −1.5/4 = −0.375; row 2: −2.5/4 = −0.625.
    assert_eq!(f64s(&out, "reward"), [Some(0.75), Some(-0.375), Some(-0.625)]);
    // The input columns come through untouched, in order, before the reward columns.
    let schema = out.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        ["prompt_id", "prompt", "sample_idx", "response", "reference_answer", "reward", "reward_correct", "reward_short", "reward_polite"]
    );
}

/// zscore_mean runs over the whole input (two chunks here) and resumes from
/// its per-chunk cache.
#[test]
fn zscore_mean_spans_chunks_and_uses_its_cache() {
    let chunk = |rows: &[(&'static str, &'static str)]| table(rows, &[]);
    let c1 = chunk(&[("p", "one two"), ("p", "one two three four")]);
    let c2 = chunk(&[("q", "a b c d e f"), ("q", "word")]);
    let cfg = json!({
        "aggregate": "zscore_mean",
        "rules": [
            {"kind": "length", "name": "len", "target": 0, "per_token": 1.0},
            {"kind": "contains", "name": "const", "substrings": ["never"]},
        ]
    });
    let scratch = tempfile::tempdir().unwrap();
    let (out, _) = run_chunks(cfg.clone(), &[c1.clone(), c2.clone()], scratch.path());
    // len = −words: [−2, −4 | −6, −1]; μ = −13/4 = −3.25; σ² = (1.5625 + 0.5625 + 7.5625 + 5.0625)/4 = 3.6875.
    // const = [0, 0, 0, 0] is constant → 0. reward = (z_len + 0)/2.
    let s = 3.6875f64.sqrt();
    let want = [(-2.0 + 3.25) / s / 2.0, (-4.0 + 3.25) / s / 2.0, (-6.0 + 3.25) / s / 2.0, (-1.0 + 3.25) / s / 2.0];
    for (got, want) in f64s(&out, "reward").iter().zip(want) {
        assert!((got.unwrap() - want).abs() < 1e-12, "{got:?} vs {want}");
    }
    // The raw scores of each chunk were cached; a re-run (after a crash) reads them back.
    let cached: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(cached.iter().filter(|f| f.ends_with(".parquet")).count(), 2, "{cached:?}");
    // Prove it: plant −100 as chunk 1's first `reward_len` in the cache; the re-run must return it.
    let cache = scratch.path().join("raw-000001.parquet");
    let raw = prefpipe_core::io::read_parquet(&cache).unwrap().remove(0);
    let mut cols = raw.columns().to_vec();
    cols[0] = Arc::new(Float64Array::from(vec![-100.0, -1.0]));
    prefpipe_core::io::write_parquet(&cache, &raw.schema(), &[RecordBatch::try_new(raw.schema(), cols).unwrap()]).unwrap();
    let (again, _) = run_chunks(cfg, &[c1, c2], scratch.path());
    assert_eq!(f64s(&again, "reward_len"), [Some(-2.0), Some(-4.0), Some(-100.0), Some(-1.0)]);
}

/// A reward model whose head outputs NaN/∞, and a sequence longer than the
/// context: the rows stay, their rewards are null, and both reasons are counted.
#[test]
fn non_finite_and_too_long_rewards_are_null_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_copy("tiny-llama-rm", &tmp.path().join("nan"), |_| {});
    poison_score_head(&dir.join("model.safetensors"));
    let long = "word ".repeat(600);
    let input = table(&[("a", "fine"), ("b", long.as_str())], &[]);
    let cfg = json!({
        "reward_models": [{"name": "nan", "model": dir}],
        "rules": [{"kind": "contains", "name": "fine", "substrings": ["fine"]}],
    });
    let (out, drops) = run(cfg, &input);
    assert_eq!(out.num_rows(), 2, "rows are kept");
    assert_eq!(f64s(&out, "reward_nan"), [None, None]);
    assert_eq!(f64s(&out, "reward_fine"), [Some(1.0), Some(0.0)]);
    assert_eq!(f64s(&out, "reward"), [None, None]);
    assert_eq!(drops, BTreeMap::from([("non_finite_reward".to_string(), 1), ("too_long".to_string(), 1)]));
}

/// Overwrites the first element of `score.weight` with NaN, in place (the
/// safetensors header gives its byte offsets).
fn poison_score_head(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = 8 + n + header["score.weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}
