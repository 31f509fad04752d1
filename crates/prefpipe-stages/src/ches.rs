//! `filter` with `strategy: ches`: CHES / length-normalised CHES from the
//! final hidden states of the model to be trained ("Unintentional
//! Unalignment", Razin et al. 2025). The math and the corpus rule live in
//! `prefpipe_select::ches`; this file feeds them the model's hidden-state sums.

use arrow::datatypes::SchemaRef;
use prefpipe_core::stage::{ConfigError, Mode, Output, PlanCx, RunCx, Stage, Table};
use prefpipe_core::table::str_col;
use prefpipe_core::Result;
use prefpipe_select::ches::{self, Ches};
use prefpipe_select::Input;

use crate::model_ref::{model_err, ModelRef};

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

    fn run(&self, cx: &RunCx, inputs: &[Table]) -> Result<Output> {
        let batch = inputs[0].read_one()?;
        let model = self.model.get(cx)?;
        let prompts = crate::backend::Prompts::of(&batch)?;
        let chosen = str_col(&batch, "chosen")?;
        let rejected = str_col(&batch, "rejected")?;
        let n = batch.num_rows();
        let mut scores = (Vec::with_capacity(n), Vec::with_capacity(n));
        let bs = self.c.batch_size as usize;
        for start in (0..n).step_by(bs) {
            let rows = start..(start + bs).min(n);
            // One forward pass over chosen and rejected of the pairs in this batch.
            let mut seqs = Vec::with_capacity(2 * rows.len());
            for r in rows.clone() {
                // TRL's tokenisation of the pair (DESIGN §15): one prompt, the common prefix of both.
                let enc = |s: &str| model.pair_ids(prompts.get(r), s, self.c.chat_template).map_err(model_err);
                let (p, mut rs) = crate::backend::shared_prompt(vec![enc(chosen.value(r))?, enc(rejected.value(r))?]);
                let neg = rs.pop().expect("two");
                seqs.push((p.clone(), rs.pop().expect("two")));
                seqs.push((p, neg));
            }
            let sums = model.hidden_sums(&seqs).map_err(model_err)?;
            for k in 0..rows.len() {
                let (pos, neg) = (&sums[2 * k], &sums[2 * k + 1]);
                let (c, l) = ches::ches(pos, neg, seqs[2 * k].1.len(), seqs[2 * k + 1].1.len());
                scores.0.push(c);
                scores.1.push(l);
            }
            (cx.progress)(rows.end as u64, n as u64);
        }
        let mut out = ches::filter_by_scores(&batch, &scores.0, &scores.1, &self.c)?;
        out.rows_in = n as u64;
        Ok(out)
    }
}
