//! Grouping rows by prompt, and the candidates of one prompt.

use std::collections::HashMap;

use arrow::array::{Array, StringArray};
use arrow::record_batch::RecordBatch;
use prefpipe_core::table::{col, f64_col, str_col, u32_col};
use prefpipe_core::Result;

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
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(batch.num_rows() / 4 + 1);
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for r in 0..ids.len() {
        let id = if ids.is_null(r) { "" } else { ids.value(r) };
        let g = *index.entry(id).or_insert_with(|| {
            rows.push(Vec::new());
            rows.len() - 1
        });
        rows[g].push(r);
    }
    drop(index);
    Ok(Groups { prompt_ids: ids, rows })
}

/// The candidates of every group, with non-finite rewards removed and
/// counted. Candidates are sorted by `sample_idx` so results do not depend
/// on row order.
pub fn candidates(batch: &RecordBatch, groups: &Groups, reward: &str) -> Result<(Vec<Vec<Candidate>>, u64)> {
    let rewards = f64_col(batch, reward)?;
    let idx = u32_col(batch, col::SAMPLE_IDX)?;
    let mut non_finite = 0u64;
    let out = groups
        .rows
        .iter()
        .map(|rows| {
            let mut c: Vec<Candidate> = Vec::with_capacity(rows.len());
            for &r in rows {
                let v = if rewards.is_null(r) { f64::NAN } else { rewards.value(r) };
                if v.is_finite() {
                    c.push(Candidate { row: r, sample_idx: idx.value(r), reward: v });
                } else {
                    non_finite += 1;
                }
            }
            c.sort_by_key(|c| c.sample_idx);
            c
        })
        .collect();
    Ok((out, non_finite))
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
    fn ties_break_toward_lowest_sample_idx() {
        let c = cands(&[1.0, 3.0, 3.0, 0.5, 0.5]);
        assert_eq!(argmax_by(&c, |c| c.reward), 1);
        assert_eq!(argmin_by(&c, |c| c.reward), 3);
    }
}
