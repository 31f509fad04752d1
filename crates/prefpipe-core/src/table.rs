//! The tables of DESIGN §6 as Arrow schemas, and typed column access.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, GenericListArray, ListArray, OffsetSizeTrait, StringArray, StructArray, UInt32Array};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};
use crate::stage::ConfigError;

/// The column families of DESIGN §6.
pub mod col {
    pub const PROMPT_ID: &str = "prompt_id";
    pub const PROMPT: &str = "prompt";
    pub const SAMPLE_IDX: &str = "sample_idx";
    pub const RESPONSE: &str = "response";
    pub const N_TOKENS: &str = "n_tokens";
    pub const FINISH_REASON: &str = "finish_reason";
    pub const REWARD: &str = "reward";
    pub const LOGP_POLICY: &str = "logp_policy";
    pub const LOGP_REFERENCE: &str = "logp_reference";
    /// A conversation: `list<struct<role: utf8, content: utf8>>` (DESIGN §15).
    pub const MESSAGES: &str = "messages";
}

/// The roles a conversation message may have (DESIGN §15).
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One message of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

impl<'a> Message<'a> {
    pub fn new(role: &'a str, content: &'a str) -> Self {
        Message { role, content }
    }
}

/// `{role, content}`, in that order: the fields of one message.
pub fn message_fields() -> Fields {
    Fields::from(vec![Field::new("role", DataType::Utf8, false), Field::new("content", DataType::Utf8, false)])
}

/// `list<struct<role: utf8, content: utf8>>`: how every table stores a
/// conversation (TRL's conversational format).
pub fn messages_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(message_fields()), false)))
}

/// The `messages` column of a prompts/samples/pairs table.
pub fn messages_field() -> Field {
    Field::new(col::MESSAGES, messages_type(), false)
}

/// Whether `schema` carries conversations (a `messages` list column).
pub fn has_messages(schema: &Schema) -> bool {
    schema.field_with_name(col::MESSAGES).map(|f| is_list(f.data_type())).unwrap_or(false)
}

/// List-valued types (a column that may hold a conversation).
pub fn is_list(t: &DataType) -> bool {
    matches!(t, DataType::List(_) | DataType::LargeList(_))
}

/// Checks that `t` can hold conversations: a list of structs with string
/// fields `role` and `content` and nothing else. The error says what it is.
pub fn check_messages_type(t: &DataType) -> Result<(), String> {
    let item = match t {
        DataType::List(f) | DataType::LargeList(f) => f.data_type(),
        t => return Err(format!("must be a list of {{role, content}} messages; it is {t}")),
    };
    let DataType::Struct(fields) = item else {
        return Err(format!("must be a list of {{role, content}} messages; its items are {item}, not {{role, content}} objects"));
    };
    for name in ["role", "content"] {
        match fields.iter().find(|f| f.name() == name) {
            None => return Err(format!("must be a list of {{role, content}} messages; its items have no `{name}`")),
            Some(f) if !Need::Text.accepts(f.data_type()) => {
                return Err(format!("must be a list of {{role, content}} messages; `{name}` is {}, not a string", f.data_type()))
            }
            Some(_) => {}
        }
    }
    if let Some(f) = fields.iter().find(|f| f.name() != "role" && f.name() != "content") {
        // A template would read it (e.g. Qwen3's `reasoning_content`), so dropping it would change the prompt.
        return Err(format!(
            "must be a list of {{role, content}} messages; its items also have `{}`, which prefpipe does not support",
            f.name()
        ));
    }
    Ok(())
}

/// A conversation column, read for random access: row `r`'s messages are
/// `range(r)` of the flat `role`/`content` arrays. Accepts list/large-list
/// and utf8/large/view strings (what Parquet, JSONL and SQL produce).
pub struct Conversations {
    offsets: Vec<usize>,
    nulls: Option<NullBuffer>,
    roles: StringArray,
    contents: StringArray,
}

impl Conversations {
    pub fn new(a: &ArrayRef) -> Result<Self> {
        check_messages_type(a.data_type()).map_err(|e| Error::Input(format!("a conversation column {e}")))?;
        fn parts<O: OffsetSizeTrait>(l: &GenericListArray<O>) -> (Vec<usize>, Option<NullBuffer>, StructArray) {
            let offsets = l.value_offsets().iter().map(|o| o.as_usize()).collect();
            let values = l.values().as_any().downcast_ref::<StructArray>().expect("checked: a struct list").clone();
            (offsets, l.nulls().cloned(), values)
        }
        let (offsets, nulls, values) = match a.data_type() {
            DataType::List(_) => parts(a.as_any().downcast_ref::<ListArray>().expect("list")),
            _ => parts(a.as_any().downcast_ref::<arrow::array::LargeListArray>().expect("large list")),
        };
        let text = |name: &str| -> Result<StringArray> {
            let c = cast(values.column_by_name(name).expect("checked"), &DataType::Utf8)?;
            Ok(c.as_any().downcast_ref::<StringArray>().expect("utf8").clone())
        };
        Ok(Conversations { offsets, nulls, roles: text("role")?, contents: text("content")? })
    }

    /// Reads column `name` of `b` as conversations.
    pub fn of(b: &RecordBatch, name: &str) -> Result<Self> {
        Conversations::new(column(b, name)?).map_err(|e| Error::Input(format!("column `{name}`: {e}")))
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether row `r` is null (no conversation at all).
    pub fn is_null(&self, r: usize) -> bool {
        self.nulls.as_ref().is_some_and(|n| n.is_null(r))
    }

    /// Indices of row `r`'s messages into [`Conversations::raw`].
    pub fn range(&self, r: usize) -> std::ops::Range<usize> {
        self.offsets[r]..self.offsets[r + 1]
    }

    /// Message `i` (a flat index) as stored: role and content, `None` when null.
    pub fn raw(&self, i: usize) -> (Option<&str>, Option<&str>) {
        fn get(a: &StringArray, i: usize) -> Option<&str> {
            a.is_valid(i).then(|| a.value(i))
        }
        (get(&self.roles, i), get(&self.contents, i))
    }

    /// Row `r`'s messages (null fields read as ""; tables that `source`
    /// wrote have none).
    pub fn row(&self, r: usize) -> Vec<Message<'_>> {
        self.range(r)
            .map(|i| {
                let (role, content) = self.raw(i);
                Message::new(role.unwrap_or_default(), content.unwrap_or_default())
            })
            .collect()
    }
}

/// Builds a `messages` column ([`messages_type`]) from one conversation per row.
pub fn messages_array<'a, I, C>(rows: I) -> Result<ArrayRef>
where
    I: IntoIterator<Item = C>,
    C: AsRef<[Message<'a>]>,
{
    let mut lengths = Vec::new();
    let mut roles = Vec::new();
    let mut contents = Vec::new();
    for row in rows {
        let row = row.as_ref();
        lengths.push(row.len());
        roles.extend(row.iter().map(|m| m.role));
        contents.extend(row.iter().map(|m| m.content));
    }
    let values = StructArray::try_new(
        message_fields(),
        vec![Arc::new(StringArray::from(roles)) as ArrayRef, Arc::new(StringArray::from(contents))],
        None,
    )?;
    let item = Arc::new(Field::new("item", DataType::Struct(message_fields()), false));
    Ok(Arc::new(ListArray::try_new(item, OffsetBuffer::from_lengths(lengths), Arc::new(values), None)?))
}

/// The canonical JSON of a conversation: a list of `{"role", "content"}`
/// objects in that key order, no whitespace, strings escaped as serde_json
/// (= Python's `json.dumps(m, ensure_ascii=False, separators=(",", ":"))`).
/// A conversation's `prompt_id` hashes it (DESIGN §15).
pub fn canonical_json(messages: &[Message]) -> String {
    let mut s = String::from("[");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str("{\"role\":");
        s.push_str(&serde_json::to_string(m.role).expect("a string serializes"));
        s.push_str(",\"content\":");
        s.push_str(&serde_json::to_string(m.content).expect("a string serializes"));
        s.push('}');
    }
    s.push(']');
    s
}

/// Columns that describe one sample rather than its prompt; a pairs table
/// does not carry them through (DESIGN §6: pairs keep the per-prompt columns).
pub fn is_per_sample(name: &str) -> bool {
    matches!(name, col::SAMPLE_IDX | col::RESPONSE | col::N_TOKENS | col::FINISH_REASON | col::REWARD | "repeat" | "rank")
        // What a pairwise judge writes per sample (DESIGN §12).
        || matches!(name, "judge_winrate" | "judge_comparisons" | "judge_inconsistent" | "judge_verdicts")
        || name.starts_with("reward_")
        || name.starts_with("logp_")
}

fn f(name: &str, t: DataType, nullable: bool) -> Field {
    Field::new(name, t, nullable)
}

/// The leading columns of every pairs table.
pub fn pairs_fields() -> Vec<Field> {
    vec![
        f("prompt_id", DataType::Utf8, false),
        f("prompt", DataType::Utf8, false),
        f("chosen", DataType::Utf8, false),
        f("rejected", DataType::Utf8, false),
        f("chosen_idx", DataType::UInt32, false),
        f("rejected_idx", DataType::UInt32, false),
        f("chosen_reward", DataType::Float64, false),
        f("rejected_reward", DataType::Float64, false),
        f("margin", DataType::Float64, false),
        // Token counts of the two responses (the samples' `n_tokens`); null without a tokenizer.
        f("chosen_tokens", DataType::UInt32, true),
        f("rejected_tokens", DataType::UInt32, true),
    ]
}

pub fn lists_fields() -> Vec<Field> {
    vec![
        f("prompt_id", DataType::Utf8, false),
        f("prompt", DataType::Utf8, false),
        f("responses", DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), false),
        f("rewards", DataType::List(Arc::new(Field::new("item", DataType::Float64, true))), false),
        // Token counts of the best and worst response (the samples' `n_tokens`); null without a tokenizer.
        f("chosen_tokens", DataType::UInt32, true),
        f("rejected_tokens", DataType::UInt32, true),
    ]
}

pub fn rankings_schema() -> Schema {
    Schema::new(vec![
        f("prompt_id", DataType::Utf8, false),
        f("sample_idx", DataType::UInt32, false),
        f("repeat", DataType::UInt32, false),
        f("rank", DataType::UInt32, false),
    ])
}

pub fn metrics_schema() -> Schema {
    Schema::new(vec![
        f("step", DataType::UInt64, false),
        f("loss", DataType::Float64, false),
        f("reward_accuracy", DataType::Float64, false),
        f("reward_margin", DataType::Float64, false),
        f("chosen_logp", DataType::Float64, false),
        f("rejected_logp", DataType::Float64, false),
        f("lr", DataType::Float64, false),
        f("elapsed_s", DataType::Float64, false),
        // Token-mean NLL of the objective's NLL term (DPO with `nll_weight` > 0, ORPO); null elsewhere.
        f("nll", DataType::Float64, true),
    ])
}

pub fn prompts_fields() -> Vec<Field> {
    vec![f("prompt_id", DataType::Utf8, false), f("prompt", DataType::Utf8, false)]
}

pub fn samples_fields() -> Vec<Field> {
    let mut v = prompts_fields();
    v.extend([
        f("sample_idx", DataType::UInt32, false),
        f("response", DataType::Utf8, false),
        f("n_tokens", DataType::UInt32, false),
        f("finish_reason", DataType::Utf8, false),
    ]);
    v
}

pub fn scored_fields() -> Vec<Field> {
    let mut v = samples_fields();
    v.push(f("reward", DataType::Float64, true));
    v
}

/// What kind of column a stage needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// utf8 (or large/view utf8).
    Text,
    /// Any numeric type (read as f64).
    Number,
    /// Any integer type (read as u32).
    Integer,
}

impl Need {
    fn accepts(self, t: &DataType) -> bool {
        match self {
            Need::Text => matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
            Need::Number => t.is_numeric(),
            Need::Integer => t.is_integer(),
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Need::Text => "a string column",
            Need::Number => "a numeric column",
            Need::Integer => "an integer column",
        }
    }
}

/// Plan-time check that `schema` has column `name` of the right kind.
pub fn require(schema: &Schema, input: &str, name: &str, need: Need) -> Result<(), ConfigError> {
    match schema.field_with_name(name) {
        Ok(field) if need.accepts(field.data_type()) => Ok(()),
        Ok(field) => {
            Err(ConfigError::new(format!("column `{name}` of input `{input}` must be {}; it is {}", need.describe(), field.data_type())))
        }
        Err(_) => {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            let hint = crate::error::closest(name, names.iter().copied()).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
            Err(ConfigError::new(format!("input `{input}` has no column `{name}`{hint} (it has: {})", names.join(", "))))
        }
    }
}

fn column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    b.column_by_name(name).ok_or_else(|| Error::Input(format!("missing column `{name}`")))
}

/// A column as Float64 (cast from any numeric type).
pub fn f64_col(b: &RecordBatch, name: &str) -> Result<Float64Array> {
    let a = cast(column(b, name)?, &DataType::Float64)?;
    Ok(a.as_any().downcast_ref::<Float64Array>().expect("cast to f64").clone())
}

/// A column as Utf8.
pub fn str_col(b: &RecordBatch, name: &str) -> Result<StringArray> {
    let a = cast(column(b, name)?, &DataType::Utf8)?;
    Ok(a.as_any().downcast_ref::<StringArray>().expect("cast to utf8").clone())
}

/// A column as UInt32 (negative or too-large values are an input error).
pub fn u32_col(b: &RecordBatch, name: &str) -> Result<UInt32Array> {
    let src = column(b, name)?;
    let opts = arrow::compute::CastOptions { safe: false, ..Default::default() };
    let a = arrow::compute::cast_with_options(src, &DataType::UInt32, &opts).map_err(|e| Error::Input(format!("column `{name}`: {e}")))?;
    let a = a.as_any().downcast_ref::<UInt32Array>().expect("cast to u32").clone();
    if a.null_count() > 0 {
        return Err(Error::Input(format!("column `{name}` has null values")));
    }
    Ok(a)
}

/// Appends fields to a schema (a stage adding columns).
pub fn with_fields(schema: &Schema, extra: impl IntoIterator<Item = Field>) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(extra);
    Arc::new(Schema::new(fields))
}

/// JSON Schema (draft 2020-12) of a table, for `schemas/`.
pub fn json_schema(title: &str, description: &str, schema: &Schema, open: bool) -> serde_json::Value {
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    for field in schema.fields() {
        props.insert(field.name().clone(), type_schema(field));
        if !field.is_nullable() {
            required.push(serde_json::Value::String(field.name().clone()));
        }
    }
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
        "description": description,
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": open,
    })
}

fn type_schema(field: &Field) -> serde_json::Value {
    let arrow_type = field.data_type().to_string();
    let base = match field.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => serde_json::json!({"type": "string"}),
        DataType::Float32 | DataType::Float64 => serde_json::json!({"type": "number"}),
        t if t.is_unsigned_integer() => serde_json::json!({"type": "integer", "minimum": 0}),
        t if t.is_integer() => serde_json::json!({"type": "integer"}),
        DataType::Boolean => serde_json::json!({"type": "boolean"}),
        DataType::List(item) => serde_json::json!({"type": "array", "items": type_schema(item)}),
        _ => serde_json::json!({}),
    };
    let mut o = base.as_object().cloned().unwrap_or_default();
    o.insert("x-arrow-type".into(), arrow_type.into());
    if field.is_nullable() {
        if let Some(t) = o.get("type").cloned() {
            o.insert("type".into(), serde_json::json!([t, "null"]));
        }
    }
    serde_json::Value::Object(o)
}

/// Every table of DESIGN §6: (name, description, schema, open to extra columns).
pub fn all_tables() -> Vec<(&'static str, &'static str, Schema, bool)> {
    vec![
        ("prompts", "Prompts from a source stage; extra columns are carried through.", Schema::new(prompts_fields()), true),
        ("samples", "Prompts + N generated samples each.", Schema::new(samples_fields()), true),
        ("scored", "Samples + reward columns (`reward`, `reward_<name>`).", Schema::new(scored_fields()), true),
        ("rankings", "Repeated rankings of samples (1 = best; ties share the lowest rank).", rankings_schema(), false),
        (
            "pairs",
            "Chosen/rejected pairs from a select stage; strategy columns and per-prompt columns follow.",
            Schema::new(pairs_fields()),
            true,
        ),
        ("lists", "Ranked lists for LiPO (sorted by reward, best first).", Schema::new(lists_fields()), true),
        ("metrics", "Training metrics per optimizer step.", metrics_schema(), false),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_names_the_problem() {
        let s = Schema::new(vec![Field::new("rewrd", DataType::Float64, true), Field::new("prompt", DataType::Int64, true)]);
        let e = require(&s, "src", "reward", Need::Number).unwrap_err();
        assert!(e.message.contains("no column `reward`; did you mean `rewrd`?"), "{}", e.message);
        let e = require(&s, "src", "prompt", Need::Text).unwrap_err();
        assert!(e.message.contains("must be a string column; it is Int64"), "{}", e.message);
        assert!(require(&s, "src", "rewrd", Need::Number).is_ok());
    }

    #[test]
    fn messages_round_trip_through_arrow() {
        let convs =
            vec![vec![Message::new("system", "Be brief."), Message::new("user", "Hi \"there\"\n")], vec![Message::new("user", "Ça va ?")]];
        let a = messages_array(&convs).unwrap();
        assert_eq!(a.data_type(), &messages_type());
        let c = Conversations::new(&a).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.row(0), convs[0]);
        assert_eq!(c.row(1), convs[1]);
        // Large lists of view strings (what SQL may hand back) read the same.
        let large = cast(&a, &DataType::LargeList(Arc::new(Field::new("item", DataType::Struct(message_fields()), false)))).unwrap();
        assert_eq!(Conversations::new(&large).unwrap().row(0), convs[0]);
    }

    #[test]
    fn canonical_json_matches_python() {
        // Python: json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \"there\"\n"}],
        //                    ensure_ascii=False, separators=(",", ":"))
        let m = [Message::new("system", "Be brief."), Message::new("user", "Hi \"there\"\n")];
        assert_eq!(canonical_json(&m), r#"[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi \"there\"\n"}]"#);
        assert_eq!(canonical_json(&[Message::new("user", "é\u{1}")]), "[{\"role\":\"user\",\"content\":\"é\\u0001\"}]");
    }

    #[test]
    fn messages_types_are_checked() {
        assert!(check_messages_type(&messages_type()).is_ok());
        let e = check_messages_type(&DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))).unwrap_err();
        assert!(e.contains("its items are Utf8"), "{e}");
        let e = check_messages_type(&DataType::Utf8).unwrap_err();
        assert!(e.contains("it is Utf8"), "{e}");
        let extra = Fields::from(vec![
            Field::new("content", DataType::Utf8, true),
            Field::new("role", DataType::Utf8, true),
            Field::new("reasoning_content", DataType::Utf8, true),
        ]);
        let e = check_messages_type(&DataType::List(Arc::new(Field::new("item", DataType::Struct(extra), true)))).unwrap_err();
        assert!(e.contains("`reasoning_content`"), "{e}");
    }

    #[test]
    fn per_sample_columns() {
        assert!(is_per_sample("reward_helpful"));
        assert!(is_per_sample("response"));
        assert!(!is_per_sample("category"));
    }
}
