//! `--shard I/N` (DESIGN §13): a run that computes chunk k of each per-chunk
//! stage only when k mod N = I. Shards write the same chunk files an
//! unsharded run writes, so they need no merge step; stages that need their
//! whole input wait for a run without `--shard`.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Whether chunk `c` is this shard's.
    pub fn owns(&self, c: usize) -> bool {
        c % self.count == self.index
    }
    /// `shard-I-of-N`: the name of its lock, lease and run manifest.
    pub fn tag(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;

    fn from_str(s: &str) -> Result<Shard, Error> {
        let bad = |why: &str| Error::Input(format!("--shard {s}: {why}"));
        let (i, n) = s.split_once('/').ok_or_else(|| bad("expected I/N, e.g. --shard 0/8 (shard I of N, counting from 0)"))?;
        let index: usize = i.trim().parse().map_err(|_| bad("I is not a whole number (expected I/N, e.g. 0/8)"))?;
        let count: usize = n.trim().parse().map_err(|_| bad("N is not a whole number (expected I/N, e.g. 0/8)"))?;
        if count == 0 {
            return Err(bad("N must be at least 1"));
        }
        if index >= count {
            return Err(bad(&format!("I must be below N (shards are numbered 0 to {})", count - 1)));
        }
        Ok(Shard { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_own_chunks() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        assert_eq!((0..7).filter(|&c| s.owns(c)).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(s.tag(), "shard-1-of-3");
        assert_eq!(s.to_string(), "1/3");
        for bad in ["3/3", "0/0", "1", "a/2", "-1/2", "1/-2"] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.to_string().starts_with(&format!("--shard {bad}: ")), "{e}");
        }
    }
}
