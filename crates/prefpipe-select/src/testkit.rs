//! Small in-memory tables for the tests of this crate.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::Output;
use prefpipe_core::table;

use crate::{Input, Strategy};

/// A scored table (DESIGN §6) from (prompt_id, sample_idx, reward) rows, plus
/// extra Float64 columns aligned with the rows and a per-prompt `category`
/// column (`cat-<prompt_id>`) that pairs and lists must carry through.
/// `prompt` is `prompt <id>` and `response` is `<id>-<sample_idx>`.
pub fn scored(rows: &[(&str, u32, f64)], extra: &[(&str, Vec<f64>)]) -> RecordBatch {
    let mut fields = table::scored_fields();
    let strs =
        |f: &dyn Fn(&(&str, u32, f64)) -> String| -> ArrayRef { Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>())) };
    let mut cols: Vec<ArrayRef> = vec![
        strs(&|r| r.0.to_string()),
        strs(&|r| format!("prompt {}", r.0)),
        Arc::new(UInt32Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
        strs(&|r| format!("{}-{}", r.0, r.1)),
        Arc::new(UInt32Array::from(vec![5; rows.len()])),
        strs(&|_| "stop".to_string()),
        Arc::new(Float64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
    ];
    for (name, v) in extra {
        assert_eq!(v.len(), rows.len(), "column {name}");
        fields.push(Field::new(*name, DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from(v.clone())));
    }
    fields.push(Field::new("category", DataType::Utf8, false));
    cols.push(strs(&|r| format!("cat-{}", r.0)));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

/// A rankings table (DESIGN §6) from (prompt_id, sample_idx, repeat, rank) rows.
pub fn rankings(rows: &[(&str, u32, u32, u32)]) -> RecordBatch {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(rows.iter().map(|r| r.3).collect::<Vec<_>>())),
    ];
    RecordBatch::try_new(Arc::new(table::rankings_schema()), cols).unwrap()
}

/// Plans and runs a strategy the way the select/filter stage does: inputs
/// named `in0`, `in1`, …, one batch per input.
pub fn run(s: &dyn Strategy, inputs: &[RecordBatch]) -> prefpipe_core::Result<Output> {
    let schemas: Vec<_> = inputs.iter().map(|b| b.schema()).collect();
    let names: Vec<String> = (0..inputs.len()).map(|i| format!("in{i}")).collect();
    let ins: Vec<Input> = schemas.iter().zip(&names).map(|(s, n)| Input { id: n, schema: s }).collect();
    let schema = s.plan(&ins).unwrap_or_else(|e| panic!("plan: {e:?}"));
    let out = s.run(inputs, &schema)?;
    for b in &out.batches {
        assert_eq!(b.schema(), schema, "run returns the planned schema");
    }
    Ok(out)
}

/// One output batch, concatenated.
pub fn one(out: &Output) -> RecordBatch {
    arrow::compute::concat_batches(&out.batches[0].schema(), &out.batches).unwrap()
}

/// A column of a batch as strings (any type, via Arrow's display).
pub fn col_strings(b: &RecordBatch, name: &str) -> Vec<String> {
    let c = b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}"));
    let f = arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &Default::default()).unwrap();
    (0..b.num_rows()).map(|i| f.value(i).to_string()).collect()
}

/// Drop count for a reason, 0 when absent.
pub fn drops(out: &Output, reason: &str) -> u64 {
    out.drops.get(reason).copied().unwrap_or(0)
}

/// `b` with its `response` column replaced by `texts` (one per row), for
/// duplicate-text cases.
pub fn with_responses(b: &RecordBatch, texts: &[&str]) -> RecordBatch {
    let i = b.schema().index_of("response").unwrap();
    let mut cols = b.columns().to_vec();
    cols[i] = Arc::new(StringArray::from(texts.to_vec()));
    RecordBatch::try_new(b.schema(), cols).unwrap()
}

/// `b` plus a Utf8 column `name` (one value per row).
pub fn with_text_column(b: &RecordBatch, name: &str, values: &[&str]) -> RecordBatch {
    let mut fields: Vec<Field> = b.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(name, DataType::Utf8, false));
    let mut cols = b.columns().to_vec();
    cols.push(Arc::new(StringArray::from(values.to_vec())));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}
