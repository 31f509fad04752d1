//! The raw added columns of a batch: reward-model and rule scores, the
//! per-chunk scratch cache of `zscore_mean`, and the output batch.

use super::*;

impl Score {
    /// The added columns, in order: `reward`, then per reward model
    /// `reward_<name>` and its label columns, then per rule `reward_<name>`.
    pub(super) fn added(&self, heads: &[Head]) -> Vec<Field> {
        self.added_names(heads).into_iter().map(|(n, _)| Field::new(n, DataType::Float64, true)).collect()
    }

    /// [`Score::added`]'s names, each with the config path of the entry that adds it.
    pub(super) fn added_names(&self, heads: &[Head]) -> Vec<(String, Vec<PathSeg>)> {
        let mut names = vec![(col::REWARD.to_string(), vec![])];
        for (i, (m, h)) in self.c.reward_models.iter().zip(heads).enumerate() {
            let at = at_rm(i, "name", String::new()).path;
            names.push((format!("reward_{}", m.name), at.clone()));
            if h.labels.len() > 1 {
                names.extend(h.labels.iter().map(|l| (format!("reward_{}_{l}", m.name), at.clone())));
            }
        }
        for (i, r) in self.c.rules.iter().enumerate() {
            names.push((format!("reward_{}", r.name()), at_rule(i, "name", String::new()).path));
        }
        names
    }

    /// Whether the length rules read `n_tokens` from this input.
    pub(super) fn uses_n_tokens(&self, r: &Rule, schema: &Schema) -> bool {
        match r {
            Rule::Length(l) => match l.unit {
                LengthUnit::NTokens => true,
                LengthUnit::Words => false,
                LengthUnit::Auto => schema.field_with_name(col::N_TOKENS).is_ok_and(|f| f.data_type().is_integer()),
            },
            _ => false,
        }
    }

    /// Raw columns (everything but `reward`) of one batch, and its drop counts.
    pub(super) fn raw(&self, cx: &RunCx, batch: &RecordBatch, heads: &[Head]) -> Result<Raw> {
        let n = batch.num_rows();
        let mut cols: Vec<Column> = Vec::new();
        let mut entry_at = Vec::new();
        let mut too_long = vec![false; n];
        let mut non_finite = vec![false; n];
        let mut other = BTreeMap::new();
        let total = (n * self.models.len()) as u64;
        let response = str_col(batch, col::RESPONSE).ok();
        // A row without a prompt or a response is not scored (never as ""): all its columns stay null.
        let prompts = Prompts::of(batch).ok();
        let null_prompt: Vec<bool> = (0..n).map(|r| prompts.as_ref().is_some_and(|p| p.is_null(r))).collect();
        let null_response: Vec<bool> = (0..n).map(|r| !null_prompt[r] && response.as_ref().is_some_and(|a| a.is_null(r))).collect();
        let skip: Vec<bool> = (0..n).map(|r| null_prompt[r] || null_response[r]).collect();
        for (i, head) in heads.iter().enumerate() {
            let (reward, labels) =
                self.score_model(cx, i, head, batch, &skip, &mut too_long, &mut non_finite, &mut other, (i * n) as u64, total)?;
            entry_at.push(cols.len());
            cols.push(reward);
            if head.labels.len() > 1 {
                cols.extend(labels);
            }
        }
        let schema = batch.schema();
        let mut null_n_tokens = vec![false; n];
        for (rule, cfg) in self.rules.iter().zip(&self.c.rules) {
            let column = match cfg {
                Rule::ExactMatch(r) => Some(str_col(batch, &r.column)?),
                Rule::Regex(r) => Some(str_col(batch, &r.column)?),
                Rule::Contains(r) => Some(str_col(batch, &r.column)?),
                Rule::Length(_) => None,
            };
            let n_tokens = if self.uses_n_tokens(cfg, &schema) { Some(n_tokens_col(batch)?) } else { None };
            let values = (0..n)
                .map(|r| {
                    if skip[r] {
                        return None;
                    }
                    // A null `n_tokens` is not 0 tokens: the rule has no value for the row.
                    let n_tokens = match &n_tokens {
                        Some(a) if a.is_null(r) => {
                            null_n_tokens[r] = true;
                            return None;
                        }
                        Some(a) => Some(a.value(r)),
                        None => None,
                    };
                    let row = RowText {
                        response: response.as_ref().and_then(|a| text_at(a, r)).unwrap_or(""),
                        column: column.as_ref().and_then(|a| text_at(a, r)),
                        n_tokens,
                    };
                    Some(rule.eval(&row))
                })
                .collect();
            entry_at.push(cols.len());
            cols.push(values);
        }
        let mut drops = other;
        for (reason, flags) in [
            ("null_prompt", &null_prompt),
            ("null_response", &null_response),
            ("null_n_tokens", &null_n_tokens),
            ("too_long", &too_long),
            ("non_finite_reward", &non_finite),
        ] {
            let k = flags.iter().filter(|&&f| f).count() as u64;
            if k > 0 {
                drops.insert(reason.to_string(), k);
            }
        }
        Ok(Raw { cols: cols.into_iter().map(Float64Array::from).collect(), entry_at, drops })
    }

    /// `reward_<name>` and the label columns of reward model `i` over `batch`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn score_model(
        &self,
        cx: &RunCx,
        i: usize,
        head: &Head,
        batch: &RecordBatch,
        skip: &[bool],
        too_long: &mut [bool],
        non_finite: &mut [bool],
        other: &mut BTreeMap<String, u64>,
        done0: u64,
        total: u64,
    ) -> Result<(Column, Vec<Column>)> {
        let n = batch.num_rows();
        let nl = head.labels.len();
        let mut reward = vec![None; n];
        let mut labels = vec![vec![None; n]; nl];
        if n == 0 {
            return Ok((reward, labels));
        }
        let chat = self.c.reward_models[i].chat_template;
        let ids = str_col(batch, col::PROMPT_ID).ok();
        let prompts = Prompts::of(batch)?;
        let responses = str_col(batch, col::RESPONSE)?;
        let rows: Vec<usize> = (0..n).filter(|&r| !skip[r]).collect();
        if rows.is_empty() {
            return Ok((reward, labels));
        }
        let pairs: Vec<Pair> = rows
            .iter()
            .map(|&r| Pair {
                prompt_id: ids.as_ref().and_then(|a| text_at(a, r)).unwrap_or(""),
                prompt: prompts.get(r),
                response: responses.value(r),
            })
            .collect();
        let progress = |done: u64, _: u64| (cx.progress)(done0 + done, total);
        let sub = RunCx { progress: &progress, ..*cx };
        let tag = format!("rm{i}");
        let results =
            self.models[i].backend(cx).scores(&sub, &tag, &pairs, PairOpts { chat_template: chat, batch_size: self.c.batch_size })?;
        for (&r, res) in rows.iter().zip(results) {
            let s = match res {
                Row::Ok(s) => s,
                Row::Drop("too_long") => {
                    too_long[r] = true;
                    continue;
                }
                Row::Drop(why) => {
                    *other.entry(why.to_string()).or_default() += 1;
                    continue;
                }
            };
            if s.len() != nl {
                return Err(Error::Runtime(format!(
                    "reward model `{}` returned {} scores per row; its head has {nl} labels",
                    self.c.reward_models[i].name,
                    s.len()
                )));
            }
            let mix: f64 = s.iter().zip(&head.mix).filter(|(_, &w)| w != 0.0).map(|(&x, &w)| w * f64::from(x)).sum();
            let finite = mix.is_finite() && s.iter().zip(&head.mix).all(|(x, &w)| w == 0.0 || x.is_finite());
            if finite {
                reward[r] = Some(mix);
            } else {
                non_finite[r] = true;
            }
            for (l, &x) in s.iter().enumerate() {
                if x.is_finite() {
                    labels[l][r] = Some(f64::from(x));
                } else {
                    non_finite[r] = true;
                }
            }
        }
        Ok((reward, labels))
    }

    pub(super) fn assemble(&self, batch: &RecordBatch, raw: &Raw, reward: Float64Array, schema: &SchemaRef) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
        cols.push(Arc::new(reward));
        cols.extend(raw.cols.iter().map(|c| Arc::new(c.clone()) as ArrayRef));
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }

    /// Raw scores of input chunk `c`, from the scratch cache when an earlier
    /// (interrupted) run already computed them. The stage's scratch directory
    /// is per stage key, so a cache never outlives its config, models or input.
    pub(super) fn cached_raw(&self, cx: &RunCx, c: usize, batch: &RecordBatch, heads: &[Head], raw_schema: &SchemaRef) -> Result<Raw> {
        let data = cx.scratch.join(format!("raw-{c:06}.parquet"));
        let drops_file = cx.scratch.join(format!("raw-{c:06}.drops.json"));
        // Anything unreadable or of another shape is recomputed, never trusted.
        let cached = || -> Option<Raw> {
            let drops: BTreeMap<String, u64> = serde_json::from_slice(&std::fs::read(&drops_file).ok()?).ok()?;
            let all = arrow::compute::concat_batches(raw_schema, &prefpipe_core::io::read_parquet(&data).ok()?).ok()?;
            let cols: Option<Vec<Float64Array>> =
                all.columns().iter().map(|a| a.as_any().downcast_ref::<Float64Array>().cloned()).collect();
            (all.num_rows() == batch.num_rows()).then_some(Raw { cols: cols?, entry_at: self.entry_positions(heads), drops })
        };
        if let Some(raw) = cached() {
            return Ok(raw);
        }
        let raw = self.raw(cx, batch, heads)?;
        // The drop counts first: the Parquet file's presence marks the chunk done.
        let bytes = serde_json::to_vec(&raw.drops).expect("drops serialize");
        prefpipe_core::io::write_atomic(&drops_file, |f| {
            use std::io::Write;
            f.write_all(&bytes).map_err(|e| Error::io(&drops_file, e))
        })?;
        let cols: Vec<ArrayRef> = raw.cols.iter().map(|c| Arc::new(c.clone()) as ArrayRef).collect();
        prefpipe_core::io::write_parquet(&data, raw_schema, &[RecordBatch::try_new(raw_schema.clone(), cols)?])?;
        Ok(raw)
    }

    pub(super) fn entry_positions(&self, heads: &[Head]) -> Vec<usize> {
        let mut at = Vec::new();
        let mut k = 0;
        for h in heads {
            at.push(k);
            k += 1 + if h.labels.len() > 1 { h.labels.len() } else { 0 };
        }
        for _ in &self.rules {
            at.push(k);
            k += 1;
        }
        at
    }
}

/// `n_tokens` as UInt32, nulls kept (a negative or too-large count is bad input).
pub(super) fn n_tokens_col(batch: &RecordBatch) -> Result<arrow::array::UInt32Array> {
    let src = batch.column_by_name(col::N_TOKENS).ok_or_else(|| Error::Input(format!("missing column `{}`", col::N_TOKENS)))?;
    let opts = arrow::compute::CastOptions { safe: false, ..Default::default() };
    let a =
        arrow::compute::cast_with_options(src, &DataType::UInt32, &opts).map_err(|e| Error::Input(format!("column `n_tokens`: {e}")))?;
    Ok(a.as_any().downcast_ref::<arrow::array::UInt32Array>().expect("cast to u32").clone())
}

pub(super) fn text_at(a: &StringArray, r: usize) -> Option<&str> {
    if a.is_null(r) {
        None
    } else {
        Some(a.value(r))
    }
}

/// One added column while it is computed (null = no finite value).
pub(super) type Column = Vec<Option<f64>>;

/// The non-`reward` added columns of a batch, and why rows hold nulls.
pub(super) struct Raw {
    pub(super) cols: Vec<Float64Array>,
    /// Index in `cols` of each entry's `reward_<name>` (reward models, then rules).
    pub(super) entry_at: Vec<usize>,
    pub(super) drops: BTreeMap<String, u64>,
}
