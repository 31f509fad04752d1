//! YAML → a tree of nodes that remember their line and column.
//!
//! This is the one place that knows the YAML crate (serde-saphyr). Everything
//! downstream works on [`Node`]s, so every later error can point at the line
//! and column of the value it is about.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::{Diagnostic, Location};

/// A YAML value with its position (1-based line and column; 0 = unknown).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub line: u64,
    pub col: u64,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys keep their own positions; order is the file's order.
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub fn new(value: Value) -> Self {
        Node { line: 0, col: 0, value }
    }

    pub fn location(&self, file: &str) -> Location {
        Location { file: file.to_string(), line: self.line, col: self.col }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The value under a string key of a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// The key node of a mapping entry (for "unknown field" positions).
    pub fn key(&self, key: &str) -> Option<&Node> {
        self.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(k, _)| k)
    }

    /// Short name of the node's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Converts to JSON (for typed deserialization and canonical hashing).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(v) => J::Array(v.iter().map(Node::to_json).collect()),
            Value::Map(m) => J::Object(m.iter().map(|(k, v)| (k.key_string(), v.to_json())).collect()),
        }
    }

    fn key_string(&self) -> String {
        match &self.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Float(f) => f.to_string(),
            _ => String::new(),
        }
    }

    /// The deepest node along a JSON-style path (`a.b[2].c`), for locating
    /// typed-deserialization errors. Stops at the last node that exists.
    pub fn locate(&self, path: &[PathSeg]) -> &Node {
        let mut node = self;
        for seg in path {
            let next = match (seg, &node.value) {
                (PathSeg::Key(k), Value::Map(m)) => m.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(key, v)| {
                    if matches!(v.value, Value::Null) && v.line == 0 {
                        key
                    } else {
                        v
                    }
                }),
                (PathSeg::Index(i), Value::Seq(v)) => v.get(*i),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node
    }
}

impl Node {
    /// Every `.nan`, `.inf` and `-.inf` under this node, with its path. JSON
    /// has no such numbers ([`Node::to_json`] turns them into null, which a
    /// typed config reads as "not given"), so the plan rejects them.
    pub fn non_finite(&self) -> Vec<(Vec<PathSeg>, &Node)> {
        fn walk<'a>(n: &'a Node, path: &mut Vec<PathSeg>, out: &mut Vec<(Vec<PathSeg>, &'a Node)>) {
            match &n.value {
                Value::Float(f) if !f.is_finite() => out.push((path.clone(), n)),
                Value::Seq(v) => {
                    for (i, x) in v.iter().enumerate() {
                        path.push(PathSeg::Index(i));
                        walk(x, path, out);
                        path.pop();
                    }
                }
                Value::Map(m) => {
                    for (k, v) in m {
                        path.push(PathSeg::Key(k.key_string()));
                        walk(v, path, out);
                        path.pop();
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(self, &mut Vec::new(), &mut out);
        out
    }

    /// Like [`Node::locate`], but for a path ending in a mapping key, the key's node.
    pub fn locate_key(&self, path: &[PathSeg]) -> &Node {
        let Some((PathSeg::Key(k), parent)) = path.split_last() else { return self.locate(path) };
        let p = self.locate(parent);
        p.key(k).unwrap_or(p)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// A path as a user writes it: `band[0]`, `reward_models[1].weight`.
pub fn path_string(path: &[PathSeg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) if s.is_empty() => s.push_str(k),
            PathSeg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            PathSeg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// A non-finite float as YAML spells it.
pub fn yaml_float(f: f64) -> String {
    if f.is_nan() {
        ".nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { ".inf" } else { "-.inf" }.into()
    } else {
        f.to_string()
    }
}

/// Parses YAML text. A syntax error becomes one diagnostic with its line:col.
pub fn parse(file: &str, text: &str) -> Result<Node, Diagnostic> {
    match serde_saphyr::from_str_with_options::<Node>(text, options()) {
        Ok(n) => Ok(n),
        Err(e) => {
            let (line, col) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
            let msg = one_line(&e.without_snippet().to_string());
            Err(Diagnostic {
                location: Location { file: file.to_string(), line, col },
                stage: None,
                message: format!("invalid YAML: {msg}"),
            })
        }
    }
}

/// Parses a `--set` value the way YAML would read it (numbers, bools, strings, lists).
pub fn parse_scalar(text: &str) -> Node {
    match serde_saphyr::from_str_with_options::<Node>(text, options()) {
        Ok(n) if !matches!(n.value, Value::Null) || text.trim() == "null" || text.trim() == "~" => strip_positions(n),
        _ => Node::new(Value::Str(text.to_string())),
    }
}

fn strip_positions(mut n: Node) -> Node {
    n.line = 0;
    n.col = 0;
    n.value = match n.value {
        Value::Seq(v) => Value::Seq(v.into_iter().map(strip_positions).collect()),
        Value::Map(m) => Value::Map(m.into_iter().map(|(k, v)| (strip_positions(k), strip_positions(v))).collect()),
        v => v,
    };
    n
}

/// YAML 1.2 booleans only: `n`, `no`, `y`, `off` stay strings (a key named
/// `n` — samples per prompt — must not turn into `false`). `.nan`, `.inf`
/// and overflowing numbers (`1e999`) are read as floats, so the plan can
/// reject each one naming its key ([`Node::non_finite`]) instead of the
/// parser stopping at the first with a message that names none.
fn options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.strict_booleans = true;
    o.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    o
}

/// Parser messages can span lines (and may repeat the position); keep the first line.
fn one_line(s: &str) -> String {
    let first = s.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    first.to_string()
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let sp = serde_saphyr::Spanned::<Value>::deserialize(d)?;
        Ok(Node { line: sp.referenced.line(), col: sp.referenced.column(), value: sp.value })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map(Value::Int).unwrap_or(Value::Float(v as f64)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            out.push(n);
        }
        Ok(Value::Seq(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out: Vec<(Node, Node)> = Vec::new();
        while let Some(k) = map.next_key::<Node>()? {
            let v = map.next_value::<Node>()?;
            out.push((k, v));
        }
        Ok(Value::Map(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_remember_positions() {
        let n = parse("p.yaml", "name: x\nstages:\n  - id: a\n    kind: source\n").unwrap();
        let stages = n.get("stages").unwrap();
        let Value::Seq(items) = &stages.value else { panic!("not a list") };
        let kind = items[0].get("kind").unwrap();
        assert_eq!(kind.as_str(), Some("source"));
        assert_eq!((kind.line, kind.col), (4, 11));
        assert_eq!(n.key("stages").map(|k| k.line), Some(2));
    }

    #[test]
    fn syntax_errors_have_line_and_col() {
        let e = parse("p.yaml", "name: x\nstages: [a, b\n").unwrap_err();
        assert!(e.location.line >= 2, "{e}");
        assert!(e.message.starts_with("invalid YAML"), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn locate_follows_paths() {
        let n = parse("p.yaml", "a:\n  b: [1, 2, {c: 3}]\n").unwrap();
        let path = [PathSeg::Key("a".into()), PathSeg::Key("b".into()), PathSeg::Index(2), PathSeg::Key("c".into())];
        let c = n.locate(&path);
        assert_eq!(c.value, Value::Int(3));
        assert_eq!(c.line, 2);
    }

    #[test]
    fn non_finite_numbers_are_found_with_their_paths() {
        let n = parse("p.yaml", "a: .nan\nband: [1, -.inf]\nok: 0.5\nm: {x: 1e999, y: .NaN}\n").unwrap();
        let found: Vec<(String, u64, u64, String)> = n
            .non_finite()
            .into_iter()
            .map(|(p, v)| {
                let Value::Float(f) = v.value else { panic!("{v:?}") };
                (path_string(&p), v.line, v.col, yaml_float(f))
            })
            .collect();
        let want = [("a", 1, 4, ".nan"), ("band[1]", 2, 11, "-.inf"), ("m.x", 4, 8, ".inf"), ("m.y", 4, 18, ".nan")];
        let want: Vec<(String, u64, u64, String)> = want.iter().map(|(p, l, c, v)| (p.to_string(), *l, *c, v.to_string())).collect();
        assert_eq!(found, want);
        // What JSON would have made of them: null.
        assert_eq!(n.to_json()["a"], serde_json::Value::Null);
        assert_eq!(parse_scalar(".nan").non_finite().len(), 1);
    }

    #[test]
    fn scalars_parse_like_yaml() {
        assert_eq!(parse_scalar("0.5").value, Value::Float(0.5));
        assert_eq!(parse_scalar("7").value, Value::Int(7));
        assert_eq!(parse_scalar("true").value, Value::Bool(true));
        assert_eq!(parse_scalar("mu-2sigma").value, Value::Str("mu-2sigma".into()));
        // YAML 1.1 booleans are strings here.
        assert_eq!(parse_scalar("n").value, Value::Str("n".into()));
        assert_eq!(parse_scalar("no").value, Value::Str("no".into()));
        let n = parse(
            "p.yaml", "n: 4
",
        )
        .unwrap();
        assert_eq!(n.get("n").map(|v| v.value.clone()), Some(Value::Int(4)));
    }
}
