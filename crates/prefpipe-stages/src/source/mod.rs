//! `source`: reads prompts, or any table, from Parquet, JSONL or CSV — one
//! file, a directory of shards or a glob ([`files`]).
//!
//! Output: `prompt_id`, `prompt`, then the file's other columns. Prompts are
//! strings or conversations (DESIGN §15, [`conversation`]): a conversation
//! is kept in `messages` (`list<struct<role, content>>`, after
//! `system_prompt` and `strip_trailing_assistant`) and `prompt` holds its last
//! user turn's text. Rows are grouped by prompt (first-appearance order) and
//! cut into chunks of `chunk_size` prompts, so every downstream per-prompt
//! stage sees whole prompts.

mod conversation;
mod files;
mod stream;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::{from_config, Arity, ConfigError, Mode, Output, PlanCx, RunCx, Stage, StageKind, Table};
use prefpipe_core::table::{self, col};
use prefpipe_core::{Error, Result};
use serde::{Deserialize, Serialize};

use conversation::Shape;
use files::{Files, Rows};

pub const KIND: StageKind = StageKind {
    name: "source",
    about: "read prompts or any table (Parquet, JSONL, CSV)",
    arity: Arity::None,
    build: |v| {
        let c: SourceConfig = from_config(v)?;
        if c.limit == Some(0) {
            return Err(vec![ConfigError::at("limit", "`limit` must be at least 1")]);
        }
        if c.system_prompt.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(vec![ConfigError::at("system_prompt", "`system_prompt` must not be empty")]);
        }
        Ok(Box::new(Source { c }))
    },
    schema: || schemars::schema_for!(SourceConfig),
};

/// `kind: source`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The file to read, relative to the pipeline file; or a directory of
    /// shards, or a glob (`data/train-*.parquet`): read in sorted order.
    pub path: String,
    /// `parquet`, `jsonl` or `csv`; by default from the file extension.
    #[serde(default)]
    pub format: Option<SourceFormat>,
    /// The column holding the prompt text (renamed to `prompt`), or a
    /// conversation when it is a list of {role, content}.
    #[serde(default = "default_prompt_column")]
    pub prompt_column: String,
    /// The id column, kept as is when present (renamed to `prompt_id`); when
    /// absent, `prompt_id` = the first 16 hex chars of blake3(prompt), or of
    /// the conversation's canonical JSON.
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// The column holding conversations (lists of {role, content}); by
    /// default `messages` when the table has one, else `prompt_column` when
    /// it is a list. Without either, rows with `chosen` and `rejected`
    /// conversations are read as TRL's implicit-prompt format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_column: Option<String>,
    /// A system turn added to every conversation that has none; string
    /// prompts become [system, user] conversations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Drop a final assistant turn (UltraFeedback's `messages` end with the
    /// old chosen answer).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strip_trailing_assistant: bool,
    /// Keep the first N prompts (after dedup).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Drop rows that repeat an earlier (prompt_id, sample_idx) — for a
    /// prompts table, repeated prompts. Counted as `duplicate`.
    #[serde(default)]
    pub dedup: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Parquet,
    Jsonl,
    Csv,
}

fn default_prompt_column() -> String {
    col::PROMPT.into()
}
fn default_id_column() -> String {
    col::PROMPT_ID.into()
}

struct Source {
    c: SourceConfig,
}

impl Source {
    fn files(&self, path: &std::path::Path) -> Result<Files, ConfigError> {
        // Plan and fingerprint resolve the same files that `read_all` reads.
        Files::find(path, self.c.format)
    }
}

impl Stage for Source {
    fn mode(&self) -> Mode {
        Mode::Source
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.c).expect("serializes")
    }

    fn plan(&self, cx: &PlanCx, _: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let path = cx.resolve(&self.c.path);
        let files = self.files(&path).map_err(|e| vec![e])?;
        let schema = files.schema().map_err(|e| vec![ConfigError::at("path", e.to_string())])?;
        let shape = Shape::of(&schema, &path.display().to_string(), &self.c)?;
        Ok(output_schema(&schema, &self.c, &shape))
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        let path = cx.resolve(&self.c.path);
        self.files(&path)?.fingerprint().map_err(|e| ConfigError::at("path", e.to_string()))
    }

    fn run(&self, cx: &RunCx, _: &[Table]) -> Result<Output> {
        let (batch, mut out) = read_all(&self.c, &cx.resolve(&self.c.path))?;
        out.batches = chunk_by_prompt(&batch, cx.chunk_size)?;
        Ok(out)
    }

    /// Streams a Parquet table that is grouped by prompt ([`stream`]); reads
    /// anything else whole, as [`Stage::run`] does.
    fn run_chunks(&self, cx: &RunCx, emit: &mut dyn FnMut(usize, RecordBatch) -> Result<()>) -> Result<Output> {
        let path = cx.resolve(&self.c.path);
        if let Some(out) = read_grouped(&self.c, &path, cx.chunk_size, emit)? {
            return Ok(out);
        }
        let mut out = self.run(cx, &[])?;
        for (c, b) in std::mem::take(&mut out.batches).into_iter().enumerate() {
            emit(c, b)?;
        }
        Ok(out)
    }
}

/// The chunks of a grouped Parquet table, streamed; `None` when the files
/// are not one ([`stream::eligible`]) or turn out not grouped by prompt.
fn read_grouped(c: &SourceConfig, path: &std::path::Path, chunk_size: usize, emit: &mut stream::Emit) -> Result<Option<Output>> {
    let (files, file_schema, shape) = open(c, path)?;
    if !stream::eligible(&files, &file_schema, c, &shape)? {
        return Ok(None);
    }
    let schema = output_schema(&file_schema, c, &shape);
    stream::stream(&files, &file_schema, &schema, c, &shape, chunk_size, emit)
}

/// [`read_all`] then [`chunk_by_prompt`], for the fuzz targets (`crate::fuzzing`).
#[doc(hidden)]
pub fn read_for_fuzz(c: &SourceConfig, path: &std::path::Path) -> Result<Vec<RecordBatch>> {
    let (batch, _) = read_all(c, path)?;
    chunk_by_prompt(&batch, 2)
}

/// The files behind `path`, their merged schema and the prompts' shape.
fn open(c: &SourceConfig, path: &std::path::Path) -> Result<(Files, SchemaRef, Shape)> {
    let files = Files::find(path, c.format).map_err(|e| Error::Input(e.message))?;
    let file_schema = files.schema()?;
    let shape = Shape::of(&file_schema, &path.display().to_string(), c)
        .map_err(|e| Error::Input(e.into_iter().map(|e| e.message).collect::<Vec<_>>().join("; ")))?;
    Ok((files, file_schema, shape))
}

/// Reads every file of `path` into the output table (one batch), with drop counts.
fn read_all(c: &SourceConfig, path: &std::path::Path) -> Result<(RecordBatch, Output)> {
    let (files, file_schema, shape) = open(c, path)?;
    let rows = files.read(&file_schema)?;
    let schema = output_schema(&file_schema, c, &shape);
    let (batch, mut out) = normalize(&rows, &schema, c, &shape)?;
    out.rows_in = rows.batch.num_rows() as u64;
    Ok((batch, out))
}

fn output_schema(file: &Schema, c: &SourceConfig, shape: &Shape) -> SchemaRef {
    let mut fields = vec![Field::new(col::PROMPT_ID, DataType::Utf8, false), Field::new(col::PROMPT, DataType::Utf8, false)];
    if shape.has_messages(c) {
        fields.push(table::messages_field());
    }
    if *shape == Shape::Implicit {
        fields.extend([Field::new("chosen", DataType::Utf8, false), Field::new("rejected", DataType::Utf8, false)]);
    }
    let mut consumed = shape.consumed();
    if shape.has_messages(c) {
        // A `messages` column beside the one `messages_column` names is replaced too.
        consumed.push(col::MESSAGES);
    }
    for f in file.fields() {
        let n = f.name();
        if n == &c.prompt_column || n == &c.id_column || n == col::PROMPT_ID || n == col::PROMPT || consumed.contains(&n.as_str()) {
            continue;
        }
        fields.push(f.as_ref().clone());
    }
    Arc::new(Schema::new(fields))
}

/// Renames/derives the id and prompt columns (and the conversation), checks
/// nulls, dedups and limits.
fn normalize(rows: &Rows, schema: &SchemaRef, c: &SourceConfig, shape: &Shape) -> Result<(RecordBatch, Output)> {
    keep_rows(rows, columns(rows, schema, c, shape)?, c)
}

/// The output columns of `rows`: the id and prompt columns renamed or
/// derived (and the conversation), nulls refused, the others as they are.
fn columns(rows: &Rows, schema: &SchemaRef, c: &SourceConfig, shape: &Shape) -> Result<RecordBatch> {
    let b = &rows.batch;
    let derived = if shape.has_messages(c) { Some(conversation::derive(rows, shape, c)?) } else { None };
    let prompt: StringArray = match &derived {
        Some(d) => d.prompt.as_any().downcast_ref::<StringArray>().expect("utf8").clone(),
        None => {
            let prompt = cast(b.column_by_name(&c.prompt_column).expect("checked at plan"), &DataType::Utf8)?;
            let prompt = prompt.as_any().downcast_ref::<StringArray>().expect("utf8").clone();
            if let Some(r) = (0..prompt.len()).find(|&r| prompt.is_null(r)) {
                return Err(Error::Input(format!("{}: `{}` is null", rows.at(r), c.prompt_column)));
            }
            prompt
        }
    };
    let ids: StringArray = match b.column_by_name(&c.id_column) {
        Some(a) => {
            let a = cast(a, &DataType::Utf8)?;
            let a = a.as_any().downcast_ref::<StringArray>().expect("utf8").clone();
            if let Some(r) = (0..a.len()).find(|&r| a.is_null(r)) {
                return Err(Error::Input(format!("{}: `{}` is null", rows.at(r), c.id_column)));
            }
            a
        }
        None => match &derived {
            Some(d) => d.canonical.iter().map(|j| Some(prompt_id(j))).collect(),
            None => prompt.iter().map(|p| Some(prompt_id(p.unwrap_or_default()))).collect(),
        },
    };
    let mut cols: Vec<ArrayRef> = vec![Arc::new(ids.clone()), Arc::new(prompt)];
    if let Some(d) = derived {
        cols.push(d.messages);
        if let Some((chosen, rejected)) = d.responses {
            cols.extend([chosen, rejected]);
        }
    }
    for f in schema.fields().iter().skip(cols.len()) {
        cols.push(b.column_by_name(f.name()).expect("from the file").clone());
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// Dedups and limits the output of [`columns`].
fn keep_rows(rows: &Rows, batch: RecordBatch, c: &SourceConfig) -> Result<(RecordBatch, Output)> {
    let b = &rows.batch;
    let mut out = Output::default();
    let schema = batch.schema();
    let ids = batch.column(0).as_any().downcast_ref::<StringArray>().expect("prompt_id is utf8").clone();

    // Rows to keep: dedup on (prompt_id, sample_idx), then the first `limit` prompts.
    let sample = b.column_by_name(col::SAMPLE_IDX).map(|a| cast(a, &DataType::Utf8)).transpose()?;
    let sample = sample.as_ref().map(|a| a.as_any().downcast_ref::<StringArray>().expect("utf8").clone());
    let mut seen: HashSet<(&str, Option<&str>)> = HashSet::new();
    let mut prompts: HashSet<&str> = HashSet::new();
    let mut keep: Vec<u32> = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let id = ids.value(r);
        let s = sample.as_ref().map(|s| if s.is_null(r) { "" } else { s.value(r) });
        // A samples table's (prompt_id, sample_idx) is its key: a repeat is dropped with
        // `dedup`, else refused (row order would decide which copy a strategy sees).
        if (c.dedup || s.is_some()) && !seen.insert((id, s)) {
            if !c.dedup {
                return Err(Error::Input(format!(
                    "{}: prompt `{id}` sample_idx {} repeats an earlier row; (prompt_id, sample_idx) must be unique (`dedup: true` keeps the first)",
                    rows.at(r),
                    s.unwrap_or_default()
                )));
            }
            out.drop("duplicate", 1);
            continue;
        }
        if let Some(limit) = c.limit {
            if !prompts.contains(id) && prompts.len() >= limit {
                out.drop("over_limit", 1);
                continue;
            }
            prompts.insert(id);
        }
        keep.push(r as u32);
    }
    if keep.len() == batch.num_rows() {
        return Ok((batch, out));
    }
    let idx = UInt32Array::from(keep);
    let cols = batch.columns().iter().map(|a| take(a, &idx, None)).collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((RecordBatch::try_new(schema.clone(), cols)?, out))
}

/// `prompt_id` for a table without one: the first 16 hex chars of
/// blake3(prompt) — for a conversation, of its canonical JSON
/// ([`table::canonical_json`]).
pub fn prompt_id(prompt: &str) -> String {
    blake3::hash(prompt.as_bytes()).to_hex()[..16].to_string()
}

/// Groups rows by prompt (first-appearance order, stable within a prompt)
/// and cuts them into batches of `chunk_size` prompts.
pub fn chunk_by_prompt(b: &RecordBatch, chunk_size: usize) -> Result<Vec<RecordBatch>> {
    let ids = b.column(0).as_any().downcast_ref::<StringArray>().expect("prompt_id is utf8");
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut groups: Vec<Vec<u32>> = Vec::new();
    for r in 0..ids.len() {
        let g = *index.entry(ids.value(r)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(r as u32);
    }
    let contiguous = groups.iter().flatten().enumerate().all(|(i, &r)| i as u32 == r);
    let mut out = Vec::new();
    for chunk in groups.chunks(chunk_size.max(1)) {
        let rows: Vec<u32> = chunk.iter().flatten().copied().collect();
        if contiguous {
            out.push(b.slice(rows[0] as usize, rows.len()));
        } else {
            let idx = UInt32Array::from(rows);
            let cols = b.columns().iter().map(|a| take(a, &idx, None)).collect::<std::result::Result<Vec<_>, _>>()?;
            out.push(RecordBatch::try_new(b.schema(), cols)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prefpipe_core::table::{Conversations, Message};
    use std::path::Path;

    fn cfg(v: serde_json::Value) -> SourceConfig {
        serde_json::from_value(v).unwrap()
    }

    /// The source's output for `config` over files in `dir` (what `run` chunks).
    fn read(dir: &Path, config: serde_json::Value) -> Result<RecordBatch> {
        let c = cfg(config);
        read_all(&c, &dir.join(&c.path)).map(|(b, _)| b)
    }

    /// What `plan` says about `config` (the first error's message).
    fn plan(dir: &Path, config: serde_json::Value) -> Result<SchemaRef, String> {
        let c = cfg(config);
        let path = dir.join(&c.path);
        let files = Files::find(&path, c.format).map_err(|e| e.message)?;
        let schema = files.schema().map_err(|e| e.to_string())?;
        let shape = Shape::of(&schema, &path.display().to_string(), &c).map_err(|e| e[0].message.clone())?;
        Ok(output_schema(&schema, &c, &shape))
    }

    fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
        table::str_col(b, name).unwrap().iter().map(|x| x.unwrap().to_string()).collect()
    }

    fn convs(b: &RecordBatch) -> Vec<Vec<(String, String)>> {
        let c = Conversations::of(b, col::MESSAGES).unwrap();
        (0..c.len()).map(|r| c.row(r).iter().map(|m| (m.role.to_string(), m.content.to_string())).collect()).collect()
    }

    fn names(b: &RecordBatch) -> Vec<String> {
        b.schema().fields().iter().map(|f| f.name().clone()).collect()
    }

    fn msgs(m: &[(&str, &str)]) -> Vec<(String, String)> {
        m.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    /// UltraFeedback-style rows: a system turn on one, history on the other,
    /// both ending with the old chosen answer.
    const ULTRA: &str = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}], "source": "a"}
{"messages": [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"}, {"content": "What is 2+2?", "role": "user"}, {"content": "4", "role": "assistant"}], "source": "b"}
"#;

    #[test]
    fn jsonl_conversations_are_stripped_and_keep_their_history() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("uf.jsonl"), ULTRA).unwrap();
        let b = read(dir.path(), serde_json::json!({"path": "uf.jsonl", "strip_trailing_assistant": true})).unwrap();
        let names = names(&b);
        assert_eq!(names, ["prompt_id", "prompt", "messages", "source"]);
        assert_eq!(b.schema().field(2).data_type(), &table::messages_type());
        assert_eq!(
            convs(&b),
            [
                msgs(&[("system", "Be brief."), ("user", "Name a prime.")]),
                msgs(&[("user", "Hi"), ("assistant", "Hello!"), ("user", "What is 2+2?")])
            ]
        );
        assert_eq!(strings(&b, "prompt"), ["Name a prime.", "What is 2+2?"]);
        // prompt_id = blake3 of the canonical JSON, first 16 hex (DESIGN §15);
        // Python: blake3(json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()[:16]
        let j = r#"[{"role":"system","content":"Be brief."},{"role":"user","content":"Name a prime."}]"#;
        assert_eq!(strings(&b, "prompt_id")[0], prompt_id(j));
        // Without stripping, a conversation ending with an answer is bad input naming the row.
        let e = read(dir.path(), serde_json::json!({"path": "uf.jsonl"})).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = e.to_string();
        assert!(e.contains("uf.jsonl: row 1: `messages` ends with a `assistant` turn"), "{e}");
        assert!(e.contains("strip_trailing_assistant"), "{e}");
    }

    #[test]
    fn canonical_json_matches_python_on_the_goldens() {
        // tests/reference/chat_golden.py writes canonical_json =
        // json.dumps([{"role", "content"}...], ensure_ascii=False, separators=(",", ":")).
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/chat");
        for family in ["llama31", "qwen25", "qwen3"] {
            let doc: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{family}.json"))).unwrap()).unwrap();
            for ex in doc["examples"].as_array().unwrap() {
                let m: Vec<Message> = ex["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                    .collect();
                assert_eq!(table::canonical_json(&m), ex["canonical_json"].as_str().unwrap(), "{family}/{}", ex["name"]);
            }
        }
    }

    #[test]
    fn system_prompt_is_added_where_there_is_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("uf.jsonl"), ULTRA).unwrap();
        let b =
            read(dir.path(), serde_json::json!({"path": "uf.jsonl", "strip_trailing_assistant": true, "system_prompt": "You are kind."}))
                .unwrap();
        let c = convs(&b);
        assert_eq!(c[0][0], ("system".to_string(), "Be brief.".to_string()), "its own system turn is kept");
        assert_eq!(c[1][0], ("system".to_string(), "You are kind.".to_string()));
        assert_eq!(c[1].len(), 4);
        // String prompts become [system, user] conversations; their ids hash the conversation.
        std::fs::write(dir.path().join("p.jsonl"), "{\"prompt\": \"Why is the sky blue?\"}\n").unwrap();
        let b = read(dir.path(), serde_json::json!({"path": "p.jsonl", "system_prompt": "You are kind."})).unwrap();
        assert_eq!(convs(&b), [msgs(&[("system", "You are kind."), ("user", "Why is the sky blue?")])]);
        assert_eq!(strings(&b, "prompt"), ["Why is the sky blue?"]);
        let j = table::canonical_json(&[Message::new("system", "You are kind."), Message::new("user", "Why is the sky blue?")]);
        assert_eq!(strings(&b, "prompt_id"), [prompt_id(&j)]);
    }

    #[test]
    fn plain_prompts_are_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.jsonl"), "{\"prompt\": \"hello\", \"category\": \"x\"}\n").unwrap();
        let b = read(dir.path(), serde_json::json!({"path": "p.jsonl"})).unwrap();
        let names = names(&b);
        assert_eq!(names, ["prompt_id", "prompt", "category"]);
        // blake3("hello"), as before conversations existed.
        assert_eq!(strings(&b, "prompt_id"), ["ea8f163db3868292"]);
        let e = plan(dir.path(), serde_json::json!({"path": "p.jsonl", "strip_trailing_assistant": true})).unwrap_err();
        assert!(e.contains("does not apply"), "{e}");
    }

    #[test]
    fn list_prompts_and_named_message_columns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("c.jsonl"),
            "{\"prompt_id\": \"x1\", \"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"conv\": [{\"role\": \"user\", \"content\": \"Yo\"}]}\n",
        )
        .unwrap();
        let b = read(dir.path(), serde_json::json!({"path": "c.jsonl"})).unwrap();
        assert_eq!(convs(&b), [msgs(&[("user", "Hi")])]);
        assert_eq!(strings(&b, "prompt_id"), ["x1"], "an id column is kept as is");
        assert!(b.schema().field_with_name("conv").is_ok(), "other list columns are carried");
        let b = read(dir.path(), serde_json::json!({"path": "c.jsonl", "messages_column": "conv"})).unwrap();
        assert_eq!(convs(&b), [msgs(&[("user", "Yo")])]);
        std::fs::write(
            dir.path().join("m.jsonl"),
            "{\"messages\": [{\"role\": \"user\", \"content\": \"old\"}], \"conv\": [{\"role\": \"user\", \"content\": \"new\"}]}\n",
        )
        .unwrap();
        let b = read(dir.path(), serde_json::json!({"path": "m.jsonl", "messages_column": "conv"})).unwrap();
        assert_eq!(names(&b), ["prompt_id", "prompt", "messages"], "the named column replaces `messages`");
        assert_eq!(convs(&b), [msgs(&[("user", "new")])]);
        assert_eq!(strings(&b, "prompt"), ["new"]);
        let e = plan(dir.path(), serde_json::json!({"path": "c.jsonl", "messages_column": "prompt_id"})).unwrap_err();
        assert!(e.contains("column `prompt_id` of") && e.contains("must be a list of {role, content} messages; it is Utf8"), "{e}");
    }

    #[test]
    fn implicit_prompt_format_as_trl_extract_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let row = |c: &str, r: &str| {
            format!(
                "{{\"chosen\": [{{\"role\": \"user\", \"content\": \"Hi\"}}, {{\"role\": \"assistant\", \"content\": \"Hello\"}}, {{\"role\": \"user\", \"content\": \"Sky?\"}}, {{\"role\": \"assistant\", \"content\": \"{c}\"}}], \"rejected\": [{{\"role\": \"user\", \"content\": \"Hi\"}}, {{\"role\": \"assistant\", \"content\": \"Hello\"}}, {{\"role\": \"user\", \"content\": \"Sky?\"}}, {{\"role\": \"assistant\", \"content\": \"{r}\"}}], \"score\": 1}}\n"
            )
        };
        std::fs::write(dir.path().join("pairs.jsonl"), row("Blue.", "Green.") + &row("Blue!", "Red.")).unwrap();
        let b = read(dir.path(), serde_json::json!({"path": "pairs.jsonl", "system_prompt": "S"})).unwrap();
        let names = names(&b);
        assert_eq!(names, ["prompt_id", "prompt", "messages", "chosen", "rejected", "score"]);
        let prompt = msgs(&[("system", "S"), ("user", "Hi"), ("assistant", "Hello"), ("user", "Sky?")]);
        assert_eq!(convs(&b), [prompt.clone(), prompt]);
        assert_eq!(strings(&b, "chosen"), ["Blue.", "Blue!"]);
        assert_eq!(strings(&b, "rejected"), ["Green.", "Red."]);
        assert_eq!(strings(&b, "prompt"), ["Sky?", "Sky?"]);
        let ids = strings(&b, "prompt_id");
        assert_eq!(ids[0], ids[1], "one prompt, two pairs");
    }

    fn write_parquet(path: &Path, convs: &[&[(&str, &str)]], item: &str) {
        // Hugging Face datasets write `list<element: struct<content, role>>`.
        use arrow::array::{ListArray, StructArray};
        use arrow::datatypes::Fields;
        let fields = Fields::from(vec![Field::new("content", DataType::Utf8, true), Field::new("role", DataType::Utf8, true)]);
        let content: Vec<&str> = convs.iter().flat_map(|c| c.iter().map(|m| m.1)).collect();
        let role: Vec<&str> = convs.iter().flat_map(|c| c.iter().map(|m| m.0)).collect();
        let values =
            StructArray::try_new(fields.clone(), vec![Arc::new(StringArray::from(content)), Arc::new(StringArray::from(role))], None)
                .unwrap();
        let field = Arc::new(Field::new(item, DataType::Struct(fields), true));
        let offsets = arrow::buffer::OffsetBuffer::from_lengths(convs.iter().map(|c| c.len()));
        let list = ListArray::try_new(field, offsets, Arc::new(values), None).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("messages", list.data_type().clone(), true)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(list)]).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn sharded_parquet_is_read_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        write_parquet(&data.join("train-00001-of-00002.parquet"), &[&[("user", "third")]], "element");
        write_parquet(&data.join("train-00000-of-00002.parquet"), &[&[("user", "first")], &[("user", "second")]], "element");
        for path in ["data/train-*.parquet", "data"] {
            let b = read(dir.path(), serde_json::json!({"path": path})).unwrap();
            assert_eq!(strings(&b, "prompt"), ["first", "second", "third"], "{path}");
        }
        // Bad rows are named by shard and row within it.
        write_parquet(&data.join("train-00002-of-00003.parquet"), &[&[("user", "ok")], &[("user", "q"), ("critic", "x")]], "element");
        let e = read(dir.path(), serde_json::json!({"path": "data/train-*.parquet"})).unwrap_err().to_string();
        assert!(e.contains("train-00002-of-00003.parquet: row 2: `messages` message 2 has unknown role `critic`"), "{e}");
    }

    #[test]
    fn bad_conversations_name_the_file_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("[{\"role\": \"user\", \"content\": \"\"}]", "`messages` message 1 (`user`) has empty content"),
            ("[{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"robot\", \"content\": \"x\"}]", "has unknown role `robot`"),
            ("[{\"role\": \"system\", \"content\": \"s\"}]", "ends with a `system` turn; a prompt must end with a user turn"),
            ("[]", "`messages` has no messages"),
            ("null", "`messages` is null"),
        ];
        for (m, want) in cases {
            let text = format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"fine\"}}]}}\n{{\"messages\": {m}}}\n");
            std::fs::write(dir.path().join("bad.jsonl"), text).unwrap();
            let e = read(dir.path(), serde_json::json!({"path": "bad.jsonl"})).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            let e = e.to_string();
            assert!(e.contains("bad.jsonl: row 2: ") && e.contains(want), "{m}: {e}");
        }
        // Wrong types are caught at plan time.
        std::fs::write(dir.path().join("bad.jsonl"), "{\"messages\": [\"hi\"]}\n").unwrap();
        let e = plan(dir.path(), serde_json::json!({"path": "bad.jsonl"})).unwrap_err();
        assert!(e.contains("column `messages` of") && e.contains("its items are Utf8"), "{e}");
        std::fs::write(dir.path().join("bad.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}\n")
            .unwrap();
        let e = plan(dir.path(), serde_json::json!({"path": "bad.jsonl"})).unwrap_err();
        assert!(e.contains("`content` is List"), "{e}");
    }

    #[test]
    fn repeated_samples_are_refused_unless_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let row = |id: &str, s: u32, r: &str| {
            format!("{{\"prompt_id\": \"{id}\", \"prompt\": \"q\", \"sample_idx\": {s}, \"response\": \"{r}\"}}\n")
        };
        std::fs::write(dir.path().join("s.jsonl"), row("a", 0, "x") + &row("a", 1, "y") + &row("b", 0, "z") + &row("a", 0, "w")).unwrap();
        let e = read(dir.path(), serde_json::json!({"path": "s.jsonl"})).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = e.to_string();
        assert!(e.contains("s.jsonl: row 4: prompt `a` sample_idx 0 repeats an earlier row"), "{e}");
        // `dedup: true` keeps the first copy (response `x`) and counts the other.
        let c = cfg(serde_json::json!({"path": "s.jsonl", "dedup": true}));
        let (b, out) = read_all(&c, &dir.path().join("s.jsonl")).unwrap();
        assert_eq!(strings(&b, "response"), ["x", "y", "z"]);
        assert_eq!(out.drops.get("duplicate"), Some(&1));
        // A table without `sample_idx` (prompts, or pairs) may repeat a prompt.
        std::fs::write(dir.path().join("p.jsonl"), "{\"prompt\": \"q\"}\n{\"prompt\": \"q\"}\n").unwrap();
        assert_eq!(read(dir.path(), serde_json::json!({"path": "p.jsonl"})).unwrap().num_rows(), 2);
    }

    #[test]
    fn prompt_ids_are_blake3_prefixes() {
        // blake3("hello") = ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f (BLAKE3 reference test vector).
        assert_eq!(prompt_id("hello"), "ea8f163db3868292");
    }

    #[test]
    fn chunks_keep_prompts_whole() {
        let schema = Arc::new(Schema::new(vec![Field::new("prompt_id", DataType::Utf8, false), Field::new("x", DataType::Int64, false)]));
        let b = RecordBatch::try_new(
            schema,
            vec![Arc::new(StringArray::from(vec!["a", "b", "a", "c", "b"])), Arc::new(arrow::array::Int64Array::from(vec![0, 1, 2, 3, 4]))],
        )
        .unwrap();
        let chunks = chunk_by_prompt(&b, 2).unwrap();
        assert_eq!(chunks.len(), 2);
        let ids: Vec<Vec<&str>> = chunks
            .iter()
            .map(|c| c.column(0).as_any().downcast_ref::<StringArray>().unwrap().iter().map(|x| x.unwrap()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["a", "a", "b", "b"], vec!["c"]]);
    }
}
