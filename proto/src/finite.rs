//! Finite numbers only: the checks every float from the wire, a flag or a file passes
//! where it enters (NaN and infinity have no place in weights, thresholds or rates).

use std::ops::RangeInclusive;

/// `value` if it is finite and within `range`, else a message naming `what`.
pub fn check(what: &str, value: f64, range: RangeInclusive<f64>) -> Result<f64, String> {
    if !value.is_finite() {
        return Err(format!("{what} must be a finite number, not {value}"));
    }
    if !range.contains(&value) {
        let (lo, hi) = (range.start(), range.end());
        return Err(if *hi == f64::MAX {
            format!("{what} must be at least {lo}, not {value}")
        } else {
            format!("{what} must be within {lo}..={hi}, not {value}")
        });
    }
    Ok(value)
}

/// Parses a finite, non-negative number (clap `value_parser` for float flags).
pub fn parse_non_negative(s: &str) -> Result<f64, String> {
    let value: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    check("the value", value, 0.0..=f64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_value_and_the_range() {
        assert_eq!(check("p99", 3.0, 0.0..=f64::MAX), Ok(3.0));
        let e = check("max_error_rate", 1.5, 0.0..=1.0)
            .err()
            .unwrap_or_default();
        assert!(e.contains("max_error_rate") && e.contains("0..=1"), "{e}");
        let e = check("p99", f64::NAN, 0.0..=f64::MAX)
            .err()
            .unwrap_or_default();
        assert!(e.contains("finite"), "{e}");
        for s in ["inf", "NaN", "-1", "x", "infinity"] {
            assert!(parse_non_negative(s).is_err(), "{s} accepted");
        }
        assert_eq!(parse_non_negative("200"), Ok(200.0));
    }
}
