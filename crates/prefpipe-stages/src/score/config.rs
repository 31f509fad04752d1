//! `score`'s YAML: the config types and their checks (names, weights, labels).

use super::*;

/// `kind: score`. Adds `reward` and one `reward_<name>` per reward model and rule.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// Reward models (`*ForSequenceClassification`), each one `reward_<name>` column.
    #[serde(default)]
    pub reward_models: Vec<RewardModel>,
    /// Rule rewards, each one `reward_<name>` column.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// How the `reward_<name>` columns combine into `reward`. Default:
    /// `weighted` when any entry has a `weight` (DESIGN §5), else `mean`.
    #[serde(default)]
    pub aggregate: Option<Aggregate>,
    /// Sequences per reward-model forward pass (rows are sorted by length first).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

impl ScoreConfig {
    /// The aggregate in use (resolved by `build`: `weighted` when a weight is given).
    pub fn aggregation(&self) -> Aggregate {
        self.aggregate.unwrap_or_default()
    }
}

/// One entry of `reward_models:`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardModel {
    /// The column is `reward_<name>` (letters, digits, `_`).
    pub name: String,
    /// A name from `models:` or a model directory.
    pub model: String,
    /// Weight in `aggregate: weighted` (required there, not allowed otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Render the model's chat template around the prompt (DESIGN §4).
    #[serde(default)]
    pub chat_template: bool,
    /// For a head with several labels: the label (an `id2label` name or an
    /// index) whose score is `reward_<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<LabelRef>,
    /// For a head with several labels: `reward_<name>` = Σ weight · score
    /// over these labels (name or index → weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, f64>>,
}

/// A label of a reward head: its `id2label` name or its index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum LabelRef {
    Index(usize),
    Name(String),
}

/// How `reward` combines the entries' columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// The plain mean of every entry's `reward_<name>`.
    #[default]
    Mean,
    /// Σ weight·x / Σ weight; every entry needs `weight` (≥ 0, not all 0).
    Weighted,
    /// The mean of each column z-scored over the whole input (population
    /// std; a constant column counts 0). Runs over the whole input at once.
    ZscoreMean,
}

pub(super) fn default_batch() -> usize {
    16
}

/// A config error under `reward_models[index].field`.
pub(super) fn at_rm(index: usize, field: &str, message: String) -> ConfigError {
    let mut path = vec![PathSeg::Key("reward_models".into()), PathSeg::Index(index)];
    if !field.is_empty() {
        path.push(PathSeg::Key(field.into()));
    }
    ConfigError { path, message }
}

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(super) fn aggregate_name(a: Aggregate) -> &'static str {
    match a {
        Aggregate::Mean => "mean",
        Aggregate::Weighted => "weighted",
        Aggregate::ZscoreMean => "zscore_mean",
    }
}

impl Score {
    pub(super) fn build(v: &Value) -> Result<Score, Vec<ConfigError>> {
        let mut c: ScoreConfig = from_config(v)?;
        // `weight:` without `aggregate:` means `weighted`; resolved here so the content key is
        // the same as with `aggregate` written out.
        let weighted = c.reward_models.iter().any(|m| m.weight.is_some()) || c.rules.iter().any(|r| r.weight().is_some());
        c.aggregate = Some(c.aggregate.unwrap_or(if weighted { Aggregate::Weighted } else { Aggregate::Mean }));
        let mut errs = Vec::new();
        if c.reward_models.is_empty() && c.rules.is_empty() {
            errs.push(ConfigError::new("`score` needs at least one entry in `reward_models` or `rules`"));
        }
        if c.batch_size == 0 {
            errs.push(ConfigError::at("batch_size", "`batch_size` must be at least 1"));
        }
        // Every entry (reward models, then rules): its name, weight and YAML path.
        let entries: Vec<(&str, Option<f64>, Vec<PathSeg>)> = c
            .reward_models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.as_str(), m.weight, at_rm(i, "", String::new()).path))
            .chain(c.rules.iter().enumerate().map(|(i, r)| (r.name(), r.weight(), at_rule(i, "", String::new()).path)))
            .collect();
        let at = |entry: &[PathSeg], field: &str, message: String| {
            let mut path = entry.to_vec();
            path.extend((!field.is_empty()).then(|| PathSeg::Key(field.into())));
            ConfigError { path, message }
        };
        let mut seen = std::collections::HashSet::new();
        for (name, _, path) in &entries {
            if !valid_name(name) {
                errs.push(at(path, "name", format!("`name` becomes the column `reward_{name}`: use letters, digits and `_` only")));
            } else if !seen.insert(*name) {
                errs.push(at(path, "name", format!("two entries are named `{name}`; each needs its own `reward_{name}` column")));
            }
        }
        match c.aggregation() {
            Aggregate::Weighted => {
                for (_, w, path) in &entries {
                    match w {
                        None => errs.push(at(
                            path,
                            "",
                            "`aggregate: weighted` needs a `weight` on every reward model and rule; this one has none".into(),
                        )),
                        Some(w) if !(w.is_finite() && *w >= 0.0) => {
                            errs.push(at(path, "weight", format!("`weight` must be a finite number ≥ 0; got {w}")))
                        }
                        _ => {}
                    }
                }
                if !entries.is_empty() && entries.iter().all(|(_, w, _)| *w == Some(0.0)) {
                    errs.push(ConfigError::at(
                        "aggregate",
                        "every `weight` is 0: `aggregate: weighted` needs at least one positive weight",
                    ));
                }
            }
            other => {
                for (_, w, path) in &entries {
                    if w.is_some() {
                        let msg = format!(
                            "`weight` is only used by `aggregate: weighted` (this stage aggregates with `{}`)",
                            aggregate_name(other)
                        );
                        errs.push(at(path, "weight", msg));
                    }
                }
            }
        }
        for (i, m) in c.reward_models.iter().enumerate() {
            if m.label.is_some() && m.labels.is_some() {
                errs.push(at_rm(i, "labels", "give `label` (one label) or `labels` (a weighted sum), not both".into()));
            }
            if let Some(ls) = &m.labels {
                if ls.is_empty() {
                    errs.push(at_rm(i, "labels", "`labels` names no label".into()));
                }
                for (k, w) in ls {
                    if !w.is_finite() {
                        let mut e = at_rm(i, "labels", format!("the weight of label `{k}` must be finite; got {w}"));
                        e.path.push(PathSeg::Key(k.clone()));
                        errs.push(e);
                    }
                }
            }
        }
        let mut rules = Vec::new();
        for (i, r) in c.rules.iter().enumerate() {
            match r.compile(&|f, m| at_rule(i, f, m)) {
                Ok(r) => rules.push(r),
                Err(es) => errs.extend(es),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let models = c.reward_models.iter().map(|m| ModelRef::new("model", &m.model)).collect();
        Ok(Score { c, models, rules })
    }
}
