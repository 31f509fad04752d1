//! `train` with the objectives beyond DPO-sigmoid (DESIGN §8 "More
//! objectives"): each learns the synthetic preference of
//! pipelines/train-dpo.yaml through the real pipeline, ORPO and SimPO without
//! any reference log-probs, and bad settings exit 2 at their key.

use std::path::{Path, PathBuf};

use crate::common::{ok, prefpipe, root, stderr};

fn models() -> PathBuf {
    root().join("data-samples/models")
}

fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else if p.file_name().is_some_and(|f| f == name) {
                out.push(p);
            }
        }
    }
    out
}

/// pipelines/train-dpo.yaml with its `train` stage's `method: dpo` / `beta: 0.1`
/// lines replaced by `settings`: held-out implicit-reward accuracy ≥ 0.9
/// (0.5 before training); reference-free methods cache no reference log-probs.
#[test]
fn every_objective_learns_the_train_dpo_task() {
    let yaml = std::fs::read_to_string(root().join("pipelines/train-dpo.yaml")).unwrap();
    assert!(yaml.contains("    method: dpo\n    model: policy\n    beta: 0.1\n"));
    for (name, settings, free) in [
        ("slic", "method: dpo\n    loss: hinge\n    beta: 0.1", false),
        ("ipo", "method: dpo\n    loss: ipo\n    beta: 0.1", false),
        ("robust", "method: dpo\n    loss: robust\n    label_smoothing: 0.1\n    beta: 0.1", false),
        ("dpo-nll", "method: dpo\n    nll_weight: 1.0\n    beta: 0.1", false),
        ("orpo", "method: orpo\n    lambda: 1.0", true),
        ("simpo", "method: simpo\n    beta: 2.0\n    gamma: 0.5", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pipelines")).unwrap();
        std::os::unix::fs::symlink(root().join("data-samples"), dir.path().join("data-samples")).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        let p = yaml.replace("    method: dpo\n    model: policy\n    beta: 0.1\n", &format!("    {settings}\n    model: policy\n"));
        std::fs::write(dir.path().join("pipelines/p.yaml"), p).unwrap();
        ok(prefpipe(dir.path(), &["run", "pipelines/p.yaml"]));
        let o = ok(prefpipe(
            dir.path(),
            &["query", "SELECT pairs, implicit_reward_accuracy FROM heldout_accuracy", "--pipeline", "pipelines/p.yaml", "--format", "csv"],
        ));
        let row: Vec<f64> = o.lines().nth(1).unwrap().split(',').map(|x| x.parse().unwrap()).collect();
        eprintln!("{name}: held-out implicit-reward accuracy {}", row[1]);
        assert_eq!(row[0], 32.0, "{name}: {o}");
        assert!(row[1] >= 0.9, "{name}: held-out implicit-reward accuracy {}", row[1]);
        let marker: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/train-dpo/prefpipe_train.json")).unwrap()).unwrap();
        assert_eq!(marker["reference"].is_null(), free, "{name}: {marker}");
        assert_eq!(files_named(dir.path(), "reference_logps.bin").is_empty(), free, "{name}: reference log-probs cached iff used");
        let o =
            ok(prefpipe(dir.path(), &["query", "SELECT count(nll) AS n FROM train", "--pipeline", "pipelines/p.yaml", "--format", "csv"]));
        let with_nll: u64 = o.lines().nth(1).unwrap().parse().unwrap();
        assert_eq!(with_nll, if name == "dpo-nll" || name == "orpo" { 16 } else { 0 }, "{name}: nll column {o}");
    }
}

fn rejected(extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pairs.jsonl"), "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n").unwrap();
    let yaml = format!(
        "name: bad
stages:
  - id: data
    kind: source
    path: pairs.jsonl
  - id: train
    kind: train
    input: data
    model: {}/tiny-llama
{extra}    output: out/model
",
        models().display()
    );
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let o = prefpipe(dir.path(), &["run", "p.yaml"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "exit code 2 expected; stderr:\n{err}");
    assert!(!err.contains("panicked") && err.lines().all(|l| l.starts_with("error: ")), "{err}");
    assert!(!dir.path().join("out").exists(), "no output: {err}");
    let v = prefpipe(dir.path(), &["validate", "p.yaml"]);
    assert_eq!(v.status.code(), Some(2), "{}", stderr(&v));
    err
}

/// Each bad setting is an exit-2 error at its own line (line 10 is the first
/// extra key, line 11 the second).
#[test]
fn bad_objective_settings_exit_2_at_the_key() {
    let e = rejected("    loss: ipo\n    beta: 0\n");
    assert!(e.contains("p.yaml:11:") && e.contains("`beta` must be > 0 (IPO's target margin is 1/(2β)) (got 0)"), "{e}");
    for eps in ["0.5", "-0.1", "1"] {
        let e = rejected(&format!("    loss: robust\n    label_smoothing: {eps}\n"));
        assert!(e.contains("p.yaml:11:") && e.contains("`label_smoothing` must be in [0, 0.5)"), "{e}");
    }
    let e = rejected(&format!("    method: orpo\n    reference: {}/tiny-mistral\n", models().display()));
    assert!(e.contains("p.yaml:11:") && e.contains("`method: orpo` is reference-free: drop `reference`"), "{e}");
    let e = rejected("    method: simpo\n    gamma: -0.5\n");
    assert!(e.contains("p.yaml:11:") && e.contains("`gamma` must be ≥ 0 (got -0.5)"), "{e}");
    let e = rejected("    method: orpo\n    beta: 0.1\n");
    assert!(e.contains("p.yaml:11:") && e.contains("its odds-ratio weight is `lambda`"), "{e}");
    let e = rejected("    loss: sigmoid\n    label_smoothing: 0.1\n");
    assert!(e.contains("p.yaml:11:") && e.contains("`loss: robust` only"), "{e}");
}
