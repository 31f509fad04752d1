//! `filter` with `strategy: ches`: CHES / length-normalised CHES from the
//! final hidden states of the model to be trained ("Unintentional
//! Unalignment", Razin et al. 2025). The math and the corpus rule live in
//! `prefpipe_select::ches`; this file feeds them the model's hidden-state sums.

use arrow::array::Array;
use arrow::datatypes::SchemaRef;
use prefpipe_core::stage::{ConfigError, Mode, Output, PlanCx, RunCx, Stage, Table};
use prefpipe_core::table::str_col;
use prefpipe_core::Result;
use prefpipe_select::ches::{self, Ches};
use prefpipe_select::Input;

use crate::model_ref::{model_err, ModelRef};

/// (prompt ids, response ids) of one side of a pair.
type Seq = (Vec<u32>, Vec<u32>);

pub struct ChesStage {
    c: Ches,
    model: ModelRef,
}

/// Builds from the filter config minus `strategy`.
pub fn build(v: &serde_json::Value) -> Result<ChesStage, Vec<ConfigError>> {
    let c = Ches::build(v)?;
    let model = ModelRef::new("model", &c.model);
    Ok(ChesStage { c, model })
}

impl Stage for ChesStage {
    fn mode(&self) -> Mode {
        Mode::Whole
    }

    fn config(&self) -> serde_json::Value {
        let mut v = self.c.config();
        v["strategy"] = ches::NAME.into();
        v
    }

    fn plan(&self, cx: &PlanCx, inputs: &[SchemaRef]) -> Result<SchemaRef, Vec<ConfigError>> {
        let ins: Vec<Input> = cx.input_ids.iter().zip(inputs).map(|(id, s)| Input { id, schema: s.as_ref() }).collect();
        let mut errs = Vec::new();
        let schema = self.c.plan(&ins).map_err(|e| errs.extend(e)).ok();
        if let Err(e) = self.model.check_for(cx, crate::backend::Uses::Hidden) {
            errs.push(e);
        }
        errs.extend(crate::backend::check_chat(&inputs[0], &cx.input_ids[0], self.c.chat_template, "chat_template"));
        match schema {
            Some(s) if errs.is_empty() => Ok(s),
            _ => Err(errs),
        }
    }

    fn fingerprint(&self, cx: &PlanCx) -> Result<Vec<u8>, ConfigError> {
        Ok(self.model.check_for(cx, crate::backend::Uses::Hidden)?.into_bytes())
    }

    /// Pairs whose prompt ⊕ chosen or prompt ⊕ rejected is longer than the
    /// model's context are dropped as `too_long`, and pairs with a null
    /// prompt or response as `null_prompt` / `null_response` (all counted in
    /// pairs, like logprob, score and train do); the corpus rule then runs
    /// over the pairs left.
    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let batch = inputs[0].read_one()?;
        let model = self.model.get(cx)?;
        let prompts = crate::backend::Prompts::of(&batch)?;
        let chosen = str_col(&batch, "chosen")?;
        let rejected = str_col(&batch, "rejected")?;
        let n = batch.num_rows();
        let mut dropped = Output::default();
        // (row, [chosen, rejected] as (prompt ids, response ids)) of every pair that is scored.
        let mut todo: Vec<(usize, [Seq; 2])> = Vec::with_capacity(n);
        for r in 0..n {
            if prompts.is_null(r) {
                dropped.drop("null_prompt", 1);
                continue;
            }
            if chosen.is_null(r) || rejected.is_null(r) {
                dropped.drop("null_response", 1);
                continue;
            }
            // TRL's tokenisation of the pair (DESIGN §15): one prompt, the common prefix of both.
            let enc = |s: &str| model.pair_ids(prompts.get(r), s, self.c.chat_template).map_err(model_err);
            let (p, mut rs) = crate::backend::shared_prompt(vec![enc(chosen.value(r))?, enc(rejected.value(r))?]);
            let neg = rs.pop().expect("two");
            let pos = rs.pop().expect("two");
            if p.len() + pos.len().max(neg.len()) > model.max_len() {
                dropped.drop("too_long", 1);
                continue;
            }
            todo.push((r, [(p.clone(), pos), (p, neg)]));
        }
        let mut scores = (Vec::with_capacity(todo.len()), Vec::with_capacity(todo.len()));
        let bs = self.c.batch_size as usize;
        for (done, group) in todo.chunks(bs).enumerate() {
            // One forward pass over chosen and rejected of the pairs in this batch.
            let seqs: Vec<(Vec<u32>, Vec<u32>)> = group.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
            let sums = model.hidden_sums(&seqs).map_err(model_err)?;
            for k in 0..group.len() {
                let (pos, neg) = (&sums[2 * k], &sums[2 * k + 1]);
                let (c, l) = ches::ches(pos, neg, seqs[2 * k].1.len(), seqs[2 * k + 1].1.len());
                scores.0.push(c);
                scores.1.push(l);
            }
            (cx.progress)((done * bs + group.len()) as u64, todo.len() as u64);
        }
        let kept = if todo.len() == n {
            batch
        } else {
            let idx = arrow::array::UInt32Array::from(todo.iter().map(|(r, _)| *r as u32).collect::<Vec<_>>());
            arrow::compute::take_record_batch(&batch, &idx)?
        };
        let mut out = ches::filter_by_scores(&kept, &scores.0, &scores.1, &self.c)?;
        for (reason, k) in dropped.drops {
            out.drop(&reason, k);
        }
        out.rows_in = n as u64;
        Ok(out)
    }
}
