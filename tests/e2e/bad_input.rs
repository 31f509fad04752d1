//! Every bad input of issue 2: a clear one-line message naming the place,
//! exit code 2, no output file, no panic.

use std::path::Path;

use crate::common::{files_under, prefpipe, stderr, write_scored};

/// Writes `pipeline.yaml` (+ a good scored table) in a fresh dir, runs it,
/// and checks the failure contract. Returns stderr.
fn rejected(yaml: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_scored(&dir.path().join("scored.parquet"), 4, 3);
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), yaml).unwrap();
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "exit code 2 expected; stderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(files_under(&dir.path().join("out")).is_empty(), "no output file: {err}");
    assert!(!dir.path().join(".prefpipe/stages").exists() || files_under(&dir.path().join(".prefpipe/stages")).is_empty(), "{err}");
    // `validate` reports the same, without running anything.
    let v = prefpipe(dir.path(), &["validate", "pipeline.yaml"]);
    assert_eq!(v.status.code(), Some(2));
    err
}

const GOOD: &str = "name: t
stages:
  - id: scored
    kind: source
    path: scored.parquet
  - id: pairs
    kind: select
    input: scored
    strategy: reward_points
  - id: export
    kind: export
    input: pairs
    path: out/pairs.parquet
";

fn good_with(from: &str, to: &str) -> Vec<u8> {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1).into_bytes()
}

#[test]
fn the_good_pipeline_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_scored(&dir.path().join("scored.parquet"), 4, 3);
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), GOOD).unwrap();
    crate::common::ok(prefpipe(dir.path(), &["run", "pipeline.yaml"]));
    assert!(dir.path().join("out/pairs.parquet").exists());
}

#[test]
fn yaml_syntax_error_has_line_and_col() {
    let e = rejected(b"name: t\nstages:\n  - id: scored\n    kind: [source\n");
    assert!(e.contains("pipeline.yaml:") && e.contains("invalid YAML"), "{e}");
    let loc = e.split(':').nth(2).unwrap();
    assert!(loc.parse::<u32>().unwrap() >= 4, "{e}");
}

#[test]
fn unknown_kind_suggests_the_closest() {
    let e = rejected(&good_with("kind: select", "kind: selcet"));
    assert!(e.contains("pipeline.yaml:7:11: stage `pairs`: unknown stage kind `selcet`; did you mean `select`?"), "{e}");
}

#[test]
fn unknown_field_is_located() {
    let e = rejected(&good_with("    strategy: reward_points\n", "    strategy: reward_points\n    chosne: max\n"));
    assert!(e.contains("pipeline.yaml:10:5: stage `pairs`: unknown field `chosne`"), "{e}");
}

#[test]
fn missing_and_dangling_inputs() {
    let e = rejected(&good_with("    input: scored\n", ""));
    assert!(e.contains("stage `pairs`: a `select` stage needs an `input`"), "{e}");
    let e = rejected(&good_with("input: scored", "input: socred"));
    assert!(e.contains("pipeline.yaml:8:12: stage `pairs`: `input` names no stage: `socred`; did you mean `scored`?"), "{e}");
}

#[test]
fn cycles_are_named() {
    let yaml = "stages:
  - id: a
    kind: sql
    input: b
    query: SELECT * FROM b
  - id: b
    kind: sql
    input: a
    query: SELECT * FROM a
";
    let e = rejected(yaml.as_bytes());
    assert!(e.contains("the stages form a cycle: ") && e.contains("a → b") || e.contains("b → a"), "{e}");
}

#[test]
fn duplicate_ids() {
    let e = rejected(&good_with("  - id: export", "  - id: pairs"));
    assert!(e.contains("pipeline.yaml:10:9: stage `pairs`: duplicate stage id `pairs`"), "{e}");
}

#[test]
fn missing_and_corrupt_input_files() {
    let e = rejected(&good_with("path: scored.parquet", "path: nope.parquet"));
    assert!(e.contains("pipeline.yaml:5:11: stage `scored`:") && e.contains("nope.parquet: no such file"), "{e}");

    // Not Parquet at all, and a truncated Parquet file.
    for (name, bytes) in [("garbage.parquet", b"hello, not parquet".to_vec()), ("trunc.parquet", truncated())] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(name), bytes).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("pipeline.yaml"), GOOD.replace("scored.parquet", name)).unwrap();
        let o = prefpipe(dir.path(), &["run", "pipeline.yaml"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(name) && err.contains("not a readable Parquet file"), "{err}");
        assert!(err.lines().count() == 1, "one line: {err}");
        assert!(files_under(&dir.path().join("out")).is_empty());
    }
}

fn truncated() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.parquet");
    write_scored(&p, 10, 3);
    let b = std::fs::read(&p).unwrap();
    b[..b.len() / 2].to_vec()
}

#[test]
fn missing_or_mistyped_columns() {
    // A table without `reward`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.jsonl"), "{\"prompt\": \"a\", \"response\": \"x\", \"sample_idx\": 0}\n").unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), GOOD.replace("scored.parquet", "p.jsonl")).unwrap();
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("stage `pairs`: input `scored` has no column `reward`"), "{e}");
    // `reward` of the wrong type.
    std::fs::write(dir.path().join("p.jsonl"), "{\"prompt\": \"a\", \"response\": \"x\", \"sample_idx\": 0, \"reward\": \"high\"}\n")
        .unwrap();
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("column `reward` of input `scored` must be a numeric column; it is Utf8"), "{e}");
    assert!(files_under(&dir.path().join("out")).is_empty());
}

#[test]
fn misspelled_point() {
    let e = rejected(&good_with("    strategy: reward_points\n", "    strategy: reward_points\n    rejected: mu-2sgima\n"));
    assert!(e.contains("pipeline.yaml:10:15: stage `pairs`: unknown variant `mu-2sgima`"), "{e}");
    assert!(e.contains("mu-2sigma"), "lists the valid points: {e}");
}

#[test]
fn out_of_range_numbers() {
    let e = rejected(&good_with("    strategy: reward_points\n", "    strategy: reward_points\n    ddof: -1\n"));
    assert!(e.contains("pipeline.yaml:10:11: stage `pairs`:") && e.contains("-1"), "{e}");
    let e = rejected(&good_with("    strategy: reward_points\n", "    strategy: reward_points\n    ddof: 2\n"));
    assert!(e.contains("`ddof` is 0 (population) or 1 (sample); got 2"), "{e}");
    let e = rejected(b"seed: -3\nstages:\n  - id: s\n    kind: source\n    path: scored.parquet\n");
    assert!(e.contains("pipeline.yaml:1:7: `seed` must be a non-negative integer"), "{e}");
}

#[test]
fn empty_pipeline_and_garbage() {
    let e = rejected(b"");
    assert!(e.contains("pipeline"), "{e}");
    let e = rejected(b"name: t\nstages: []\n");
    assert!(e.contains("`stages` is empty"), "{e}");
    let e = rejected(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0xff, 0xfe, 0x00, 0x9c]);
    assert!(e.contains("not a YAML text file"), "{e}");
}

#[test]
fn export_into_a_missing_directory() {
    let e = rejected(&good_with("path: out/pairs.parquet", "path: nowhere/pairs.parquet"));
    assert!(e.contains("pipeline.yaml:13:11: stage `export`: the directory") && e.contains("nowhere does not exist"), "{e}");
}

#[test]
fn unknown_strategy_and_bad_set() {
    let e = rejected(&good_with("strategy: reward_points", "strategy: reward_point"));
    assert!(e.contains("unknown select strategy `reward_point`; did you mean `reward_points`?"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), GOOD).unwrap();
    write_scored(&dir.path().join("scored.parquet"), 2, 2);
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml", "--set", "pairz.ddof=1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no stage `pairz`; did you mean `pairs`?"), "{}", stderr(&o));
}

#[test]
fn a_missing_pipeline_file() {
    let o = prefpipe(Path::new("."), &["run", "/nonexistent/p.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/p.yaml: cannot read pipeline"), "{}", stderr(&o));
}

/// GOOD plus a `margin` filter between `pairs` and `export`, with `threshold`
/// as its last line (line 14).
fn with_margin_filter(threshold: &str) -> Vec<u8> {
    let filter = format!("  - id: wide\n    kind: filter\n    input: pairs\n    strategy: margin\n    {threshold}\n");
    good_with(
        "  - id: export\n    kind: export\n    input: pairs\n",
        &format!("{filter}  - id: export\n    kind: export\n    input: wide\n"),
    )
}

#[test]
fn non_finite_thresholds_name_their_key() {
    // JSON has no NaN: read as null, `min_margin: .nan` used to mean "no threshold" and kept every pair.
    let e = rejected(&with_margin_filter("min_margin: .nan"));
    assert!(e.contains("pipeline.yaml:14:17: stage `wide`: `min_margin` is .nan; numbers in a pipeline must be finite"), "{e}");
    // `band: [.nan, 1]` applied one bound only; every bad number is reported, each at its place.
    let e = rejected(&with_margin_filter("band: [.nan, .inf]"));
    assert!(e.contains("pipeline.yaml:14:12: stage `wide`: `band[0]` is .nan"), "{e}");
    assert!(e.contains("pipeline.yaml:14:18: stage `wide`: `band[1]` is .inf"), "{e}");
    // A number too large for f64 overflows to ∞ and is refused the same way.
    let e = rejected(&with_margin_filter("min_margin: -1e999"));
    assert!(e.contains("pipeline.yaml:14:17: stage `wide`: `min_margin` is -.inf"), "{e}");
    // And from the command line.
    let dir = tempfile::tempdir().unwrap();
    write_scored(&dir.path().join("scored.parquet"), 2, 2);
    std::fs::write(dir.path().join("pipeline.yaml"), with_margin_filter("min_margin: 0.5")).unwrap();
    let o = prefpipe(dir.path(), &["run", "pipeline.yaml", "--set", "wide.min_margin=.nan"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("stage `wide`: `min_margin` is .nan"), "{}", stderr(&o));
}
