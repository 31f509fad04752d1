//! Which files a `source` reads: one file, a directory of shards, or a glob
//! (`data/train-*.parquet`, as Hugging Face datasets lay them out), in sorted
//! order; their one schema; their rows, with each row's file and line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::compute::concat_batches;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::io::{self, Format};
use prefpipe_core::stage::ConfigError;
use prefpipe_core::{Error, Result};

use super::SourceFormat;

/// The files behind a `path:`, in the order they are read.
pub(super) struct Files {
    pub paths: Vec<PathBuf>,
    pub format: Format,
    /// `path:` named one file (not a directory or a glob).
    pub single: bool,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?'])
}

impl Files {
    /// Resolves `path` (already made absolute) to its files.
    pub fn find(path: &Path, format: Option<SourceFormat>) -> Result<Files, ConfigError> {
        let shown = path.display();
        let (paths, single) = if has_glob(&path.to_string_lossy()) {
            let found = glob(path);
            if found.is_empty() {
                return Err(ConfigError::at("path", format!("{shown}: no file matches")));
            }
            (found, false)
        } else if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| ConfigError::at("path", format!("{shown}: cannot list: {e}")))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && !hidden(p) && (format.is_some() || Format::from_path(p).is_some()))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(ConfigError::at(
                    "path",
                    format!("{shown}: the directory has no .parquet, .jsonl or .csv files (for a Hugging Face dataset, name the shards, e.g. `{}/data/train-*.parquet`)", shown),
                ));
            }
            (found, false)
        } else if path.is_file() {
            (vec![path.to_path_buf()], true)
        } else {
            return Err(ConfigError::at("path", format!("{shown}: no such file")));
        };
        let format = match format {
            Some(SourceFormat::Parquet) => Format::Parquet,
            Some(SourceFormat::Jsonl) => Format::Jsonl,
            Some(SourceFormat::Csv) => Format::Csv,
            None => {
                let of = |p: &Path| {
                    Format::from_path(p).ok_or_else(|| {
                        ConfigError::at(
                            "path",
                            format!("{}: unknown file type; use .parquet, .jsonl or .csv, or set `format`", p.display()),
                        )
                    })
                };
                let first = of(&paths[0])?;
                for p in &paths[1..] {
                    if of(p)? != first {
                        return Err(ConfigError::at(
                            "path",
                            format!(
                                "{}: not the same file type as {}; a source reads shards of one format",
                                p.display(),
                                paths[0].display()
                            ),
                        ));
                    }
                }
                first
            }
        };
        Ok(Files { paths, format, single })
    }

    /// The one schema of all the files: each file's schema (a Parquet footer,
    /// or inferred from JSONL/CSV), merged. Parquet shards must agree on
    /// every column's type; JSON shards may miss columns (read as null).
    pub fn schema(&self) -> Result<SchemaRef> {
        let first = io::file_schema(&self.paths[0], self.format)?;
        if self.single {
            return Ok(first);
        }
        let mut fields: Vec<Field> = first.fields().iter().map(|f| f.as_ref().clone()).collect();
        for p in &self.paths[1..] {
            let s = io::file_schema(p, self.format)?;
            if self.format == Format::Parquet && s.fields().len() != fields.len() {
                let names = |fs: &mut dyn Iterator<Item = String>| fs.collect::<Vec<_>>().join(", ");
                return Err(Error::Input(format!(
                    "{}: its columns ({}) differ from those of {} ({})",
                    p.display(),
                    names(&mut s.fields().iter().map(|f| f.name().clone())),
                    self.paths[0].display(),
                    names(&mut fields.iter().map(|f| f.name().clone())),
                )));
            }
            for f in s.fields() {
                match fields.iter_mut().find(|g| g.name() == f.name()) {
                    Some(g) if g.data_type() == f.data_type() => {
                        if f.is_nullable() {
                            g.set_nullable(true);
                        }
                    }
                    Some(g) => {
                        return Err(Error::Input(format!(
                            "{}: column `{}` is {}, but {} in {}",
                            p.display(),
                            f.name(),
                            f.data_type(),
                            g.data_type(),
                            self.paths[0].display()
                        )))
                    }
                    None if self.format == Format::Parquet => {
                        return Err(Error::Input(format!("{}: column `{}` is not in {}", p.display(), f.name(), self.paths[0].display())))
                    }
                    None => fields.push(f.as_ref().clone().with_nullable(true)),
                }
            }
            if self.format != Format::Parquet {
                for g in fields.iter_mut().filter(|g| s.field_with_name(g.name()).is_err()) {
                    g.set_nullable(true);
                }
            }
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    /// Content-key bytes: a single file's digest (as before shards existed);
    /// for shards, each file name and digest in read order.
    pub fn fingerprint(&self) -> Result<Vec<u8>> {
        if self.single {
            return Ok(io::input_digest(&self.paths[0])?.into_bytes());
        }
        let mut h = blake3::Hasher::new();
        for p in &self.paths {
            h.update(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
            h.update(b"\0");
            h.update(io::input_digest(p)?.as_bytes());
            h.update(b"\n");
        }
        Ok(h.finalize().to_hex().to_string().into_bytes())
    }

    /// Reads every file into one batch of `schema` (from [`Files::schema`]).
    pub fn read(&self, schema: &SchemaRef) -> Result<Rows> {
        let mut batches = Vec::new();
        let mut starts = Vec::with_capacity(self.paths.len());
        let mut n = 0;
        for p in &self.paths {
            starts.push(n);
            let file_schema = match self.format {
                // Each shard is read with its own footer, then matched to the merged schema.
                Format::Parquet => io::parquet_schema(p)?,
                _ => schema.clone(),
            };
            for b in io::read_file(p, self.format, &file_schema)? {
                n += b.num_rows();
                batches.push(if self.single { b } else { RecordBatch::try_new(schema.clone(), b.columns().to_vec())? });
            }
        }
        let batch = concat_batches(schema, &batches)?;
        Ok(Rows { batch, starts, paths: self.paths.clone(), first: 0 })
    }

    /// Whether the files can be read row group by row group ([`super::stream`]):
    /// Parquet whose footers show no null in any of `columns` (or whose
    /// schema forbids them), so the only row errors left are ones a stream
    /// meets in file order, as the whole-table read would.
    pub fn null_free_parquet(&self, schema: &Schema, columns: &[&str]) -> Result<bool> {
        if self.format != Format::Parquet {
            return Ok(false);
        }
        for p in &self.paths {
            let md = io::parquet_metadata(p)?;
            for c in columns {
                let nullable = schema.field_with_name(c).map_or(true, |f| f.is_nullable());
                if nullable && !io::parquet_no_nulls(&md, c) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The batches of file `f`'s row group `g`, with the merged `schema`.
    pub fn row_group(&self, f: usize, g: usize, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
        let batches = io::read_row_group(&self.paths[f], g)?;
        if self.single {
            return Ok(batches);
        }
        batches.into_iter().map(|b| Ok(RecordBatch::try_new(schema.clone(), b.columns().to_vec())?)).collect()
    }
}

/// All rows of a source's files, and where each file's rows start.
pub(super) struct Rows {
    pub batch: RecordBatch,
    starts: Vec<usize>,
    paths: Vec<PathBuf>,
    /// Row (0-based) of its file that the batch's first row is.
    first: usize,
}

impl Rows {
    /// Rows of one file that start at its row `first` (0-based): a row group read on its own.
    pub fn part(batch: RecordBatch, path: &Path, first: usize) -> Rows {
        Rows { batch, starts: vec![0], paths: vec![path.to_path_buf()], first }
    }

    /// `FILE: row N` for row `r` of the batch (N counts from 1 within its file).
    pub fn at(&self, r: usize) -> String {
        let f = self.starts.partition_point(|&s| s <= r) - 1;
        format!("{}: row {}", self.paths[f].display(), self.first + r - self.starts[f] + 1)
    }
}

fn hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') || n.starts_with('_'))
}

/// Expands `*` and `?` in any component of `pattern`; files only, sorted.
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::new()];
    let parts: Vec<_> = pattern.components().collect();
    for (i, c) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let part = c.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for d in &dirs {
            if !has_glob(&part) {
                next.push(d.join(c.as_os_str()));
                continue;
            }
            let Ok(rd) = std::fs::read_dir(if d.as_os_str().is_empty() { Path::new(".") } else { d }) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if (name.starts_with('.') && !part.starts_with('.')) || !wildcard(&part, &name) {
                    continue;
                }
                next.push(d.join(&name));
            }
        }
        dirs = if last { next.into_iter().filter(|p| p.is_file()).collect() } else { next.into_iter().filter(|p| p.is_dir()).collect() };
    }
    dirs.sort();
    dirs
}

/// `*` matches any run of characters, `?` one character.
fn wildcard(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Classic two-pointer match with backtracking to the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard("train-*.parquet", "train-00000-of-00002.parquet"));
        assert!(wildcard("*", "x"));
        assert!(wildcard("a?c", "abc"));
        assert!(!wildcard("train-*.parquet", "test-00000-of-00001.parquet"));
        assert!(!wildcard("*.parquet", "x.parquet.tmp"));
        assert!(wildcard("*a*b", "xxaxxb"));
    }

    #[test]
    fn globs_and_directories_list_shards_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        for name in ["train-00001-of-00002.jsonl", "train-00000-of-00002.jsonl", "test-00000-of-00001.jsonl", ".hidden.jsonl", "README.md"]
        {
            std::fs::write(data.join(name), "{\"prompt\": \"x\"}\n").unwrap();
        }
        let names = |f: &Files| f.paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>();
        let g = Files::find(&data.join("train-*.jsonl"), None).unwrap();
        assert_eq!(names(&g), ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]);
        assert!(!g.single);
        let d = Files::find(&data, None).unwrap();
        assert_eq!(names(&d), ["test-00000-of-00001.jsonl", "train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]);
        let g = Files::find(&dir.path().join("*/train-*.jsonl"), None).unwrap();
        assert_eq!(g.paths.len(), 2);
        let e = Files::find(&data.join("valid-*.jsonl"), None).err().unwrap();
        assert!(e.message.contains("no file matches"), "{}", e.message);
        let e = Files::find(dir.path(), None).err().unwrap();
        assert!(e.message.contains("data/train-*.parquet"), "{}", e.message);
    }

    #[test]
    fn rows_are_located_in_their_shard() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.jsonl"), "{\"prompt\": \"x\"}\n{\"prompt\": \"y\"}\n").unwrap();
        std::fs::write(dir.path().join("b.jsonl"), "{\"prompt\": \"z\", \"extra\": 1}\n").unwrap();
        let f = Files::find(dir.path(), None).unwrap();
        let schema = f.schema().unwrap();
        assert!(schema.field_with_name("extra").unwrap().is_nullable());
        let rows = f.read(&schema).unwrap();
        assert_eq!(rows.batch.num_rows(), 3);
        assert!(rows.at(1).ends_with("a.jsonl: row 2"), "{}", rows.at(1));
        assert!(rows.at(2).ends_with("b.jsonl: row 1"), "{}", rows.at(2));
    }
}
