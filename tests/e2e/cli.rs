//! The CLI over finished runs: query, inspect, plan, schema, --until,
//! --force, --set, cache reuse, and every example pipeline.

use std::path::Path;

use crate::common::{ok, prefpipe, root, stderr, write_scored};

fn copy_pipeline(dir: &Path, yaml: &str) {
    write_scored(&dir.join("scored.parquet"), 50, 4);
    std::fs::write(dir.join("pipeline.yaml"), yaml).unwrap();
}

const P: &str = "name: t
stages:
  - id: scored
    kind: source
    path: scored.parquet
  - id: pairs
    kind: select
    input: scored
    strategy: max_min
  - id: wide
    kind: sql
    input: pairs
    query: SELECT prompt_id, margin FROM pairs WHERE margin > 1 ORDER BY prompt_id
  - id: export
    kind: export
    input: pairs
    path: pairs.jsonl
    format: trl
";

#[test]
fn query_plan_and_inspect_a_finished_run() {
    let dir = tempfile::tempdir().unwrap();
    copy_pipeline(dir.path(), P);
    let out = ok(prefpipe(dir.path(), &["plan", "pipeline.yaml"]));
    assert_eq!(out.matches("pending").count(), 4, "{out}");
    assert!(out.contains("select ← scored"), "{out}");
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let out = ok(prefpipe(dir.path(), &["plan", "pipeline.yaml"]));
    assert_eq!(out.matches("done").count(), 4, "{out}");

    // 50 prompts, rewards ((p·7 + s·13) mod 17)/4 − 2 for s = 0..3 are never all equal → 50 pairs.
    let out = ok(prefpipe(dir.path(), &["query", "SELECT count(*) AS n FROM pairs", "--pipeline", "pipeline.yaml", "--format", "csv"]));
    assert_eq!(out, "n\n50\n");
    let out = ok(prefpipe(dir.path(), &["query", "SELECT count(*) AS n FROM wide", "--pipeline", "pipeline.yaml", "--format", "json"]));
    assert!(out.starts_with("{\"n\":"), "{out}");
    let out = ok(prefpipe(dir.path(), &["query", "SELECT min(margin) AS m FROM pairs", "--pipeline", "pipeline.yaml"]));
    assert!(out.contains("| m "), "{out}");
    // --table registers a plain Parquet file.
    let out = ok(prefpipe(dir.path(), &["query", "SELECT count(*) AS n FROM t", "--table", "t=scored.parquet", "--format", "csv"]));
    assert_eq!(out, "n\n200\n");
    ok(prefpipe(dir.path(), &["query", "SELECT * FROM t", "--table", "t=scored.parquet", "--format", "parquet", "--out", "copy.parquet"]));
    assert!(dir.path().join("copy.parquet").exists());
    let bad = prefpipe(dir.path(), &["query", "SELECT nope FROM pairs", "--pipeline", "pipeline.yaml"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("nope"), "{}", stderr(&bad));

    let out = ok(prefpipe(dir.path(), &["inspect", "scored.parquet"]));
    assert!(out.contains("200 rows, 5 columns"), "{out}");
    assert!(out.contains("reward") && out.contains("min=-2 max=2"), "{out}");
    assert!(out.contains("█"), "a histogram: {out}");
    let bad = prefpipe(dir.path(), &["inspect", "pipeline.yaml"]);
    assert_eq!(bad.status.code(), Some(2));

    // The JSONL export holds TRL's three columns.
    let text = std::fs::read_to_string(dir.path().join("pairs.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 50);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let keys: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["chosen", "prompt", "rejected"]);
}

#[test]
fn changing_a_stage_reruns_it_and_its_descendants_only() {
    let dir = tempfile::tempdir().unwrap();
    copy_pipeline(dir.path(), P);
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml", "--set", "wide.query=SELECT prompt_id FROM pairs ORDER BY prompt_id"]);
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    let status = |id: &str| log.lines().find(|l| l.starts_with(id)).unwrap().split_whitespace().nth(2).unwrap().to_string();
    assert_eq!(status("scored"), "cached", "{log}");
    assert_eq!(status("pairs"), "cached", "{log}");
    assert_eq!(status("wide"), "ran", "{log}");
    assert_eq!(status("export"), "cached", "{log}");

    // --force re-runs a stage and everything downstream.
    let log = stderr(&prefpipe(dir.path(), &["run", "pipeline.yaml", "--force", "pairs"]));
    let status = |id: &str| log.lines().find(|l| l.starts_with(id)).unwrap().split_whitespace().nth(2).unwrap().to_string();
    assert_eq!(
        (status("scored"), status("pairs"), status("wide"), status("export")),
        ("cached".into(), "ran".into(), "ran".into(), "ran".into()),
        "{log}"
    );

    // --until runs only what a stage needs.
    let dir2 = tempfile::tempdir().unwrap();
    copy_pipeline(dir2.path(), P);
    let log = stderr(&prefpipe(dir2.path(), &["run", "pipeline.yaml", "--until", "pairs"]));
    assert!(log.contains("pairs") && !log.contains("export"), "{log}");
    assert!(!dir2.path().join("pairs.jsonl").exists());

    // Deleting an export's file makes only the export run again.
    std::fs::remove_file(dir.path().join("pairs.jsonl")).unwrap();
    let log = stderr(&prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    assert!(log.lines().any(|l| l.starts_with("export") && l.contains(" ran ")), "{log}");
    assert!(dir.path().join("pairs.jsonl").exists());

    // run.json has row counts and drop reasons.
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join(".prefpipe/run.json")).unwrap()).unwrap();
    let pairs = run["stages"].as_array().unwrap().iter().find(|s| s["id"] == "pairs").unwrap();
    assert_eq!(pairs["rows_in"], 200);
    assert_eq!(pairs["rows_out"], 50);
}

#[test]
fn chunk_size_and_row_order_do_not_change_outputs() {
    let a = tempfile::tempdir().unwrap();
    copy_pipeline(a.path(), P);
    ok(prefpipe(a.path(), &["run", "pipeline.yaml"]));
    let b = tempfile::tempdir().unwrap();
    copy_pipeline(b.path(), &P.replace("name: t\n", "name: t\nchunk_size: 3\n"));
    ok(prefpipe(b.path(), &["run", "pipeline.yaml"]));
    assert_eq!(std::fs::read(a.path().join("pairs.jsonl")).unwrap(), std::fs::read(b.path().join("pairs.jsonl")).unwrap());
}

#[test]
fn schemas_are_fresh() {
    let dir = tempfile::tempdir().unwrap();
    ok(prefpipe(dir.path(), &["schema", "--out", "s"]));
    for f in crate::common::files_under(&dir.path().join("s")) {
        let rel = f.strip_prefix(dir.path().join("s")).unwrap();
        let committed = root().join("schemas").join(rel);
        assert_eq!(
            std::fs::read_to_string(&committed).unwrap_or_default(),
            std::fs::read_to_string(&f).unwrap(),
            "schemas/{} is stale: run `cargo run -- schema --out schemas`",
            rel.display()
        );
    }
}

/// Every example pipeline runs (in a sandbox: their `../out/` outputs go to
/// a temp dir, not the repository's `out/`), and output paths print
/// normalised (`out/x.parquet`, not `pipelines/../out/x.parquet`).
#[test]
fn every_example_pipeline_runs() {
    let sandbox = crate::common::pipelines_sandbox();
    let mut n = 0;
    for e in std::fs::read_dir(sandbox.path().join("pipelines")).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "yaml")
            || p.file_name().unwrap().to_string_lossy().starts_with("real-")
            || p.file_name().unwrap() == "smollm2.yaml"
            || p.file_name().unwrap() == "remote.yaml"
            || p.file_name().unwrap() == "judge-repeat-ranking.yaml"
        {
            // Real-model pipelines need downloaded weights; remote.yaml and
            // judge-repeat-ranking.yaml need servers (tests/e2e/remote.rs and judge.rs run them).
            continue;
        }
        let store = tempfile::tempdir().unwrap();
        let rel = format!("pipelines/{}", p.file_name().unwrap().to_string_lossy());
        let o = prefpipe(sandbox.path(), &["run", &rel, "--store", store.path().to_str().unwrap()]);
        let err = stderr(&o);
        assert!(o.status.success(), "{}:\n{err}", p.display());
        assert!(!err.contains("/../") && !err.contains("/./"), "{rel}: paths print normalised:\n{err}");
        if std::fs::read_to_string(&p).unwrap().contains("kind: export") {
            assert!(err.contains(" → out/"), "{rel}: an export's output path:\n{err}");
        }
        n += 1;
    }
    assert!(n >= 1);
    assert!(crate::common::files_under(&sandbox.path().join("out")).len() >= n, "outputs went to the sandbox");
}

#[test]
fn export_formats() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = P.replace("path: pairs.jsonl\n    format: trl", "path: chat.parquet\n    format: trl_chat")
        + "  - id: raw\n    kind: export\n    input: pairs\n    path: raw.parquet\n  - id: lines\n    kind: export\n    input: pairs\n    path: raw.jsonl\n    format: jsonl\n";
    copy_pipeline(dir.path(), &yaml);
    ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    // trl_chat: each column is a one-message list of {role, content} (TRL's conversational format).
    let chat = crate::common::read(&dir.path().join("chat.parquet"));
    let schema = chat[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["prompt", "chosen", "rejected"]);
    let text = format!("{}", arrow::util::pretty::pretty_format_batches(&[chat[0].slice(0, 1)]).unwrap());
    assert!(text.contains("{role: user, content: Question number 0?}"), "{text}");
    assert!(text.contains("{role: assistant, content: Answer"), "{text}");
    // parquet: the pairs table as is, DESIGN §6 columns first.
    let raw = crate::common::read(&dir.path().join("raw.parquet"));
    let schema = raw[0].schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        &names[..9],
        ["prompt_id", "prompt", "chosen", "rejected", "chosen_idx", "rejected_idx", "chosen_reward", "rejected_reward", "margin"]
    );
    let lines = std::fs::read_to_string(dir.path().join("raw.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 50);
}
