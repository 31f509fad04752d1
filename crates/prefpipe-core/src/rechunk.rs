//! Cuts a whole-input stage's output (sql, corpus-level selection) into
//! chunks of `chunk_size` prompts again, so the stages after it keep resume
//! granularity, progress, bounded memory and shardability (DESIGN §13).
//!
//! Rows keep their order: a cut falls only where `prompt_id` changes, after
//! `chunk_size` runs of equal ids (a table without a `prompt_id` string
//! column is cut every `chunk_size` rows). Concatenating the chunks gives
//! the stage's output back exactly, so whatever reads the whole table
//! (export, sql, training) sees the same rows as before.

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::error::Result;
use crate::table::col;

/// The chunks of `batches` (in order); empty when there are no rows.
pub fn rechunk(schema: &SchemaRef, batches: &[RecordBatch], chunk_size: usize) -> Result<Vec<RecordBatch>> {
    let chunk_size = chunk_size.max(1);
    let id_col = schema
        .index_of(col::PROMPT_ID)
        .ok()
        .filter(|&i| matches!(schema.field(i).data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View));
    // Each chunk as (batch, offset, len) slices.
    let mut chunks: Vec<Vec<(usize, usize, usize)>> = Vec::new();
    let mut cur: Vec<(usize, usize, usize)> = Vec::new();
    let mut units = 0usize;
    let mut prev: Option<Option<String>> = None;
    for (bi, b) in batches.iter().enumerate() {
        let ids = id_col.map(|i| b.column(i).clone());
        let mut start = 0;
        for r in 0..b.num_rows() {
            let new_unit = match &ids {
                None => true,
                Some(a) => {
                    let id = id_at(a.as_ref(), r);
                    let changed = prev.as_ref() != Some(&id);
                    if changed {
                        prev = Some(id);
                    }
                    changed
                }
            };
            if new_unit {
                if units == chunk_size {
                    if r > start {
                        cur.push((bi, start, r - start));
                    }
                    chunks.push(std::mem::take(&mut cur));
                    start = r;
                    units = 0;
                }
                units += 1;
            }
        }
        if b.num_rows() > start {
            cur.push((bi, start, b.num_rows() - start));
        }
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
        .into_iter()
        .map(|slices| {
            let parts: Vec<RecordBatch> = slices.into_iter().map(|(bi, off, len)| batches[bi].slice(off, len)).collect();
            if parts.len() == 1 {
                Ok(parts.into_iter().next().expect("one part"))
            } else {
                Ok(arrow::compute::concat_batches(schema, &parts)?)
            }
        })
        .collect()
}

fn id_at(a: &dyn Array, r: usize) -> Option<String> {
    if a.is_null(r) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().value(r).to_string(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(r).to_string(),
        DataType::Utf8View => a.as_string_view().value(r).to_string(),
        _ => unreachable!("checked to be a string column"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{StringArray, UInt32Array};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn table(ids: &[&str]) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("prompt_id", DataType::Utf8, true), Field::new("n", DataType::UInt32, false)]));
        let n: Vec<u32> = (0..ids.len() as u32).collect();
        let b =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(ids.to_vec())), Arc::new(UInt32Array::from(n))]).unwrap();
        (schema, b)
    }

    fn ids(chunks: &[RecordBatch]) -> Vec<Vec<String>> {
        chunks.iter().map(|c| c.column(0).as_string::<i32>().iter().map(|v| v.unwrap().to_string()).collect()).collect()
    }

    #[test]
    fn cuts_at_prompt_boundaries_across_batches() {
        let (schema, b) = table(&["a", "a", "b", "c", "c", "c", "d", "a"]);
        // The same rows in uneven input batches give the same chunks.
        let split = vec![b.slice(0, 1), b.slice(1, 3), b.slice(4, 4)];
        for input in [vec![b.clone()], split] {
            let out = rechunk(&schema, &input, 2).unwrap();
            assert_eq!(ids(&out), vec![vec!["a", "a", "b"], vec!["c", "c", "c", "d"], vec!["a"]]);
            assert_eq!(arrow::compute::concat_batches(&schema, &out).unwrap(), b);
        }
        assert!(rechunk(&schema, &[], 2).unwrap().is_empty());
        assert!(rechunk(&schema, &[b.slice(0, 0)], 2).unwrap().is_empty());
    }

    #[test]
    fn tables_without_prompt_id_are_cut_by_rows() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::UInt32, false)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(UInt32Array::from((0..5).collect::<Vec<u32>>()))]).unwrap();
        let out = rechunk(&schema, &[b], 2).unwrap();
        assert_eq!(out.iter().map(|c| c.num_rows()).collect::<Vec<_>>(), vec![2, 2, 1]);
    }
}
