//! IMU recordings loaded from CSV, converted to SI units on load.
//!
//! Layouts are recognised from the header row: EuRoC (`#timestamp [ns],w_x,w_y,w_z,
//! a_x,a_y,a_z`, rad/s and m/s²) and the x-io exports (`Timestamp (us)` or `Time (s)`,
//! `Gyroscope X (deg/s)`, `Accelerometer X (g)`, extra columns such as magnetometer or
//! barometer ignored). Invariant: a loaded recording has at least one sample, strictly
//! increasing timestamps starting at 0, and only finite values; anything else is a
//! [`CsvError`] naming the file, line and column, never a skipped row.

use std::path::Path;

pub use crate::units::STANDARD_GRAVITY;

/// One recorded reading in SI units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RecordedSample {
    /// Time since the recording's first sample.
    pub t_ns: u64,
    /// Angular rate, rad/s (x, y, z).
    pub gyro: [f64; 3],
    /// Acceleration, m/s² (x, y, z).
    pub accel: [f64; 3],
    /// Temperature if the recording has a column for it.
    pub temperature_c: Option<f64>,
}

/// A whole recording, ready to replay.
#[derive(Clone, Debug)]
pub struct Recording {
    /// Sensor id: the file stem.
    pub name: String,
    /// Where it came from (for status and errors).
    pub source: String,
    /// The recognised layout, e.g. "x-io (µs, deg/s, g)".
    pub layout: String,
    /// The samples, in time order.
    pub samples: Vec<RecordedSample>,
    /// Median interval between samples: the gap inserted between loops.
    pub median_interval_ns: u64,
}

/// Why a CSV recording could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A row or header is malformed.
    #[error("{file}:{line}:{column}: {reason}")]
    Malformed {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// 1-based column number.
        column: usize,
        /// What is wrong, and what was expected.
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum TimeUnit {
    Nanos,
    Micros,
    Millis,
    Seconds,
}

impl TimeUnit {
    /// Digits after the decimal point that still name whole nanoseconds.
    fn fraction_digits(self) -> usize {
        match self {
            TimeUnit::Nanos => 0,
            TimeUnit::Micros => 3,
            TimeUnit::Millis => 6,
            TimeUnit::Seconds => 9,
        }
    }

    fn label(self) -> &'static str {
        match self {
            TimeUnit::Nanos => "ns",
            TimeUnit::Micros => "µs",
            TimeUnit::Millis => "ms",
            TimeUnit::Seconds => "s",
        }
    }
}

/// Where each quantity sits in a row and the factor to SI.
#[derive(Debug)]
struct Layout {
    columns: usize,
    time_unit: TimeUnit,
    gyro: [usize; 3],
    gyro_scale: f64,
    accel: [usize; 3],
    accel_scale: f64,
    temperature: Option<usize>,
    name: String,
}

/// Largest recording file read (256 MiB of CSV, some 4 million samples).
pub const MAX_RECORDING_BYTES: u64 = 256 << 20;

impl Recording {
    /// Reads and parses `path`; the sensor id is the file stem.
    pub fn load(path: &Path) -> Result<Recording, CsvError> {
        use std::io::Read;
        let file = path.display().to_string();
        let read_err = |source| CsvError::Read {
            file: file.clone(),
            source,
        };
        // Bounded whatever the path is (`/dev/zero`, a pipe): the stub holds every
        // recording in memory.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_RECORDING_BYTES + 1).read_to_end(&mut bytes))
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_RECORDING_BYTES {
            return Err(read_err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("larger than {MAX_RECORDING_BYTES} bytes; split the recording"),
            )));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text: {e}"),
            ))
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        Recording::parse(&name, &file, &text)
    }

    /// Parses CSV text; `file` is only used in errors.
    pub fn parse(name: &str, file: &str, text: &str) -> Result<Recording, CsvError> {
        let err = |line: usize, column: usize, reason: String| CsvError::Malformed {
            file: file.to_owned(),
            line,
            column,
            reason,
        };
        let mut lines = text.split('\n').enumerate().map(|(i, l)| {
            // CRLF files (the x-io exports) are as welcome as LF ones.
            (i + 1, l.strip_suffix('\r').unwrap_or(l))
        });
        let (_, header) = lines
            .next()
            .ok_or_else(|| err(1, 1, "empty file: expected a header row".into()))?;
        let layout =
            Layout::from_header(header).map_err(|(column, reason)| err(1, column, reason))?;

        let mut samples: Vec<RecordedSample> = Vec::new();
        let mut first_ns: Option<u64> = None;
        let mut previous: Option<(u64, usize)> = None;
        let mut blank_at: Option<usize> = None;
        for (line, row) in lines {
            if row.trim().is_empty() {
                blank_at.get_or_insert(line);
                continue;
            }
            if let Some(blank) = blank_at {
                // Blank lines are fine at the end of a file, not between rows.
                return Err(err(blank, 1, "blank line between rows".into()));
            }
            if row.starts_with('#') {
                return Err(err(line, 1, "comment row after the header".into()));
            }
            let fields: Vec<&str> = row.split(',').collect();
            if fields.len() != layout.columns {
                let column = fields.len().min(layout.columns) + 1;
                return Err(err(
                    line,
                    column,
                    format!(
                        "expected {} columns as in the header, found {}",
                        layout.columns,
                        fields.len()
                    ),
                ));
            }
            let absolute =
                parse_time(fields[0], layout.time_unit).map_err(|reason| err(line, 1, reason))?;
            if let Some((before, before_line)) = previous {
                if absolute <= before {
                    return Err(err(
                        line,
                        1,
                        format!(
                            "timestamp {} is not after the one on line {before_line}; rows must be sorted by time",
                            fields[0].trim()
                        ),
                    ));
                }
            }
            previous = Some((absolute, line));
            let first = *first_ns.get_or_insert(absolute);
            // Sensor time is u64 ns from the first sample, and loops add spans together:
            // a recording may span at most a century (the fuzzer found one that wrapped).
            if absolute - first > crate::units::MAX_SENSOR_NS {
                return Err(err(
                    line,
                    1,
                    format!(
                        "timestamp {} is more than a century after the first sample",
                        fields[0].trim()
                    ),
                ));
            }
            let number = |column: usize| -> Result<f64, CsvError> {
                let text = fields[column].trim();
                match text.parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(v),
                    Ok(_) => Err(err(
                        line,
                        column + 1,
                        format!("`{text}` is not a finite number"),
                    )),
                    Err(_) => Err(err(line, column + 1, format!("`{text}` is not a number"))),
                }
            };
            let mut gyro = [0.0; 3];
            let mut accel = [0.0; 3];
            for axis in 0..3 {
                gyro[axis] = number(layout.gyro[axis])? * layout.gyro_scale;
                accel[axis] = number(layout.accel[axis])? * layout.accel_scale;
            }
            let temperature_c = layout.temperature.map(number).transpose()?;
            samples.push(RecordedSample {
                t_ns: absolute - first,
                gyro,
                accel,
                temperature_c,
            });
        }
        if samples.is_empty() {
            return Err(err(2, 1, "no samples after the header".into()));
        }
        let mut intervals: Vec<u64> = samples.windows(2).map(|w| w[1].t_ns - w[0].t_ns).collect();
        intervals.sort_unstable();
        // A one-sample recording loops once a second rather than spinning.
        let median_interval_ns = intervals
            .get(intervals.len() / 2)
            .copied()
            .unwrap_or(1_000_000_000);
        Ok(Recording {
            name: name.to_owned(),
            source: file.to_owned(),
            layout: layout.name,
            samples,
            median_interval_ns,
        })
    }

    /// Recording length: first to last sample.
    pub fn span_ns(&self) -> u64 {
        self.samples.last().map(|s| s.t_ns).unwrap_or(0)
    }

    /// Time from one loop's start to the next: the span plus one median interval.
    pub fn loop_period_ns(&self) -> u64 {
        self.span_ns().saturating_add(self.median_interval_ns)
    }

    /// Mean sample rate (for status).
    pub fn rate_hz(&self) -> f64 {
        if self.median_interval_ns == 0 {
            return 0.0;
        }
        1e9 / self.median_interval_ns as f64
    }
}

impl Layout {
    /// Recognises the columns from the header; errors carry the 1-based column.
    fn from_header(header: &str) -> Result<Layout, (usize, String)> {
        let names: Vec<String> = header
            .trim_start_matches('#')
            .split(',')
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        let time = &names[0];
        let time_unit = if time.contains("[ns]") || time.contains("(ns)") {
            TimeUnit::Nanos
        } else if time.contains("(us)") || time.contains("(µs)") || time.contains("[us]") {
            TimeUnit::Micros
        } else if time.contains("(ms)") || time.contains("[ms]") {
            TimeUnit::Millis
        } else if time.contains("(s)") || time.contains("[s]") {
            TimeUnit::Seconds
        } else {
            return Err((
                1,
                format!(
                    "first column `{}` is not a timestamp with a unit \
                     (expected e.g. `#timestamp [ns]`, `Timestamp (us)` or `Time (s)`)",
                    names[0]
                ),
            ));
        };
        let find = |matches: &dyn Fn(&str) -> bool,
                    axis: char,
                    what: &str|
         -> Result<usize, (usize, String)> {
            names
                .iter()
                .position(|n| matches(n) && axis_of(n) == Some(axis))
                .ok_or_else(|| {
                    (
                        names.len() + 1,
                        format!("no {what} {axis} column (expected EuRoC or x-io headers)"),
                    )
                })
        };
        let is_gyro = |n: &str| n.starts_with("w_") || n.starts_with("gyro");
        let is_accel = |n: &str| n.starts_with("a_") || n.starts_with("acc");
        let mut gyro = [0; 3];
        let mut accel = [0; 3];
        for (i, axis) in ['x', 'y', 'z'].into_iter().enumerate() {
            gyro[i] = find(&is_gyro, axis, "gyroscope")?;
            accel[i] = find(&is_accel, axis, "accelerometer")?;
        }
        let gyro_scale = unit_scale(
            &names[gyro[0]],
            &[("deg/s", std::f64::consts::PI / 180.0), ("rad", 1.0)],
        )
        .ok_or_else(|| {
            (
                gyro[0] + 1,
                format!(
                    "unknown gyroscope unit in `{}` (deg/s or rad/s)",
                    names[gyro[0]]
                ),
            )
        })?;
        let accel_scale = unit_scale(
            &names[accel[0]],
            &[
                ("m/s^2", 1.0),
                ("m s^-2", 1.0),
                ("m/s2", 1.0),
                ("(g)", STANDARD_GRAVITY),
                ("[g]", STANDARD_GRAVITY),
            ],
        )
        .ok_or_else(|| {
            (
                accel[0] + 1,
                format!(
                    "unknown accelerometer unit in `{}` (g or m/s^2)",
                    names[accel[0]]
                ),
            )
        })?;
        // EuRoC has no unit in its bare `w_x` form: rad/s and m/s² by definition.
        let temperature = names.iter().position(|n| n.starts_with("temp"));
        let name = format!(
            "{} ({}, {}, {})",
            if header.starts_with('#') {
                "EuRoC"
            } else {
                "x-io"
            },
            time_unit.label(),
            if gyro_scale == 1.0 { "rad/s" } else { "deg/s" },
            if accel_scale == 1.0 { "m/s²" } else { "g" },
        );
        Ok(Layout {
            columns: names.len(),
            time_unit,
            gyro,
            gyro_scale,
            accel,
            accel_scale,
            temperature,
            name,
        })
    }
}

/// `gyroscope x (deg/s)` → 'x'; `w_rs_s_y [rad s^-1]` → 'y'; `a_z` → 'z'.
fn axis_of(name: &str) -> Option<char> {
    let base = name.split(['(', '[']).next().unwrap_or(name).trim();
    let last = base.chars().last()?;
    matches!(last, 'x' | 'y' | 'z').then_some(last)
}

/// The factor for the first unit named in `name`; a bare EuRoC name (no unit) is SI.
fn unit_scale(name: &str, units: &[(&str, f64)]) -> Option<f64> {
    if !name.contains('(') && !name.contains('[') {
        return Some(1.0);
    }
    units
        .iter()
        .find(|(unit, _)| name.contains(unit))
        .map(|(_, scale)| *scale)
}

/// Parses a non-negative decimal timestamp exactly into nanoseconds.
fn parse_time(text: &str, unit: TimeUnit) -> Result<u64, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "timestamp `{text}` is not a non-negative number of {}",
            unit.label()
        )
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let digits = unit.fraction_digits();
    if fraction.len() > digits && fraction[digits..].bytes().any(|b| b != b'0') {
        return Err(format!("timestamp `{text}` is finer than a nanosecond"));
    }
    let scale = 10u64.pow(digits as u32);
    let mut fraction_ns: u64 = 0;
    for (i, b) in fraction.bytes().take(digits).enumerate() {
        fraction_ns += u64::from(b - b'0') * 10u64.pow((digits - 1 - i) as u32);
    }
    whole
        .parse::<u64>()
        .ok()
        .and_then(|w| w.checked_mul(scale))
        .and_then(|w| w.checked_add(fraction_ns))
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(text: &str, line: usize, column: usize, reason_part: &str) {
        match Recording::parse("t", "t.csv", text) {
            Err(CsvError::Malformed {
                line: l,
                column: c,
                reason,
                ..
            }) => {
                assert_eq!((l, c), (line, column), "{reason}");
                assert!(reason.contains(reason_part), "{reason}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    const EUROC: &str = "#timestamp [ns],w_RS_S_x [rad s^-1],w_RS_S_y [rad s^-1],w_RS_S_z [rad s^-1],a_RS_S_x [m s^-2],a_RS_S_y [m s^-2],a_RS_S_z [m s^-2]\n\
        1403636579758555392,-0.099134701513277898,0.14730578886832138,0.02722713633111154,8.1476917083333333,-0.37592158333333331,-2.4026292499999999\n\
        1403636579763555584,-0.099134701513277898,0.14032447186034408,0.029321531433504733,8.033280791666666,-0.40861041666666664,-2.4026292499999999\n";

    #[test]
    fn a_recording_spanning_more_than_a_century_is_refused() {
        // Found by the fuzzer: a timestamp with one digit too many wrapped the loop period.
        let text = "#timestamp [ns],w_x,w_y,w_z,a_x,a_y,a_z\n1403636579758555392,0,0,0,0,0,1\n14036365797635155583,0,0,0,0,0,1\n";
        let err = Recording::parse("r", "r.csv", text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("r.csv:3:1") && err.contains("century"),
            "{err}"
        );
    }

    #[test]
    fn euroc_is_si_and_nanoseconds() {
        let r = Recording::parse("euroc", "euroc.csv", EUROC).expect("parses");
        assert_eq!(r.samples.len(), 2);
        assert_eq!(r.samples[1].t_ns, 5_000_192);
        assert_eq!(
            r.samples[0].gyro[0],
            "-0.099134701513277898"
                .parse::<f64>()
                .ok()
                .unwrap_or_default()
        );
        assert_eq!(
            r.samples[0].accel[0],
            "8.1476917083333333".parse::<f64>().ok().unwrap_or_default()
        );
        assert!(r.layout.starts_with("EuRoC"));
    }

    #[test]
    fn bare_euroc_names_are_si() {
        let text = "#timestamp [ns],w_x,w_y,w_z,a_x,a_y,a_z\n0,1,2,3,4,5,6\n";
        let r = Recording::parse("e", "e.csv", text).expect("parses");
        assert_eq!(r.samples[0].gyro, [1.0, 2.0, 3.0]);
        assert_eq!(r.samples[0].accel, [4.0, 5.0, 6.0]);
    }

    #[test]
    fn xio_converts_degrees_and_g() {
        let text = "Time (s),Gyroscope X (deg/s),Gyroscope Y (deg/s),Gyroscope Z (deg/s),Accelerometer X (g),Accelerometer Y (g),Accelerometer Z (g),Barometer (hPa)\r\n\
            0.000000000,180,0,-90,1,0,-0.5,984.7\r\n0.020248413,0,0,0,0,0,1,984.7\r\n";
        let r = Recording::parse("n", "n.csv", text).expect("parses");
        assert_eq!(r.samples[1].t_ns, 20_248_413);
        assert!((r.samples[0].gyro[0] - std::f64::consts::PI).abs() < 1e-12);
        assert!((r.samples[0].gyro[2] + std::f64::consts::FRAC_PI_2).abs() < 1e-12);
        assert_eq!(r.samples[0].accel[0], STANDARD_GRAVITY);
        assert_eq!(r.samples[0].accel[2], -0.5 * STANDARD_GRAVITY);
    }

    #[test]
    fn microsecond_timestamps_start_at_zero() {
        let text = "Timestamp (us),Gyroscope X (deg/s),Gyroscope Y (deg/s),Gyroscope Z (deg/s),Accelerometer X (g),Accelerometer Y (g),Accelerometer Z (g)\n\
            392093562,0,0,0,0,0,1\n392113596,0,0,0,0,0,1\n";
        let r = Recording::parse("x", "x.csv", text).expect("parses");
        assert_eq!(r.samples[1].t_ns, 20_034_000);
        assert_eq!(r.median_interval_ns, 20_034_000);
    }

    #[test]
    fn malformed_rows_name_line_and_column() {
        let header = "#timestamp [ns],w_x,w_y,w_z,a_x,a_y,a_z\n";
        check_err(
            &format!("{header}0,1,2,3,4,5\n"),
            2,
            7,
            "expected 7 columns",
        );
        check_err(
            &format!("{header}0,1,2,x3,4,5,6\n"),
            2,
            4,
            "`x3` is not a number",
        );
        check_err(
            &format!("{header}0,1,2,3,4,5,NaN\n"),
            2,
            7,
            "not a finite number",
        );
        check_err(
            &format!("{header}10,1,2,3,4,5,6\n5,1,2,3,4,5,6\n"),
            3,
            1,
            "not after the one on line 2",
        );
        check_err(
            &format!("{header}10,1,2,3,4,5,6\n10,1,2,3,4,5,6\n"),
            3,
            1,
            "not after",
        );
        check_err(&format!("{header}-1,1,2,3,4,5,6\n"), 2, 1, "non-negative");
        check_err(
            &format!("{header}0,1,2,3,4,5,6\n\n1,1,2,3,4,5,6\n"),
            3,
            1,
            "blank line",
        );
        check_err(header, 2, 1, "no samples");
        check_err(
            "time,w_x,w_y,w_z,a_x,a_y,a_z\n0,1,2,3,4,5,6\n",
            1,
            1,
            "not a timestamp",
        );
        check_err(
            "#timestamp [ns],w_x,w_y,a_x,a_y,a_z\n",
            1,
            7,
            "no gyroscope z",
        );
        check_err("", 1, 1, "not a timestamp");
    }

    #[test]
    fn time_parsing_is_exact() {
        assert_eq!(parse_time("0.020248413", TimeUnit::Seconds), Ok(20_248_413));
        assert_eq!(parse_time("9.98", TimeUnit::Seconds), Ok(9_980_000_000));
        assert_eq!(
            parse_time("392093562", TimeUnit::Micros),
            Ok(392_093_562_000)
        );
        assert!(parse_time("1.0000000001", TimeUnit::Seconds).is_err());
        assert!(parse_time("1e3", TimeUnit::Seconds).is_err());
    }
}
