//! Building a pairs table (DESIGN §6) from chosen/rejected row indices.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::ConfigError;
use prefpipe_core::table::{self, col, is_per_sample, Need};
use prefpipe_core::Result;

/// Plan-time check of a scored table; the columns every pairs strategy reads.
pub fn require_scored(input: &Schema, input_id: &str) -> Vec<ConfigError> {
    [
        (col::PROMPT_ID, Need::Text),
        (col::PROMPT, Need::Text),
        (col::RESPONSE, Need::Text),
        (col::SAMPLE_IDX, Need::Integer),
        (col::REWARD, Need::Number),
    ]
    .into_iter()
    .filter_map(|(c, need)| table::require(input, input_id, c, need).err())
    .collect()
}

/// Per-prompt columns carried into pairs: every input column that does not
/// describe one sample (DESIGN §6), except floats (scores are per sample).
/// Values come from the chosen sample's row.
pub fn carried(input: &Schema, taken: &[Field]) -> Vec<Field> {
    input
        .fields()
        .iter()
        .filter(|f| {
            !is_per_sample(f.name())
                && !matches!(f.data_type(), DataType::Float16 | DataType::Float32 | DataType::Float64)
                && !taken.iter().any(|t| t.name() == f.name())
        })
        .map(|f| f.as_ref().clone())
        .collect()
}

/// The pairs schema: DESIGN §6 columns, then the strategy's, then carried ones.
pub fn pairs_schema(input: &Schema, input_id: &str, extra: Vec<Field>) -> Result<SchemaRef, Vec<ConfigError>> {
    let errs = require_scored(input, input_id);
    if !errs.is_empty() {
        return Err(errs);
    }
    let mut fields = table::pairs_fields();
    fields.extend(extra);
    let carry = carried(input, &fields);
    fields.extend(carry);
    Ok(Arc::new(Schema::new(fields)))
}

/// Rows of the pairs table: chosen and rejected row indices into the input
/// batch, and the strategy's extra columns (aligned with them).
#[derive(Default)]
pub struct PairRows {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl PairRows {
    pub fn push(&mut self, chosen: usize, rejected: usize) {
        self.chosen.push(chosen as u32);
        self.rejected.push(rejected as u32);
    }
    pub fn len(&self) -> usize {
        self.chosen.len()
    }
    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }
}

/// Assembles the output batch with `schema` from [`pairs_schema`].
pub fn build(input: &RecordBatch, schema: &SchemaRef, rows: &PairRows, extra: Vec<ArrayRef>) -> Result<RecordBatch> {
    let ci = UInt32Array::from(rows.chosen.clone());
    let ri = UInt32Array::from(rows.rejected.clone());
    let col_as = |name: &str, t: &DataType| -> Result<ArrayRef> {
        let c = input.column_by_name(name).expect("checked at plan time");
        Ok(cast(c, t)?)
    };
    let prompt_id = col_as(col::PROMPT_ID, &DataType::Utf8)?;
    let prompt = col_as(col::PROMPT, &DataType::Utf8)?;
    let response = col_as(col::RESPONSE, &DataType::Utf8)?;
    let idx = col_as(col::SAMPLE_IDX, &DataType::UInt32)?;
    let reward = col_as(col::REWARD, &DataType::Float64)?;
    let chosen_reward = take(&reward, &ci, None)?;
    let rejected_reward = take(&reward, &ri, None)?;
    let cr = chosen_reward.as_any().downcast_ref::<Float64Array>().expect("f64");
    let rr = rejected_reward.as_any().downcast_ref::<Float64Array>().expect("f64");
    let margin: Float64Array = cr.iter().zip(rr.iter()).map(|(a, b)| Some(a? - b?)).collect();
    let mut cols: Vec<ArrayRef> = vec![
        take(&prompt_id, &ci, None)?,
        take(&prompt, &ci, None)?,
        take(&response, &ci, None)?,
        take(&response, &ri, None)?,
        take(&idx, &ci, None)?,
        take(&idx, &ri, None)?,
        chosen_reward.clone(),
        rejected_reward.clone(),
        Arc::new(margin),
    ];
    cols.extend(extra);
    for f in schema.fields().iter().skip(cols.len()) {
        let c = input.column_by_name(f.name()).expect("carried columns exist");
        cols.push(take(c, &ci, None)?);
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}
