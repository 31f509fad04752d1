//! Rule rewards of the `score` stage: cheap, deterministic functions of one
//! row (`exact_match`, `regex`, `length`, `contains`), each one `reward_<name>`
//! column. Rules never produce a non-finite value.
//!
//! ## The `last_number` grammar (`exact_match` with `normalize: last_number`)
//!
//! The text is cut into *runs*: maximal stretches of digits, `.` and `,` that
//! hold at least one digit; leading `,` and trailing `.`/`,` (sentence
//! punctuation) are trimmed. A run is read as the first form that fits it:
//!
//! 1. thousands groups: `1,234` `12,345,678.5` (1–3 digits, then `,ddd` groups, optional `.fraction`);
//! 2. plain decimal: `42` `3.14` `.5`;
//! 3. decimal comma: `3,5` `1234,56` (one comma, not followed by exactly 3 digits — that is form 1);
//! 4. European groups: `1.234.567` `1.234,5` (`.ddd` groups, two or more or followed by `,fraction`);
//! 5. anything else (`1,2,3` `3.14.15`) is split at `,` and then `.`; its last integer piece counts.
//!
//! A `-`, `+` or `−` (U+2212) directly before a run is its sign unless a
//! letter or digit precedes the sign (`3-7` is a range: 7; `x-1` gives 1).
//! The number is the *last* run that reads as one. It is compared as a
//! canonical decimal string — no leading zeros, no trailing fractional zeros,
//! no `+`, `-0` → `0` — so `$1,234.50` and `1234.5` match exactly, with no
//! floating-point rounding. Not numbers: exponents (`1e5` gives 5), fractions
//! (`3/4` gives 4), words (`seven`).

use regex::Regex;
use serde::{Deserialize, Serialize};

use prefpipe_core::stage::ConfigError;
use prefpipe_core::yaml::PathSeg;

/// One entry of `rules:`; `kind` picks the rule.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// `match` when the response equals a reference column (after `normalize`), else `mismatch`.
    ExactMatch(ExactMatch),
    /// `value` when a regular expression matches the response, else `otherwise`.
    Regex(RegexRule),
    /// A length penalty: −`per_token` × the tokens beyond `target` (0 within it).
    Length(LengthRule),
    /// `value` when the response contains any of `substrings`, else `otherwise`.
    Contains(ContainsRule),
}

/// `kind: exact_match`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExactMatch {
    /// The column is `reward_<name>` (letters, digits, `_`).
    pub name: String,
    /// Weight in `aggregate: weighted` (required there, not allowed otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// The input column holding the reference answer.
    #[serde(default = "default_reference")]
    pub column: String,
    /// How response and reference are compared.
    #[serde(default)]
    pub normalize: Normalize,
    /// The reward when they are equal.
    #[serde(default = "one", rename = "match")]
    pub on_match: f64,
    /// The reward when they differ.
    #[serde(default)]
    pub mismatch: f64,
    /// The reward when the reference is null or empty after `normalize`
    /// (for `last_number`: holds no number), e.g. non-math prompts.
    #[serde(default)]
    pub no_reference: f64,
}

/// How `exact_match` normalizes both texts before comparing them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// The last number in each text (`3,5` = 3.5, `$1,234.50` = 1234.5, `−7`),
    /// compared as a canonical decimal; no exponents or fractions.
    LastNumber,
    /// Leading and trailing whitespace removed.
    #[default]
    Strip,
    /// `strip`, then lowercase.
    Lower,
    /// Byte-for-byte.
    None,
}

/// `kind: regex`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegexRule {
    /// The column is `reward_<name>`.
    pub name: String,
    /// Weight in `aggregate: weighted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// A Rust `regex` pattern, searched anywhere in the text (anchor with `^`/`$`;
    /// `(?i)` for case-insensitive, `(?s)` to let `.` match newlines).
    pub pattern: String,
    /// The text column searched.
    #[serde(default = "default_response")]
    pub column: String,
    /// The reward when the pattern matches.
    #[serde(default = "one")]
    pub value: f64,
    /// The reward when it does not.
    #[serde(default)]
    pub otherwise: f64,
}

/// `kind: length`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LengthRule {
    /// The column is `reward_<name>`.
    pub name: String,
    /// Weight in `aggregate: weighted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Tokens allowed without penalty.
    pub target: u32,
    /// Penalty per token beyond `target` (≥ 0): reward = −per_token · max(0, tokens − target).
    pub per_token: f64,
    /// What a token is.
    #[serde(default)]
    pub unit: LengthUnit,
}

/// How the `length` rule counts a response's tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LengthUnit {
    /// The input's `n_tokens` column when it has one (the policy's tokens, as
    /// `generate` writes them), else `words`.
    #[default]
    Auto,
    /// Whitespace-separated words of `response`.
    Words,
    /// The input's `n_tokens` column (required).
    NTokens,
}

/// `kind: contains`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainsRule {
    /// The column is `reward_<name>`.
    pub name: String,
    /// Weight in `aggregate: weighted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Literal substrings; any one of them present gives `value`.
    pub substrings: Vec<String>,
    /// Compare ignoring case (Unicode lowercase of both sides).
    #[serde(default)]
    pub case_insensitive: bool,
    /// The text column searched.
    #[serde(default = "default_response")]
    pub column: String,
    /// The reward when a substring is present.
    #[serde(default = "one")]
    pub value: f64,
    /// The reward when none is.
    #[serde(default)]
    pub otherwise: f64,
}

fn one() -> f64 {
    1.0
}
fn default_reference() -> String {
    "reference_answer".into()
}
fn default_response() -> String {
    prefpipe_core::table::col::RESPONSE.into()
}

impl Rule {
    pub fn name(&self) -> &str {
        match self {
            Rule::ExactMatch(r) => &r.name,
            Rule::Regex(r) => &r.name,
            Rule::Length(r) => &r.name,
            Rule::Contains(r) => &r.name,
        }
    }

    pub fn weight(&self) -> Option<f64> {
        match self {
            Rule::ExactMatch(r) => r.weight,
            Rule::Regex(r) => r.weight,
            Rule::Length(r) => r.weight,
            Rule::Contains(r) => r.weight,
        }
    }

    /// Text columns the rule reads, with the config field that names each
    /// (`None` for the built-in `response`).
    pub fn text_columns(&self) -> Vec<(&str, Option<&'static str>)> {
        let resp = (prefpipe_core::table::col::RESPONSE, None);
        match self {
            Rule::ExactMatch(r) => vec![resp, (r.column.as_str(), Some("column"))],
            Rule::Regex(r) => vec![(r.column.as_str(), Some("column"))],
            Rule::Length(r) if r.unit == LengthUnit::NTokens => vec![],
            Rule::Length(_) => vec![resp],
            Rule::Contains(r) => vec![(r.column.as_str(), Some("column"))],
        }
    }

    /// Checks the values and compiles the rule; `at` locates errors under `rules[i]`.
    pub fn compile(&self, at: &dyn Fn(&str, String) -> ConfigError) -> Result<Compiled, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let mut finite = |field: &str, v: f64| {
            if !v.is_finite() {
                errs.push(at(field, format!("`{field}` must be a finite number; got {v}")));
            }
        };
        let compiled = match self {
            Rule::ExactMatch(r) => {
                finite("match", r.on_match);
                finite("mismatch", r.mismatch);
                finite("no_reference", r.no_reference);
                Some(Compiled::ExactMatch(r.clone()))
            }
            Rule::Regex(r) => {
                finite("value", r.value);
                finite("otherwise", r.otherwise);
                match Regex::new(&r.pattern) {
                    Ok(re) => Some(Compiled::Regex(re, r.value, r.otherwise)),
                    Err(e) => {
                        // regex's message spans lines (pattern, caret, reason): keep the reason.
                        let text = e.to_string();
                        let msg = text.lines().find_map(|l| l.trim().strip_prefix("error: ")).unwrap_or(text.trim()).to_string();
                        errs.push(at("pattern", format!("not a valid regular expression: {msg}")));
                        None
                    }
                }
            }
            Rule::Length(r) => {
                if !(r.per_token.is_finite() && r.per_token >= 0.0) {
                    errs.push(at("per_token", format!("`per_token` is a penalty per token, a finite number ≥ 0; got {}", r.per_token)));
                }
                Some(Compiled::Length(r.clone()))
            }
            Rule::Contains(r) => {
                finite("value", r.value);
                finite("otherwise", r.otherwise);
                if r.substrings.is_empty() {
                    errs.push(at("substrings", "`substrings` lists no substring".into()));
                }
                if r.substrings.iter().any(String::is_empty) {
                    errs.push(at("substrings", "an empty substring is in every text; remove it".into()));
                }
                let subs = if r.case_insensitive { r.substrings.iter().map(|s| s.to_lowercase()).collect() } else { r.substrings.clone() };
                Some(Compiled::Contains(subs, r.case_insensitive, r.value, r.otherwise))
            }
        };
        match compiled {
            Some(c) if errs.is_empty() => Ok(c),
            _ => Err(errs),
        }
    }
}

/// A rule ready to evaluate.
#[derive(Debug, Clone)]
pub enum Compiled {
    ExactMatch(ExactMatch),
    Regex(Regex, f64, f64),
    Length(LengthRule),
    Contains(Vec<String>, bool, f64, f64),
}

/// What one row offers a rule.
pub struct RowText<'a> {
    pub response: &'a str,
    /// The rule's `column` (exact_match's reference, regex/contains's text); `None` = null.
    pub column: Option<&'a str>,
    /// `n_tokens`, when the rule counts them.
    pub n_tokens: Option<u32>,
}

impl Compiled {
    pub fn eval(&self, row: &RowText) -> f64 {
        match self {
            Compiled::ExactMatch(r) => match normalized(row.column.unwrap_or(""), r.normalize) {
                None => r.no_reference,
                Some(want) => {
                    if normalized(row.response, r.normalize).as_deref() == Some(want.as_str()) {
                        r.on_match
                    } else {
                        r.mismatch
                    }
                }
            },
            Compiled::Regex(re, value, otherwise) => {
                if row.column.is_some_and(|t| re.is_match(t)) {
                    *value
                } else {
                    *otherwise
                }
            }
            Compiled::Length(r) => {
                let tokens = match row.n_tokens {
                    Some(n) => u64::from(n),
                    None => row.response.split_whitespace().count() as u64,
                };
                let over = tokens.saturating_sub(u64::from(r.target));
                if over == 0 {
                    0.0
                } else {
                    -r.per_token * over as f64
                }
            }
            Compiled::Contains(subs, ci, value, otherwise) => {
                let hit = row.column.is_some_and(|t| {
                    if *ci {
                        let t = t.to_lowercase();
                        subs.iter().any(|s| t.contains(s.as_str()))
                    } else {
                        subs.iter().any(|s| t.contains(s.as_str()))
                    }
                });
                if hit {
                    *value
                } else {
                    *otherwise
                }
            }
        }
    }
}

/// The text `exact_match` compares, or `None` when there is nothing to compare.
fn normalized(text: &str, how: Normalize) -> Option<String> {
    let s = match how {
        Normalize::LastNumber => return last_number(text),
        Normalize::Strip => text.trim().to_string(),
        Normalize::Lower => text.trim().to_lowercase(),
        Normalize::None => text.to_string(),
    };
    (!s.is_empty()).then_some(s)
}

/// The last number in `text` as a canonical decimal string (module docs: the grammar).
pub fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let is_run = |c: char| c.is_ascii_digit() || c == '.' || c == ',';
    let mut best = None;
    let mut i = 0;
    while i < chars.len() {
        if !is_run(chars[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_run(chars[i]) {
            i += 1;
        }
        let mut run: &[char] = &chars[start..i];
        let mut lead = start;
        while let [',', rest @ ..] = run {
            run = rest;
            lead += 1;
        }
        while let [rest @ .., '.' | ','] = run {
            run = rest;
        }
        if !run.iter().any(char::is_ascii_digit) {
            continue;
        }
        let Some((int, frac)) = read_run(&run.iter().collect::<String>()) else {
            continue;
        };
        // A sign counts when nothing word-like is glued to its left (`3-7` is a range).
        let negative = lead > 0 && matches!(chars[lead - 1], '-' | '−') && (lead < 2 || !chars[lead - 2].is_alphanumeric());
        best = Some(canonical(negative, &int, &frac));
    }
    best
}

/// (integer digits, fraction digits) of one trimmed run, per the module grammar.
fn read_run(s: &str) -> Option<(String, String)> {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let plain = |t: &str| -> Option<(String, String)> {
        match t.split_once('.') {
            None if digits(t) => Some((t.to_string(), String::new())),
            Some((a, b)) if (a.is_empty() || digits(a)) && digits(b) => Some((a.to_string(), b.to_string())),
            _ => None,
        }
    };
    // 1. Thousands groups with commas.
    let (body, frac) = s.split_once('.').unwrap_or((s, ""));
    let groups: Vec<&str> = body.split(',').collect();
    if groups.len() > 1
        && (1..=3).contains(&groups[0].len())
        && groups.iter().all(|g| digits(g))
        && groups[1..].iter().all(|g| g.len() == 3)
        && (frac.is_empty() && !s.contains('.') || digits(frac))
    {
        return Some((groups.concat(), frac.to_string()));
    }
    // 2. Plain decimal.
    if let Some(p) = plain(s) {
        return Some(p);
    }
    // 3. Decimal comma.
    if let Some((a, b)) = s.split_once(',') {
        if digits(a) && digits(b) {
            return Some((a.to_string(), b.to_string()));
        }
    }
    // 4. European groups: dots between thousands, optional decimal comma.
    let (body, frac) = s.split_once(',').unwrap_or((s, ""));
    let groups: Vec<&str> = body.split('.').collect();
    if groups.len() > 1
        && (1..=3).contains(&groups[0].len())
        && groups.iter().all(|g| digits(g))
        && groups[1..].iter().all(|g| g.len() == 3)
        && (groups.len() > 2 || !frac.is_empty())
        && (frac.is_empty() && !s.contains(',') || digits(frac))
    {
        return Some((groups.concat(), frac.to_string()));
    }
    // 5. A list or garbage: its last integer piece.
    s.rsplit([',', '.']).find(|p| digits(p)).map(|p| (p.to_string(), String::new()))
}

fn canonical(negative: bool, int: &str, frac: &str) -> String {
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let zero = int == "0" && frac.is_empty();
    let mut out = String::new();
    if negative && !zero {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

/// A config error under `rules[index].field`.
pub fn at_rule(index: usize, field: &str, message: String) -> ConfigError {
    let mut path = vec![PathSeg::Key("rules".into()), PathSeg::Index(index)];
    if !field.is_empty() {
        path.push(PathSeg::Key(field.into()));
    }
    ConfigError { path, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml_json: serde_json::Value) -> Compiled {
        let r: Rule = serde_json::from_value(yaml_json).unwrap();
        r.compile(&|f, m| at_rule(0, f, m)).unwrap()
    }

    fn row<'a>(response: &'a str, column: Option<&'a str>) -> RowText<'a> {
        RowText { response, column, n_tokens: None }
    }

    /// Each case: text → the canonical last number, by the grammar in the module docs.
    #[test]
    fn last_number_grammar() {
        let cases: &[(&str, Option<&str>)] = &[
            // Decimal comma (form 3): "3,5" = 3.5.
            ("… so the answer is 3,5", Some("3.5")),
            // Thousands groups (form 1) with a fraction; the `$` is not part of it; trailing 0 dropped.
            ("$1,234.50", Some("1234.5")),
            ("-7", Some("-7")),
            ("The answer is 42.", Some("42")),
            ("x = 0.50, done", Some("0.5")),
            ("first 12, then 13", Some("13")),
            ("12,345", Some("12345")),
            ("1,234,567", Some("1234567")),
            ("1234,56", Some("1234.56")),
            // European groups (form 4).
            ("1.234.567,89 €", Some("1234567.89")),
            ("1.234,5", Some("1234.5")),
            // `1.234` alone is a plain decimal (form 2 comes before form 4).
            ("1.234", Some("1.234")),
            // A list (form 5): its last piece.
            ("1,2,3", Some("3")),
            ("3.14.15", Some("15")),
            // Signs: a range is not a sign; a letter before `-` is not either; U+2212 is.
            ("between 3-7", Some("7")),
            ("x-1", Some("1")),
            ("so (−2)", Some("-2")),
            ("= -0.0", Some("0")),
            ("+5", Some("5")),
            (".5 cups", Some("0.5")),
            ("007", Some("7")),
            ("50%", Some("50")),
            ("3/4", Some("4")),
            ("1e5", Some("5")),
            ("no number here.", None),
            ("..., ,.", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(last_number(text).as_deref(), *want, "{text:?}");
        }
    }

    #[test]
    fn exact_match_values() {
        let r = rule(
            serde_json::json!({"kind": "exact_match", "name": "em", "normalize": "last_number", "match": 2.0, "mismatch": -1.0, "no_reference": 0.5}),
        );
        // "… is $1,234.50" → 1234.5 = reference "1234.5" → match = 2.0.
        assert_eq!(r.eval(&row("The total is $1,234.50.", Some("1234.5"))), 2.0);
        // 1234.51 ≠ 1234.5 → mismatch = −1.0.
        assert_eq!(r.eval(&row("The total is 1234.51", Some("1234.5"))), -1.0);
        // No number in the response → mismatch.
        assert_eq!(r.eval(&row("I don't know", Some("7"))), -1.0);
        // Reference "" (a non-math prompt) or null → no_reference = 0.5.
        assert_eq!(r.eval(&row("42", Some(""))), 0.5);
        assert_eq!(r.eval(&row("42", None)), 0.5);

        let strip = rule(serde_json::json!({"kind": "exact_match", "name": "em"}));
        // strip: "  Paris \n" → "Paris" = "Paris" → match = 1 (default).
        assert_eq!(strip.eval(&row("  Paris \n", Some("Paris"))), 1.0);
        // strip keeps case: "paris" ≠ "Paris" → mismatch = 0 (default).
        assert_eq!(strip.eval(&row("paris", Some("Paris"))), 0.0);
        let lower = rule(serde_json::json!({"kind": "exact_match", "name": "em", "normalize": "lower"}));
        assert_eq!(lower.eval(&row(" PARIS", Some("paris "))), 1.0);
        let none = rule(serde_json::json!({"kind": "exact_match", "name": "em", "normalize": "none"}));
        // none: " Paris" ≠ "Paris" byte-for-byte.
        assert_eq!(none.eval(&row(" Paris", Some("Paris"))), 0.0);
    }

    #[test]
    fn regex_contains_and_length() {
        let re = rule(
            serde_json::json!({"kind": "regex", "name": "r", "pattern": "(?i)^i (can't|cannot) help", "value": 0.5, "otherwise": -0.25}),
        );
        assert_eq!(re.eval(&row("", Some("I can't help with that."))), 0.5);
        assert_eq!(re.eval(&row("", Some("Sure: first, ..."))), -0.25);
        assert_eq!(re.eval(&row("", None)), -0.25);

        let c = rule(
            serde_json::json!({"kind": "contains", "name": "c", "substrings": ["sorry", "cannot"], "case_insensitive": true, "value": 3.0}),
        );
        assert_eq!(c.eval(&row("", Some("I CANNOT do that"))), 3.0);
        assert_eq!(c.eval(&row("", Some("Here you go"))), 0.0);
        let cs = rule(serde_json::json!({"kind": "contains", "name": "c", "substrings": ["Sorry"]}));
        assert_eq!(cs.eval(&row("", Some("sorry"))), 0.0);

        let len = rule(serde_json::json!({"kind": "length", "name": "len", "target": 5, "per_token": 0.1}));
        // 8 words, target 5 → −0.1 · (8 − 5) = −0.3.
        let eight = "one two three four five six seven eight";
        assert!((len.eval(&row(eight, None)) - -0.3).abs() < 1e-12);
        // 3 words ≤ 5 → 0.
        assert_eq!(len.eval(&row("a b  c", None)), 0.0);
        // With n_tokens = 12: −0.1 · (12 − 5) = −0.7, whatever the words.
        let r = RowText { response: eight, column: None, n_tokens: Some(12) };
        assert!((len.eval(&r) - -0.7).abs() < 1e-12);
    }

    #[test]
    fn bad_rules_are_located() {
        let r: Rule = serde_json::from_value(serde_json::json!({"kind": "regex", "name": "r", "pattern": "(unclosed"})).unwrap();
        let e = r.compile(&|f, m| at_rule(3, f, m)).unwrap_err();
        assert_eq!(e[0].path, vec![PathSeg::Key("rules".into()), PathSeg::Index(3), PathSeg::Key("pattern".into())]);
        assert!(e[0].message.starts_with("not a valid regular expression"), "{}", e[0].message);
        let r: Rule = serde_json::from_value(serde_json::json!({"kind": "length", "name": "l", "target": 1, "per_token": -1.0})).unwrap();
        assert_eq!(r.compile(&|f, m| at_rule(0, f, m)).unwrap_err()[0].path[2], PathSeg::Key("per_token".into()));
        let r: Rule = serde_json::from_value(serde_json::json!({"kind": "contains", "name": "c", "substrings": []})).unwrap();
        assert!(r.compile(&|f, m| at_rule(0, f, m)).is_err());
        // Unknown fields are refused inside a rule too.
        assert!(serde_json::from_value::<Rule>(
            serde_json::json!({"kind": "length", "name": "l", "target": 1, "per_token": 1.0, "typo": 1})
        )
        .is_err());
    }
}
