//! Grouping rows by prompt, and the candidates of one prompt.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::record_batch::RecordBatch;
use prefpipe_core::stage::Output;
use prefpipe_core::table::{col, f64_col, str_col, u32_col};
use prefpipe_core::{Error, Result};

use crate::DropReason;

/// One sample of a prompt: its row in the batch, `sample_idx` and reward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub row: usize,
    pub sample_idx: u32,
    pub reward: f64,
}

/// The rows of a batch grouped by `prompt_id`, groups in first-appearance order.
pub struct Groups {
    pub prompt_ids: StringArray,
    /// Row indices of each group, in input order.
    pub rows: Vec<Vec<usize>>,
}

pub fn group_rows(batch: &RecordBatch) -> Result<Groups> {
    let ids = str_col(batch, col::PROMPT_ID)?;
    let id = |r: usize| if ids.is_null(r) { "" } else { ids.value(r) };
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // Rows come grouped (sources cut chunks by prompt): one look-up per run of equal ids, not per row.
    let mut start = 0;
    while start < ids.len() {
        let first = id(start);
        let end = (start + 1..ids.len()).find(|&r| id(r) != first).unwrap_or(ids.len());
        let g = *index.entry(first).or_insert_with(|| {
            rows.push(Vec::with_capacity(end - start));
            rows.len() - 1
        });
        rows[g].extend(start..end);
        start = end;
    }
    drop(index);
    Ok(Groups { prompt_ids: ids, rows })
}

/// Rows dropped before a strategy decides anything, by reason (in rows).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RowDrops {
    /// A null `prompt`.
    pub null_prompt: u64,
    /// A null `response`.
    pub null_response: u64,
    /// A null or non-finite reward (or, for `repeat_ranking`, ranker value).
    pub non_finite: u64,
}

impl RowDrops {
    /// Adds the counts to a stage's output.
    pub fn record(&self, out: &mut Output) {
        out.drop(DropReason::NullPrompt.as_str(), self.null_prompt);
        out.drop(DropReason::NullResponse.as_str(), self.null_response);
        out.drop(DropReason::NonFiniteReward.as_str(), self.non_finite);
    }
}

/// The candidates of every group: rows with a null `prompt` or `response`
/// (when the table has them) or a null or non-finite `reward` are removed
/// and counted, in that order of reasons. Candidates are sorted by
/// `sample_idx` so results do not depend on row order. Two rows of one
/// prompt with the same `sample_idx` are an input error naming the prompt:
/// which of them won would depend on row order.
pub fn candidates(batch: &RecordBatch, groups: &Groups, reward: &str) -> Result<(Vec<Vec<Candidate>>, RowDrops)> {
    candidates_with(batch, groups, Some(reward))
}

/// [`candidates`]; with `reward: None` (a table without rewards, ranked by
/// other means) every candidate's reward is NaN and none is dropped for it.
pub fn candidates_with(batch: &RecordBatch, groups: &Groups, reward: Option<&str>) -> Result<(Vec<Vec<Candidate>>, RowDrops)> {
    let rewards = reward.map(|c| f64_col(batch, c)).transpose()?;
    let idx = u32_col(batch, col::SAMPLE_IDX)?;
    let prompt = batch.column_by_name(col::PROMPT);
    let response = batch.column_by_name(col::RESPONSE);
    let is_null = |a: Option<&ArrayRef>, r: usize| a.is_some_and(|a| a.is_null(r));
    let mut drops = RowDrops::default();
    let mut out = Vec::with_capacity(groups.rows.len());
    for (g, rows) in groups.rows.iter().enumerate() {
        let mut seen: Vec<u32> = rows.iter().map(|&r| idx.value(r)).collect();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            let r = groups.rows[g][0];
            let id = if groups.prompt_ids.is_null(r) { "" } else { groups.prompt_ids.value(r) };
            let n = seen.iter().filter(|&&s| s == w[0]).count();
            return Err(Error::Input(format!(
                "prompt `{id}` has {n} rows with sample_idx {}; (prompt_id, sample_idx) must be unique (a duplicating join, or a source without `dedup: true`?)",
                w[0]
            )));
        }
        let mut c: Vec<Candidate> = Vec::with_capacity(rows.len());
        for &r in rows {
            let v = match &rewards {
                Some(a) if !a.is_null(r) => a.value(r),
                _ => f64::NAN,
            };
            if is_null(prompt, r) {
                drops.null_prompt += 1;
            } else if is_null(response, r) {
                drops.null_response += 1;
            } else if v.is_finite() || rewards.is_none() {
                c.push(Candidate { row: r, sample_idx: idx.value(r), reward: v });
            } else {
                drops.non_finite += 1;
            }
        }
        c.sort_by_key(|c| c.sample_idx);
        out.push(c);
    }
    Ok((out, drops))
}

/// Index of the best candidate by `key` (largest), ties → lowest sample_idx.
/// Candidates must be sorted by sample_idx (as [`candidates`] returns them).
pub fn argmax_by(c: &[Candidate], key: impl Fn(&Candidate) -> f64) -> usize {
    let mut best = 0;
    for i in 1..c.len() {
        if key(&c[i]) > key(&c[best]) {
            best = i;
        }
    }
    best
}

/// Index of the smallest candidate by `key`, ties → lowest sample_idx.
pub fn argmin_by(c: &[Candidate], key: impl Fn(&Candidate) -> f64) -> usize {
    let mut best = 0;
    for i in 1..c.len() {
        if key(&c[i]) < key(&c[best]) {
            best = i;
        }
    }
    best
}

#[cfg(test)]
pub(crate) mod testing {
    use super::Candidate;

    /// Candidates with sample_idx 0..n and the given rewards.
    pub fn cands(rewards: &[f64]) -> Vec<Candidate> {
        rewards.iter().enumerate().map(|(i, &r)| Candidate { row: i, sample_idx: i as u32, reward: r }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::cands;
    use super::*;

    #[test]
    fn duplicate_sample_idx_is_bad_input() {
        // p has sample_idx 0 twice: which row wins would depend on row order (issue 14).
        let b = crate::testkit::scored(&[("q", 0, 1.0), ("p", 0, 1.0), ("p", 1, 2.0), ("p", 0, 3.0)], &[]);
        let e = candidates(&b, &group_rows(&b).unwrap(), col::REWARD).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().starts_with("prompt `p` has 2 rows with sample_idx 0; (prompt_id, sample_idx) must be unique"), "{e}");
    }

    #[test]
    fn null_prompts_and_responses_are_dropped_not_read_as_empty() {
        use arrow::array::StringArray;
        use std::sync::Arc;
        // Rows: 0 fine, 1 null response, 2 null prompt (and null response: counted once, as
        // null_prompt), 3 NaN reward, 4 fine.
        let b = crate::testkit::scored(&[("p", 0, 1.0), ("p", 1, 2.0), ("p", 2, 3.0), ("p", 3, f64::NAN), ("p", 4, 0.5)], &[]);
        let mut cols = b.columns().to_vec();
        let s = b.schema();
        let nullable = |name: &str| s.index_of(name).unwrap();
        cols[nullable("response")] = Arc::new(StringArray::from(vec![Some("a"), None, None, Some("d"), Some("e")]));
        cols[nullable("prompt")] = Arc::new(StringArray::from(vec![Some("x"), Some("x"), None, Some("x"), Some("x")]));
        let fields: Vec<_> = s.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect();
        let b = RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), cols).unwrap();
        let (c, d) = candidates(&b, &group_rows(&b).unwrap(), col::REWARD).unwrap();
        assert_eq!(c[0].iter().map(|c| c.sample_idx).collect::<Vec<_>>(), [0, 4]);
        assert_eq!(d, RowDrops { null_prompt: 1, null_response: 1, non_finite: 1 });
    }

    #[test]
    fn ties_break_toward_lowest_sample_idx() {
        let c = cands(&[1.0, 3.0, 3.0, 0.5, 0.5]);
        assert_eq!(argmax_by(&c, |c| c.reward), 1);
        assert_eq!(argmin_by(&c, |c| c.reward), 3);
    }
}
