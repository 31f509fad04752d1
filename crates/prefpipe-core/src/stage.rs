//! The `Stage` trait every YAML `kind` implements, and the registry entry type.
//!
//! A stage kind is one file in `prefpipe-stages` plus one [`StageKind`] line
//! in its registry list. The engine (spec → plan → run) only sees this trait.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::error::Result;
use crate::remote::RemoteModel;
use crate::yaml::PathSeg;

/// How the executor feeds a stage and stores what it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No input; each returned batch becomes one chunk (grouped by prompt).
    Source,
    /// Input chunk i → output chunk i; rows are independent (generate, score).
    /// Resumes chunk by chunk.
    PerChunk,
    /// Like `PerChunk` but needs every row of a prompt in the same call
    /// (per-prompt selection). When the input is not prompt-aligned, the
    /// whole input is one call.
    PerPrompt,
    /// All inputs at once (sql, corpus-level selection, training).
    Whole,
    /// Writes a file outside the store (export). Output table is empty.
    Sink,
}

/// A problem in a stage's configuration, located by a path inside the stage's YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub path: Vec<PathSeg>,
    pub message: String,
}

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError { path: Vec::new(), message: message.into() }
    }
    /// At a field of the stage config (`at("keep")`).
    pub fn at(field: &str, message: impl Into<String>) -> Self {
        ConfigError { path: vec![PathSeg::Key(field.to_string())], message: message.into() }
    }
}

/// What plan-time checks may read: the pipeline's model table and its directory.
pub struct PlanCx<'a> {
    /// Directory of the pipeline file; relative paths resolve against it.
    pub base_dir: &'a Path,
    /// `models:` of the pipeline, name → path (already resolved).
    pub models: &'a BTreeMap<String, PathBuf>,
    /// `models:` entries that are servers (DESIGN §11), by name.
    pub remotes: &'a BTreeMap<String, Arc<RemoteModel>>,
    /// Ids of this stage's inputs, in order.
    pub input_ids: &'a [String],
    /// Model directories written by stages of this pipeline (train
    /// checkpoints), by lexically normalised path; see [`PlanCx::producer_of`].
    pub produced: &'a BTreeMap<PathBuf, Producer>,
}

/// A path as written in a pipeline, relative to the pipeline file's directory.
pub fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// A `model:` value: a name from `models:` or a path.
pub fn resolve_model(base_dir: &Path, models: &BTreeMap<String, PathBuf>, m: &str) -> PathBuf {
    models.get(m).cloned().unwrap_or_else(|| resolve(base_dir, m))
}

/// `a/./b/../c` → `a/c`, without touching the disk.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

impl PlanCx<'_> {
    pub fn resolve(&self, p: &str) -> PathBuf {
        resolve(self.base_dir, p)
    }
    /// A `model:` value: a name from `models:` or a path.
    pub fn resolve_model(&self, m: &str) -> PathBuf {
        resolve_model(self.base_dir, self.models, m)
    }
    /// The server a `model:` value names, when it names one.
    pub fn remote(&self, m: &str) -> Option<&Arc<RemoteModel>> {
        self.remotes.get(m)
    }

    /// The stage of this pipeline that writes model directory `dir` (see
    /// [`Stage::model_output`]), if any; a stage that reads such a model
    /// checks nothing on disk (it need not exist yet) and uses the writer's
    /// content key as its digest.
    pub fn producer_of(&self, dir: &Path) -> Option<Producer> {
        self.produced.get(&normalize(dir)).cloned()
    }
}

impl RunCx<'_> {
    pub fn resolve(&self, p: &str) -> PathBuf {
        resolve(self.base_dir, p)
    }
    pub fn resolve_model(&self, m: &str) -> PathBuf {
        resolve_model(self.base_dir, self.models, m)
    }
    /// The server a `model:` value names, when it names one.
    pub fn remote(&self, m: &str) -> Option<&Arc<RemoteModel>> {
        self.remotes.get(m)
    }
}

/// A stage that writes a model directory other stages read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Producer {
    pub stage: String,
    /// Its content key; `None` while it is not planned yet (it runs later).
    pub key: Option<String>,
}

/// One input table as the executor hands it over: its files, read on demand.
#[derive(Debug, Clone)]
pub struct Table {
    pub id: String,
    pub schema: SchemaRef,
    pub files: Vec<PathBuf>,
}

impl Table {
    /// Reads every file, in order.
    pub fn read(&self) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for f in &self.files {
            out.extend(crate::io::read_parquet(f)?);
        }
        Ok(out)
    }
    /// Reads every file into one batch.
    pub fn read_one(&self) -> Result<RecordBatch> {
        let batches = self.read()?;
        Ok(arrow::compute::concat_batches(&self.schema, &batches)?)
    }
}

/// What a stage may use at run time.
pub struct RunCx<'a> {
    pub stage_id: &'a str,
    /// The pipeline seed; derive draws from (seed, stage id, prompt_id, sample_idx).
    pub seed: u64,
    /// Index of the chunk being processed (PerChunk/PerPrompt), else 0.
    pub chunk: usize,
    /// Prompts per chunk (sources split their output by it).
    pub chunk_size: usize,
    /// A private directory in the store for caches and checkpoints; survives crashes.
    pub scratch: &'a Path,
    pub base_dir: &'a Path,
    pub models: &'a BTreeMap<String, PathBuf>,
    pub remotes: &'a BTreeMap<String, Arc<RemoteModel>>,
    /// The store's root: `requests/` (the request cache, DESIGN §11) lives there.
    pub store_root: &'a Path,
    /// This stage's content key.
    pub stage_key: &'a str,
    /// Reports progress of long stages (units done, units total).
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
    /// Records where a model of this stage runs: `cpu`, `cuda:N`, `metal:N`
    /// or `remote` (run.json's `device`, DESIGN §2).
    pub device: &'a (dyn Fn(&str) + Sync),
}

/// What one call of [`Stage::run`] returns.
#[derive(Debug, Default)]
pub struct Output {
    pub batches: Vec<RecordBatch>,
    /// Drop reason → count (prompts, pairs or rows, as the stage documents).
    pub drops: BTreeMap<String, u64>,
    /// Rows read (for the manifest); the executor fills it when left at 0.
    pub rows_in: u64,
}

impl Output {
    pub fn drop(&mut self, reason: &str, n: u64) {
        if n > 0 {
            *self.drops.entry(reason.to_string()).or_default() += n;
        }
    }
}

pub trait Stage: Send + Sync {
    fn mode(&self) -> Mode;

    /// The typed config with defaults filled in, as JSON: hashed into the
    /// stage's content key, so writing a default explicitly changes nothing.
    fn config(&self) -> serde_json::Value;

    /// Checks the inputs' schemas and returns the output schema. Reads at most
    /// file headers; never loads a model.
    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>>;

    /// Extra bytes for the stage's content key: digests of files the stage
    /// reads (source data, model weights). Called at plan time.
    fn fingerprint(&self, _cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        Ok(Vec::new())
    }

    /// A file this stage writes outside the store (export, a `train`
    /// checkpoint's weights); the executor checks it still exists, unchanged,
    /// before trusting the cache.
    fn external_output(&self, _cx: &PlanCx) -> Option<PathBuf> {
        None
    }

    /// A model directory this stage writes (a `train` checkpoint). Stages
    /// after it may name the directory as a `model:` before it exists; their
    /// content keys then follow this stage's key ([`PlanCx::producer_of`]).
    fn model_output(&self, _cx: &PlanCx) -> Option<PathBuf> {
        None
    }

    /// Whether chunks may run concurrently (cheap CPU stages; model stages
    /// already use every thread inside one chunk).
    fn parallel_chunks(&self) -> bool {
        false
    }

    /// How many chunks may be in flight at once (each on its own thread).
    /// Remote stages return more than 1 so the servers never idle while a
    /// chunk waits for its slowest request (DESIGN §11 "Throughput").
    fn chunk_concurrency(&self, _chunk_size: usize) -> usize {
        1
    }

    /// What the stage reports in `run.json` after running (a remote stage:
    /// backend, base URLs, served model, request counts).
    fn run_info(&self) -> Option<serde_json::Value> {
        None
    }

    /// Whether outputs keep all rows of a prompt in one chunk.
    fn output_aligned(&self, input_aligned: bool) -> bool {
        input_aligned
    }

    /// Input columns that do not reach the output (`inputs` and `output` as
    /// planned), for `run.json`: a stage that leaves columns behind says
    /// which, so that none vanishes silently. Default: none.
    fn dropped_columns(&self, _inputs: &[SchemaRef], _output: &Schema) -> Vec<String> {
        Vec::new()
    }

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output>;

    /// A source's output chunk by chunk: `emit(c, batch)` for chunks c = 0,
    /// 1, …, so the executor writes each chunk while the next is read and
    /// memory stays bounded by the chunk size, not the table. A source may
    /// start over at chunk 0 (its input was not laid out as it assumed): a
    /// chunk emitted again replaces the earlier one, and only the last pass
    /// counts. The returned [`Output`] holds the drops and rows read, no
    /// batches. Default: [`Stage::run`], then its batches in order.
    fn run_chunks(&self, cx: &RunCx, emit: &mut dyn FnMut(usize, RecordBatch) -> Result<()>) -> Result<Output> {
        let mut out = self.run(cx, &[])?;
        for (c, b) in std::mem::take(&mut out.batches).into_iter().enumerate() {
            emit(c, b)?;
        }
        Ok(out)
    }
}

/// How many `input:` ids a kind takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    None,
    One,
    Many,
}

/// Builds a stage from its config (the stage's YAML minus id/kind/input).
pub type BuildStage = fn(&serde_json::Value) -> Result<Box<dyn Stage>, Vec<ConfigError>>;

/// One line of the registry: a YAML `kind`.
pub struct StageKind {
    pub name: &'static str,
    pub about: &'static str,
    pub arity: Arity,
    /// Builds the stage from its config (the stage's YAML minus id/kind/input).
    pub build: BuildStage,
    /// JSON Schema of the config.
    pub schema: fn() -> schemars::Schema,
}

/// Deserializes a typed config, turning serde's error into a located [`ConfigError`].
pub fn from_config<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, Vec<ConfigError>> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(PathSeg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(PathSeg::Index(*index)),
                _ => None,
            })
            .collect();
        vec![ConfigError { path, message: e.into_inner().to_string() }]
    })
}

/// An empty schema, for sinks.
pub fn empty_schema() -> SchemaRef {
    Arc::new(Schema::empty())
}
