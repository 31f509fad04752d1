//! Helpers: run the binary, write tables, read outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow::array::{Float64Array, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_prefpipe"))
}

/// The repository root (pipelines/ and data-samples/ live there).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary copy of the repository's layout for the example pipelines:
/// `pipelines/` (copied), `data-samples` (a link to the repository's) and an
/// empty `out/`, so their `../out/…` outputs land in the temp dir, never in
/// the repository's `out/`.
pub fn pipelines_sandbox() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    for e in std::fs::read_dir(root().join("pipelines")).unwrap().flatten() {
        std::fs::copy(e.path(), dir.path().join("pipelines").join(e.file_name())).unwrap();
    }
    std::os::unix::fs::symlink(root().join("data-samples"), dir.path().join("data-samples")).unwrap();
    dir
}

/// Runs `prefpipe ARGS` in `dir`.
pub fn prefpipe(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin()).args(args).current_dir(dir).output().expect("runs prefpipe")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "prefpipe failed ({:?}):\n{}", o.status.code(), stderr(&o));
    stdout(&o)
}

/// A scored table of `prompts` × `n` samples with deterministic rewards,
/// written as Parquet. Rewards: ((p·7 + s·13) mod 17) / 4 − 2.
pub fn write_scored(path: &Path, prompts: usize, n: usize) {
    let mut pid = Vec::new();
    let mut prompt = Vec::new();
    let mut idx = Vec::new();
    let mut resp = Vec::new();
    let mut reward = Vec::new();
    for p in 0..prompts {
        for s in 0..n {
            pid.push(format!("q{p:06}"));
            prompt.push(format!("Question number {p}?"));
            idx.push(s as u32);
            resp.push(format!("Answer {s} to question {p}."));
            reward.push(((p * 7 + s * 13) % 17) as f64 / 4.0 - 2.0);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt_id", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("sample_idx", DataType::UInt32, false),
        Field::new("response", DataType::Utf8, false),
        Field::new("reward", DataType::Float64, true),
    ]));
    let b = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(pid)),
            Arc::new(StringArray::from(prompt)),
            Arc::new(UInt32Array::from(idx)),
            Arc::new(StringArray::from(resp)),
            Arc::new(Float64Array::from(reward)),
        ],
    )
    .unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None).unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
}

/// Reads a Parquet file into batches.
pub fn read(path: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap().map(|b| b.unwrap()).collect()
}

/// Files in a directory tree (to show nothing was written).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
