//! The `score` stage through the CLI: located plan-time errors (exit 2, every
//! problem at once, before any model loads) and the quickstart's scores.

use std::path::Path;

use crate::common::{ok, prefpipe, root, stderr};

/// A reward model directory whose config says `LlamaForSequenceClassification`
/// but whose weights are a causal LM's: no `score.weight`.
fn headless_rm(dir: &Path) {
    let src = root().join("data-samples/models/tiny-llama");
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = cfg.replace("LlamaForCausalLM", "LlamaForSequenceClassification").replacen('{', "{\n  \"num_labels\": 1,", 1);
    std::fs::write(dir.join("config.json"), cfg).unwrap();
}

#[test]
fn score_errors_are_located_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    headless_rm(&dir.path().join("headless"));
    let models = root().join("data-samples/models");
    let yaml = format!(
        "name: t
stages:
  - id: samples
    kind: source
    path: {prompts}
  - id: scored
    kind: score
    input: samples
    reward_models:
      - name: nohead
        model: headless
      - name: attrs
        model: {models}/tiny-qwen3-rm-3labels
        label: harmlessness
    rules:
      - name: correct
        kind: exact_match
        column: gold_answer
  - id: bad_regex
    kind: score
    input: samples
    rules:
      - name: polite
        kind: regex
        pattern: \"(please\"
",
        prompts = root().join("data-samples/scored.jsonl").display(),
        models = models.display()
    );
    std::fs::write(dir.path().join("pipeline.yaml"), yaml).unwrap();
    for cmd in ["validate", "run"] {
        let o = prefpipe(dir.path(), &[cmd, "pipeline.yaml"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 5, "every problem, one line each:\n{err}");
        // Sorted by position: the input's own `reward` column (the stage, line 6), the `model:` of
        // entry 0 (line 11, col 16), the `label:` of entry 1 (line 14), the rule's `column:` (line 18),
        // the bad pattern (line 25).
        assert!(
            lines[0].starts_with("error: pipeline.yaml:6:5: stage `scored`: ") && lines[0].contains("already has a `reward` column"),
            "{err}"
        );
        let lines = &lines[1..];
        assert!(lines[0].starts_with("error: pipeline.yaml:11:16: stage `scored`: ") && lines[0].contains("no `score.weight`"), "{err}");
        assert!(
            lines[1].starts_with("error: pipeline.yaml:14:16: stage `scored`: ") && lines[1].contains("no label `harmlessness`"),
            "{err}"
        );
        assert!(
            lines[2].starts_with("error: pipeline.yaml:18:17: stage `scored`: ") && lines[2].contains("no column `gold_answer`"),
            "{err}"
        );
        assert!(
            lines[3].starts_with("error: pipeline.yaml:25:18: stage `bad_regex`: not a valid regular expression: unclosed group"),
            "{err}"
        );
    }
    assert!(
        !dir.path().join(".prefpipe/stages").exists() || std::fs::read_dir(dir.path().join(".prefpipe/stages")).unwrap().next().is_none()
    );
}

/// The quickstart's `reward` is its weighted aggregate, every pair is oriented
/// by it, and the manifest counts no non-finite rewards.
#[test]
fn quickstart_scores_and_pairs() {
    let store = tempfile::tempdir().unwrap();
    let s = store.path().to_str().unwrap();
    // A sandbox, so the export lands in a temp `out/`, not the repository's.
    let sandbox = crate::common::pipelines_sandbox();
    let p = "pipelines/quickstart.yaml";
    let o = prefpipe(sandbox.path(), &["run", p, "--store", s]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // The export's path prints normalised: not `pipelines/../out/…`.
    assert!(err.contains("→ out/quickstart-pairs.parquet") && !err.contains("/../"), "{err}");
    assert!(sandbox.path().join("out/quickstart-pairs.parquet").is_file());
    // aggregate: weighted with weights rm 1, correct 2, length 0.5: reward = (rm + 2·correct + 0.5·length) / 3.5.
    let sql = "SELECT count(*) AS n, max(abs(reward - (reward_rm + 2.0 * reward_correct + 0.5 * reward_length) / 3.5)) < 1e-12 AS exact, \
               sum(CASE WHEN reward IS NULL THEN 1 ELSE 0 END) AS nulls FROM scored";
    let out = ok(prefpipe(sandbox.path(), &["query", sql, "--pipeline", p, "--store", s, "--format", "csv"]));
    // 24 prompts × n = 4.
    assert_eq!(out, "n,exact,nulls\n96,true,0\n");
    let out = ok(prefpipe(
        sandbox.path(),
        &["query", "SELECT count(*) AS n, min(margin) > 0 AS oriented FROM pairs", "--pipeline", p, "--store", s, "--format", "csv"],
    ));
    assert!(out.ends_with(",true\n") && !out.contains("\n0,"), "{out}");
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(store.path().join("run.json")).unwrap()).unwrap();
    let scored = run["stages"].as_array().unwrap().iter().find(|st| st["id"] == "scored").unwrap();
    assert_eq!(scored["rows_out"], 96);
    assert!(scored["drops"].as_object().is_none_or(|d| d.is_empty()), "{scored}");
}
