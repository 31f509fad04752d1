//! Reward heads: a model's labels from config.json and the safetensors headers,
//! and how `reward_<name>` mixes them.

use super::*;

/// A label name as it appears in a column name.
pub(super) fn column_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

/// A reward head resolved against its config.json: label names and how
/// `reward_<name>` mixes the label scores.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Head {
    /// Column-safe label names, one per label.
    pub(super) labels: Vec<String>,
    /// `reward_<name>` = Σ mix[l] · score[l].
    pub(super) mix: Vec<f64>,
}

impl Score {
    /// Checks reward model `i`'s directory (config, tokenizer, head, labels)
    /// without loading weights; returns its head and digest.
    pub(super) fn check_model(&self, cx: &PlanCx, i: usize) -> Result<(Head, String), ConfigError> {
        let digest = self.models[i].check_for(cx, Uses::Score).map_err(|e| at_rm(i, "model", e.message))?;
        let remote = cx.remote(&self.models[i].value);
        if let Some(m) = remote {
            if self.c.reward_models[i].chat_template && m.tokenizer.is_none() {
                return Err(at_rm(
                    i,
                    "chat_template",
                    format!(
                        "model `{}`: `chat_template: true` on a server needs `tokenizer:` (the reward model's template renders here)",
                        m.name
                    ),
                ));
            }
        }
        let head = head_of(remote, &cx.resolve_model(&self.models[i].value), &self.c.reward_models[i])
            .map_err(|(field, msg)| at_rm(i, field, msg))?;
        Ok((head, digest))
    }

    /// The heads of every reward model, from their config.json files.
    pub(super) fn heads_at_run(&self, cx: &RunCx) -> Result<Vec<Head>> {
        (0..self.models.len())
            .map(|i| {
                head_of(cx.remote(&self.models[i].value), &self.models[i].dir(cx), &self.c.reward_models[i])
                    .map_err(|(_, m)| Error::Input(m))
            })
            .collect()
    }
}

/// Resolves a reward model's head from its directory: the architecture must
/// be `*ForSequenceClassification`, the safetensors must hold `score.weight`
/// of shape [num_labels, hidden_size], and `label`/`labels` must name labels
/// the head has. Errors are (field of the entry, message).
pub(super) fn resolve_head(dir: &Path, m: &RewardModel, check_weights: bool) -> std::result::Result<Head, (&'static str, String)> {
    let cfg_path = dir.join("config.json");
    let cfg = ModelConfig::from_file(&cfg_path).map_err(|e| ("model", e.to_string()))?;
    let HeadKind::SequenceClassification { num_labels } = cfg.head else {
        return Err((
            "model",
            format!(
                "{}: `{}` is a language model; `score` needs a reward model (a *ForSequenceClassification checkpoint with a `score` head)",
                dir.display(),
                cfg.architecture
            ),
        ));
    };
    let raw: Value = std::fs::read(&cfg_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
    let declared = raw.get("num_labels").is_some() || raw.get("id2label").is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty()));
    let shape =
        if check_weights { tensor_shape(dir, "score.weight").map_err(|e| ("model", e))? } else { Some(vec![num_labels, cfg.hidden_size]) };
    match shape {
        None => {
            return Err((
                "model",
                format!(
                    "{}: config.json says `{}` but the weights have no `score.weight`: the reward head is missing (a base or causal-LM checkpoint saved under a reward-model config?)",
                    dir.display(),
                    cfg.architecture
                ),
            ))
        }
        Some(shape) if shape != [num_labels, cfg.hidden_size] => {
            let why = if declared {
                format!("config.json declares num_labels {num_labels}")
            } else {
                format!("config.json declares neither `num_labels` nor `id2label`, so transformers assumes {num_labels} labels; add \"num_labels\": {}", shape.first().copied().unwrap_or(0))
            };
            return Err(("model", format!("{}: `score.weight` has shape {shape:?}, expected [{num_labels}, {}]: {why}", dir.display(), cfg.hidden_size)));
        }
        Some(_) => {}
    }
    // Label names by index: id2label, else the index itself.
    let mut names: Vec<String> = (0..num_labels).map(|l| l.to_string()).collect();
    if let Some(map) = raw.get("id2label").and_then(Value::as_object) {
        for (k, v) in map {
            match (k.parse::<usize>(), v.as_str()) {
                (Ok(l), Some(name)) if l < num_labels => names[l] = name.to_string(),
                _ => {
                    return Err((
                        "model",
                        format!("{}: config.json `id2label` entry {k:?}: {v} does not name one of the {num_labels} labels", dir.display()),
                    ))
                }
            }
        }
    }
    let labels: Vec<String> = names.iter().map(|n| column_safe(n)).collect();
    for (a, la) in labels.iter().enumerate() {
        if labels[..a].contains(la) && num_labels > 1 {
            return Err(("model", format!("{}: two labels become the column suffix `{la}`; rename them in `id2label`", dir.display())));
        }
    }
    let listed = || names.iter().enumerate().map(|(i, n)| format!("{i}: {n}")).collect::<Vec<_>>().join(", ");
    let find = |key: &str| -> Option<usize> {
        names.iter().position(|n| n == key).or_else(|| key.parse::<usize>().ok().filter(|&i| i < num_labels))
    };
    let mut mix = vec![0.0; num_labels];
    match (&m.label, &m.labels) {
        (Some(l), _) => {
            let idx = match l {
                LabelRef::Index(i) => (*i < num_labels).then_some(*i),
                LabelRef::Name(s) => find(s),
            };
            let Some(idx) = idx else {
                let shown = match l {
                    LabelRef::Index(i) => i.to_string(),
                    LabelRef::Name(s) => format!("`{s}`"),
                };
                return Err(("label", format!("the reward model has no label {shown}; its labels are {}", listed())));
            };
            mix[idx] = 1.0;
        }
        (None, Some(ls)) => {
            for (k, w) in ls {
                let Some(idx) = find(k) else {
                    return Err(("labels", format!("the reward model has no label `{k}`; its labels are {}", listed())));
                };
                mix[idx] += w;
            }
        }
        (None, None) if num_labels == 1 => mix[0] = 1.0,
        (None, None) => {
            return Err((
                "model",
                format!(
                    "{}: the head has {num_labels} labels ({}); say which one is `reward_{}` with `label:`, or mix them with `labels: {{label: weight}}`",
                    dir.display(),
                    listed(),
                    m.name
                ),
            ))
        }
    }
    Ok(Head { labels, mix })
}

/// The head of reward model entry `m`: from its directory, or for a server
/// from its `tokenizer:` directory's config.json (labels only; the weights
/// are on the server), else one label.
pub(super) fn head_of(remote: Option<&Arc<RemoteModel>>, dir: &Path, m: &RewardModel) -> std::result::Result<Head, (&'static str, String)> {
    let Some(rm) = remote else { return resolve_head(dir, m, true) };
    match &rm.tokenizer {
        Some(t) if t.join("config.json").is_file() => resolve_head(t, m, false),
        _ if m.label.is_some() || m.labels.is_some() => Err((
            "label",
            format!(
                "model `{}`: the labels of a served reward model come from its `tokenizer:` directory's config.json; add `tokenizer:`",
                rm.name
            ),
        )),
        _ => Ok(Head { labels: vec!["0".into()], mix: vec![1.0] }),
    }
}

/// Shape of tensor `name` from the safetensors headers of a model directory
/// (8-byte little-endian header length, then a JSON header): no weights are read.
pub(super) fn tensor_shape(dir: &Path, name: &str) -> std::result::Result<Option<Vec<usize>>, String> {
    let files: Vec<PathBuf> = prefpipe_models::model::weight_files(dir).map_err(|e| e.to_string())?;
    for f in files {
        let bad = |what: String| format!("{}: not a safetensors file ({what})", f.display());
        let mut file = std::fs::File::open(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(bad(format!("a header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
        let header: Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        if let Some(t) = header.get(name) {
            let shape = t
                .get("shape")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect())
                .ok_or_else(|| bad(format!("`{name}` has no shape")))?;
            return Ok(Some(shape));
        }
    }
    Ok(None)
}
