//! The one error type of the library crates.
//!
//! Errors carry structure (what, where, expected, got); the binary flattens
//! them into one line and picks the exit code from [`Error::exit_code`].

use std::fmt;
use std::path::PathBuf;

/// Where in a pipeline file a problem is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    /// The pipeline file (or `--set` for command-line overrides).
    pub file: String,
    /// 1-based line; 0 when unknown.
    pub line: u64,
    /// 1-based column; 0 when unknown.
    pub col: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}:{}", self.file, self.line, self.col)
        }
    }
}

/// One validation problem: a position and a message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub location: Location,
    /// The stage the problem belongs to, when there is one.
    pub stage: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.stage {
            Some(s) => write!(f, "{}: stage `{}`: {}", self.location, s, self.message),
            None => write!(f, "{}: {}", self.location, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline is invalid; every problem found, in file order.
    #[error("{}", fmt_diagnostics(.0))]
    Invalid(Vec<Diagnostic>),
    /// Bad input data or arguments (a missing column, a corrupt file, ...).
    #[error("{0}")]
    Input(String),
    /// A failure at run time that is not the user's input.
    #[error("{0}")]
    Runtime(String),
    /// Another run holds the store (or this shard of it); `holder` says who.
    #[error("the store {store} is locked by another prefpipe run: {holder}; wait for it to finish or use --store to pick another store")]
    Locked { store: String, holder: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// An error inside a stage, with the stage id added once, centrally.
    #[error("stage `{stage}`: {source}")]
    Stage {
        stage: String,
        #[source]
        source: Box<Error>,
    },
}

fn fmt_diagnostics(d: &[Diagnostic]) -> String {
    let lines: Vec<String> = d.iter().map(|d| d.to_string()).collect();
    lines.join("\n")
}

impl Error {
    /// 2 for invalid pipelines, arguments and input data; 1 for run-time failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid(_) | Error::Input(_) => 2,
            Error::Stage { source, .. } => source.exit_code(),
            _ => 1,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// Wraps with the stage id unless it already names one.
    pub fn in_stage(self, stage: &str) -> Self {
        match self {
            e @ Error::Stage { .. } | e @ Error::Invalid(_) => e,
            e => Error::Stage { stage: stage.to_string(), source: Box::new(e) },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `bail!(Input, "...")`: return early with an error of that variant.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::Error::$kind(format!($($arg)*)))
    };
}

/// `ensure!(cond, Input, "...")`: a one-line check.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $kind:ident, $($arg:tt)*) => {
        if !$cond {
            $crate::bail!($kind, $($arg)*);
        }
    };
}

/// Closest candidate by edit distance, for "did you mean" hints.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 2).max(2))
        .min()
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_suggests_near_names() {
        assert_eq!(closest("selct", ["source", "select", "sql"]), Some("select"));
        assert_eq!(closest("mu-2sgima", ["mu-2sigma", "max", "min"]), Some("mu-2sigma"));
        assert_eq!(closest("zzzzzz", ["source", "select"]), None);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Error::Input("x".into()).exit_code(), 2);
        assert_eq!(Error::Runtime("x".into()).in_stage("s").exit_code(), 1);
        assert_eq!(Error::Input("x".into()).in_stage("s").exit_code(), 2);
    }
}
