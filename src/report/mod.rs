//! `prefpipe report P [--store DIR] [--out FILE.html]` (DESIGN §14): one
//! self-contained HTML page for a finished run — the funnel per stage,
//! reward distributions, chosen vs rejected rewards, margins and lengths,
//! Kendall's W with its threshold, CHES with its cut, the judges' parse
//! failures and biases, training curves, and the lineage. Only the sections
//! that apply to the run are drawn.
//!
//! The page loads nothing: charts are inline SVG (plotters), styles inline,
//! no script, and a `Content-Security-Policy` of `default-src 'none'` says
//! so to the browser. Every number taken from `run.json` is marked with its
//! JSON pointer (`data-run-json="/stages/2/rows_out"`), so a test can check
//! each against the manifest.

mod charts;
mod html;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, UInt32Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type};
use arrow::record_batch::RecordBatch;
use prefpipe_core::plan::Plan;
use prefpipe_core::store::Store;
use prefpipe_core::table::{f64_col, str_col};
use prefpipe_core::Error;
use prefpipe_select::tokens;
use serde_json::Value;

use charts::Series;
use html::{esc, num, Page};

/// Writes the report of the run in `store` (named `label` in messages: its
/// directory or URL) to `out`; returns its path.
pub fn run(plan: &Plan, pipeline: &Path, store: &Store, label: &str, out: &Path) -> anyhow::Result<PathBuf> {
    let run = finished_run(plan, pipeline, store, label)?;
    let page = build(plan, store, &run)?;
    let path = out.to_path_buf();
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !d.is_dir() {
            return Err(Error::Input(format!("--out {}: the directory {} does not exist", path.display(), d.display())).into());
        }
    }
    let text = page.render();
    prefpipe_core::io::write_atomic(&path, |f| {
        use std::io::Write;
        f.write_all(text.as_bytes()).map_err(|e| Error::io(&path, e))
    })?;
    Ok(path)
}

/// `run.json` of the store, checked to be a finished run of this plan: the
/// same pipeline (name and text hash) and every stage complete under its
/// planned key. Anything else is bad input (exit 2), in one line.
fn finished_run(plan: &Plan, pipeline: &Path, store: &Store, dir: &str) -> Result<Value, Error> {
    let path = store.root.join("run.json");
    let p = pipeline.display();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Input(format!("no run in the store {dir} (it has no run.json): run `prefpipe run {p} --store {dir}` first")))
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let run: Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::Input(format!("{}: not a prefpipe run manifest ({e})", path.display())))?;
    let (Some(name), Some(hash), Some(stages)) = (run["pipeline"].as_str(), run["pipeline_hash"].as_str(), run["stages"].as_array()) else {
        return Err(Error::Input(format!("{}: not a prefpipe run manifest (no pipeline, pipeline_hash or stages)", path.display())));
    };
    if name != plan.spec.name {
        return Err(Error::Input(format!(
            "the store {dir} holds a run of pipeline `{name}`, not of `{}` ({p}): pass this pipeline's store with --store",
            plan.spec.name
        )));
    }
    if hash != plan.spec.text_hash {
        return Err(Error::Input(format!(
            "the run in the store {dir} is of another version of pipeline `{name}` (pipeline hash {} ≠ {} of {p}): run `prefpipe run {p}` again",
            &hash[..hash.len().min(12)],
            &plan.spec.text_hash[..12]
        )));
    }
    let mut missing = Vec::new();
    for s in &plan.stages {
        let in_run = stages.iter().any(|r| r["id"].as_str() == Some(&s.id) && r["key"].as_str() == Some(&s.key));
        let complete = matches!(store.manifest(&s.id, &s.key)?, Some(m) if m.complete);
        if !(in_run && complete) {
            missing.push(format!("`{}`", s.id));
        }
    }
    if !missing.is_empty() {
        let (what, verb) = if missing.len() == 1 { ("stage", "has") } else { ("stages", "have") };
        let failed = match (run["status"].as_str(), run["error"]["stage"].as_str()) {
            (Some("failed"), Some(at)) => format!(" (the last run failed at stage `{at}`)"),
            (Some("failed"), None) => " (the last run failed)".to_string(),
            _ => String::new(),
        };
        return Err(Error::Input(format!(
            "the run in the store {dir} has not finished{failed}: {what} {} {verb} not run (with these settings): run `prefpipe run {p}` to finish it",
            missing.join(", ")
        )));
    }
    Ok(run)
}

/// A finished stage's table, in one batch.
fn table(plan: &Plan, store: &Store, i: usize) -> anyhow::Result<RecordBatch> {
    let s = &plan.stages[i];
    let m = store.manifest(&s.id, &s.key)?.ok_or_else(|| Error::Runtime(format!("stage `{}` has no manifest", s.id)))?;
    let mut batches = Vec::new();
    for f in store.chunk_files(&m) {
        batches.extend(prefpipe_core::io::read_parquet(&f)?);
    }
    Ok(arrow::compute::concat_batches(&s.schema, &batches)?)
}

fn has(b: &RecordBatch, c: &str) -> bool {
    b.schema().field_with_name(c).is_ok()
}

fn finite(a: &arrow::array::Float64Array) -> Vec<f64> {
    a.iter().flatten().filter(|v| v.is_finite()).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Population standard deviation (ddof 0, as `reward_points`).
fn std(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

fn u32s(b: &RecordBatch, c: &str) -> anyhow::Result<Vec<Option<u32>>> {
    let a = cast(b.column_by_name(c).expect("checked"), &DataType::UInt32)?;
    Ok(a.as_any().downcast_ref::<UInt32Array>().expect("u32").iter().collect())
}

fn build(plan: &Plan, store: &Store, run: &Value) -> anyhow::Result<Page> {
    let mut page = Page::new(&plan.spec.name);
    let k_of = |id: &str| run["stages"].as_array().and_then(|a| a.iter().position(|r| r["id"].as_str() == Some(id))).unwrap_or(0);
    page.summary = format!(
        "Pipeline <code>{}</code> · hash {} · prefpipe {} · seed {} · device {} · {} stages in {} s",
        esc(&plan.spec.file),
        num("/pipeline_hash", &run["pipeline_hash"]),
        num("/prefpipe_version", &run["prefpipe_version"]),
        num("/seed", &run["seed"]),
        num("/device", &run["device"]),
        run["stages"].as_array().map_or(0, Vec::len),
        num("/elapsed_s", &run["elapsed_s"]),
    );
    funnel(&mut page, run)?;
    for (i, s) in plan.stages.iter().enumerate() {
        let config = s.stage.config();
        let k = k_of(&s.id);
        let strategy = config.get("strategy").and_then(Value::as_str).unwrap_or_default().to_string();
        match s.kind.as_str() {
            "judge" => judge(&mut page, plan, store, i, run, k)?,
            "train" => training(&mut page, &s.id, &table(plan, store, i)?)?,
            "export" => {}
            _ if s.mode == prefpipe_core::stage::Mode::Sink => {}
            _ => {
                let b = table(plan, store, i)?;
                if has(&b, "reward") && has(&b, "prompt_id") && has(&b, "sample_idx") && s.kind != "select" {
                    rewards(&mut page, &s.id, &b)?;
                }
                if has(&b, "chosen_reward") && has(&b, "rejected_reward") {
                    pairs(&mut page, &s.id, &b)?;
                }
                if has(&b, "responses") && has(&b, "rewards") {
                    lists(&mut page, &s.id, &b)?;
                }
                if strategy == "repeat_ranking" && has(&b, "kendall_w") {
                    kendall(&mut page, &s.id, &b, &config, run, k)?;
                }
                if strategy == prefpipe_select::ches::NAME && has(&b, "ln_ches") {
                    ches(&mut page, &s.id, &b, &config, run, k)?;
                }
            }
        }
    }
    lineage(&mut page, plan, store)?;
    Ok(page)
}

fn funnel(page: &mut Page, run: &Value) -> anyhow::Result<()> {
    let stages = run["stages"].as_array().cloned().unwrap_or_default();
    let labels: Vec<String> = stages.iter().map(|s| s["id"].as_str().unwrap_or_default().to_string()).collect();
    let rin: Vec<f64> = stages.iter().map(|s| s["rows_in"].as_f64().unwrap_or(0.0)).collect();
    let rout: Vec<f64> = stages.iter().map(|s| s["rows_out"].as_f64().unwrap_or(0.0)).collect();
    let mut h = String::from("<p>Rows in and out of every stage, and what each dropped and why (from <code>run.json</code>).</p>");
    h += &html::chart("funnel", charts::bars("Rows per stage", "rows", &labels, &[("rows in", &rin), ("rows out", &rout)]));
    h += "<table><thead><tr><th>stage</th><th>kind</th><th>status</th><th>rows in</th><th>rows out</th><th>dropped (by reason)</th><th>seconds</th></tr></thead><tbody>";
    for (k, s) in stages.iter().enumerate() {
        let p = format!("/stages/{k}");
        let drops: Vec<String> = s["drops"]
            .as_object()
            .map(|d| d.iter().map(|(r, n)| format!("{} {}", esc(r), num(&format!("{p}/drops/{}", html::pointer_escape(r)), n))).collect())
            .unwrap_or_default();
        h += &format!(
            "<tr data-stage=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"r\">{}</td><td class=\"r\">{}</td><td>{}</td><td class=\"r\">{}</td></tr>",
            esc(s["id"].as_str().unwrap_or_default()),
            num(&format!("{p}/id"), &s["id"]),
            num(&format!("{p}/kind"), &s["kind"]),
            num(&format!("{p}/status"), &s["status"]),
            num(&format!("{p}/rows_in"), &s["rows_in"]),
            num(&format!("{p}/rows_out"), &s["rows_out"]),
            if drops.is_empty() { "–".to_string() } else { drops.join(", ") },
            num(&format!("{p}/elapsed_s"), &s["elapsed_s"]),
        );
    }
    h += "</tbody></table>";
    page.section("funnel", "Funnel", h);
    Ok(())
}

/// Per-prompt reward mean and standard deviation of a scored table.
fn rewards(page: &mut Page, id: &str, b: &RecordBatch) -> anyhow::Result<()> {
    let pid = str_col(b, "prompt_id")?;
    let r = f64_col(b, "reward")?;
    let mut by: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut non_finite = 0;
    for i in 0..b.num_rows() {
        match (pid.is_valid(i), r.is_valid(i) && r.value(i).is_finite()) {
            (true, true) => by.entry(pid.value(i)).or_default().push(r.value(i)),
            _ => non_finite += 1,
        }
    }
    if by.is_empty() {
        return Ok(());
    }
    let pts: Vec<(f64, f64)> = by.values().map(|v| (mean(v), std(v))).collect();
    let means: Vec<f64> = pts.iter().map(|p| p.0).collect();
    let stds: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let mut h = format!(
        "<p>{} prompts, {} samples with a finite reward ({} without). Mean of the per-prompt means {}, mean per-prompt σ {} (population σ, as <code>reward_points</code>).</p>",
        by.len(),
        b.num_rows() - non_finite,
        non_finite,
        html::f(mean(&means)),
        html::f(mean(&stds))
    );
    h += &html::chart(&format!("reward-mean-std-{id}"), charts::scatter("Per-prompt reward: mean vs σ", "mean reward", "σ", &pts));
    h += &html::chart(
        &format!("reward-hist-{id}"),
        charts::histogram("All rewards", "reward", &[Series { name: "reward", values: &finite(&r) }], 24, None),
    );
    page.section(&format!("rewards-{id}"), &format!("Rewards · {id}"), h);
    Ok(())
}

/// Length-bias charts and line from token counts, or characters without them.
fn lengths(id: &str, chosen: Vec<f64>, rejected: Vec<f64>, unit: &str, line: Option<String>) -> String {
    let mut h = match line {
        Some(l) => format!("<p class=\"bias\" data-length-bias=\"{}\">Length bias: {}.</p>", esc(id), esc(&l)),
        None => format!(
            "<p class=\"bias\">No token counts (the table has no <code>chosen_tokens</code>/<code>rejected_tokens</code> values); lengths in {unit}: mean chosen {} vs rejected {}.</p>",
            html::f(mean(&chosen)),
            html::f(mean(&rejected))
        ),
    };
    h += &html::chart(
        &format!("length-{id}"),
        charts::histogram(
            &format!("Chosen vs rejected length ({unit})"),
            unit,
            &[Series { name: "chosen", values: &chosen }, Series { name: "rejected", values: &rejected }],
            20,
            None,
        ),
    );
    h
}

/// Chosen and rejected lengths, their unit, and the length-bias line when they are tokens.
type Lengths = (Vec<f64>, Vec<f64>, &'static str, Option<String>);

/// Chosen/rejected lengths of a pairs or lists table: tokens where known.
fn length_columns(b: &RecordBatch, chars: impl Fn() -> anyhow::Result<(Vec<f64>, Vec<f64>)>) -> anyhow::Result<Lengths> {
    if has(b, tokens::CHOSEN_TOKENS) && has(b, tokens::REJECTED_TOKENS) {
        if let Some(lb) = tokens::length_bias(std::slice::from_ref(b))? {
            let (c, r) = (u32s(b, tokens::CHOSEN_TOKENS)?, u32s(b, tokens::REJECTED_TOKENS)?);
            let both: Vec<(f64, f64)> = c.iter().zip(&r).filter_map(|(c, r)| Some(((*c)? as f64, (*r)? as f64))).collect();
            return Ok((both.iter().map(|p| p.0).collect(), both.iter().map(|p| p.1).collect(), "tokens", Some(lb.line())));
        }
    }
    let (c, r) = chars()?;
    Ok((c, r, "characters", None))
}

fn pairs(page: &mut Page, id: &str, b: &RecordBatch) -> anyhow::Result<()> {
    let (c, r, m) = (f64_col(b, "chosen_reward")?, f64_col(b, "rejected_reward")?, f64_col(b, "margin")?);
    let (c, r, m) = (finite(&c), finite(&r), finite(&m));
    let mut h = format!(
        "<p>{} pairs. Mean chosen reward {}, rejected {}, margin {}.</p>",
        b.num_rows(),
        html::f(mean(&c)),
        html::f(mean(&r)),
        html::f(mean(&m))
    );
    if !c.is_empty() || !r.is_empty() {
        h += &html::chart(
            &format!("pair-rewards-{id}"),
            charts::histogram(
                "Chosen vs rejected reward",
                "reward",
                &[Series { name: "chosen", values: &c }, Series { name: "rejected", values: &r }],
                24,
                None,
            ),
        );
        h += &html::chart(
            &format!("margin-{id}"),
            charts::histogram("Margin (chosen − rejected)", "margin", &[Series { name: "margin", values: &m }], 24, None),
        );
    }
    let (lc, lr, unit, line) = length_columns(b, || {
        let len = |c: &str| -> anyhow::Result<Vec<f64>> { Ok(str_col(b, c)?.iter().flatten().map(|s| s.chars().count() as f64).collect()) };
        Ok((len("chosen")?, len("rejected")?))
    })?;
    h += &lengths(id, lc, lr, unit, line);
    page.section(&format!("pairs-{id}"), &format!("Pairs · {id}"), h);
    Ok(())
}

fn lists(page: &mut Page, id: &str, b: &RecordBatch) -> anyhow::Result<()> {
    let rewards = b.column_by_name("rewards").expect("checked");
    let Some(rewards) = rewards.as_list_opt::<i32>() else { return Ok(()) };
    let (mut best, mut worst) = (Vec::new(), Vec::new());
    for i in 0..rewards.len() {
        let v = rewards.value(i);
        let Some(v) = v.as_primitive_opt::<Float64Type>() else { continue };
        if v.len() >= 2 && v.is_valid(0) && v.is_valid(v.len() - 1) {
            best.push(v.value(0));
            worst.push(v.value(v.len() - 1));
        }
    }
    let spread: Vec<f64> = best.iter().zip(&worst).map(|(a, b)| a - b).collect();
    let mut h = format!("<p>{} lists (sorted by reward, best first): best vs worst reward of each.</p>", b.num_rows());
    h += &html::chart(
        &format!("list-rewards-{id}"),
        charts::histogram(
            "Best vs worst reward",
            "reward",
            &[Series { name: "best", values: &best }, Series { name: "worst", values: &worst }],
            24,
            None,
        ),
    );
    h += &html::chart(
        &format!("list-spread-{id}"),
        charts::histogram("Best − worst reward", "reward", &[Series { name: "spread", values: &spread }], 24, None),
    );
    let (lc, lr, unit, line) = length_columns(b, || {
        let resp = b.column_by_name("responses").expect("checked").as_list::<i32>().clone();
        let (mut c, mut r) = (Vec::new(), Vec::new());
        for i in 0..resp.len() {
            let v = cast(&resp.value(i), &DataType::Utf8)?;
            let v = v.as_string::<i32>();
            if v.len() >= 2 {
                c.push(v.value(0).chars().count() as f64);
                r.push(v.value(v.len() - 1).chars().count() as f64);
            }
        }
        Ok((c, r))
    })?;
    h += &lengths(id, lc, lr, unit, line);
    page.section(&format!("lists-{id}"), &format!("Lists · {id}"), h);
    Ok(())
}

fn drops_of(run: &Value, k: usize, reason: &str) -> String {
    let v = &run["stages"][k]["drops"][reason];
    if v.is_null() {
        "0".into()
    } else {
        num(&format!("/stages/{k}/drops/{reason}"), v)
    }
}

fn kendall(page: &mut Page, id: &str, b: &RecordBatch, config: &Value, run: &Value, k: usize) -> anyhow::Result<()> {
    let w = finite(&f64_col(b, "kendall_w")?);
    let (cut, label) = match (config.get("min_w").and_then(Value::as_f64), config.get("keep").and_then(Value::as_f64)) {
        (Some(t), _) => (Some(t), format!("min_w = {}", html::plain(t))),
        (None, Some(keep)) => {
            let lowest = w.iter().copied().fold(f64::INFINITY, f64::min);
            (lowest.is_finite().then_some(lowest), format!("keep {}: lowest kept W = {}", html::plain(keep), html::plain(lowest)))
        }
        _ => (None, String::new()),
    };
    let mut h = format!(
        "<p>Kendall's W of the {} kept prompts (1 = the rankings agree); {} prompts fell below the threshold (<code>below_threshold</code> in <code>run.json</code>). {}</p>",
        w.len(),
        drops_of(run, k, "below_threshold"),
        esc(&label)
    );
    h += &html::chart(
        &format!("kendall-{id}"),
        charts::histogram(
            "Kendall's W of the kept prompts",
            "W",
            &[Series { name: "W", values: &w }],
            20,
            cut.map(|c| (c, label.as_str())),
        ),
    );
    page.section(&format!("kendall-{id}"), &format!("Ranking consistency · {id}"), h);
    Ok(())
}

fn ches(page: &mut Page, id: &str, b: &RecordBatch, config: &Value, run: &Value, k: usize) -> anyhow::Result<()> {
    let by = config.get("by").and_then(Value::as_str).unwrap_or("ln_ches").to_string();
    let mut h = format!(
        "<p>Pairs are ordered by <code>{}</code>, highest first, and the first are dropped (likelihood-displacement risk): {} dropped (<code>above_threshold</code> in <code>run.json</code>). The charts show the kept pairs; the cut is the highest score kept.</p>",
        esc(&by),
        drops_of(run, k, "above_threshold")
    );
    for col in ["ln_ches", "ches"] {
        if !has(b, col) {
            continue;
        }
        let v = finite(&f64_col(b, col)?);
        let cut = (col == by).then(|| v.iter().copied().fold(f64::NEG_INFINITY, f64::max)).filter(|c| c.is_finite());
        let label = cut.map(|c| format!("cut: highest kept {col} = {}", html::plain(c))).unwrap_or_default();
        h += &html::chart(
            &format!("{}-{id}", col.replace('_', "-")),
            charts::histogram(
                &format!("{col} of the kept pairs"),
                col,
                &[Series { name: col, values: &v }],
                20,
                cut.map(|c| (c, label.as_str())),
            ),
        );
    }
    page.section(&format!("ches-{id}"), &format!("CHES · {id}"), h);
    Ok(())
}

fn judge(page: &mut Page, plan: &Plan, store: &Store, i: usize, run: &Value, k: usize) -> anyhow::Result<()> {
    let id = &plan.stages[i].id;
    let j = &run["stages"][k]["backend"]["judge"];
    let p = format!("/stages/{k}/backend/judge");
    let mut h = String::new();
    if let Some(o) = j.as_object() {
        h += "<p>Figures of the judge stage as <code>run.json</code> reports them (DESIGN §12).</p><table><tbody>";
        for (key, v) in o.iter().filter(|(_, v)| !v.is_object()) {
            h += &format!("<tr><th>{}</th><td class=\"r\">{}</td></tr>", esc(key), num(&format!("{p}/{}", html::pointer_escape(key)), v));
        }
        h += "</tbody></table>";
        let failures: Vec<(String, f64)> = j["parse_failures"]
            .as_object()
            .map(|o| o.iter().map(|(r, n)| (r.clone(), n.as_f64().unwrap_or(0.0))).collect())
            .unwrap_or_default();
        if let Some(o) = j["parse_failures"].as_object() {
            h += "<p>Failures by reason: ";
            let items: Vec<String> = o
                .iter()
                .map(|(r, n)| format!("{} {}", esc(r), num(&format!("{p}/parse_failures/{}", html::pointer_escape(r)), n)))
                .collect();
            h += &if items.is_empty() { "none".to_string() } else { items.join(", ") };
            h += ".</p>";
        }
        let mut labels = vec!["ok".to_string()];
        let mut vals = vec![j["ok"].as_f64().unwrap_or(0.0)];
        for (r, n) in &failures {
            labels.push(r.clone());
            vals.push(*n);
        }
        h += &html::chart(
            &format!("judge-failures-{id}"),
            charts::bars("Judge replies: ok and parse failures", "replies", &labels, &[("replies", &vals)]),
        );
        let rates: Vec<(&str, &str)> = vec![
            ("first shown wins", "first_shown_win_rate"),
            ("chance", "first_shown_win_chance"),
            ("longer wins", "longer_response_win_rate"),
            ("tie rate", "tie_rate"),
            ("inconsistent", "inconsistent_rate"),
        ];
        let present: Vec<(String, f64)> = rates.iter().filter_map(|(l, key)| j[*key].as_f64().map(|v| (l.to_string(), v))).collect();
        if !present.is_empty() {
            let labels: Vec<String> = present.iter().map(|p| p.0.clone()).collect();
            let vals: Vec<f64> = present.iter().map(|p| p.1).collect();
            h += &html::chart(&format!("judge-bias-{id}"), charts::bars("Position and length bias", "rate", &labels, &[("rate", &vals)]));
        } else {
            h += "<p>No ok replies, so no position or length bias to show.</p>";
        }
    } else {
        // A stage cached in the last run reports no backend figures; count the statuses from its table.
        let b = table(plan, store, i)?;
        h +=
            "<p>This stage was cached in the last run, so <code>run.json</code> has no judge figures; statuses counted from its table:</p>";
        if has(&b, "status") {
            let st = str_col(&b, "status")?;
            let mut counts: BTreeMap<String, f64> = BTreeMap::new();
            for s in st.iter().flatten() {
                *counts.entry(s.to_string()).or_default() += 1.0;
            }
            let labels: Vec<String> = counts.keys().cloned().collect();
            let vals: Vec<f64> = counts.values().copied().collect();
            h += &html::chart(&format!("judge-failures-{id}"), charts::bars("Judge rows by status", "rows", &labels, &[("rows", &vals)]));
        }
    }
    page.section(&format!("judge-{id}"), &format!("Judge · {id}"), h);
    Ok(())
}

fn training(page: &mut Page, id: &str, b: &RecordBatch) -> anyhow::Result<()> {
    if !has(b, "step") || b.num_rows() == 0 {
        return Ok(());
    }
    let step: Vec<f64> = f64_col(b, "step")?.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    let col = |c: &str| -> anyhow::Result<Vec<f64>> { Ok(f64_col(b, c)?.iter().map(|v| v.unwrap_or(f64::NAN)).collect()) };
    let (loss, acc, margin, cl, rl) =
        (col("loss")?, col("reward_accuracy")?, col("reward_margin")?, col("chosen_logp")?, col("rejected_logp")?);
    let last = b.num_rows() - 1;
    let mut h = format!(
        "<p>{} optimizer steps (the metrics table). Last step: loss {}, reward accuracy {}, reward margin {}, chosen log-prob {}, rejected {}.</p>",
        b.num_rows(),
        html::f(loss[last]),
        html::f(acc[last]),
        html::f(margin[last]),
        html::f(cl[last]),
        html::f(rl[last])
    );
    h += "<div class=\"grid\">";
    h += &html::chart(&format!("train-loss-{id}"), charts::lines("Loss", "step", "loss", &step, &[("loss", &loss)]));
    h += &html::chart(
        &format!("train-accuracy-{id}"),
        charts::lines("Reward accuracy", "step", "accuracy", &step, &[("reward accuracy", &acc)]),
    );
    h +=
        &html::chart(&format!("train-margin-{id}"), charts::lines("Reward margin", "step", "margin", &step, &[("reward margin", &margin)]));
    h += &html::chart(
        &format!("train-logps-{id}"),
        charts::lines("Chosen vs rejected log-probs", "step", "log-prob", &step, &[("chosen", &cl), ("rejected", &rl)]),
    );
    h += "</div>";
    page.section(&format!("train-{id}"), &format!("Training · {id}"), h);
    Ok(())
}

fn lineage(page: &mut Page, plan: &Plan, store: &Store) -> anyhow::Result<()> {
    let all: Vec<usize> = (0..plan.stages.len()).collect();
    let lin = prefpipe_stages::lineage::lineage(plan, store, &all)?;
    let mut h = format!(
        "<p>Pipeline <code>{}</code> (<code>{}</code>), blake3 <code>{}</code>, prefpipe {}, pipeline seed {}, {} prompts per chunk.</p>",
        esc(&lin.pipeline),
        esc(&lin.file),
        esc(&lin.pipeline_hash),
        esc(&lin.prefpipe_version),
        lin.seed,
        lin.chunk_size
    );
    if !lin.models.is_empty() {
        h +=
            "<table><thead><tr><th>model</th><th>directory or served name</th><th>digest (blake3)</th><th>read by</th></tr></thead><tbody>";
        for m in &lin.models {
            let d = match (&m.digest, m.remote) {
                (Some(d), _) => format!("<code>{}</code>", esc(d)),
                (None, true) => "served".into(),
                (None, false) => "not on disk".into(),
            };
            let used: Vec<String> = m.used_by.iter().map(|(s, f)| format!("<code>{}.{}</code>", esc(s), esc(f))).collect();
            h += &format!(
                "<tr><td>{}</td><td><code>{}</code></td><td>{d}</td><td>{}</td></tr>",
                esc(&m.name),
                esc(&m.shown),
                used.join(", ")
            );
        }
        h += "</tbody></table>";
    }
    h += "<table><thead><tr><th>stage</th><th>kind</th><th>strategy</th><th>reads</th><th>seed</th><th>key</th></tr></thead><tbody>";
    for s in &lin.stages {
        h += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            esc(&s.id),
            esc(&s.kind),
            match (&s.strategy, &s.about) {
                (Some(n), Some(a)) => format!("<code>{}</code> — {}", esc(n), esc(a)),
                (Some(n), None) => format!("<code>{}</code>", esc(n)),
                _ => String::new(),
            },
            esc(&s.inputs.join(", ")),
            s.seed.map(|v| v.to_string()).unwrap_or_default(),
            esc(&s.key[..16.min(s.key.len())])
        );
    }
    h += "</tbody></table>";
    page.section("lineage", "Lineage", h);
    Ok(())
}
