//! Kubernetes label selectors (`?labelSelector=`), parsed and matched without I/O: `k=v`, `k==v`,
//! `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` (has the label), `!k` (has not), joined by commas.

use std::collections::BTreeMap;

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

/// Why a selector was refused (the client's fault: 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad labelSelector {selector:?}: {why}")]
pub struct SelectorError {
    selector: String,
    why: String,
}

impl Selector {
    /// Parses `text`; empty selects everything.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let bad = |why: String| SelectorError {
            selector: text.to_owned(),
            why,
        };
        let mut out = Vec::new();
        for part in split_top(text) {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(bad("an empty requirement".into()));
            }
            let req = if let Some((key, rest)) = split_word(part, " notin ") {
                Requirement::NotIn(key, set(rest).map_err(bad)?)
            } else if let Some((key, rest)) = split_word(part, " in ") {
                Requirement::In(key, set(rest).map_err(bad)?)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotIn(word(k).map_err(bad)?, vec![value(v).map_err(bad)?])
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::In(word(k).map_err(bad)?, vec![value(v).map_err(bad)?])
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::Absent(word(k).map_err(bad)?)
            } else {
                Requirement::Exists(word(part).map_err(bad)?)
            };
            out.push(req);
        }
        Ok(Self(out))
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

/// Splits on commas outside parentheses.
fn split_top(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn split_word(part: &str, op: &str) -> Option<(String, String)> {
    let (k, rest) = part.split_once(op)?;
    Some((k.trim().to_owned(), rest.trim().to_owned()))
}

fn set(text: String) -> Result<Vec<String>, String> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("{text:?} is not a parenthesised set"))?;
    inner.split(',').map(value).collect()
}

fn word(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty()
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        return Err(format!("{t:?} is not a label key"));
    }
    Ok(t.to_owned())
}

fn value(text: &str) -> Result<String, String> {
    let t = text.trim();
    if !t
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!("{t:?} is not a label value"));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kubernetes_selector_forms() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=db", false),
            ("app in (db, web)", true),
            ("app notin (db,web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=web,tier=front", true),
            ("app=web,tier=back", false),
            ("missing!=x", true),
        ] {
            assert_eq!(Selector::parse(sel).unwrap().matches(&l), want, "{sel}");
        }
        for bad in ["app=we b", "app in db", "=x", "app=web,", "a b"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }
}
