//! Label selectors, as operators know them from Kubernetes: equality terms
//! (`region=cn-sz,tier!=canary`) and set-based ones (`region in (eu,us)`,
//! `tier notin (canary)`, `gpu`, `!gpu`). Every term must hold; the empty selector
//! matches all.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::ControlPlaneError;

/// What a term asks of its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Kind {
    /// `key=value` (`equal`) or `key!=value`.
    #[default]
    Equality,
    /// `key in (v1,v2)`: the key is set to one of the values.
    In,
    /// `key notin (v1,v2)`: the key is unset or set to none of the values.
    NotIn,
    /// `key`: the key is set.
    Exists,
    /// `!key`: the key is unset.
    Absent,
}

/// One term. Stored in weight rules, rollouts and config scopes: equality terms keep
/// the form they always had (`kind` and `values` default).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Term {
    key: String,
    value: String,
    equal: bool,
    #[serde(default, skip_serializing_if = "is_equality")]
    kind: Kind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    values: Vec<String>,
}

fn is_equality(k: &Kind) -> bool {
    *k == Kind::Equality
}

/// A parsed label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Selector {
    terms: Vec<Term>,
}

fn bad(message: String) -> ControlPlaneError {
    ControlPlaneError::BadField {
        field: "selector".into(),
        message,
    }
}

/// Splits at commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, ControlPlaneError> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0u32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| bad(format!("selector {text:?} closes a ( it never opened")))?
            }
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(bad(format!("selector {text:?} leaves a ( open")));
    }
    out.push(&text[start..]);
    Ok(out
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect())
}

impl Term {
    fn parse(raw: &str) -> Result<Term, ControlPlaneError> {
        let term = |key: &str, kind, value: &str, equal, values: Vec<String>| Term {
            key: key.trim().to_owned(),
            value: value.trim().to_owned(),
            equal,
            kind,
            values,
        };
        let t = if let Some((k, rest)) = raw.split_once(" notin ") {
            term(k, Kind::NotIn, "", false, set(rest)?)
        } else if let Some((k, rest)) = raw.split_once(" in ") {
            term(k, Kind::In, "", true, set(rest)?)
        } else if let Some((k, v)) = raw.split_once("!=") {
            term(k, Kind::Equality, v, false, Vec::new())
        } else if let Some((k, v)) = raw.split_once("==") {
            term(k, Kind::Equality, v, true, Vec::new())
        } else if let Some((k, v)) = raw.split_once('=') {
            term(k, Kind::Equality, v, true, Vec::new())
        } else if let Some(k) = raw.strip_prefix('!') {
            term(k, Kind::Absent, "", false, Vec::new())
        } else if !raw.contains(char::is_whitespace) {
            term(raw, Kind::Exists, "", true, Vec::new())
        } else {
            return Err(bad(format!(
                "selector term {raw:?} is not key=value, key!=value, key in (...), \
                 key notin (...), key or !key"
            )));
        };
        validate_label(&t.key, &t.value).map_err(|e| bad(e.to_string()))?;
        for v in &t.values {
            validate_label(&t.key, v).map_err(|e| bad(e.to_string()))?;
        }
        Ok(t)
    }

    fn holds(&self, labels: &BTreeMap<String, String>) -> bool {
        let got = labels.get(&self.key);
        match self.kind {
            Kind::Equality => (got == Some(&self.value)) == self.equal,
            Kind::In => got.is_some_and(|v| self.values.contains(v)),
            Kind::NotIn => got.is_none_or(|v| !self.values.contains(v)),
            Kind::Exists => got.is_some(),
            Kind::Absent => got.is_none(),
        }
    }
}

/// `(a, b)` → [a, b]: at least one value.
fn set(text: &str) -> Result<Vec<String>, ControlPlaneError> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| bad(format!("selector set {text:?} is not (v1,v2,...)")))?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() {
        return Err(bad(format!("selector set {text:?} names no value")));
    }
    Ok(values)
}

impl Selector {
    /// Parses a selector (see the module docs); whitespace around terms is ignored.
    pub(crate) fn parse(text: &str) -> Result<Selector, ControlPlaneError> {
        let terms = split_terms(text)?
            .into_iter()
            .map(Term::parse)
            .collect::<Result<_, _>>()?;
        Ok(Selector { terms })
    }

    /// True when every term holds for `labels`.
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| t.holds(labels))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match t.kind {
                Kind::Equality => {
                    let op = if t.equal { "=" } else { "!=" };
                    write!(f, "{}{op}{}", t.key, t.value)?;
                }
                Kind::In => write!(f, "{} in ({})", t.key, t.values.join(","))?,
                Kind::NotIn => write!(f, "{} notin ({})", t.key, t.values.join(","))?,
                Kind::Exists => write!(f, "{}", t.key)?,
                Kind::Absent => write!(f, "!{}", t.key)?,
            }
        }
        Ok(())
    }
}

/// Label keys are 1–63 of `[A-Za-z0-9._/-]`; values 0–63 of `[A-Za-z0-9._-]`.
pub(crate) fn validate_label(key: &str, value: &str) -> Result<(), ControlPlaneError> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    let value_ok = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if key_ok && value_ok {
        Ok(())
    } else {
        Err(ControlPlaneError::InvalidArgument(format!(
            "label {key:?}={value:?}: keys are 1-63 of [A-Za-z0-9._/-], values 0-63 of [A-Za-z0-9._-]"
        )))
    }
}

/// Checks a node's whole label set: at most 64 labels, each as `validate_label`.
pub(crate) fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ControlPlaneError> {
    if labels.len() > 64 {
        return Err(ControlPlaneError::InvalidArgument(
            "at most 64 labels per node".into(),
        ));
    }
    labels.iter().try_for_each(|(k, v)| validate_label(k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn terms_all_must_hold() {
        let s = Selector::parse("region=cn-sz, tier!=canary").expect("valid");
        assert!(s.matches(&labels(&[("region", "cn-sz"), ("tier", "edge")])));
        assert!(s.matches(&labels(&[("region", "cn-sz")])));
        assert!(!s.matches(&labels(&[("region", "cn-sz"), ("tier", "canary")])));
        assert!(!s.matches(&labels(&[("region", "eu")])));
        assert!(Selector::parse("").expect("empty").matches(&labels(&[])));
        assert_eq!(s.to_string(), "region=cn-sz,tier!=canary");
    }

    #[test]
    fn set_based_terms_match_as_in_kubernetes_and_print_back() {
        let s =
            Selector::parse("region in (eu, us),tier notin (canary),gpu,!legacy").expect("valid");
        let eu_gpu = labels(&[("region", "eu"), ("gpu", "a100")]);
        assert!(s.matches(&eu_gpu));
        assert!(
            !s.matches(&labels(&[("region", "ap"), ("gpu", "x")])),
            "region not in set"
        );
        assert!(
            !s.matches(&labels(&[("gpu", "x")])),
            "region unset is not in"
        );
        assert!(!s.matches(&labels(&[("region", "eu")])), "gpu must exist");
        let canary = labels(&[("region", "us"), ("gpu", "x"), ("tier", "canary")]);
        assert!(!s.matches(&canary));
        let legacy = labels(&[("region", "us"), ("gpu", "x"), ("legacy", "")]);
        assert!(!s.matches(&legacy), "!legacy: the key must be unset");
        assert_eq!(
            s.to_string(),
            "region in (eu,us),tier notin (canary),gpu,!legacy"
        );
        assert_eq!(Selector::parse(&s.to_string()).ok(), Some(s));
    }

    #[test]
    fn stored_equality_selectors_read_back_unchanged() -> Result<(), serde_json::Error> {
        // The form every store written before set-based terms holds.
        let old = r#"{"terms":[{"key":"region","value":"eu","equal":true}]}"#;
        let s: Selector = serde_json::from_str(old)?;
        assert_eq!(Some(s.clone()), Selector::parse("region=eu").ok());
        assert_eq!(serde_json::to_string(&s)?, old);
        Ok(())
    }

    #[test]
    fn malformed_selectors_are_refused() {
        for bad in [
            "region in eu",
            "region in ()",
            "region in (eu",
            "region) in (eu",
            "a b",
            "!",
            "=x",
            "a=b c",
            "a=b,=",
            &format!("{}=x", "k".repeat(64)),
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
