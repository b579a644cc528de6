//! Equality-based label selectors, as operators know them from Kubernetes:
//! `region=cn-sz,tier!=canary`. Every term must hold; the empty selector matches all.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::ControlPlaneError;

/// One `key=value` or `key!=value` term.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Term {
    key: String,
    value: String,
    equal: bool,
}

/// A parsed label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Selector {
    terms: Vec<Term>,
}

impl Selector {
    /// Parses `k=v,k2!=v2`; whitespace around terms is ignored.
    pub(crate) fn parse(text: &str) -> Result<Selector, ControlPlaneError> {
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, value, equal) = if let Some((k, v)) = raw.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = raw.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = raw.split_once('=') {
                (k, v, true)
            } else {
                return Err(ControlPlaneError::BadField {
                    field: "selector".into(),
                    message: format!("selector term {raw:?} is not key=value or key!=value"),
                });
            };
            let (key, value) = (key.trim(), value.trim());
            validate_label(key, value).map_err(|e| ControlPlaneError::BadField {
                field: "selector".into(),
                message: e.to_string(),
            })?;
            terms.push(Term {
                key: key.to_owned(),
                value: value.to_owned(),
                equal,
            });
        }
        Ok(Selector { terms })
    }

    /// True when every term holds for `labels`.
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms
            .iter()
            .all(|t| (labels.get(&t.key) == Some(&t.value)) == t.equal)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let op = if t.equal { "=" } else { "!=" };
            write!(f, "{}{op}{}", t.key, t.value)?;
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
    fn malformed_selectors_are_refused() {
        for bad in [
            "region",
            "=x",
            "a=b c",
            "a=b,=",
            &format!("{}=x", "k".repeat(64)),
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
