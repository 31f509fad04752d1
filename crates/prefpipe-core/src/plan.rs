//! Spec → plan: typed stage configs, a checked DAG in run order, output
//! schemas, and content keys. Every problem is reported at once, located.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use std::sync::Arc;

use arrow::datatypes::SchemaRef;

use crate::error::{closest, Diagnostic, Error, Result};
use crate::remote::{RemoteModel, RemoteSpec};
use crate::spec::{PipelineSpec, StageSpec};
use crate::stage::{normalize, Arity, ConfigError, Mode, PlanCx, Producer, Stage, StageKind};

/// A pipeline resolved and checked, ready to run.
pub struct Plan {
    pub spec: PipelineSpec,
    /// Directory relative paths resolve against (the pipeline file's).
    pub base_dir: PathBuf,
    pub models: BTreeMap<String, PathBuf>,
    /// `models:` entries that are servers (DESIGN §11).
    pub remotes: BTreeMap<String, Arc<RemoteModel>>,
    /// Stages in run order (inputs before the stages that read them).
    pub stages: Vec<PlannedStage>,
}

pub struct PlannedStage {
    pub id: String,
    pub kind: String,
    /// Indices into [`Plan::stages`].
    pub inputs: Vec<usize>,
    pub input_ids: Vec<String>,
    pub stage: Box<dyn Stage>,
    pub mode: Mode,
    pub schema: SchemaRef,
    /// Content key: blake3 over kind, canonical config, file digests and input keys.
    pub key: String,
    /// Whether every prompt's rows sit in one chunk of the output.
    pub aligned: bool,
    /// Input columns the output does not carry, for `run.json` ([`Stage::dropped_columns`]).
    pub dropped_columns: Vec<String>,
    pub external: Option<PathBuf>,
}

impl Plan {
    pub fn index(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.id == id)
    }

    /// The stage and every stage it reads from, transitively.
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.stages.len()];
        let mut stack = vec![i];
        while let Some(j) = stack.pop() {
            if !std::mem::replace(&mut seen[j], true) {
                stack.extend(&self.stages[j].inputs);
            }
        }
        (0..self.stages.len()).filter(|&j| seen[j]).collect()
    }

    /// The stage and every stage that reads from it, transitively.
    pub fn descendants(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.stages.len()];
        seen[i] = true;
        for j in i + 1..self.stages.len() {
            if self.stages[j].inputs.iter().any(|&k| seen[k]) {
                seen[j] = true;
            }
        }
        (0..self.stages.len()).filter(|&j| seen[j]).collect()
    }

    /// A stage id that must exist (for --until/--force/--set).
    pub fn require(&self, id: &str, flag: &str) -> Result<usize> {
        self.index(id).ok_or_else(|| {
            let hint = closest(id, self.stages.iter().map(|s| s.id.as_str())).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
            Error::Input(format!("{flag} {id}: the pipeline has no stage `{id}`{hint}"))
        })
    }
}

/// Builds the plan; on failure every problem found, sorted by position.
pub fn build(spec: PipelineSpec, base_dir: &Path, registry: &[StageKind]) -> Result<Plan> {
    let file = spec.file.clone();
    let mut errs: Vec<Diagnostic> = Vec::new();
    let located = |s: &StageSpec, e: ConfigError| Diagnostic {
        // An unknown field points at its key, anything else at the value.
        location: if e.message.starts_with("unknown field") { s.config.locate_key(&e.path) } else { s.config.locate(&e.path) }
            .location(&file),
        stage: Some(s.id.clone()),
        message: e.message,
    };
    let at_node = |s: &StageSpec, n: &crate::yaml::Node, msg: String| Diagnostic {
        location: n.location(&file),
        stage: Some(s.id.clone()),
        message: msg,
    };

    let models: BTreeMap<String, PathBuf> = spec
        .models
        .iter()
        .map(|(k, (p, _))| {
            let p = Path::new(p);
            (k.clone(), if p.is_absolute() { p.to_path_buf() } else { base_dir.join(p) })
        })
        .collect();
    let remotes = remote_models(&spec, base_dir, &mut errs);

    // 1. Kinds and typed configs.
    let ids: HashMap<&str, usize> = spec.stages.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let mut built: Vec<Option<(Box<dyn Stage>, &StageKind)>> = Vec::new();
    for s in &spec.stages {
        let kind_node = s.node.get("kind").unwrap_or(&s.node);
        let Some(kind) = registry.iter().find(|k| k.name == s.kind) else {
            let hint = closest(&s.kind, registry.iter().map(|k| k.name)).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
            let all: Vec<&str> = registry.iter().map(|k| k.name).collect();
            errs.push(at_node(s, kind_node, format!("unknown stage kind `{}`{hint} (kinds: {})", s.kind, all.join(", "))));
            built.push(None);
            continue;
        };
        match (kind.arity, s.inputs.len()) {
            (Arity::None, 0) | (Arity::One, 1) | (Arity::Many, 1..) => {}
            (Arity::None, _) => {
                errs.push(at_node(s, s.node.get("input").unwrap_or(&s.node), format!("a `{}` stage reads no `input`", kind.name)))
            }
            (Arity::One, 0) | (Arity::Many, 0) => {
                errs.push(at_node(s, &s.node, format!("a `{}` stage needs an `input` (the id of the stage it reads)", kind.name)))
            }
            (Arity::One, _) => {
                errs.push(at_node(s, s.node.get("input").unwrap_or(&s.node), format!("a `{}` stage reads exactly one `input`", kind.name)))
            }
        }
        let bad = non_finite(&s.config, &file);
        if !bad.is_empty() {
            errs.extend(bad.into_iter().map(|(location, message)| Diagnostic { location, stage: Some(s.id.clone()), message }));
            built.push(None);
            continue;
        }
        match (kind.build)(&s.config.to_json()) {
            Ok(stage) => built.push(Some((stage, kind))),
            Err(es) => {
                errs.extend(es.into_iter().map(|e| located(s, e)));
                built.push(None);
            }
        }
    }

    // 2. Input references and cycles.
    let mut deps: Vec<Vec<usize>> = Vec::new();
    for s in &spec.stages {
        let mut d = Vec::new();
        for (input, node) in &s.inputs {
            match ids.get(input.as_str()) {
                Some(_) if input == &s.id => errs.push(at_node(s, node, format!("stage `{}` reads itself", s.id))),
                Some(&j) => d.push(j),
                None => {
                    let hint = closest(input, ids.keys().copied()).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
                    errs.push(at_node(s, node, format!("`input` names no stage: `{input}`{hint}")));
                }
            }
        }
        deps.push(d);
    }
    let order = match topo_order(&deps) {
        Ok(o) => o,
        Err(cycle) => {
            let names: Vec<&str> = cycle.iter().map(|&i| spec.stages[i].id.as_str()).collect();
            let s = &spec.stages[cycle[0]];
            errs.push(at_node(
                s,
                s.node.get("input").unwrap_or(&s.node),
                format!("the stages form a cycle: {} → {}", names.join(" → "), names[0]),
            ));
            Vec::new()
        }
    };

    // Model directories written by stages (train checkpoints), so that stages
    // reading them plan against the writer rather than the disk.
    let mut produced: BTreeMap<PathBuf, Producer> = BTreeMap::new();
    for (s, b) in spec.stages.iter().zip(&built) {
        let Some((stage, _)) = b else { continue };
        let input_ids: Vec<String> = s.inputs.iter().map(|(id, _)| id.clone()).collect();
        let none = BTreeMap::new();
        let cx = PlanCx { base_dir, models: &models, remotes: &remotes, input_ids: &input_ids, produced: &none };
        if let Some(dir) = stage.model_output(&cx) {
            produced.insert(normalize(&dir), Producer { stage: s.id.clone(), key: None });
        }
    }

    // 3. Schemas and keys, in run order; skip stages whose inputs failed.
    let mut planned: Vec<Option<PlannedStage>> = (0..spec.stages.len()).map(|_| None).collect();
    let mut built = built;
    for &i in &order {
        let s = &spec.stages[i];
        let Some((stage, kind)) = built[i].take() else { continue };
        // An input that names no stage has no dep (its error is reported): skip
        // the stage rather than plan it with fewer inputs than it declares.
        if deps[i].len() != s.inputs.len() || deps[i].iter().any(|&j| planned[j].is_none()) {
            continue;
        }
        let input_ids: Vec<String> = s.inputs.iter().map(|(id, _)| id.clone()).collect();
        let cx = PlanCx { base_dir, models: &models, remotes: &remotes, input_ids: &input_ids, produced: &produced };
        let in_schemas: Vec<SchemaRef> = deps[i].iter().map(|&j| planned[j].as_ref().unwrap().schema.clone()).collect();
        let schema = match stage.plan(&cx, &in_schemas) {
            Ok(s) => s,
            Err(es) => {
                errs.extend(es.into_iter().map(|e| located(s, e)));
                continue;
            }
        };
        let fingerprint_res = stage.fingerprint(&cx);
        let external = stage.external_output(&cx);
        let fingerprint = match fingerprint_res {
            Ok(f) => f,
            Err(e) => {
                errs.push(located(s, e));
                continue;
            }
        };
        let mut h = blake3::Hasher::new();
        h.update(b"prefpipe/stage/v1\0");
        for part in [kind.name, s.id.as_str(), &stage.config().to_string(), &spec.seed.to_string(), &spec.chunk_size.to_string()] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        h.update(&fingerprint);
        for &j in &deps[i] {
            h.update(planned[j].as_ref().unwrap().key.as_bytes());
        }
        let input_aligned = deps[i].iter().all(|&j| planned[j].as_ref().unwrap().aligned);
        let mode = stage.mode();
        let key = h.finalize().to_hex().to_string();
        let dropped_columns = stage.dropped_columns(&in_schemas, &schema);
        let written = stage.model_output(&cx);
        if let Some(dir) = written {
            produced.insert(normalize(&dir), Producer { stage: s.id.clone(), key: Some(key.clone()) });
        }
        planned[i] = Some(PlannedStage {
            id: s.id.clone(),
            kind: kind.name.to_string(),
            inputs: deps[i].clone(),
            input_ids: input_ids.clone(),
            mode,
            schema,
            key,
            aligned: stage.output_aligned(input_aligned),
            dropped_columns,
            external,
            stage,
        });
    }
    if !errs.is_empty() {
        errs.sort();
        errs.dedup();
        return Err(Error::Invalid(errs));
    }
    // Re-index into run order.
    let pos: HashMap<usize, usize> = order.iter().enumerate().map(|(p, &i)| (i, p)).collect();
    let mut stages = Vec::new();
    for &i in &order {
        let mut p = planned[i].take().expect("planned");
        p.inputs = p.inputs.iter().map(|j| pos[j]).collect();
        stages.push(p);
    }
    Ok(Plan { spec, base_dir: base_dir.to_path_buf(), models, remotes, stages })
}

/// The `models:` entries that name servers, typed and checked (URLs, the
/// environment variables they name); problems are located inside the entry.
fn remote_models(spec: &PipelineSpec, base_dir: &Path, errs: &mut Vec<Diagnostic>) -> BTreeMap<String, Arc<RemoteModel>> {
    let mut out = BTreeMap::new();
    for (name, node) in &spec.remotes {
        let located = |e: crate::stage::ConfigError| Diagnostic {
            location: if e.message.starts_with("unknown field") { node.locate_key(&e.path) } else { node.locate(&e.path) }
                .location(&spec.file),
            stage: None,
            message: format!("model `{name}`: {}", e.message),
        };
        // A broken entry stays a server (not a path) so stages report nothing more about it.
        let broken = || {
            let spec: RemoteSpec = serde_json::from_value(serde_json::json!({"backend": "openai"})).expect("a minimal spec");
            Arc::new(RemoteModel { name: name.clone(), spec, tokenizer: None, invalid: true })
        };
        let bad = non_finite(node, &spec.file);
        if !bad.is_empty() {
            errs.extend(bad.into_iter().map(|(location, m)| Diagnostic { location, stage: None, message: format!("model `{name}`: {m}") }));
            out.insert(name.clone(), broken());
            continue;
        }
        let rs: RemoteSpec = match crate::stage::from_config(&node.to_json()) {
            Ok(r) => r,
            Err(es) => {
                errs.extend(es.into_iter().map(located));
                out.insert(name.clone(), broken());
                continue;
            }
        };
        let problems = rs.validate();
        if !problems.is_empty() {
            errs.extend(problems.into_iter().map(located));
            out.insert(name.clone(), broken());
            continue;
        }
        let tokenizer = rs.tokenizer.as_deref().map(|t| crate::stage::resolve(base_dir, t));
        out.insert(name.clone(), Arc::new(RemoteModel { name: name.clone(), spec: rs, tokenizer, invalid: false }));
    }
    out
}

/// Each `.nan`/`.inf` under `node` (a stage config or a server entry): its
/// location and a message naming the key. JSON has no such numbers, and
/// [`crate::yaml::Node::to_json`] would make them null, which a typed config
/// reads as "not given" (`min_margin: .nan` would keep every pair); no
/// setting takes one.
fn non_finite(node: &crate::yaml::Node, file: &str) -> Vec<(crate::error::Location, String)> {
    node.non_finite()
        .into_iter()
        .map(|(path, n)| {
            let v = match n.value {
                crate::yaml::Value::Float(f) => crate::yaml::yaml_float(f),
                _ => String::new(),
            };
            (n.location(file), format!("`{}` is {v}; numbers in a pipeline must be finite", crate::yaml::path_string(&path)))
        })
        .collect()
}

/// Kahn's algorithm, ties by file order; Err(a cycle) if there is one.
fn topo_order(deps: &[Vec<usize>]) -> std::result::Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut indeg: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut out = Vec::with_capacity(n);
    let mut done = vec![false; n];
    while let Some(i) = (0..n).find(|&i| !done[i] && indeg[i] == 0) {
        done[i] = true;
        out.push(i);
        for (j, d) in deps.iter().enumerate() {
            indeg[j] -= d.iter().filter(|&&k| k == i).count();
        }
    }
    if out.len() == n {
        return Ok(out);
    }
    // Walk dependencies from a blocked stage until one repeats: that's a cycle.
    let start = (0..n).find(|&i| !done[i]).expect("a blocked stage");
    let mut path = vec![start];
    let mut cur = start;
    loop {
        let next = *deps[cur].iter().find(|&&k| !done[k]).expect("blocked stages have blocked deps");
        if let Some(p) = path.iter().position(|&x| x == next) {
            let mut cycle = path[p..].to_vec();
            cycle.reverse();
            return Err(cycle);
        }
        path.push(next);
        cur = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_lexically() {
        assert_eq!(normalize(Path::new("/a/b/./../c/")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("pipelines/../out/./m")), PathBuf::from("out/m"));
        assert_eq!(normalize(Path::new("../out")), PathBuf::from("../out"));
    }

    #[test]
    fn topo_orders_and_finds_cycles() {
        assert_eq!(topo_order(&[vec![], vec![0], vec![1]]), Ok(vec![0, 1, 2]));
        assert_eq!(topo_order(&[vec![1], vec![]]), Ok(vec![1, 0]));
        let c = topo_order(&[vec![], vec![2], vec![1]]).unwrap_err();
        assert_eq!(c.len(), 2);
    }
}
