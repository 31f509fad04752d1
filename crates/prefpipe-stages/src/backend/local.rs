//! The in-process backend: a Hugging Face directory or GGUF file on candle,
//! loaded on first use and shared by every chunk of the run.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use prefpipe_core::stage::RunCx;
use prefpipe_core::{Error, Result};
use prefpipe_models::{Model, SamplingParams};

use super::{Backend, GenJob, GenParams, Pair, PairOpts, Row, Sample};
use crate::model_ref::{device, model_err};

/// (prompt ids, response ids) of one row.
type Ids = (Vec<u32>, Vec<u32>);

pub struct Local {
    dir: PathBuf,
    /// The loaded model, or the load error (its class — bad input or not — and message).
    model: OnceLock<std::result::Result<Arc<Model>, (bool, String)>>,
}

impl Local {
    pub fn new(dir: PathBuf) -> Self {
        Local { dir, model: OnceLock::new() }
    }

    /// The model, loaded on first use.
    pub fn model(&self) -> Result<Arc<Model>> {
        self.model
            .get_or_init(|| Model::load(&self.dir, &device()).map(Arc::new).map_err(|e| (e.is_input(), e.to_string())))
            .clone()
            .map_err(|(input, msg)| if input { Error::Input(msg) } else { Error::Runtime(msg) })
    }

    /// (prompt, response) ids per DESIGN §4/§15, or `None` when they exceed the context.
    fn encode_pairs(&self, m: &Model, pairs: &[Pair], chat: bool) -> Result<Vec<Option<Ids>>> {
        pairs
            .iter()
            .map(|p| {
                let ids = m.pair_ids(p.prompt, p.response, chat).map_err(model_err)?;
                Ok((ids.0.len() + ids.1.len() <= m.max_len()).then_some(ids))
            })
            .collect()
    }
}

impl Backend for Local {
    fn generate(&self, cx: &RunCx, _tag: &str, jobs: &[GenJob], params: &GenParams) -> Result<Vec<Row<Sample>>> {
        let model = self.model()?;
        let mut out: Vec<Option<Row<Sample>>> = vec![None; jobs.len()];
        // (job, prompt ids) for every prompt that fits the context.
        let mut todo: Vec<(usize, Arc<Vec<u32>>)> = Vec::with_capacity(jobs.len());
        let mut last: Option<(&str, Arc<Vec<u32>>)> = None;
        for (j, job) in jobs.iter().enumerate() {
            // Consecutive samples of one prompt share its ids.
            let ids = match &last {
                Some((p, ids)) if *p == job.prompt_id => ids.clone(),
                _ => {
                    let ids = Arc::new(model.prompt_ids(job.prompt, params.chat_template).map_err(model_err)?);
                    last = Some((job.prompt_id, ids.clone()));
                    ids
                }
            };
            if ids.len() >= model.max_len() {
                out[j] = Some(Row::Drop("prompt_too_long"));
            } else {
                todo.push((j, ids));
            }
        }
        let sp = SamplingParams {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            min_p: params.min_p,
            max_new_tokens: params.max_new_tokens,
            stop_strings: params.stop.clone(),
        };
        let bs = params.batch_size.max(1);
        for (done, batch) in todo.chunks(bs).enumerate() {
            let ps: Vec<Vec<u32>> = batch.iter().map(|(_, ids)| ids.as_ref().clone()).collect();
            let seeds: Vec<u64> = batch.iter().map(|(j, _)| jobs[*j].seed).collect();
            for ((j, _), g) in batch.iter().zip(model.generate(&ps, &sp, &seeds).map_err(model_err)?) {
                out[*j] = Some(Row::Ok(Sample {
                    text: g.text,
                    n_tokens: g.n_tokens as u32,
                    finish_reason: g.finish_reason.as_str().to_string(),
                }));
            }
            (cx.progress)(((done + 1) * bs).min(todo.len()) as u64, todo.len() as u64);
        }
        Ok(out.into_iter().map(|r| r.expect("every job answered")).collect())
    }

    fn scores(&self, cx: &RunCx, _tag: &str, pairs: &[Pair], opts: PairOpts) -> Result<Vec<Row<Vec<f32>>>> {
        let model = self.model()?;
        let mut out: Vec<Row<Vec<f32>>> = vec![Row::Drop("too_long"); pairs.len()];
        // A reward model reads its own template over the whole conversation (DESIGN §4).
        let mut seqs: Vec<(usize, Vec<u32>)> = Vec::with_capacity(pairs.len());
        for (r, p) in pairs.iter().enumerate() {
            let ids = model.reward_ids(p.prompt, p.response, opts.chat_template).map_err(model_err)?;
            if ids.len() <= model.max_len() {
                seqs.push((r, ids));
            }
        }
        // Longest first, so each batch pads little (the sort is stable: ties keep row order).
        seqs.sort_by_key(|(_, s)| std::cmp::Reverse(s.len()));
        let mut done = (pairs.len() - seqs.len()) as u64;
        for group in seqs.chunks(opts.batch_size.max(1)) {
            let ids: Vec<Vec<u32>> = group.iter().map(|(_, s)| s.clone()).collect();
            for ((r, _), s) in group.iter().zip(model.scores(&ids).map_err(model_err)?) {
                out[*r] = Row::Ok(s);
            }
            done += group.len() as u64;
            (cx.progress)(done, pairs.len() as u64);
        }
        Ok(out)
    }

    fn logprobs(&self, _cx: &RunCx, _tag: &str, pairs: &[Pair], opts: PairOpts) -> Result<Vec<Row<(f64, u32)>>> {
        let model = self.model()?;
        let encoded = self.encode_pairs(&model, pairs, opts.chat_template)?;
        let kept: Vec<(usize, Ids)> = encoded.into_iter().enumerate().filter_map(|(r, e)| e.map(|e| (r, e))).collect();
        let mut out: Vec<Row<(f64, u32)>> = vec![Row::Drop("too_long"); pairs.len()];
        for group in kept.chunks(opts.batch_size.max(1)) {
            let batch: Vec<Ids> = group.iter().map(|(_, e)| e.clone()).collect();
            for ((r, e), lp) in group.iter().zip(model.logprobs(&batch).map_err(model_err)?) {
                out[*r] = Row::Ok((lp, e.1.len() as u32));
            }
        }
        Ok(out)
    }
}
