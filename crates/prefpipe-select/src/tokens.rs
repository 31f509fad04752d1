//! `chosen_tokens` / `rejected_tokens` (DESIGN §6): the token counts of a
//! pair's (or a list's best and worst) responses — the length-bias check of
//! SimPO, R-DPO and iLR-DPO. They come from the input's `n_tokens`, which
//! `generate` writes with the policy's tokenizer; without that column (a
//! scored table from elsewhere) they are null: prefpipe never guesses a
//! tokenizer.

use arrow::array::{new_null_array, ArrayRef, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field};
use arrow::record_batch::RecordBatch;
use prefpipe_core::table::col;
use prefpipe_core::Result;

pub const CHOSEN_TOKENS: &str = "chosen_tokens";
pub const REJECTED_TOKENS: &str = "rejected_tokens";

/// The two columns, nullable `uint32`.
pub fn fields() -> [Field; 2] {
    [Field::new(CHOSEN_TOKENS, DataType::UInt32, true), Field::new(REJECTED_TOKENS, DataType::UInt32, true)]
}

/// `n_tokens` at the chosen and rejected rows of `input` (null where the
/// input has no `n_tokens`, or a value that is not a count).
pub fn take_tokens(input: &RecordBatch, chosen: &UInt32Array, rejected: &UInt32Array) -> Result<[ArrayRef; 2]> {
    let Some(n) = input.column_by_name(col::N_TOKENS) else {
        return Ok([new_null_array(&DataType::UInt32, chosen.len()), new_null_array(&DataType::UInt32, rejected.len())]);
    };
    // A safe cast: a negative or non-integer count becomes null, never a wrong number.
    let n = cast(n, &DataType::UInt32)?;
    Ok([take(&n, chosen, None)?, take(&n, rejected, None)?])
}

/// The length-bias figures of a pairs or lists table: over the rows with
/// both counts, the mean chosen and rejected token counts and how often the
/// chosen response is the longer one (SimPO §2, R-DPO: DPO learns to prefer
/// length when chosen responses are longer more often than not).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthBias {
    /// Rows with both `chosen_tokens` and `rejected_tokens`.
    pub pairs: u64,
    pub mean_chosen: f64,
    pub mean_rejected: f64,
    /// Rows whose chosen response has more tokens than the rejected one.
    pub chosen_longer: u64,
    /// Rows whose rejected response has more tokens.
    pub rejected_longer: u64,
}

impl LengthBias {
    /// `chosen_longer / pairs`.
    pub fn chosen_longer_rate(&self) -> f64 {
        self.chosen_longer as f64 / self.pairs as f64
    }

    /// One line, as `inspect`, the report and the dataset card print it.
    pub fn line(&self) -> String {
        format!(
            "mean chosen tokens {:.1} vs rejected {:.1} over {} pairs; chosen longer in {} ({:.1}%), rejected longer in {}",
            self.mean_chosen,
            self.mean_rejected,
            self.pairs,
            self.chosen_longer,
            100.0 * self.chosen_longer_rate(),
            self.rejected_longer
        )
    }
}

/// [`LengthBias`] of `batches`; `None` when they have no token columns or no
/// row with both counts.
pub fn length_bias(batches: &[RecordBatch]) -> Result<Option<LengthBias>> {
    let (mut n, mut sc, mut sr, mut cl, mut rl) = (0u64, 0f64, 0f64, 0u64, 0u64);
    for b in batches {
        let (Some(c), Some(r)) = (b.column_by_name(CHOSEN_TOKENS), b.column_by_name(REJECTED_TOKENS)) else { return Ok(None) };
        let (c, r) = (cast(c, &DataType::UInt32)?, cast(r, &DataType::UInt32)?);
        let c = c.as_any().downcast_ref::<UInt32Array>().expect("cast to u32");
        let r = r.as_any().downcast_ref::<UInt32Array>().expect("cast to u32");
        for (c, r) in c.iter().zip(r.iter()) {
            let (Some(c), Some(r)) = (c, r) else { continue };
            n += 1;
            sc += c as f64;
            sr += r as f64;
            cl += u64::from(c > r);
            rl += u64::from(r > c);
        }
    }
    Ok((n > 0).then(|| LengthBias {
        pairs: n,
        mean_chosen: sc / n as f64,
        mean_rejected: sr / n as f64,
        chosen_longer: cl,
        rejected_longer: rl,
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, Int64Array, StringArray};
    use arrow::datatypes::Schema;

    use super::*;

    fn batch(n_tokens: Option<Vec<i64>>) -> RecordBatch {
        let mut fields = vec![Field::new("response", DataType::Utf8, false)];
        let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["a", "bb", "ccc"]))];
        if let Some(n) = n_tokens {
            fields.push(Field::new("n_tokens", DataType::Int64, false));
            cols.push(Arc::new(Int64Array::from(n)));
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    #[test]
    fn counts_come_from_n_tokens() {
        // Rows 2 (chosen) and 0 (rejected): n_tokens 7 and 3.
        let [c, r] = take_tokens(&batch(Some(vec![3, 5, 7])), &UInt32Array::from(vec![2]), &UInt32Array::from(vec![0])).unwrap();
        let c = c.as_any().downcast_ref::<UInt32Array>().unwrap();
        let r = r.as_any().downcast_ref::<UInt32Array>().unwrap();
        assert_eq!((c.value(0), r.value(0)), (7, 3));
    }

    #[test]
    fn without_a_tokenizer_they_are_null() {
        let [c, r] = take_tokens(&batch(None), &UInt32Array::from(vec![2, 1]), &UInt32Array::from(vec![0, 0])).unwrap();
        assert_eq!((c.len(), c.null_count(), r.null_count()), (2, 2, 2));
        // A negative count is not a count: null, not 4294967295.
        let [c, _] = take_tokens(&batch(Some(vec![-1, 5, 7])), &UInt32Array::from(vec![0]), &UInt32Array::from(vec![1])).unwrap();
        assert_eq!(c.null_count(), 1);
    }

    /// `b` with `n_tokens` replaced by `n` (one per row).
    fn with_n_tokens(b: &RecordBatch, n: &[u32]) -> RecordBatch {
        let i = b.schema().index_of("n_tokens").unwrap();
        let mut cols = b.columns().to_vec();
        cols[i] = Arc::new(UInt32Array::from(n.to_vec()));
        RecordBatch::try_new(b.schema(), cols).unwrap()
    }

    #[test]
    fn length_bias_figures() {
        // (chosen, rejected) = (7, 3), (2, 5), (4, 4), (null, 1): three rows with both counts;
        // means (7+2+4)/3 = 4.333…, (3+5+4)/3 = 4; chosen longer once, rejected longer once.
        let fields = fields();
        let schema = Arc::new(Schema::new(fields.to_vec()));
        let c: ArrayRef = Arc::new(UInt32Array::from(vec![Some(7), Some(2), Some(4), None]));
        let r: ArrayRef = Arc::new(UInt32Array::from(vec![Some(3), Some(5), Some(4), Some(1)]));
        let b = RecordBatch::try_new(schema, vec![c, r]).unwrap();
        let lb = length_bias(&[b]).unwrap().unwrap();
        assert_eq!((lb.pairs, lb.chosen_longer, lb.rejected_longer), (3, 1, 1));
        assert!((lb.mean_chosen - 13.0 / 3.0).abs() < 1e-12 && lb.mean_rejected == 4.0);
        assert_eq!(lb.line(), "mean chosen tokens 4.3 vs rejected 4.0 over 3 pairs; chosen longer in 1 (33.3%), rejected longer in 1");
        assert_eq!(length_bias(&[batch(Some(vec![1, 2, 3]))]).unwrap(), None, "no token columns");
    }

    #[test]
    fn pairs_and_lists_carry_the_counts() {
        use crate::testkit::{self, col_strings};
        // p: rewards [1, 3, 2], n_tokens [10, 20, 30]. max_min: chosen idx 1 (20 tokens),
        // rejected idx 0 (10); listwise: best idx 1 (20), worst idx 0 (10).
        let b = with_n_tokens(&testkit::scored(&[("p", 0, 1.0), ("p", 1, 3.0), ("p", 2, 2.0)], &[]), &[10, 20, 30]);
        for name in ["max_min", "listwise"] {
            let s = (crate::SELECT.iter().find(|k| k.name == name).unwrap().build)(&serde_json::json!({})).unwrap();
            let o = testkit::one(&testkit::run(s.as_ref(), std::slice::from_ref(&b)).unwrap());
            assert_eq!(
                (col_strings(&o, CHOSEN_TOKENS), col_strings(&o, REJECTED_TOKENS)),
                (vec!["20".into()], vec!["10".into()]),
                "{name}"
            );
        }
    }
}
