//! How a run's tables were made, for the dataset card and `prefpipe report`
//! (DESIGN §14): the stages with their strategies and counts, the models by
//! directory or served name with digests, the seeds, the pipeline hash.
//! Read from the plan and the store's manifests only, so it is the same
//! whether a stage ran or was cached.

use std::collections::BTreeMap;

use prefpipe_core::plan::Plan;
use prefpipe_core::stage::resolve_model;
use prefpipe_core::store::Store;
use prefpipe_core::Result;

/// One stage of the lineage.
#[derive(Debug, Clone)]
pub struct StageLine {
    pub id: String,
    pub kind: String,
    pub inputs: Vec<String>,
    pub key: String,
    /// `strategy:` of a select/filter stage, `method:` of a train stage.
    pub strategy: Option<String>,
    /// What the strategy is and the paper it follows (the registry's `about`).
    pub about: Option<String>,
    /// The stage's `seed:` where it has one.
    pub seed: Option<u64>,
    /// From the stage's manifest; `None` when the stage has not finished.
    pub counts: Option<Counts>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    pub rows_in: u64,
    pub rows_out: u64,
    pub drops: BTreeMap<String, u64>,
}

/// One model a stage reads.
#[derive(Debug, Clone)]
pub struct ModelLine {
    /// The `model:` value as written (a `models:` name or a path).
    pub name: String,
    /// The directory or file name (local), or the served model name (remote).
    pub shown: String,
    pub remote: bool,
    /// blake3 of the local model's files (as in the stage keys); `None` for
    /// a server or a model that is not on disk.
    pub digest: Option<String>,
    /// (stage id, YAML field) pairs that read it.
    pub used_by: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Lineage {
    pub pipeline: String,
    pub file: String,
    pub pipeline_hash: String,
    pub prefpipe_version: String,
    pub seed: u64,
    pub chunk_size: usize,
    pub stages: Vec<StageLine>,
    pub models: Vec<ModelLine>,
}

/// The lineage of the stages `which` (indices into the plan, run order).
pub fn lineage(plan: &Plan, store: &Store, which: &[usize]) -> Result<Lineage> {
    let mut stages = Vec::new();
    let mut models: Vec<ModelLine> = Vec::new();
    for &i in which {
        let s = &plan.stages[i];
        let config = s.stage.config();
        let counts = match store.manifest(&s.id, &s.key)? {
            Some(m) if m.complete => Some(Counts { rows_in: m.rows_in(), rows_out: m.rows_out(), drops: m.drops() }),
            _ => None,
        };
        let strategy = config.get("strategy").or_else(|| if s.kind == "train" { config.get("method") } else { None });
        let strategy = strategy.and_then(|v| v.as_str()).map(str::to_string);
        let about = strategy.as_deref().and_then(|name| match s.kind.as_str() {
            "select" => prefpipe_select::SELECT.iter().find(|k| k.name == name).map(|k| k.about.to_string()),
            "filter" if name == prefpipe_select::ches::NAME => Some(prefpipe_select::ches::ABOUT.to_string()),
            "filter" => prefpipe_select::FILTER.iter().find(|k| k.name == name).map(|k| k.about.to_string()),
            _ => None,
        });
        stages.push(StageLine {
            id: s.id.clone(),
            kind: s.kind.clone(),
            inputs: s.input_ids.clone(),
            key: s.key.clone(),
            strategy,
            about,
            seed: config.get("seed").and_then(|v| v.as_u64()),
            counts,
        });
        let mut refs = Vec::new();
        model_refs(&config, "", &mut refs);
        for (field, value) in refs {
            if let Some(m) = models.iter_mut().find(|m| m.name == value) {
                m.used_by.push((s.id.clone(), field));
                continue;
            }
            let line = match plan.remotes.get(&value) {
                Some(r) => ModelLine { name: value.clone(), shown: r.spec.model.clone(), remote: true, digest: None, used_by: Vec::new() },
                None => {
                    let path = resolve_model(&plan.base_dir, &plan.models, &value);
                    let shown = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| value.clone());
                    let digest = if path.exists() { prefpipe_models::model_digest(&path).ok() } else { None };
                    ModelLine { name: value.clone(), shown, remote: false, digest, used_by: Vec::new() }
                }
            };
            models.push(ModelLine { used_by: vec![(s.id.clone(), field)], ..line });
        }
    }
    Ok(Lineage {
        pipeline: plan.spec.name.clone(),
        file: plan.spec.file.clone(),
        pipeline_hash: plan.spec.text_hash.clone(),
        prefpipe_version: env!("CARGO_PKG_VERSION").to_string(),
        seed: plan.spec.seed,
        chunk_size: plan.spec.chunk_size,
        stages,
        models,
    })
}

/// The `model` / `reference` string values of a stage config, with their
/// dotted field paths (`reward_models.0.model`).
fn model_refs(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    let join = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
    match v {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                match v {
                    serde_json::Value::String(s) if k == "model" || k == "reference" => out.push((join(k), s.clone())),
                    _ => model_refs(v, &join(k), out),
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                model_refs(v, &join(&i.to_string()), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_fields_are_found_at_any_depth() {
        let v = serde_json::json!({"model": "policy", "reference": "ref", "output": "ckpt",
            "reward_models": [{"name": "rm", "model": "../models/rm", "weight": 1.0}], "prompt": "model"});
        let mut out = Vec::new();
        model_refs(&v, "", &mut out);
        out.sort();
        assert_eq!(
            out,
            [
                ("model".to_string(), "policy".to_string()),
                ("reference".to_string(), "ref".to_string()),
                ("reward_models.0.model".to_string(), "../models/rm".to_string())
            ]
        );
    }
}
