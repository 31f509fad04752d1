//! The pipeline as written: YAML → [`PipelineSpec`], with every problem
//! collected (not just the first) and located by line:col.
//!
//! Only shapes are checked here; stage configs are typed and checked by
//! [`crate::plan`], which needs the registry.

use std::collections::{BTreeMap, HashSet};

use crate::error::{closest, Diagnostic, Error, Location, Result};
use crate::yaml::{self, Node, Value};

/// Default prompts per chunk (DESIGN §2).
pub const DEFAULT_CHUNK_SIZE: usize = 256;

const TOP_KEYS: &[&str] = &["name", "seed", "chunk_size", "models", "stages"];

/// A pipeline file as written.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// The file name used in error messages.
    pub file: String,
    pub name: String,
    /// The pipeline seed (default 0).
    pub seed: u64,
    /// Prompts per chunk (default 256).
    pub chunk_size: usize,
    /// `models:` name → path as written, with the value's node.
    pub models: BTreeMap<String, (String, Node)>,
    /// `models:` entries that name a server (a mapping, DESIGN §11), checked by the plan.
    pub remotes: BTreeMap<String, Node>,
    pub stages: Vec<StageSpec>,
    /// blake3 of the file's bytes (for run.json).
    pub text_hash: String,
}

/// One entry of `stages:`.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub id: String,
    pub kind: String,
    /// `input:` ids, with their nodes (for positions).
    pub inputs: Vec<(String, Node)>,
    /// The stage's mapping without `id`, `kind` and `input`.
    pub config: Node,
    /// The whole stage mapping.
    pub node: Node,
}

impl StageSpec {
    pub fn location(&self, file: &str) -> Location {
        self.node.location(file)
    }
}

/// Reads and parses a pipeline file.
pub fn load(path: &std::path::Path) -> Result<PipelineSpec> {
    let bytes = std::fs::read(path).map_err(|e| Error::Input(format!("{}: cannot read pipeline: {e}", path.display())))?;
    parse(&path.display().to_string(), &bytes, default_name(path))
}

fn default_name(path: &std::path::Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into())
}

/// Parses pipeline bytes; `file` names the source in messages.
pub fn parse(file: &str, bytes: &[u8], default_name: String) -> Result<PipelineSpec> {
    let diag = |line, col, msg: String| Diagnostic { location: Location { file: file.to_string(), line, col }, stage: None, message: msg };
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let upto = &bytes[..e.valid_up_to()];
            let line = upto.iter().filter(|b| **b == b'\n').count() as u64 + 1;
            return Err(Error::Invalid(vec![diag(line, 0, format!("not a YAML text file: invalid UTF-8 at byte {}", e.valid_up_to()))]));
        }
    };
    if text.contains('\0') {
        return Err(Error::Invalid(vec![diag(0, 0, "not a YAML text file: it contains NUL bytes".into())]));
    }
    let root = yaml::parse(file, text).map_err(|d| Error::Invalid(vec![d]))?;
    let mut errs = Vec::new();
    let spec = from_node(file, &root, default_name, &mut errs);
    if !errs.is_empty() {
        errs.sort();
        return Err(Error::Invalid(errs));
    }
    let mut spec = spec.expect("spec exists when there are no errors");
    spec.text_hash = blake3::hash(bytes).to_hex().to_string();
    Ok(spec)
}

fn from_node(file: &str, root: &Node, default_name: String, errs: &mut Vec<Diagnostic>) -> Option<PipelineSpec> {
    let at = |n: &Node, stage: Option<&str>, msg: String| Diagnostic {
        location: n.location(file),
        stage: stage.map(str::to_string),
        message: msg,
    };
    let Some(map) = root.as_map() else {
        errs.push(at(
            root,
            None,
            format!("a pipeline is a mapping with `name`, `seed`, `models` and `stages`; found {}", root.type_name()),
        ));
        return None;
    };
    for (k, _) in map {
        let key = k.as_str().unwrap_or("");
        if !TOP_KEYS.contains(&key) {
            let hint = closest(key, TOP_KEYS.iter().copied()).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
            errs.push(at(k, None, format!("unknown top-level key `{key}`{hint} (expected one of: {})", TOP_KEYS.join(", "))));
        }
    }
    let name = match root.get("name") {
        None => default_name,
        Some(n) => match n.as_str() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => {
                errs.push(at(n, None, "`name` must be a non-empty string".into()));
                String::new()
            }
        },
    };
    let seed = match root.get("seed") {
        None => 0,
        Some(n) => match n.value {
            Value::Int(i) if i >= 0 => i as u64,
            _ => {
                errs.push(at(n, None, format!("`seed` must be a non-negative integer; found {}", n.type_name())));
                0
            }
        },
    };
    let chunk_size = match root.get("chunk_size") {
        None => DEFAULT_CHUNK_SIZE,
        Some(n) => match n.value {
            Value::Int(i) if i > 0 => i as usize,
            _ => {
                errs.push(at(n, None, "`chunk_size` must be a positive integer (prompts per chunk)".into()));
                DEFAULT_CHUNK_SIZE
            }
        },
    };
    let mut models = BTreeMap::new();
    let mut remotes = BTreeMap::new();
    if let Some(m) = root.get("models") {
        match m.as_map() {
            Some(entries) => {
                for (k, v) in entries {
                    match (k.as_str(), v.as_str()) {
                        (Some(k), Some(p)) => {
                            models.insert(k.to_string(), (p.to_string(), v.clone()));
                        }
                        (Some(k), None) if v.as_map().is_some() => {
                            remotes.insert(k.to_string(), v.clone());
                        }
                        _ => errs.push(at(
                            v,
                            None,
                            "`models` maps a name to a model directory or file path (a string), or to a server (a mapping with `backend: openai`)"
                                .into(),
                        )),
                    }
                }
            }
            None if matches!(m.value, Value::Null) => {}
            None => errs.push(at(m, None, "`models` must be a mapping of name → path".into())),
        }
    }
    let mut stages = Vec::new();
    match root.get("stages") {
        None => errs.push(at(root, None, "the pipeline has no `stages`".into())),
        Some(n) => match &n.value {
            Value::Seq(items) if items.is_empty() => {
                errs.push(at(n, None, "`stages` is empty: a pipeline needs at least one stage".into()))
            }
            Value::Seq(items) => {
                let mut seen = HashSet::new();
                for item in items {
                    if let Some(s) = stage_from_node(file, item, errs) {
                        if !seen.insert(s.id.clone()) {
                            let id_node = item.get("id").unwrap_or(item);
                            errs.push(at(id_node, Some(&s.id), format!("duplicate stage id `{}`", s.id)));
                        }
                        stages.push(s);
                    }
                }
            }
            Value::Null => errs.push(at(n, None, "`stages` is empty: a pipeline needs at least one stage".into())),
            _ => errs.push(at(n, None, format!("`stages` must be a list; found {}", n.type_name()))),
        },
    }
    Some(PipelineSpec { file: file.to_string(), name, seed, chunk_size, models, remotes, stages, text_hash: String::new() })
}

fn stage_from_node(file: &str, item: &Node, errs: &mut Vec<Diagnostic>) -> Option<StageSpec> {
    let at = |n: &Node, stage: Option<&str>, msg: String| Diagnostic {
        location: n.location(file),
        stage: stage.map(str::to_string),
        message: msg,
    };
    let Some(map) = item.as_map() else {
        errs.push(at(item, None, format!("a stage is a mapping with `id` and `kind`; found {}", item.type_name())));
        return None;
    };
    let id = match item.get("id") {
        Some(n) => match n.as_str() {
            Some(s) if valid_id(s) => Some(s.to_string()),
            _ => {
                errs.push(at(n, None, "a stage `id` is a name of letters, digits, `_` and `-` that starts with a letter".into()));
                None
            }
        },
        None => {
            errs.push(at(item, None, "this stage has no `id`".into()));
            None
        }
    };
    let kind = match item.get("kind") {
        Some(n) => match n.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                errs.push(at(n, id.as_deref(), "`kind` must be a string".into()));
                None
            }
        },
        None => {
            errs.push(at(item, id.as_deref(), "this stage has no `kind`".into()));
            None
        }
    };
    let mut inputs = Vec::new();
    if let Some(n) = item.get("input") {
        match &n.value {
            Value::Str(s) => inputs.push((s.clone(), n.clone())),
            Value::Seq(v) => {
                for x in v {
                    match x.as_str() {
                        Some(s) => inputs.push((s.to_string(), x.clone())),
                        None => errs.push(at(x, id.as_deref(), "`input` lists stage ids (strings)".into())),
                    }
                }
            }
            _ => errs.push(at(n, id.as_deref(), "`input` is a stage id or a list of stage ids".into())),
        }
    }
    let rest: Vec<(Node, Node)> = map.iter().filter(|(k, _)| !matches!(k.as_str(), Some("id" | "kind" | "input"))).cloned().collect();
    let config = Node { line: item.line, col: item.col, value: Value::Map(rest) };
    Some(StageSpec { id: id?, kind: kind?, inputs, config, node: item.clone() })
}

fn valid_id(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic()) && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl PipelineSpec {
    /// Applies `--set STAGE.KEY=VALUE` (KEY may be dotted for nested maps).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let bad = || Error::Input(format!("--set {assignment}: expected STAGE.KEY=VALUE"));
        let (lhs, value) = assignment.split_once('=').ok_or_else(bad)?;
        let (stage, key) = lhs.split_once('.').ok_or_else(bad)?;
        let Some(s) = self.stages.iter_mut().find(|s| s.id == stage) else {
            let hint =
                closest(stage, self.stages.iter().map(|s| s.id.as_str())).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
            return Err(Error::Input(format!("--set {assignment}: no stage `{stage}`{hint}")));
        };
        if matches!(key, "id" | "kind" | "input") {
            return Err(Error::Input(format!("--set {assignment}: `{key}` cannot be overridden")));
        }
        let mut node = &mut s.config;
        let parts: Vec<&str> = key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Value::Map(m) = &mut node.value else {
                return Err(Error::Input(format!("--set {assignment}: `{}` is not a mapping", parts[..i].join("."))));
            };
            let pos = match m.iter().position(|(k, _)| k.as_str() == Some(part)) {
                Some(p) => p,
                None => {
                    let empty = if i + 1 == parts.len() { Value::Null } else { Value::Map(Vec::new()) };
                    m.push((Node::new(Value::Str(part.to_string())), Node::new(empty)));
                    m.len() - 1
                }
            };
            node = &mut m[pos].1;
        }
        *node = yaml::parse_scalar(value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse("p.yaml", text.as_bytes(), "p".into()) {
            Err(Error::Invalid(d)) => d.iter().map(|d| d.to_string()).collect(),
            other => panic!("expected errors, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_pipeline() {
        let s = parse(
            "p.yaml",
            b"name: q\nseed: 3\nstages:\n  - id: src\n    kind: source\n    path: a.jsonl\n  - id: sel\n    kind: select\n    input: src\n    strategy: max_min\n",
            "p".into(),
        )
        .unwrap();
        assert_eq!(s.name, "q");
        assert_eq!(s.seed, 3);
        assert_eq!(s.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(s.stages.len(), 2);
        assert_eq!(s.stages[1].inputs[0].0, "src");
        assert!(s.stages[1].config.get("strategy").is_some());
        assert!(s.stages[1].config.get("id").is_none());
    }

    #[test]
    fn reports_every_problem_with_positions() {
        let e = errors("nmae: x\nseed: -1\nstages:\n  - id: a\n    kind: source\n  - id: a\n    kind: source\n  - kind: x\n");
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0].starts_with("p.yaml:1:1: unknown top-level key `nmae`; did you mean `name`?"), "{e:?}");
        assert!(e[1].starts_with("p.yaml:2:7: `seed`"), "{e:?}");
        assert!(e.iter().any(|m| m.contains("duplicate stage id `a`") && m.starts_with("p.yaml:6:")), "{e:?}");
        assert!(e.iter().any(|m| m.contains("no `id`") && m.starts_with("p.yaml:8:")), "{e:?}");
    }

    #[test]
    fn empty_and_garbage_are_rejected() {
        assert!(errors("name: x\nstages: []\n")[0].contains("`stages` is empty"));
        assert!(errors("name: x\n")[0].contains("no `stages`"));
        let garbage: Vec<u8> = vec![0x89, b'P', b'N', b'G', 0, 0xff, 0xfe];
        let Err(Error::Invalid(d)) = parse("g.yaml", &garbage, "g".into()) else { panic!() };
        assert!(d[0].message.contains("not a YAML text file"));
        assert!(errors("- just\n- a list\n")[0].contains("a pipeline is a mapping"));
    }

    #[test]
    fn set_overrides_values() {
        let mut s = parse("p.yaml", b"stages:\n  - id: sel\n    kind: select\n    strategy: max_min\n", "p".into()).unwrap();
        s.set("sel.strategy=reward_points").unwrap();
        s.set("sel.ddof=1").unwrap();
        assert_eq!(s.stages[0].config.get("strategy").unwrap().as_str(), Some("reward_points"));
        assert_eq!(s.stages[0].config.get("ddof").unwrap().value, Value::Int(1));
        assert!(s.set("nope.x=1").is_err());
        assert!(s.set("sel.id=x").is_err());
        assert!(s.set("garbage").is_err());
    }
}
