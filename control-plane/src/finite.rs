//! Finite numbers only, where floats enter and where they are stored.
//!
//! JSON has no NaN or infinity: `serde_json` writes them as `null` and then refuses to
//! read `null` back as a number, so one such value in a record used to stop the control
//! plane from ever starting again. Every `f64` of a stored record is therefore
//! `#[serde(with = "crate::finite")]`: writing a non-finite value fails the write (the
//! store never holds what it cannot read back) and reading one fails the read. Values
//! from the wire, the CLI and TOML are checked with `aviary_proto::finite::check` where
//! they enter.

use serde::{de, ser, Deserialize, Deserializer, Serializer};

/// Serialises a finite `f64`; a non-finite one is an error.
pub(crate) fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    if !value.is_finite() {
        return Err(ser::Error::custom(format!(
            "{value} is not a finite number"
        )));
    }
    s.serialize_f64(*value)
}

/// Deserialises an `f64`, refusing a non-finite one.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(d)?;
    if !value.is_finite() {
        return Err(de::Error::custom(format!("{value} is not a finite number")));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct R {
        #[serde(with = "super")]
        x: f64,
    }

    #[test]
    fn non_finite_values_are_refused_both_ways() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(
                serde_json::to_vec(&R { x: bad }).is_err(),
                "{bad} was written"
            );
        }
        assert!(serde_json::from_slice::<R>(br#"{"x":null}"#).is_err());
        assert!(serde_json::from_slice::<R>(br#"{"x":1e999}"#).is_err());
        let r = R { x: -0.5e-300 };
        let back: Result<R, _> = serde_json::to_vec(&r).and_then(|b| serde_json::from_slice(&b));
        assert_eq!(back.ok(), Some(r));
    }
}
