//! The dataset card beside every export (DESIGN §14): `README.md` in the
//! Hugging Face dataset-card format — YAML front matter (`configs` with
//! `data_files` relative to the card, `task_categories`, `tags`,
//! `size_categories` per the Hub's buckets, `dataset_info` features for every
//! column) and a body that says how the data was made.
//!
//! The rule for the file beside an export:
//! - the card is `README.md` in the export's directory (where the Hub and
//!   `datasets.load_dataset(dir)` look for it);
//! - every export of one pipeline in that directory is one `configs` entry
//!   of one card (`default` when it is the only one, else the stage id) —
//!   those in the file format (Parquet or JSON lines) of the first of them:
//!   `datasets` reads a directory with one builder, chosen from its first
//!   config's files, so the others are listed in the body only;
//! - prefpipe only ever replaces a `README.md` it wrote (it carries the
//!   [`MARK`] comment): a directory with another `README.md` is refused at
//!   plan time (exit 2) unless the export says `card: false`;
//! - the card is rewritten after every run from the plan and the store's
//!   manifests, so it is the same whether the export ran or was cached, and
//!   the last pipeline to export into a directory owns its card.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use arrow::datatypes::{DataType, Field, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use prefpipe_core::plan::Plan;
use prefpipe_core::stage::normalize;
use prefpipe_core::store::Store;
use prefpipe_core::{Error, Result};
use prefpipe_select::tokens::{self, LengthBias};

use super::{Export, ExportConfig, ExportFormat};
use crate::lineage::{lineage, Lineage};

/// The card's file name: the Hub reads `README.md` at the dataset's root.
pub const FILE: &str = "README.md";

/// Marks a card prefpipe wrote (and may replace).
pub const MARK: &str = "<!-- prefpipe dataset card";

/// Whether `text` is a card prefpipe wrote.
pub fn is_prefpipe_card(text: &str) -> bool {
    text.contains(MARK)
}

/// Plan-time check of an export's directory: `Err(why)` when it holds a
/// `README.md` that prefpipe did not write (it would be replaced).
pub fn check_dir(dir: &Path) -> std::result::Result<(), String> {
    let p = dir.join(FILE);
    match std::fs::read(&p) {
        Ok(bytes) if is_prefpipe_card(&String::from_utf8_lossy(&bytes)) => Ok(()),
        Ok(_) => Err(format!(
            "{} exists and was not written by prefpipe; the dataset card would replace it: export to a directory of its own, or set `card: false`",
            p.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) if p.is_dir() => Err(format!("{} is a directory; the dataset card needs that name: set `card: false`", p.display())),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// One export of the card: one `configs` entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub config_name: String,
    /// The export's stage id and the stage it reads.
    pub stage: String,
    pub input: String,
    /// The data file, relative to the card.
    pub file: String,
    pub format: ExportFormat,
    pub rows: u64,
    /// The columns of the written file.
    pub schema: SchemaRef,
    /// `Err(why)` when the input's chunks could not be read.
    pub length_bias: std::result::Result<Option<LengthBias>, String>,
    /// Whether the exported table has token-count columns at all.
    pub has_tokens: bool,
    /// JSON lines (else Parquet).
    pub json: bool,
}

/// Writes the card of every finished export with `card: true` (one per
/// directory); returns the cards written.
pub fn write_cards(plan: &Plan, store: &Store) -> Result<Vec<PathBuf>> {
    let mut by_dir: BTreeMap<PathBuf, Vec<(usize, ExportConfig)>> = BTreeMap::new();
    for (i, s) in plan.stages.iter().enumerate() {
        if s.kind != super::KIND.name {
            continue;
        }
        let Ok(c) = serde_json::from_value::<ExportConfig>(s.stage.config()) else { continue };
        let (true, Some(path)) = (c.card, &s.external) else { continue };
        if !matches!(store.manifest(&s.id, &s.key)?, Some(m) if m.complete) {
            continue;
        }
        let dir = normalize(path.parent().unwrap_or(Path::new(".")));
        by_dir.entry(dir).or_default().push((i, c));
    }
    let mut written = Vec::new();
    for (dir, exports) in by_dir {
        let json =
            |c: &ExportConfig, i: usize| Export { c: c.clone() }.as_json(plan.stages[i].external.as_deref().unwrap_or(Path::new("")));
        let first = json(&exports[0].1, exports[0].0);
        let single = exports.iter().filter(|(i, c)| json(c, *i) == first).count() == 1;
        let mut entries = Vec::new();
        let mut which = Vec::new();
        for (i, c) in &exports {
            entries.push(entry(plan, store, *i, c, single && json(c, *i) == first)?);
            which.extend(plan.ancestors(*i));
        }
        which.sort_unstable();
        which.dedup();
        let lin = lineage(plan, store, &which)?;
        let text = render(&lin, &entries);
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        check_dir(&dir).map_err(Error::Input)?;
        let path = dir.join(FILE);
        prefpipe_core::io::write_atomic(&path, |f| {
            use std::io::Write;
            f.write_all(text.as_bytes()).map_err(|e| Error::io(&path, e))
        })?;
        written.push(path);
    }
    Ok(written)
}

fn entry(plan: &Plan, store: &Store, i: usize, c: &ExportConfig, single: bool) -> Result<Entry> {
    let s = &plan.stages[i];
    let input = &plan.stages[s.inputs[0]];
    let path = s.external.clone().expect("an export names its file");
    let export = Export { c: c.clone() };
    // The written file's columns: the export's transform of the input's (planned) schema.
    let schema = export.table(&RecordBatch::new_empty(input.schema.clone()))?.schema();
    let rows = store.manifest(&s.id, &s.key)?.map_or(0, |m| m.rows_in());
    let has_tokens = input.schema.field_with_name(tokens::CHOSEN_TOKENS).is_ok();
    // The counts are read from the input's chunks; a card never fails a run that wrote its data.
    let length_bias = match store.manifest(&input.id, &input.key)? {
        Some(m) if has_tokens => {
            let read = || -> Result<Option<LengthBias>> {
                let mut batches = Vec::new();
                for f in store.chunk_files(&m) {
                    batches.extend(prefpipe_core::io::read_parquet_columns(&f, &[tokens::CHOSEN_TOKENS, tokens::REJECTED_TOKENS])?);
                }
                tokens::length_bias(&batches)
            };
            read().map_err(|e| e.to_string())
        }
        _ => Ok(None),
    };
    Ok(Entry {
        config_name: if single { "default".to_string() } else { s.id.clone() },
        stage: s.id.clone(),
        input: input.id.clone(),
        file: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        format: c.format,
        rows,
        schema,
        length_bias,
        has_tokens,
        json: export.as_json(&path),
    })
}

/// The Hub's `size_categories` bucket for `n` rows.
pub fn size_category(n: u64) -> &'static str {
    const BUCKETS: [(u64, &str); 10] = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
        (10_000_000_000, "1B<n<10B"),
        (100_000_000_000, "10B<n<100B"),
        (1_000_000_000_000, "100B<n<1T"),
    ];
    BUCKETS.iter().find(|(lim, _)| n < *lim).map_or("n>1T", |b| b.1)
}

/// A column as a `datasets` feature (`Features._to_yaml_list`).
#[derive(Debug, Clone, PartialEq)]
enum Feature {
    Dtype(String),
    List(Box<Feature>),
    Struct(Vec<(String, Feature)>),
}

fn feature(t: &DataType) -> Option<Feature> {
    let d = |s: &str| Some(Feature::Dtype(s.to_string()));
    match t {
        DataType::Null => d("null"),
        DataType::Boolean => d("bool"),
        DataType::Int8 => d("int8"),
        DataType::Int16 => d("int16"),
        DataType::Int32 => d("int32"),
        DataType::Int64 => d("int64"),
        DataType::UInt8 => d("uint8"),
        DataType::UInt16 => d("uint16"),
        DataType::UInt32 => d("uint32"),
        DataType::UInt64 => d("uint64"),
        DataType::Float16 => d("float16"),
        DataType::Float32 => d("float32"),
        DataType::Float64 => d("float64"),
        DataType::Utf8 | DataType::Utf8View => d("string"),
        DataType::LargeUtf8 => d("large_string"),
        DataType::Binary | DataType::BinaryView => d("binary"),
        DataType::LargeBinary => d("large_binary"),
        DataType::Date32 => d("date32"),
        DataType::Date64 => d("date64"),
        DataType::Timestamp(unit, None) => d(match unit {
            TimeUnit::Second => "timestamp[s]",
            TimeUnit::Millisecond => "timestamp[ms]",
            TimeUnit::Microsecond => "timestamp[us]",
            TimeUnit::Nanosecond => "timestamp[ns]",
        }),
        DataType::List(f) | DataType::LargeList(f) => Some(Feature::List(Box::new(feature(f.data_type())?))),
        DataType::Struct(fields) => {
            Some(Feature::Struct(fields.iter().map(|f| Some((f.name().clone(), feature(f.data_type())?))).collect::<Option<_>>()?))
        }
        _ => None,
    }
}

/// A YAML scalar: double-quoted JSON strings are valid YAML.
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// `- name: N` and its type, at `ind` (Features' YAML list form).
fn yaml_named(out: &mut String, ind: &str, name: &str, f: &Feature) {
    let _ = writeln!(out, "{ind}- name: {}", q(name));
    yaml_type(out, &format!("{ind}  "), f);
}

/// The type of a feature as the keys of a mapping at `ind`.
fn yaml_type(out: &mut String, ind: &str, f: &Feature) {
    match f {
        Feature::Dtype(d) => {
            let _ = writeln!(out, "{ind}dtype: {d}");
        }
        Feature::List(inner) => match inner.as_ref() {
            Feature::Dtype(d) => {
                let _ = writeln!(out, "{ind}list: {d}");
            }
            Feature::List(_) => {
                let _ = writeln!(out, "{ind}list:");
                yaml_type(out, &format!("{ind}  "), inner);
            }
            Feature::Struct(fields) => {
                let _ = writeln!(out, "{ind}list:");
                for (n, f) in fields {
                    yaml_named(out, ind, n, f);
                }
            }
        },
        Feature::Struct(fields) => {
            let _ = writeln!(out, "{ind}struct:");
            for (n, f) in fields {
                yaml_named(out, ind, n, f);
            }
        }
    }
}

/// The `features:` of a schema; `None` when a column has no `datasets`
/// type (then `datasets` infers them).
fn features_yaml(fields: &[std::sync::Arc<Field>], ind: &str) -> Option<String> {
    let mut out = String::new();
    for f in fields {
        yaml_named(&mut out, ind, f.name(), &feature(f.data_type())?);
    }
    Some(out)
}

fn format_name(f: ExportFormat) -> &'static str {
    match f {
        ExportFormat::Parquet => "parquet",
        ExportFormat::Trl => "trl",
        ExportFormat::TrlChat => "trl_chat",
        ExportFormat::Lists => "lists",
        ExportFormat::Jsonl => "jsonl",
    }
}

/// A Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The card's text. `all[0]`'s file format decides which exports are
/// `configs` (see the module docs); the rest are listed in the body.
pub fn render(lin: &Lineage, all: &[Entry]) -> String {
    let entries: Vec<Entry> = all.iter().filter(|e| e.json == all[0].json).cloned().collect();
    let others: Vec<&Entry> = all.iter().filter(|e| e.json != all[0].json).collect();
    let mut y = String::from("---\n");
    let _ = writeln!(y, "# Written by prefpipe from pipeline {}; rewritten on every run.", q(&lin.pipeline));
    y.push_str("configs:\n");
    for (k, e) in entries.iter().enumerate() {
        let _ = writeln!(y, "- config_name: {}", q(&e.config_name));
        y.push_str("  data_files:\n  - split: train\n");
        let _ = writeln!(y, "    path: {}", q(&e.file));
        if entries.len() > 1 && k == 0 {
            y.push_str("  default: true\n");
        }
    }
    let lists = entries.iter().any(|e| e.schema.field_with_name("responses").is_ok());
    y.push_str("task_categories:\n- text-generation\n");
    y.push_str("tags:\n- dpo\n- preference\n");
    if lists {
        y.push_str("- lipo\n");
    }
    y.push_str("- prefpipe\n");
    let max_rows = entries.iter().map(|e| e.rows).max().unwrap_or(0);
    let _ = writeln!(y, "size_categories:\n- {}", size_category(max_rows));
    // One config: a mapping; several: a list with `config_name` (the Hub's two forms).
    let infos: Vec<(&Entry, Option<String>)> =
        entries.iter().map(|e| (e, features_yaml(e.schema.fields(), if entries.len() > 1 { "    " } else { "  " }))).collect();
    if infos.iter().any(|(_, f)| f.is_some()) {
        y.push_str("dataset_info:\n");
        for (e, f) in &infos {
            let Some(f) = f else { continue };
            if entries.len() > 1 {
                let _ = writeln!(y, "- config_name: {}", q(&e.config_name));
            }
            // Rows are in the body: `splits` would also need `num_bytes`, the size of data `datasets` builds.
            y.push_str("  features:\n");
            y.push_str(f);
        }
    }
    y.push_str("---\n\n");

    let mut b = y;
    let _ = writeln!(
        b,
        "{MARK}: written by `prefpipe run` from pipeline `{}`, and rewritten on every run; set `card: false` on the export to keep a README.md of your own -->\n",
        lin.pipeline
    );
    let _ = writeln!(b, "# {}\n", lin.pipeline);
    let what = if lists { "Ranked response lists (LiPO) and preference data" } else { "Preference data (prompt, chosen, rejected)" };
    let _ = writeln!(
        b,
        "{what} built by prefpipe from the pipeline `{}` (blake3 `{}`), prefpipe {}, pipeline seed {}.\n",
        lin.file, lin.pipeline_hash, lin.prefpipe_version, lin.seed
    );

    b.push_str("## Files\n\n| config | file | format | rows | written by |\n|---|---|---|---|---|\n");
    for e in &entries {
        let _ = writeln!(
            b,
            "| `{}` | `{}` | {} | {} | stage `{}` ← `{}` |",
            cell(&e.config_name),
            cell(&e.file),
            format_name(e.format),
            e.rows,
            cell(&e.stage),
            cell(&e.input)
        );
    }
    b.push_str("\nLoad one with `datasets.load_dataset(\"<this directory>\", \"<config>\")`.\n");
    if !others.is_empty() {
        let kind = if all[0].json { "JSON lines" } else { "Parquet" };
        b.push_str(
            "\nAlso here, in another file format (`datasets` reads one format per directory; these are not configs of this card):\n\n",
        );
        for e in &others {
            let _ = writeln!(
                b,
                "- `{}` ({}, {} rows), from stage `{}`: export it to a directory of its own to load it",
                e.file,
                format_name(e.format),
                e.rows,
                e.stage
            );
        }
        let _ = writeln!(b, "\nThe configs above are the {kind} exports.");
    }
    b.push('\n');

    b.push_str("## How it was made\n\n| stage | kind | strategy | input | rows in | rows out | dropped |\n|---|---|---|---|---|---|---|\n");
    for s in &lin.stages {
        let (rin, rout, drops) = match &s.counts {
            Some(c) => {
                let d: Vec<String> = c.drops.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                (c.rows_in.to_string(), c.rows_out.to_string(), d.join(", "))
            }
            None => ("–".into(), "–".into(), "not finished".into()),
        };
        let _ = writeln!(
            b,
            "| `{}` | {} | {} | {} | {rin} | {rout} | {} |",
            cell(&s.id),
            s.kind,
            s.strategy.as_deref().map(|x| format!("`{}`", cell(x))).unwrap_or_default(),
            s.inputs.iter().map(|i| format!("`{}`", cell(i))).collect::<Vec<_>>().join(", "),
            cell(&drops)
        );
    }
    let strategies: Vec<_> = lin.stages.iter().filter(|s| s.about.is_some()).collect();
    if !strategies.is_empty() {
        b.push_str("\n### Strategy\n\n");
        for s in strategies {
            let _ = writeln!(
                b,
                "- `{}` ({}): `{}` — {}.",
                s.id,
                s.kind,
                s.strategy.as_deref().unwrap_or_default(),
                s.about.as_deref().unwrap_or_default()
            );
        }
    }
    if !lin.models.is_empty() {
        b.push_str("\n### Models\n\n| model | directory or served name | digest (blake3) | read by |\n|---|---|---|---|\n");
        for m in &lin.models {
            let digest = match (&m.digest, m.remote) {
                (Some(d), _) => format!("`{d}`"),
                (None, true) => "served".to_string(),
                (None, false) => "not on disk".to_string(),
            };
            let used: Vec<String> = m.used_by.iter().map(|(s, f)| format!("`{s}.{f}`")).collect();
            let _ = writeln!(b, "| `{}` | `{}` | {digest} | {} |", cell(&m.name), cell(&m.shown), used.join(", "));
        }
    }
    b.push_str("\n### Seeds\n\n");
    let mut seeds = vec![format!("pipeline seed {}", lin.seed)];
    seeds.extend(lin.stages.iter().filter_map(|s| s.seed.map(|v| format!("`{}` seed {v}", s.id))));
    let _ = writeln!(b, "{}; every draw derives from (seed, stage id, prompt_id, sample_idx).", seeds.join(", "));

    b.push_str("\n## Length bias\n\nChosen responses that are longer than rejected ones teach length (SimPO, R-DPO, iLR-DPO).\n\n");
    for e in all {
        let line = match (&e.length_bias, e.has_tokens) {
            (Ok(Some(lb)), _) => lb.line(),
            (Ok(None), true) => "no pair has both token counts".to_string(),
            (Ok(None), false) => "no token counts (the table has no `chosen_tokens`/`rejected_tokens`)".to_string(),
            (Err(why), _) => format!("token counts unavailable ({why})"),
        };
        let _ = writeln!(b, "- `{}`: {line}.", e.config_name);
    }
    b
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{Fields, Schema};
    use prefpipe_core::table;

    use super::*;

    #[test]
    fn size_buckets_are_the_hubs() {
        // huggingface.co's size_categories: n<1K, 1K<n<10K, …, n>1T.
        assert_eq!(size_category(0), "n<1K");
        assert_eq!(size_category(999), "n<1K");
        assert_eq!(size_category(1_000), "1K<n<10K");
        assert_eq!(size_category(123_456), "100K<n<1M");
        assert_eq!(size_category(2_000_000_000_000), "n>1T");
    }

    #[test]
    fn features_are_datasets_yaml() {
        // As `datasets.Features({...})._to_yaml_list()` (datasets 5.2) prints them.
        let s = Schema::new(vec![
            Field::new("prompt", DataType::Utf8, false),
            Field::new("rewards", DataType::List(Arc::new(Field::new("item", DataType::Float64, true))), false),
            table::messages_field(),
            Field::new("chosen_tokens", DataType::UInt32, true),
            Field::new("s", DataType::Struct(Fields::from(vec![Field::new("a", DataType::Int64, true)])), true),
        ]);
        let y = features_yaml(s.fields(), "").unwrap();
        assert_eq!(
            y,
            "- name: \"prompt\"\n  dtype: string\n- name: \"rewards\"\n  list: float64\n- name: \"messages\"\n  list:\n  - name: \"role\"\n    dtype: string\n  - name: \"content\"\n    dtype: string\n- name: \"chosen_tokens\"\n  dtype: uint32\n- name: \"s\"\n  struct:\n  - name: \"a\"\n    dtype: int64\n"
        );
        assert_eq!(features_yaml(&[Arc::new(Field::new("d", DataType::Duration(TimeUnit::Second), true))], ""), None);
    }

    #[test]
    fn only_prefpipe_cards_are_replaced() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_dir(d.path()).is_ok(), "no README");
        std::fs::write(d.path().join(FILE), "# my dataset\n").unwrap();
        let e = check_dir(d.path()).unwrap_err();
        assert!(e.contains("exists and was not written by prefpipe") && e.contains("`card: false`"), "{e}");
        std::fs::write(d.path().join(FILE), format!("---\n---\n{MARK}: … -->\n")).unwrap();
        assert!(check_dir(d.path()).is_ok());
    }
}
