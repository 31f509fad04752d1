//! Issue 14's data edges through the CLI: duplicated rows, nulls, sampled
//! duplicates, columns that would vanish, and over-long pairs in `ches` —
//! each either refused (exit 2, one line naming the place) or dropped and
//! counted in `run.json`, never guessed.

use std::path::Path;

use crate::common::{ok, prefpipe, read, root, stderr};

/// One scored row: (prompt_id, sample_idx, response, reward) plus a
/// per-prompt float `difficulty`, a per-sample float `judge` and a
/// per-prompt string `category`.
fn row(id: &str, s: u32, response: &str, reward: f64) -> String {
    let d = if id == "a" { 0.25 } else { 0.75 };
    format!(
        "{{\"prompt_id\": \"{id}\", \"prompt\": \"Question {id}?\", \"sample_idx\": {s}, \"response\": \"{response}\", \"reward\": {reward}, \"difficulty\": {d}, \"judge\": {}, \"category\": \"cat-{id}\"}}\n",
        reward + 0.5
    )
}

fn run_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(".prefpipe/run.json")).unwrap()).unwrap()
}

fn stage<'a>(run: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    run["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no stage {id}: {run}"))
}

/// Writes `rows` as `scored.jsonl` and `pipeline.yaml` = a source of it followed by `stages`.
fn setup(dir: &Path, rows: &str, stages: &str) {
    std::fs::write(dir.join("scored.jsonl"), rows).unwrap();
    std::fs::write(
        dir.join("pipeline.yaml"),
        format!("name: t\nstages:\n  - id: scored\n    kind: source\n    path: scored.jsonl\n{stages}"),
    )
    .unwrap();
}

/// Runs and checks the bad-input contract (exit 2, one line, no panic); returns stderr.
fn refused(dir: &Path) -> String {
    let o = prefpipe(dir, &["run", "pipeline.yaml"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // Progress lines come before it; the error is one line.
    let errors: Vec<&str> = e.lines().skip_while(|l| !l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one line: {e}");
    errors[0].to_string()
}

const MAX_MIN: &str = "  - id: pairs\n    kind: select\n    input: scored\n    strategy: max_min\n";

#[test]
fn sampled_duplicates_and_dropped_columns_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    // a: max (idx 0) and min (idx 2) are two copies of one text → identical_responses.
    // b: an ordinary pair.
    let rows =
        row("a", 0, "same", 3.0) + &row("a", 1, "other", 1.0) + &row("a", 2, "same", 0.0) + &row("b", 0, "x", 2.0) + &row("b", 1, "y", 1.0);
    setup(dir.path(), &rows, MAX_MIN);
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let run = run_json(dir.path());
    let pairs = stage(&run, "pairs");
    assert_eq!(pairs["drops"]["identical_responses"], 1, "{pairs}");
    assert_eq!(pairs["rows_out"], 1, "{pairs}");
    // Floats are not carried (they may be per-sample scores like `judge`): listed, not silent.
    assert_eq!(pairs["dropped_columns"], serde_json::json!(["difficulty", "judge"]), "{pairs}");

    // `carry: [difficulty]` keeps the per-prompt float explicitly.
    setup(dir.path(), &rows, &format!("{MAX_MIN}    carry: [difficulty]\n"));
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let pairs = stage(&run_json(dir.path()), "pairs").clone();
    assert_eq!(pairs["dropped_columns"], serde_json::json!(["judge"]), "{pairs}");
    let out = std::fs::read_dir(dir.path().join(".prefpipe/stages"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("pairs-"))
        .unwrap()
        .path();
    let file =
        std::fs::read_dir(&out).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "parquet")).unwrap();
    let b = &read(&file)[0];
    let d = b.column_by_name("difficulty").expect("carried").as_any().downcast_ref::<arrow::array::Float64Array>().unwrap().value(0);
    assert_eq!(d, 0.75, "b's difficulty");

    // A per-sample column cannot be carried: which sample's value would it be?
    setup(dir.path(), &rows, &format!("{MAX_MIN}    carry: [judge]\n"));
    let e = refused(dir.path());
    assert!(
        e.contains("stage `pairs`: input `scored`: `carry` column `judge` is not one value per prompt: prompt `a` has 3.5 and 1.5"),
        "{e}"
    );
    // Nor a column the input does not have (plan time, located).
    setup(dir.path(), &rows, &format!("{MAX_MIN}    carry: [dificulty]\n"));
    let e = refused(dir.path());
    assert!(e.contains("pipeline.yaml:10:13: stage `pairs`: input `scored` has no column `dificulty`; did you mean `difficulty`?"), "{e}");
}

#[test]
fn an_input_column_the_pairs_table_writes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = [row("a", 0, "p", 1.0), row("a", 1, "q", 2.0)].iter().map(|r| r.replacen('{', "{\"margin\": 5, ", 1)).collect();
    setup(dir.path(), &rows, MAX_MIN);
    let e = refused(dir.path());
    assert!(e.contains("stage `pairs`: input `scored` already has a column `margin`, which this strategy writes"), "{e}");
}

#[test]
fn duplicated_rows_are_refused_naming_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    // At the source: the file's own rows.
    let rows = row("a", 0, "p", 1.0) + &row("a", 1, "q", 2.0) + &row("a", 0, "r", 3.0);
    setup(dir.path(), &rows, MAX_MIN);
    let e = refused(dir.path());
    assert!(e.contains("stage `scored`:") && e.contains("scored.jsonl: row 3: prompt `a` sample_idx 0 repeats an earlier row"), "{e}");
    // After a join that duplicates rows: at the strategy.
    let rows = row("a", 0, "p", 1.0) + &row("a", 1, "q", 2.0);
    let stages = "  - id: twice\n    kind: sql\n    input: [scored]\n    query: SELECT * FROM scored UNION ALL SELECT * FROM scored WHERE sample_idx = 0\n  - id: pairs\n    kind: select\n    input: twice\n    strategy: max_min\n";
    setup(dir.path(), &rows, stages);
    let e = refused(dir.path());
    assert!(e.contains("stage `pairs`: prompt `a` has 2 rows with sample_idx 0; (prompt_id, sample_idx) must be unique"), "{e}");
}

#[test]
fn nulls_are_dropped_and_counted_never_read_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    // a1: null response; a2: null n_tokens; the rest fine.
    let rows = "{\"prompt_id\": \"a\", \"prompt\": \"Q?\", \"sample_idx\": 0, \"response\": \"x y\", \"n_tokens\": 2}\n\
                {\"prompt_id\": \"a\", \"prompt\": \"Q?\", \"sample_idx\": 1, \"response\": null, \"n_tokens\": 3}\n\
                {\"prompt_id\": \"a\", \"prompt\": \"Q?\", \"sample_idx\": 2, \"response\": \"x y z w\", \"n_tokens\": null}\n\
                {\"prompt_id\": \"a\", \"prompt\": \"Q?\", \"sample_idx\": 3, \"response\": \"x\", \"n_tokens\": 9}\n";
    let stages = "  - id: rewarded
    kind: score
    input: scored
    rules:
      - kind: length
        name: short
        unit: n_tokens
        target: 1
        per_token: 0.1
  - id: pairs
    kind: select
    input: rewarded
    strategy: max_min
";
    setup(dir.path(), rows, stages);
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let run = run_json(dir.path());
    let score = stage(&run, "rewarded");
    // The null response is not scored as "", the null n_tokens not counted as 0 tokens.
    assert_eq!((score["drops"]["null_response"].as_u64(), score["drops"]["null_n_tokens"].as_u64()), (Some(1), Some(1)), "{score}");
    let pairs = stage(&run, "pairs");
    // select drops the null response (null_response) and the unscored row (non_finite_reward).
    assert_eq!((pairs["drops"]["null_response"].as_u64(), pairs["drops"]["non_finite_reward"].as_u64()), (Some(1), Some(1)), "{pairs}");
    assert_eq!(pairs["rows_out"], 1, "{pairs}");
}

/// A copy of the tiny Llama with a context of `ctx` tokens.
fn short_context_model(dir: &Path, ctx: u64) -> std::path::PathBuf {
    let src = root().join("data-samples/models/tiny-llama");
    let dst = dir.join("tiny");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dst.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = ctx.into();
    std::fs::write(dst.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    dst
}

#[test]
fn ches_drops_and_counts_a_pair_too_long_for_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = short_context_model(dir.path(), 32);
    let long = "word ".repeat(60);
    let rows = row("a", 0, "yes", 2.0) + &row("a", 1, "no", 1.0) + &row("b", 0, long.trim(), 2.0) + &row("b", 1, "no", 1.0);
    let stages = format!("{MAX_MIN}  - id: safe\n    kind: filter\n    input: pairs\n    strategy: ches\n    model: {}\n", model.display());
    setup(dir.path(), &rows, &stages);
    // It used to fail the whole stage on b; logprob, score and train drop and count such rows.
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let safe = stage(&run_json(dir.path()), "safe").clone();
    assert_eq!(
        (safe["drops"]["too_long"].as_u64(), safe["rows_in"].as_u64(), safe["rows_out"].as_u64()),
        (Some(1), Some(2), Some(1)),
        "{safe}"
    );
}

#[test]
fn generate_refuses_a_prompt_twice_and_skips_null_prompts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("prompts.jsonl"),
        "{\"prompt_id\": \"a\", \"prompt\": \"Hi\"}\n{\"prompt_id\": \"b\", \"prompt\": \"Yo\"}\n",
    )
    .unwrap();
    let model = root().join("data-samples/models/tiny-llama");
    let yaml = |query: &str| {
        format!(
            "name: t\nstages:\n  - id: prompts\n    kind: source\n    path: prompts.jsonl\n  - id: p2\n    kind: sql\n    input: [prompts]\n    query: {query}\n  - id: samples\n    kind: generate\n    input: p2\n    model: {}\n    n: 2\n    max_new_tokens: 3\n",
            model.display()
        )
    };
    // Twice the same prompt would give two samples 0, two samples 1.
    std::fs::write(dir.path().join("pipeline.yaml"), yaml("SELECT * FROM prompts UNION ALL SELECT * FROM prompts WHERE prompt_id = 'a'"))
        .unwrap();
    let e = refused(dir.path());
    assert!(e.contains("stage `samples`: input `p2` has prompt `a` twice"), "{e}");
    // A null prompt is not generated from as "": dropped, counted.
    std::fs::write(
        dir.path().join("pipeline.yaml"),
        yaml("SELECT prompt_id, CASE WHEN prompt_id = 'b' THEN NULL ELSE prompt END AS prompt FROM prompts"),
    )
    .unwrap();
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let s = stage(&run_json(dir.path()), "samples").clone();
    assert_eq!((s["drops"]["null_prompt"].as_u64(), s["rows_out"].as_u64()), (Some(1), Some(2)), "{s}");
}

#[test]
fn logprob_drops_null_responses() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("data-samples/models/tiny-llama");
    let rows = row("a", 0, "yes", 2.0) + &row("a", 1, "no", 1.0).replace("\"no\"", "null");
    let stages = format!("  - id: lp\n    kind: logprob\n    input: scored\n    model: {}\n", model.display());
    setup(dir.path(), &rows, &stages);
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let lp = stage(&run_json(dir.path()), "lp").clone();
    // The null response is not teacher-forced as "" (EOS alone): dropped, counted.
    assert_eq!((lp["drops"]["null_response"].as_u64(), lp["rows_out"].as_u64()), (Some(1), Some(1)), "{lp}");
}
