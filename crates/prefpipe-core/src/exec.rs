//! Runs a plan against the store: skips what is done, resumes what is half
//! done, recomputes stored chunks that are missing or corrupt, and writes
//! `run.json` — also when a stage fails, naming it and the error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::stage::{Mode, RunCx, Table};
use crate::store::{chunk_file_name, ChunkRecord, ExternalRecord, Manifest, Store};

/// Receives progress; the binary draws bars on a TTY or logs JSON lines.
pub trait Reporter: Sync {
    fn stage_started(&self, id: &str, kind: &str, status: &str, total: u64);
    fn progress(&self, id: &str, done: u64, total: u64);
    fn stage_finished(&self, report: &StageReport);
    /// Something the user should know that does not stop the run (a stored
    /// chunk found corrupt and computed again).
    fn warning(&self, stage: &str, message: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "warning: stage `{stage}`: {message}");
    }
    /// A `--shard` run leaves this stage to a run without `--shard` (it needs
    /// its whole input, or reads a stage that does; DESIGN §13).
    fn stage_deferred(&self, id: &str, kind: &str, why: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{id} ({kind}): {why}");
    }
}

/// A reporter that says nothing (tests, library use).
pub struct Quiet;

impl Reporter for Quiet {
    fn stage_started(&self, _: &str, _: &str, _: &str, _: u64) {}
    fn progress(&self, _: &str, _: u64, _: u64) {}
    fn stage_finished(&self, _: &StageReport) {}
    fn warning(&self, _: &str, _: &str) {}
    fn stage_deferred(&self, _: &str, _: &str, _: &str) {}
}

#[derive(Debug, Default)]
pub struct RunOptions {
    /// Run only this stage and what it needs.
    pub until: Option<String>,
    /// Recompute these stages and everything downstream of them.
    pub force: Vec<String>,
}

/// One stage's line in `run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    pub key: String,
    /// `ran`, `resumed` (some chunks were already done), `repaired` (stored
    /// chunks found missing or corrupt were computed again), `cached`, or
    /// `failed`; in a `--shard` run also `partial` (this shard's chunks are
    /// done, other shards' are not) and `deferred` (left for a run without
    /// `--shard`).
    pub status: String,
    pub chunks: usize,
    pub rows_in: u64,
    pub rows_out: u64,
    pub drops: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// A remote stage's backend, base URLs, served model and request counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<serde_json::Value>,
    /// Input columns the stage's output does not carry ([`crate::stage::Stage::dropped_columns`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped_columns: Vec<String>,
    /// Where the stage's models ran in this run: `cpu`, `cuda:N`, `metal:N`,
    /// `remote`, or several joined by `+`; absent when it ran none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub pipeline: String,
    pub pipeline_hash: String,
    pub prefpipe_version: String,
    pub seed: u64,
    pub chunk_size: usize,
    /// Where this run's models ran: the stages' devices joined by `+`
    /// (`cpu`, `cuda:0`, `remote`, `cpu+remote`, …); `cpu` when no model ran.
    pub device: String,
    pub elapsed_s: f64,
    /// `succeeded` or `failed`.
    pub status: String,
    /// The failure, when the run failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    pub stages: Vec<StageReport>,
}

/// Why a run failed, in `run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunError {
    /// The stage that failed (absent for a failure before any stage ran, e.g. `--force NOPE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The one-line error the command printed.
    pub message: String,
    /// 1 (run-time failure) or 2 (bad input), as the command exits.
    pub exit_code: i32,
}

/// Runs the plan; returns the report also written to `<store>/run.json`. A
/// failed run writes `run.json` too (the stages so far, the failing one with
/// status `failed`, and the error) before returning the error.
pub fn run(plan: &Plan, store: &Store, opts: &RunOptions, reporter: &dyn Reporter) -> Result<RunReport> {
    let t0 = Instant::now();
    let mut reports = Vec::new();
    let result = run_stages(plan, store, opts, reporter, &mut reports);
    let devices: std::collections::BTreeSet<&str> =
        reports.iter().filter(|r| r.status != "cached").filter_map(|r| r.device.as_deref()).flat_map(|d| d.split('+')).collect();
    let error = result.as_ref().err().map(|e| RunError {
        stage: match e {
            Error::Stage { stage, .. } => Some(stage.clone()),
            _ => None,
        },
        message: e.to_string().lines().next().unwrap_or_default().to_string(),
        exit_code: e.exit_code(),
    });
    let report = RunReport {
        pipeline: plan.spec.name.clone(),
        pipeline_hash: plan.spec.text_hash.clone(),
        prefpipe_version: env!("CARGO_PKG_VERSION").to_string(),
        seed: plan.spec.seed,
        chunk_size: plan.spec.chunk_size,
        device: if devices.is_empty() { "cpu".to_string() } else { devices.into_iter().collect::<Vec<_>>().join("+") },
        elapsed_s: t0.elapsed().as_secs_f64(),
        status: if error.is_some() { "failed" } else { "succeeded" }.to_string(),
        error,
        stages: reports,
    };
    let bytes = serde_json::to_vec_pretty(&report).expect("report serializes");
    let path = store.run_json_path();
    let written = crate::io::write_atomic(&path, |f| {
        use std::io::Write;
        f.write_all(&bytes).map_err(|e| Error::io(&path, e))
    })
    .and_then(|_| store.publish(std::slice::from_ref(&path)));
    // The run's own error comes first; then a manifest that could not be written.
    result?;
    written?;
    Ok(report)
}

/// Runs the selected stages in order, pushing each one's report (a failing
/// stage's too, with status `failed`).
fn run_stages(plan: &Plan, store: &Store, opts: &RunOptions, reporter: &dyn Reporter, reports: &mut Vec<StageReport>) -> Result<()> {
    let mut selected = vec![true; plan.stages.len()];
    if let Some(u) = &opts.until {
        let i = plan.require(u, "--until")?;
        selected = vec![false; plan.stages.len()];
        for j in plan.ancestors(i) {
            selected[j] = true;
        }
    }
    for f in &opts.force {
        let i = plan.require(f, "--force")?;
        for j in plan.descendants(i) {
            let s = &plan.stages[j];
            store.clear(&s.id, &s.key)?;
        }
    }
    let mut manifests: Vec<Option<Manifest>> = vec![None; plan.stages.len()];
    // Stages a shard run leaves to a run without --shard (DESIGN §13).
    let mut deferred = vec![false; plan.stages.len()];
    for (i, s) in plan.stages.iter().enumerate() {
        if !selected[i] {
            continue;
        }
        if let Some(&j) = s.inputs.iter().find(|&&j| deferred[j]) {
            let why = format!("reads `{}`, which waits for a run without --shard", plan.stages[j].id);
            reporter.stage_deferred(&s.id, &s.kind, &why);
            reports.push(deferred_report(s, Manifest::default()));
            deferred[i] = true;
            continue;
        }
        if manifests[i].is_some() {
            // Run beside the source before it ([`follower`]).
            continue;
        }
        let t0 = Instant::now();
        let devices = Mutex::new(BTreeSet::new());
        // The next stage, run chunk by chunk beside a source.
        let beside = follower(plan, store, i, &selected)?.map(|j| Beside::start(plan, store, i, j)).transpose()?;
        // Chunks whose reader runs right after they are written stay decoded for it.
        for k in [Some(i), beside.as_ref().map(|b| b.j)].into_iter().flatten() {
            let r = plan.stages.get(k + 1);
            if r.is_some_and(|r| selected[k + 1] && r.inputs.contains(&k) && (r.stage.parallel_chunks() || r.mode == Mode::Sink)) {
                let d = &plan.stages[k];
                crate::chunk_cache::keep_from(&store.stage_dir(&d.id, &d.key));
            }
        }
        let mut followed = None;
        match run_stage(plan, store, i, &manifests, reporter, &devices, beside.as_ref(), &mut followed) {
            Ok(r) if r.0.status == "deferred" => {
                reports.push(r.0);
                deferred[i] = true;
            }
            Ok(r) => {
                reporter.stage_finished(&r.0);
                reports.push(r.0);
                manifests[i] = Some(r.1);
                if let (Some(b), Some(chunks)) = (beside, followed) {
                    let j = b.j;
                    let (r, m) = b.finish(chunks, reporter).map_err(|e| e.in_stage(&plan.stages[j].id))?;
                    reports.push(r);
                    manifests[j] = Some(m);
                    release(plan, store, j, &selected, &manifests);
                }
                release(plan, store, i, &selected, &manifests);
            }
            Err(e) => {
                // What the store holds of it now (finished chunks stay for the next run).
                let m = store.manifest(&s.id, &s.key).ok().flatten().unwrap_or_default();
                let mut r = stage_report(s, &Manifest { external: None, ..m }, "failed", t0.elapsed().as_secs_f64());
                r.backend = s.stage.run_info();
                r.device = joined(&devices);
                reports.push(r);
                return Err(e.in_stage(&s.id));
            }
        }
    }
    Ok(())
}

/// Stage `s`'s `run.json` line from its manifest (no backend or device yet).
fn stage_report(s: &crate::plan::PlannedStage, m: &Manifest, status: &str, elapsed_s: f64) -> StageReport {
    StageReport {
        id: s.id.clone(),
        kind: s.kind.clone(),
        key: s.key.clone(),
        status: status.to_string(),
        chunks: m.chunks.len(),
        rows_in: m.rows_in(),
        rows_out: m.rows_out(),
        drops: m.drops(),
        elapsed_s,
        // Lexically normalised for display (`pipelines/../out/x` → `out/x`).
        output: m.external.as_ref().map(|e| crate::stage::normalize(&e.path)),
        backend: None,
        dropped_columns: s.dropped_columns.clone(),
        device: None,
    }
}

/// Drops from [`crate::chunk_cache`] the chunks that no selected stage after
/// `i` reads: those of `i`'s inputs and of `i` itself.
fn release(plan: &Plan, store: &Store, i: usize, selected: &[bool], manifests: &[Option<Manifest>]) {
    for j in plan.stages[i].inputs.iter().copied().chain([i]) {
        let read_later = (i + 1..plan.stages.len()).any(|k| selected[k] && plan.stages[k].inputs.contains(&j) && manifests[k].is_none());
        if let (false, Some(m)) = (read_later, &manifests[j]) {
            store.paths(m).iter().for_each(|p| crate::chunk_cache::forget(p));
        }
    }
}

/// The `run.json` line of a stage a shard run leaves for later.
fn deferred_report(s: &crate::plan::PlannedStage, m: Manifest) -> StageReport {
    stage_report(s, &Manifest { external: None, ..m }, "deferred", 0.0)
}

/// A stage's devices, `+`-joined; `None` when its models ran nowhere.
fn joined(devices: &Mutex<BTreeSet<String>>) -> Option<String> {
    let d = devices.lock().expect("devices");
    (!d.is_empty()).then(|| d.iter().cloned().collect::<Vec<_>>().join("+"))
}

/// The input tables of stage `i`, from finished manifests.
fn input_tables(plan: &Plan, store: &Store, i: usize, manifests: &[Option<Manifest>]) -> Vec<(Table, Manifest)> {
    plan.stages[i]
        .inputs
        .iter()
        .map(|&j| {
            let m = manifests[j].clone().expect("inputs run first");
            let t = Table { id: plan.stages[j].id.clone(), schema: plan.stages[j].schema.clone(), files: store.chunk_files(&m) };
            (t, m)
        })
        .collect()
}

/// Runs stage `i`. A source with a stage `beside` it puts that stage's
/// records in `followed` when they are its whole output ([`run_source`]).
#[allow(clippy::too_many_arguments)]
fn run_stage(
    plan: &Plan,
    store: &Store,
    i: usize,
    manifests: &[Option<Manifest>],
    reporter: &dyn Reporter,
    devices: &Mutex<BTreeSet<String>>,
    beside: Option<&Beside>,
    followed: &mut Option<Chunks>,
) -> Result<(StageReport, Manifest)> {
    let s = &plan.stages[i];
    let t0 = Instant::now();
    let dir = store.stage_dir(&s.id, &s.key);
    let stored = store.manifest(&s.id, &s.key)?;
    let existed = stored.is_some();
    let mut m = stored.unwrap_or_else(|| Manifest {
        id: s.id.clone(),
        kind: s.kind.clone(),
        key: s.key.clone(),
        aligned: s.aligned,
        ..Default::default()
    });
    // A stage whose outside file was deleted or changed is not done.
    if m.complete {
        if let Some(ext) = &m.external {
            let same = ext.path.exists() && crate::io::file_digest(&ext.path).ok().as_deref() == Some(ext.blake3.as_str());
            if !same {
                m.complete = false;
                m.external = None;
            }
        }
    }
    let report = |m: &Manifest, status: &str, t0: Instant| stage_report(s, m, status, t0.elapsed().as_secs_f64());
    let inputs = input_tables(plan, store, i, manifests);
    let per_chunk = runs_per_chunk(s.mode, inputs.len() == 1 && inputs[0].1.aligned);
    // A stored chunk that is missing, unreadable or altered (its blake3 no
    // longer matches the record) is not done: it is computed again — only
    // it, for a per-chunk stage; the whole stage otherwise.
    let mut repaired = false;
    let recorded: Vec<(usize, ChunkRecord)> = m.chunks.iter().map(|(c, r)| (*c, r.clone())).collect();
    for (c, rec) in recorded {
        // Computed from an input chunk that has changed since (a source that read differently).
        if rec.input.is_some() && (!per_chunk || inputs[0].1.chunks.get(&c).and_then(|r| r.blake3.as_ref()) != rec.input.as_ref()) {
            m.chunks.remove(&c);
            m.complete = false;
            continue;
        }
        if let Err(why) = store.verify_chunk(&m, &rec) {
            let redo = if per_chunk { "computing that chunk again" } else { "running the stage again" };
            reporter.warning(&s.id, &format!("stored chunk {c} ({}) {why}; {redo}", rec.file));
            m.chunks.remove(&c);
            m.complete = false;
            repaired = true;
        }
    }
    if m.complete {
        reporter.stage_started(&s.id, &s.kind, "cached", 0);
        return Ok((report(&m, "cached", t0), m));
    }
    // A shard runs per-chunk stages only (and sources, which every shard reads).
    let shard = store.shard();
    if shard.is_some() && !per_chunk && s.mode != Mode::Source {
        reporter.stage_deferred(&s.id, &s.kind, "needs every chunk of its input; a run without --shard runs it once all shards are done");
        return Ok((deferred_report(s, m.clone()), m));
    }
    let scratch = scratch_dir(store, s)?;
    let id = s.id.as_str();
    let progress = |done: u64, total: u64| reporter.progress(id, done, total);
    let record_device = |d: &str| {
        devices.lock().expect("devices").insert(d.to_string());
    };
    let cx = |chunk| run_cx(plan, store, s, &scratch, chunk, &progress, &record_device);
    // Only per-chunk stages resume; the others start over.
    let resumed = per_chunk && !m.chunks.is_empty();
    if per_chunk {
        let (input, input_m) = &inputs[0];
        // In a shard run the input may hold only this shard's chunks so far.
        let n = input_m.n_chunks.unwrap_or(input_m.chunks.len());
        m.n_chunks = Some(n);
        // Chunks recorded under an older layout are dropped.
        m.chunks.retain(|k, _| *k < n);
        // Shards never overwrite each other's manifest: it is written once, then completed.
        if shard.is_none() || !existed {
            store.write_manifest(&m)?;
        }
        reporter.stage_started(&s.id, &s.kind, if resumed { "resumed" } else { "running" }, n as u64);
        // Recorded chunks were verified above; a shard takes chunk c only when c mod N = I.
        let pending: Vec<usize> = (0..n).filter(|c| !m.chunks.contains_key(c) && shard.is_none_or(|sh| sh.owns(*c))).collect();
        let done = std::sync::atomic::AtomicU64::new(m.chunks.len() as u64);
        // One chunk: run, write its Parquet file, then record it.
        let process = |c: usize| -> Result<(usize, ChunkRecord)> {
            let t = Table { id: input.id.clone(), schema: input.schema.clone(), files: vec![store.chunk_file(input_m, c)?] };
            let rows = input_m.chunks.get(&c).map_or(0, |r| r.rows_out);
            let rec = compute_chunk(s, &cx(c), &dir, t, rows)?;
            store.record_chunk(&s.id, &s.key, c, &rec)?;
            let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            reporter.progress(&s.id, k, n as u64);
            Ok((c, rec))
        };
        let window = s.stage.chunk_concurrency(plan.spec.chunk_size).max(1);
        let records: Vec<(usize, ChunkRecord)> = if s.stage.parallel_chunks() {
            use rayon::prelude::*;
            pending.into_par_iter().map(process).collect::<Result<_>>()?
        } else if window > 1 {
            in_flight(&pending, window, &process)?
        } else {
            pending.into_iter().map(process).collect::<Result<_>>()?
        };
        m.chunks.extend(records);
        if shard.is_some() && m.chunks.len() < n {
            // Other shards may have finished theirs meanwhile; the last one completes the stage.
            if let Some(now) = store.manifest(&s.id, &s.key)? {
                for (c, rec) in now.chunks {
                    m.chunks.entry(c).or_insert(rec);
                }
            }
            if m.chunks.len() < n {
                let mut r = report(&m, "partial", t0);
                r.backend = s.stage.run_info();
                r.device = joined(devices);
                return Ok((r, m));
            }
        }
    } else {
        reporter.stage_started(&s.id, &s.kind, "running", 1);
        m.chunks.clear();
        if s.mode == Mode::Source {
            let (chunks, f) = run_source(s, &cx(0), &dir, beside)?;
            m.chunks = chunks;
            *followed = f;
        } else {
            let tables: Vec<Table> =
                inputs.iter().map(|(t, im)| Ok(Table { files: store.fetch(im)?, ..t.clone() })).collect::<Result<_>>()?;
            let out = s.stage.run(&cx(0), &tables)?;
            let rows_in = if out.rows_in > 0 { out.rows_in } else { inputs.iter().map(|(_, m)| m.rows_out()).sum() };
            check_schema(&s.schema, &out.batches)?;
            if s.mode == Mode::Sink {
                let path = s.external.clone().expect("a sink names its file");
                let blake3 = crate::io::file_digest(&path)?;
                m.external = Some(ExternalRecord { path, blake3 });
                m.chunks.insert(
                    0,
                    ChunkRecord { file: String::new(), rows_in, rows_out: rows_in, drops: out.drops, blake3: None, input: None },
                );
            } else {
                // Cut into chunks of `chunk_size` prompts again, so the stages after
                // a barrier keep resume granularity and shardability (DESIGN §13).
                let parts = crate::rechunk::rechunk(&s.schema, &out.batches, plan.spec.chunk_size)?;
                use rayon::prelude::*;
                let written = parts
                    .into_par_iter()
                    .enumerate()
                    .map(|(c, b)| Ok((c, write_chunk(&s.schema, &dir, c, std::slice::from_ref(&b))?)))
                    .collect::<Result<BTreeMap<_, _>>>()?;
                m.chunks = finish_chunks(&s.schema, &dir, written, rows_in, out.drops)?;
                // A stage with a table *and* a file outside the store (a train checkpoint).
                if let Some(path) = &s.external {
                    let blake3 = crate::io::file_digest(path)?;
                    m.external = Some(ExternalRecord { path: path.clone(), blake3 });
                }
            }
        }
    }
    m.complete = true;
    store.write_manifest(&m)?;
    let status = if repaired {
        "repaired"
    } else if resumed {
        "resumed"
    } else {
        "ran"
    };
    let mut r = report(&m, status, t0);
    r.backend = s.stage.run_info();
    r.device = joined(devices);
    Ok((r, m))
}

/// Stage `s`'s scratch directory, created.
fn scratch_dir(store: &Store, s: &crate::plan::PlannedStage) -> Result<PathBuf> {
    let scratch = store.stage_dir(&s.id, &s.key).join("scratch");
    std::fs::create_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
    Ok(scratch)
}

fn run_cx<'a>(
    plan: &'a Plan,
    store: &'a Store,
    s: &'a crate::plan::PlannedStage,
    scratch: &'a std::path::Path,
    chunk: usize,
    progress: &'a (dyn Fn(u64, u64) + Sync),
    device: &'a (dyn Fn(&str) + Sync),
) -> RunCx<'a> {
    RunCx {
        stage_id: &s.id,
        seed: plan.spec.seed,
        chunk,
        chunk_size: plan.spec.chunk_size,
        scratch,
        base_dir: &plan.base_dir,
        models: &plan.models,
        remotes: &plan.remotes,
        store_root: &store.root,
        stage_key: &s.key,
        progress,
        device,
    }
}

/// Runs chunk `cx.chunk` of per-chunk stage `s` on `input` (whose chunk
/// holds `input_rows` rows) and writes its Parquet file into `dir`; the
/// caller records it.
fn compute_chunk(s: &crate::plan::PlannedStage, cx: &RunCx, dir: &std::path::Path, input: Table, input_rows: u64) -> Result<ChunkRecord> {
    let c = cx.chunk;
    let out = s.stage.run(cx, &[input])?;
    let rows_in = if out.rows_in > 0 { out.rows_in } else { input_rows };
    let rows_out = out.batches.iter().map(|b| b.num_rows() as u64).sum();
    check_schema(&s.schema, &out.batches)?;
    let blake3 = crate::io::write_store_chunk(&dir.join(chunk_file_name(c)), &s.schema, &out.batches)?;
    Ok(ChunkRecord { file: chunk_file_name(c), rows_in, rows_out, drops: out.drops, blake3: Some(blake3), input: None })
}

/// Runs a source and writes the chunks it emits ([`crate::stage::Stage::run_chunks`])
/// on a second thread while it reads the next one (at most one waits in
/// between), so memory stays bounded by a few chunks, not the table. Chunk 0's
/// record holds the stage's rows read and drops; no rows is one empty chunk.
///
/// With a stage `beside` it (the next stage, per chunk, see [`follower`]), a third
/// thread runs it on each chunk as soon as the chunk is written, while the
/// source reads on; each chunk it finishes is recorded with the blake3 of
/// the source chunk it read, so a kill loses none of them, and one whose
/// source chunk comes out different on a later run is computed again. Its
/// records come back when they are the follower's whole output — every
/// chunk of the source's last pass followed, none failed — else `None`, and
/// the follower's usual run does what is left. A source that starts over
/// or a follower that fails stops the following.
fn run_source(
    s: &crate::plan::PlannedStage,
    cx: &RunCx,
    dir: &std::path::Path,
    beside: Option<&Beside>,
) -> Result<(Chunks, Option<Chunks>)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let write = |c: usize, batches: &[arrow::record_batch::RecordBatch]| -> Result<ChunkRecord> {
        check_schema(&s.schema, batches)?;
        write_chunk(&s.schema, dir, c, batches)
    };
    // Set when the source emits chunk 0 again, or the follower fails: what it did is not used.
    let void = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, arrow::record_batch::RecordBatch)>(1);
    let (out, written, followed) = std::thread::scope(|scope| {
        let (ftx, frx) = std::sync::mpsc::sync_channel::<(usize, ChunkRecord)>(1);
        let follow = beside.map(|b| {
            let void = &void;
            scope.spawn(move || {
                let mut done = BTreeMap::new();
                for (c, input) in frx {
                    if void.load(Ordering::SeqCst) {
                        continue;
                    }
                    match b.chunk(c, &input) {
                        Ok(rec) => {
                            done.insert(c, rec);
                        }
                        // The usual run of the follower meets the error again, and reports it.
                        Err(_) => void.store(true, Ordering::SeqCst),
                    }
                }
                done
            })
        });
        let ftx = beside.map(|_| ftx);
        let writer = scope.spawn(move || -> Result<BTreeMap<usize, ChunkRecord>> {
            let mut written = BTreeMap::new();
            for (c, b) in rx {
                let rec = write(c, std::slice::from_ref(&b))?;
                drop(b);
                if let Some(ftx) = &ftx {
                    // A follower that stopped leaves the chunks to the usual run.
                    let _ = ftx.send((c, rec.clone()));
                }
                written.insert(c, rec);
            }
            Ok(written)
        });
        // Chunks of the last pass, and of all passes (a source may start over from chunk 0).
        let (mut pass, mut emitted) = (0usize, 0usize);
        let out = s.stage.run_chunks(cx, &mut |c, b| {
            if c == 0 && emitted > 0 {
                void.store(true, Ordering::SeqCst);
            }
            pass = if c == 0 { 1 } else { pass.max(c + 1) };
            emitted = emitted.max(c + 1);
            // A closed channel means the writer failed; its error is the one returned.
            tx.send((c, b)).map_err(|_| Error::Runtime("internal error: the chunk writer stopped".into()))
        });
        drop(tx);
        let written = writer.join().expect("the chunk writer does not panic");
        let followed = follow.map(|h| h.join().expect("the follower does not panic"));
        (out, written.map(|w| (w, pass, emitted)), followed)
    });
    let (mut written, n, emitted) = written?;
    let out = out?;
    // A source that started over may emit fewer chunks the second time: the leftovers are not its output.
    for c in n..emitted {
        let path = dir.join(chunk_file_name(c));
        crate::chunk_cache::forget(&path);
        let _ = std::fs::remove_file(path);
    }
    written.retain(|&c, _| c < n);
    let chunks = finish_chunks(&s.schema, dir, written, out.rows_in, out.drops)?;
    // The follower's whole output: one chunk per source chunk, each from the chunk as it stands.
    let followed = followed.filter(|f| {
        f.len() == chunks.len()
            && f.iter().zip(&chunks).all(|((a, rec), (b, input))| a == b && rec.input.is_some() && rec.input == input.blake3)
    });
    Ok((chunks, followed))
}

/// A stage's chunk records by chunk index.
type Chunks = BTreeMap<usize, ChunkRecord>;

/// Whether a stage of `mode` runs chunk by chunk: per chunk always, per
/// prompt when it reads one input whose chunks hold whole prompts.
fn runs_per_chunk(mode: Mode, one_aligned_input: bool) -> bool {
    match mode {
        Mode::PerChunk => true,
        Mode::PerPrompt => one_aligned_input,
        _ => false,
    }
}

/// Stage `j`, run chunk by chunk beside source `i` ([`run_source`]).
struct Beside<'a> {
    plan: &'a Plan,
    store: &'a Store,
    i: usize,
    j: usize,
    scratch: PathBuf,
    devices: Mutex<BTreeSet<String>>,
    /// When its first chunk started.
    t0: std::sync::OnceLock<Instant>,
}

impl<'a> Beside<'a> {
    /// Writes `j`'s manifest first, so that the chunk records it writes count on the next run.
    fn start(plan: &'a Plan, store: &'a Store, i: usize, j: usize) -> Result<Beside<'a>> {
        let f = &plan.stages[j];
        let m = Manifest { id: f.id.clone(), kind: f.kind.clone(), key: f.key.clone(), aligned: f.aligned, ..Default::default() };
        store.write_manifest(&m).map_err(|e| e.in_stage(&f.id))?;
        let scratch = scratch_dir(store, f)?;
        Ok(Beside { plan, store, i, j, scratch, devices: Mutex::new(BTreeSet::new()), t0: std::sync::OnceLock::new() })
    }

    /// Runs chunk `c` on the source's chunk `c` just written (`input`, its
    /// record, not written yet), writes the chunk's file and records it with
    /// its input's blake3.
    fn chunk(&self, c: usize, input: &ChunkRecord) -> Result<ChunkRecord> {
        self.t0.get_or_init(Instant::now);
        let (s, f, store) = (&self.plan.stages[self.i], &self.plan.stages[self.j], self.store);
        let table = Table { id: s.id.clone(), schema: s.schema.clone(), files: vec![store.stage_dir(&s.id, &s.key).join(&input.file)] };
        let device = |d: &str| {
            self.devices.lock().expect("devices").insert(d.to_string());
        };
        let cx = run_cx(self.plan, store, f, &self.scratch, c, &|_, _| {}, &device);
        let rec =
            ChunkRecord { input: input.blake3.clone(), ..compute_chunk(f, &cx, &store.stage_dir(&f.id, &f.key), table, input.rows_out)? };
        store.record_chunk(&f.id, &f.key, c, &rec)?;
        Ok(rec)
    }

    /// Completes the stage with `chunks`, its whole output, and reports it
    /// (its progress comes after the source's).
    fn finish(self, chunks: Chunks, reporter: &dyn Reporter) -> Result<(StageReport, Manifest)> {
        let f = &self.plan.stages[self.j];
        let n = chunks.len();
        let m = Manifest {
            id: f.id.clone(),
            kind: f.kind.clone(),
            key: f.key.clone(),
            complete: true,
            n_chunks: Some(n),
            chunks,
            external: None,
            aligned: f.aligned,
        };
        self.store.write_manifest(&m)?;
        reporter.stage_started(&f.id, &f.kind, "running", n as u64);
        reporter.progress(&f.id, n as u64, n as u64);
        let mut r = stage_report(f, &m, "ran", self.t0.get().map_or(0.0, |t| t.elapsed().as_secs_f64()));
        r.backend = f.stage.run_info();
        r.device = joined(&self.devices);
        reporter.stage_finished(&r);
        Ok((r, m))
    }
}

/// The stage that may run chunk by chunk beside source `i` ([`run_source`]):
/// the next stage in the plan, when it reads `i` alone, per chunk, is a
/// cheap CPU stage ([`crate::stage::Stage::parallel_chunks`]), and neither
/// has anything stored yet; not in a `--shard` run or on an object store.
fn follower(plan: &Plan, store: &Store, i: usize, selected: &[bool]) -> Result<Option<usize>> {
    let (s, j) = (&plan.stages[i], i + 1);
    let Some(f) = plan.stages.get(j) else { return Ok(None) };
    if s.mode != Mode::Source || !selected[j] || f.inputs != [i] || !runs_per_chunk(f.mode, s.aligned) || !f.stage.parallel_chunks() {
        return Ok(None);
    }
    if store.shard().is_some() || store.remote().is_some() {
        return Ok(None);
    }
    let fresh = store.manifest(&s.id, &s.key)?.is_none() && store.manifest(&f.id, &f.key)?.is_none();
    Ok(fresh.then_some(j))
}

/// Writes chunk `c` of a stage into its store directory. The record counts
/// rows out only: [`finish_chunks`] gives chunk 0 the stage's rows in and drops.
fn write_chunk(
    schema: &arrow::datatypes::SchemaRef,
    dir: &std::path::Path,
    c: usize,
    batches: &[arrow::record_batch::RecordBatch],
) -> Result<ChunkRecord> {
    let blake3 = crate::io::write_store_chunk(&dir.join(chunk_file_name(c)), schema, batches)?;
    let rows_out = batches.iter().map(|b| b.num_rows() as u64).sum();
    Ok(ChunkRecord { file: chunk_file_name(c), rows_in: 0, rows_out, drops: Default::default(), blake3: Some(blake3), input: None })
}

/// A stage's chunk records as the manifest keeps them: a stage with no rows
/// has one empty chunk 0, and chunk 0 carries the stage's rows in and drops.
fn finish_chunks(
    schema: &arrow::datatypes::SchemaRef,
    dir: &std::path::Path,
    mut written: BTreeMap<usize, ChunkRecord>,
    rows_in: u64,
    drops: BTreeMap<String, u64>,
) -> Result<BTreeMap<usize, ChunkRecord>> {
    if written.is_empty() {
        written.insert(0, write_chunk(schema, dir, 0, &[])?);
    }
    let first = written.get_mut(&0).expect("chunk 0 was written");
    first.rows_in = rows_in;
    first.drops = drops;
    Ok(written)
}

/// Runs `pending` chunks with up to `window` in flight, each on its own
/// thread, taking them in order. On the first error no new chunk starts;
/// those in flight finish (and are recorded) before the error is returned,
/// so nothing already received is lost.
fn in_flight<T: Send>(pending: &[usize], window: usize, process: &(dyn Fn(usize) -> Result<T> + Sync)) -> Result<Vec<T>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<T>> = Mutex::new(Vec::new());
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..window.min(pending.len()) {
            scope.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&c) = pending.get(i) else { break };
                    match process(c) {
                        Ok(t) => results.lock().expect("results").push(t),
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            first_err.lock().expect("error").get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().expect("error") {
        return Err(e);
    }
    Ok(results.into_inner().expect("results"))
}

/// A stage's batches must match its planned schema (a bug otherwise).
fn check_schema(schema: &arrow::datatypes::SchemaRef, batches: &[arrow::record_batch::RecordBatch]) -> Result<()> {
    for b in batches {
        if b.schema().fields() != schema.fields() {
            return Err(Error::Runtime(format!(
                "internal error: output schema {:?} differs from the planned {:?}",
                b.schema().fields().iter().map(|f| format!("{}:{}", f.name(), f.data_type())).collect::<Vec<_>>(),
                schema.fields().iter().map(|f| format!("{}:{}", f.name(), f.data_type())).collect::<Vec<_>>()
            )));
        }
    }
    Ok(())
}

/// Per-stage status for `prefpipe plan`: `done`, `k of n chunks`, `pending`.
pub fn status(plan: &Plan, store: &Store) -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    for s in &plan.stages {
        let st = match store.manifest(&s.id, &s.key)? {
            Some(m) if m.complete => "done".to_string(),
            Some(m) if !m.chunks.is_empty() => match m.n_chunks {
                Some(n) => format!("{} of {n} chunks", m.chunks.len()),
                None => format!("{} chunks", m.chunks.len()),
            },
            _ => "pending".to_string(),
        };
        let inputs = if s.input_ids.is_empty() { String::new() } else { format!(" ← {}", s.input_ids.join(", ")) };
        out.push((s.id.clone(), format!("{}{inputs}", s.kind), st));
    }
    Ok(out)
}

/// Finished outputs of every stage, for `prefpipe query --pipeline`.
pub fn finished_tables(plan: &Plan, store: &Store) -> Result<Vec<Table>> {
    let mut out = Vec::new();
    for s in &plan.stages {
        if s.mode == Mode::Sink {
            continue;
        }
        if let Some(m) = store.manifest(&s.id, &s.key)? {
            if m.complete {
                out.push(Table { id: s.id.clone(), schema: s.schema.clone(), files: store.fetch(&m)? });
            }
        }
    }
    Ok(out)
}
