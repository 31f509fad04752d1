//! `prefpipe report` and the dataset card (DESIGN §14) on real runs: the
//! report in headless Chromium (it loads, requests nothing, draws its charts
//! and shows run.json's numbers), the card through `huggingface_hub` and
//! `datasets`, `inspect`'s length-bias line, and the bad inputs.
//!
//! Chromium is Debian's `chromium` (`.ci/run` installs it); the Python side
//! is the `.venv` of scripts/setup-venv.sh. Without them a test says so and
//! passes, except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::{Array, UInt32Array};

use crate::common::{ok, prefpipe, read, root, stderr, stdout};

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A tool the test needs, or `None` (skip with a message; on CI, fail).
fn need(what: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_none() {
        assert!(!on_ci(), "{what} is missing and CI=true: .ci/run installs it");
        eprintln!("skipped: {what} is missing (run .ci/run or scripts/setup-venv.sh)");
    }
    found
}

fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        let ok = Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success());
        ok.then(|| PathBuf::from(name))
    });
    need("Debian's chromium", found)
}

fn venv_python() -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    let ok = Command::new(&py).args(["-c", "import datasets, huggingface_hub"]).output().is_ok_and(|o| o.status.success());
    need(".venv with datasets and huggingface_hub", ok.then_some(py))
}

/// Headless Chromium on a local file, sandboxed from the network: every
/// connection goes to a closed loopback port (a proxy that is not there) and
/// no host name resolves, so not even the browser's own update checks leave
/// the machine. `extra` are the flags of the job (dump the DOM, screenshot).
fn chromium_on(bin: &Path, page: &Path, profile: &Path, extra: &[String]) -> std::process::Output {
    let mut c = Command::new(bin);
    c.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=3000",
    ]);
    c.arg(format!("--user-data-dir={}", profile.display())).args(extra).arg(format!("file://{}", page.display()));
    let o = c.output().expect("runs chromium");
    assert!(o.status.success(), "chromium failed: {}", stderr(&o));
    o
}

/// URLs the page itself asked for (not the browser's own background
/// requests), from Chromium's NetLog: URL_REQUEST_START_JOB events whose
/// network isolation key is the page's file:// origin.
fn page_requests(netlog: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(netlog).unwrap()).unwrap();
    let start = v["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].as_u64().unwrap();
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(start))
        .filter(|e| e["params"]["network_isolation_key"].as_str().is_some_and(|k| k.starts_with("file://")))
        .filter_map(|e| e["params"]["url"].as_str().map(str::to_string))
        .filter(|u| !u.starts_with("file:"))
        .collect()
}

/// The values marked `data-run-json="POINTER"` in a DOM: (pointer, text shown, title).
fn marked_values(dom: &str) -> Vec<(String, String, Option<String>)> {
    let unescape =
        |s: &str| s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&");
    let mut out = Vec::new();
    for part in dom.split("data-run-json=\"").skip(1) {
        let (ptr, rest) = part.split_once('"').unwrap();
        let (attrs, rest) = rest.split_once('>').unwrap();
        let text = rest.split_once('<').unwrap().0;
        let title = attrs.split_once("title=\"").map(|(_, t)| unescape(t.split_once('"').unwrap().0));
        out.push((unescape(ptr), unescape(text), title));
    }
    out
}

/// Generate → judge → score → select (Sweet Spot, repeated ranking) → CHES →
/// DPO on the tiny fixtures, with two exports.
fn real_pipeline() -> String {
    let m = root().join("data-samples/models");
    format!(
        "name: report-demo
seed: 0
chunk_size: 8
models:
  policy: {m}/tiny-llama
  reward: {m}/tiny-llama-rm
  reward2: {m}/tiny-qwen2-rm
stages:
  - id: prompts
    kind: source
    path: {prompts}
    dedup: true
    limit: 16
  - id: samples
    kind: generate
    input: prompts
    model: policy
    n: 4
    temperature: 1.0
    max_new_tokens: 16
    seed: 5
  - id: judged
    kind: judge
    input: samples
    model: policy
    repeats: 2
    max_tokens: 8
  - id: scored
    kind: score
    input: samples
    reward_models:
      - {{name: rm, model: reward, weight: 1.0}}
      - {{name: rm2, model: reward2, weight: 1.0}}
    rules:
      - {{name: length, kind: length, target: 8, per_token: 0.05, weight: 0.5}}
  - id: pairs
    kind: select
    input: scored
    strategy: reward_points
  - id: consistent
    kind: select
    input: scored
    strategy: repeat_ranking
    rankers: [reward_rm, reward_rm2, reward_length]
    keep: 0.5
  - id: safe
    kind: filter
    input: pairs
    strategy: ches
    model: policy
    drop: 0.25
  - id: train
    kind: train
    input: safe
    method: dpo
    model: policy
    beta: 0.1
    lr: 0.001
    epochs: 2
    batch_size: 2
    seed: 3
    output: out/policy-dpo
    metrics: out/metrics.parquet
  - id: export
    kind: export
    input: safe
    path: out/pairs.parquet
  - id: export_trl
    kind: export
    input: safe
    path: out/pairs-trl.parquet
    format: trl
",
        m = m.display(),
        prompts = root().join("data-samples/prompts.jsonl").display()
    )
}

#[test]
fn report_of_a_real_run_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("out")).unwrap();
    std::fs::write(d.join("p.yaml"), real_pipeline()).unwrap();
    ok(prefpipe(d, &["run", "p.yaml"]));
    let out = ok(prefpipe(d, &["report", "p.yaml", "--out", "report.html"]));
    assert!(out.contains("wrote report.html"), "{out}");
    let html = std::fs::read_to_string(d.join("report.html")).unwrap();
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join(".prefpipe/run.json")).unwrap()).unwrap();

    // Self-contained: a policy that forbids every fetch, no script, no URL in any src or href.
    assert!(html.contains(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
    ));
    assert!(!html.contains("<script"), "no script");
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let url = part.split('"').next().unwrap();
            assert!(url.starts_with('#') || url.starts_with("data:"), "{attr}{url}\" leaves the page");
        }
    }

    let Some(bin) = chromium() else { return };
    let profile = tempfile::tempdir().unwrap();
    let dom = stdout(&chromium_on(&bin, &d.join("report.html"), profile.path(), &["--dump-dom".into()]));

    // The charts that apply to this run, each an SVG in the loaded page.
    let charts = [
        "funnel",
        "judge-failures-judged",
        "reward-mean-std-scored",
        "reward-hist-scored",
        "pair-rewards-pairs",
        "margin-pairs",
        "length-pairs",
        "kendall-consistent",
        "ln-ches-safe",
        "ches-safe",
        "train-loss-train",
        "train-accuracy-train",
        "train-margin-train",
        "train-logps-train",
    ];
    for c in charts {
        let at = dom.find(&format!("data-chart=\"{c}\"")).unwrap_or_else(|| panic!("chart {c} is missing"));
        assert!(dom[at..].trim_start_matches(|ch| ch != '>').get(1..6) == Some("<svg "), "chart {c} has its SVG");
    }
    assert!(!dom.contains("data-chart-error"), "every chart drew");
    for s in ["funnel", "judge-judged", "rewards-scored", "pairs-pairs", "kendall-consistent", "ches-safe", "train-train", "lineage"] {
        assert!(dom.contains(&format!("<section id=\"{s}\">")), "section {s}");
    }

    // Every number marked from run.json equals run.json's (floats are shown to 4 decimals, exactly in the title).
    let marked = marked_values(&dom);
    for (ptr, shown, title) in &marked {
        let v = run.pointer(ptr).unwrap_or_else(|| panic!("{ptr} is not in run.json"));
        match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                let x = n.as_f64().unwrap();
                assert!((shown.parse::<f64>().unwrap() - x).abs() <= 5e-5, "{ptr}: shown {shown}, run.json {x}");
                assert_eq!(title.as_deref().map(|t| t.parse::<f64>().unwrap()), Some(x), "{ptr}");
            }
            serde_json::Value::String(s) => assert_eq!(shown, s, "{ptr}"),
            v => assert_eq!(shown, &v.to_string(), "{ptr}"),
        }
    }
    // … and they cover the funnel, the lineage and the judge figures.
    let has = |p: &str| marked.iter().any(|m| m.0 == p);
    for p in ["/pipeline_hash", "/prefpipe_version", "/seed"] {
        assert!(has(p), "{p}");
    }
    for (k, s) in run["stages"].as_array().unwrap().iter().enumerate() {
        assert!(has(&format!("/stages/{k}/rows_in")) && has(&format!("/stages/{k}/rows_out")), "stage {k}");
        for reason in s["drops"].as_object().unwrap().keys() {
            assert!(has(&format!("/stages/{k}/drops/{reason}")), "stage {k} drop {reason}");
        }
    }
    let kj = run["stages"].as_array().unwrap().iter().position(|s| s["id"] == "judged").unwrap();
    assert!(has(&format!("/stages/{kj}/backend/judge/rankings")) && has(&format!("/stages/{kj}/backend/judge/ok")));
    for reason in run["stages"][kj]["backend"]["judge"]["parse_failures"].as_object().unwrap().keys() {
        assert!(has(&format!("/stages/{kj}/backend/judge/parse_failures/{reason}")), "{reason}");
    }
    // The length-bias line is the one the card and `inspect` print for the CHES-filtered pairs.
    let safe = read(&d.join("out/pairs.parquet"));
    let tokens = |c: &str| -> Vec<u32> {
        safe.iter()
            .flat_map(|b| b.column_by_name(c).unwrap().as_any().downcast_ref::<UInt32Array>().unwrap().iter().flatten().collect::<Vec<_>>())
            .collect()
    };
    let (ct, rt) = (tokens("chosen_tokens"), tokens("rejected_tokens"));
    assert!(!ct.is_empty() && ct.len() == rt.len(), "generate's n_tokens reach the pairs");
    let mean = |v: &[u32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let line = format!("mean chosen tokens {:.1} vs rejected {:.1} over {} pairs", mean(&ct), mean(&rt), ct.len());
    assert!(dom.contains(&line), "{line}");
    let card = std::fs::read_to_string(d.join("out/README.md")).unwrap();
    assert!(card.contains(&line), "{line} in the card");
    assert!(ok(prefpipe(d, &["inspect", "out/pairs.parquet"])).contains(&format!("length bias: {line}")));

    // No request leaves the page, even without its policy: Chromium's NetLog
    // of the page with the CSP meta removed shows none; the same page with an
    // <img> of a loopback URL shows that one, so the check sees requests.
    let nocsp = html.replacen("<meta http-equiv=\"Content-Security-Policy\"", "<meta name=\"was-csp\"", 1);
    std::fs::write(d.join("nocsp.html"), &nocsp).unwrap();
    std::fs::write(d.join("probe.html"), nocsp.replace("</body>", "<img src=\"http://127.0.0.1:9/probe.png\"></body>")).unwrap();
    for (page, expect) in [("nocsp", vec![]), ("probe", vec!["http://127.0.0.1:9/probe.png".to_string()])] {
        let log = d.join(format!("{page}.netlog.json"));
        let profile = tempfile::tempdir().unwrap();
        chromium_on(
            &bin,
            &d.join(format!("{page}.html")),
            profile.path(),
            &[format!("--log-net-log={}", log.display()), "--dump-dom".into()],
        );
        assert_eq!(page_requests(&log), expect, "{page}");
    }

    // The screenshot, kept under target/ as the test's artifact (README's docs/report.png is one).
    let shot_dir = root().join("target/report-test");
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("report.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    chromium_on(
        &bin,
        &d.join("report.html"),
        profile.path(),
        &[format!("--screenshot={}", shot.display()), "--window-size=1360,2400".into(), "--hide-scrollbars".into()],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a screenshot of {} bytes", png.len());
    std::fs::copy(d.join("report.html"), shot_dir.join("report.html")).unwrap();
}

/// A cheap run with no models: scored samples (with n_tokens) → Sweet Spot pairs and LiPO lists,
/// exported in every format into three directories.
fn card_pipeline(extra: &str) -> String {
    format!(
        "name: cards
stages:
  - id: scored
    kind: source
    path: {scored}
    limit: 40
  - id: pairs
    kind: select
    input: scored
    strategy: reward_points
  - id: lists
    kind: select
    input: scored
    strategy: listwise
    list_size: 3
  - id: raw
    kind: export
    input: pairs
    path: a/pairs.parquet
  - id: lipo
    kind: export
    input: lists
    path: a/lists.parquet
    format: lists
  - id: lines
    kind: export
    input: pairs
    path: a/pairs.jsonl
    format: jsonl
  - id: trl
    kind: export
    input: pairs
    path: b/pairs.jsonl
    format: trl
  - id: chat
    kind: export
    input: pairs
    path: c/chat.parquet
    format: trl_chat
{extra}",
        scored = root().join("data-samples/scored.jsonl").display()
    )
}

#[test]
fn dataset_cards_load_with_huggingface_hub_and_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["a", "b", "c"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("p.yaml"), card_pipeline("")).unwrap();
    let err = stderr(&prefpipe(d, &["run", "p.yaml"]));
    for card in ["a/README.md", "b/README.md", "c/README.md"] {
        assert!(err.contains(&format!("card    → {}", d.join(card).display())) || d.join(card).is_file(), "{card}: {err}");
    }
    let a = std::fs::read_to_string(d.join("a/README.md")).unwrap();
    // Two Parquet exports share a's card as two configs; the JSON-lines one is listed, not a config
    // (datasets reads a directory with the builder of its first config's files).
    assert!(a.contains("- config_name: \"raw\"") && a.contains("- config_name: \"lipo\"") && !a.contains("config_name: \"lines\""), "{a}");
    assert!(a.contains("`pairs.jsonl` (jsonl, ") && a.contains("reward_points") && a.contains("Finding the Sweet Spot"), "{a}");
    assert!(a.contains("tags:\n- dpo\n- preference\n- lipo\n") && a.contains("size_categories:\n- n<1K\n"), "{a}");
    // The card is rewritten identically when every stage is cached.
    ok(prefpipe(d, &["run", "p.yaml"]));
    assert_eq!(std::fs::read_to_string(d.join("a/README.md")).unwrap(), a);

    let Some(py) = venv_python() else { return };
    let script = r#"
import json, sys
from huggingface_hub import DatasetCard
import datasets
out = {}
for sub in sys.argv[1:]:
    card = DatasetCard.load(f"{sub}/README.md")
    meta = card.data.to_dict()
    infos = meta["dataset_info"] if isinstance(meta["dataset_info"], list) else [dict(meta["dataset_info"], config_name="default")]
    for cfg in meta["configs"]:
        ds = datasets.load_dataset(sub, cfg["config_name"], split="train")
        info = next(i for i in infos if i["config_name"] == cfg["config_name"])
        out[f'{sub}/{cfg["config_name"]}'] = {
            "rows": ds.num_rows,
            "columns": ds.column_names,
            "card_columns": [f["name"] for f in info["features"]],
            "features": {k: str(v) for k, v in ds.features.items()},
            "tags": meta["tags"],
            "first": {k: (v if not isinstance(v, float) else round(v, 9)) for k, v in ds[0].items()},
        }
print(json.dumps(out))
"#;
    let hf = d.join("hf-home");
    let o = Command::new(&py)
        .args(["-c", script, "a", "b", "c"])
        .current_dir(d)
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &hf)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let got: serde_json::Value = serde_json::from_str(stdout(&o).trim().lines().last().unwrap()).unwrap();
    let keys: Vec<&String> = got.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["a/lipo", "a/raw", "b/default", "c/default"]);
    // Rows per config = the export's rows in run.json (and the card's table); columns = the card's features.
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join(".prefpipe/run.json")).unwrap()).unwrap();
    let rows_of = |id: &str| run["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap()["rows_in"].as_u64().unwrap();
    for (cfg, stage) in [("a/lipo", "lipo"), ("a/raw", "raw"), ("b/default", "trl"), ("c/default", "chat")] {
        let g = &got[cfg];
        assert_eq!(g["rows"].as_u64(), Some(rows_of(stage)), "{cfg}");
        let file = if cfg.starts_with("a/") { format!("`{stage}`") } else { "`default`".to_string() };
        let card = std::fs::read_to_string(d.join(&cfg[..1]).join("README.md")).unwrap();
        assert!(
            card.lines().any(|l| l.starts_with(&format!("| {file} |")) && l.contains(&format!("| {} |", rows_of(stage)))),
            "{cfg}: {card}"
        );
        assert_eq!(g["columns"], g["card_columns"], "{cfg}");
    }
    assert_eq!(got["b/default"]["columns"], serde_json::json!(["prompt", "chosen", "rejected"]));
    assert!(got["a/raw"]["features"]["chosen_tokens"].as_str().unwrap().contains("uint32"), "{}", got["a/raw"]);
    assert!(got["c/default"]["features"]["prompt"].as_str().unwrap().contains("role"), "{}", got["c/default"]);
    assert_eq!(got["c/default"]["first"]["chosen"][0]["role"], "assistant");
    // scored.jsonl carries n_tokens, so the pairs carry the chosen sample's count.
    let raw = read(&d.join("a/pairs.parquet"));
    let ct = raw[0].column_by_name("chosen_tokens").unwrap().as_any().downcast_ref::<UInt32Array>().unwrap().clone();
    assert_eq!(ct.null_count(), 0);
    assert_eq!(got["a/raw"]["first"]["chosen_tokens"].as_u64(), Some(ct.value(0) as u64));
}

#[test]
fn a_readme_of_someone_else_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["a", "b", "c"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("a/README.md"), "# my notes\n").unwrap();
    std::fs::write(d.join("p.yaml"), card_pipeline("")).unwrap();
    // Refused at plan time, at each export into a/, exit 2, before anything runs.
    let o = prefpipe(d, &["run", "p.yaml"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("a/README.md exists and was not written by prefpipe") && e.contains("set `card: false`"), "{e}");
    assert!(!d.join("a/pairs.parquet").exists() && !d.join("b/README.md").exists());
    // `card: false` on the exports into a/ writes none there; the others still get theirs.
    let yaml = card_pipeline("")
        .replace("path: a/pairs.parquet\n", "path: a/pairs.parquet\n    card: false\n")
        .replace("path: a/lists.parquet\n    format: lists\n", "path: a/lists.parquet\n    format: lists\n    card: false\n");
    let yaml = yaml.replace("path: a/pairs.jsonl\n    format: jsonl\n", "path: a/pairs.jsonl\n    format: jsonl\n    card: false\n");
    std::fs::write(d.join("p.yaml"), yaml).unwrap();
    ok(prefpipe(d, &["run", "p.yaml"]));
    assert_eq!(std::fs::read_to_string(d.join("a/README.md")).unwrap(), "# my notes\n");
    assert!(d.join("a/pairs.parquet").is_file() && d.join("b/README.md").is_file());
}

#[test]
fn report_draws_only_what_applies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["a", "b", "c"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("p.yaml"), card_pipeline("")).unwrap();
    ok(prefpipe(d, &["run", "p.yaml"]));
    ok(prefpipe(d, &["report", "p.yaml"]));
    let html = std::fs::read_to_string(d.join(".prefpipe/report.html")).unwrap();
    for present in [
        "data-chart=\"funnel\"",
        "data-chart=\"reward-mean-std-scored\"",
        "data-chart=\"pair-rewards-pairs\"",
        "data-chart=\"list-rewards-lists\"",
    ] {
        assert!(html.contains(present), "{present}");
    }
    for absent in ["data-chart=\"train-", "data-chart=\"judge-", "data-chart=\"kendall-", "-ches-"] {
        assert!(!html.contains(absent), "{absent}: this run has no such stage");
    }
}

#[test]
fn report_refuses_unfinished_runs_and_other_pipelines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["a", "b", "c"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("p.yaml"), card_pipeline("")).unwrap();
    let one_line = |o: &std::process::Output, want: &[&str]| {
        assert_eq!(o.status.code(), Some(2), "{}", stderr(o));
        let e = stderr(o);
        assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
        for w in want {
            assert!(e.contains(w), "{w}: {e}");
        }
    };
    // No run yet.
    one_line(&prefpipe(d, &["report", "p.yaml"]), &["no run in the store .prefpipe", "run `prefpipe run p.yaml --store .prefpipe` first"]);
    // A run stopped after `pairs`: the stages that have not run are named.
    ok(prefpipe(d, &["run", "p.yaml", "--until", "pairs"]));
    one_line(&prefpipe(d, &["report", "p.yaml"]), &["has not finished", "`lists`, `raw`, `lipo`, `lines`, `trl`, `chat`", "have not run"]);
    // Another pipeline's store.
    std::fs::write(d.join("q.yaml"), card_pipeline("").replace("name: cards", "name: other")).unwrap();
    ok(prefpipe(d, &["run", "p.yaml"]));
    one_line(&prefpipe(d, &["report", "q.yaml"]), &["holds a run of pipeline `cards`, not of `other` (q.yaml)"]);
    // The same pipeline, edited since the run.
    std::fs::write(d.join("p.yaml"), card_pipeline("# edited\n")).unwrap();
    one_line(&prefpipe(d, &["report", "p.yaml"]), &["another version of pipeline `cards`", "run `prefpipe run p.yaml` again"]);
    // A report into a directory that does not exist.
    std::fs::write(d.join("p.yaml"), card_pipeline("")).unwrap();
    ok(prefpipe(d, &["run", "p.yaml"]));
    one_line(
        &prefpipe(d, &["report", "p.yaml", "--out", "nowhere/r.html"]),
        &["--out nowhere/r.html: the directory nowhere does not exist"],
    );
}
