//! Synthetic IMU signals: per axis a sum of sines, Gaussian noise and a constant.
//!
//! A spec reads `AXIS=TERM+TERM...`, e.g. `gyro.z=sine:0.5:2:0+noise:0.01` or
//! `accel.z=const:9.80665+noise:0.02`, with terms `sine:AMPLITUDE:FREQUENCY_HZ[:PHASE_RAD]`,
//! `noise:STDDEV` and `const:VALUE`; axes are `gyro.x|y|z` (rad/s), `accel.x|y|z` (m/s²)
//! and `temperature` (°C). Invariant: a signal is a pure function of (seed, sample
//! index, sensor time), so the same seed gives the same samples bit for bit.

use std::fmt;
use std::str::FromStr;

use crate::rng::SplitMix64;

/// Gyro x, y, z, accel x, y, z, temperature.
pub const AXES: [&str; 7] = [
    "gyro.x",
    "gyro.y",
    "gyro.z",
    "accel.x",
    "accel.y",
    "accel.z",
    "temperature",
];

/// One sine term.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sine {
    /// Peak value in the axis' unit.
    pub amplitude: f64,
    /// Hz.
    pub frequency_hz: f64,
    /// Radians.
    pub phase_rad: f64,
}

/// What one axis produces: `constant + Σ sines + N(0, noise_std²)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Waveform {
    /// Sine terms.
    pub sines: Vec<Sine>,
    /// Standard deviation of the Gaussian noise.
    pub noise_std: f64,
    /// Offset.
    pub constant: f64,
}

/// `AXIS=TERMS`, as given to `--axis`.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisSpec {
    /// Index into [`AXES`].
    pub axis: usize,
    /// The signal.
    pub waveform: Waveform,
}

/// The waveform of every axis.
#[derive(Clone, Debug, PartialEq)]
pub struct SignalSpec {
    /// Indexed like [`AXES`].
    pub axes: [Waveform; 7],
}

impl Default for SignalSpec {
    /// A device lying still with a slow yaw oscillation: gravity on z, sensor-grade noise.
    fn default() -> SignalSpec {
        let noise = |noise_std: f64, constant: f64| Waveform {
            sines: Vec::new(),
            noise_std,
            constant,
        };
        let mut yaw = noise(0.002, 0.0);
        yaw.sines.push(Sine {
            amplitude: 0.5,
            frequency_hz: 0.5,
            phase_rad: 0.0,
        });
        SignalSpec {
            axes: [
                noise(0.002, 0.0),
                noise(0.002, 0.0),
                yaw,
                noise(0.02, 0.0),
                noise(0.02, 0.0),
                noise(0.02, crate::units::STANDARD_GRAVITY),
                noise(0.0, 25.0),
            ],
        }
    }
}

impl SignalSpec {
    /// The default signal with `overrides` replacing whole axes.
    pub fn with(overrides: &[AxisSpec]) -> SignalSpec {
        let mut spec = SignalSpec::default();
        for o in overrides {
            spec.axes[o.axis] = o.waveform.clone();
        }
        spec
    }
}

impl fmt::Display for SignalSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, w)) in AXES.iter().zip(&self.axes).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={w}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Waveform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut terms = vec![format!("const:{}", self.constant)];
        for s in &self.sines {
            terms.push(format!(
                "sine:{}:{}:{}",
                s.amplitude, s.frequency_hz, s.phase_rad
            ));
        }
        if self.noise_std > 0.0 {
            terms.push(format!("noise:{}", self.noise_std));
        }
        f.write_str(&terms.join("+"))
    }
}

impl FromStr for AxisSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<AxisSpec, String> {
        let (name, terms) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}`: expected AXIS=TERM+TERM, e.g. gyro.z=sine:0.5:2"))?;
        let axis = AXES
            .iter()
            .position(|a| *a == name.trim())
            .ok_or_else(|| format!("`{name}`: unknown axis (one of {})", AXES.join(", ")))?;
        let mut waveform = Waveform::default();
        for term in terms.split('+') {
            let parts: Vec<&str> = term.trim().split(':').collect();
            let numbers = parts[1..]
                .iter()
                .map(|p| match p.trim().parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(v),
                    _ => Err(format!("`{term}`: `{p}` is not a finite number")),
                })
                .collect::<Result<Vec<f64>, String>>()?;
            match (parts[0].trim(), numbers.as_slice()) {
                ("sine", [amplitude, frequency_hz]) | ("sine", [amplitude, frequency_hz, _]) => {
                    if *frequency_hz < 0.0 {
                        return Err(format!("`{term}`: frequency must not be negative"));
                    }
                    waveform.sines.push(Sine {
                        amplitude: *amplitude,
                        frequency_hz: *frequency_hz,
                        phase_rad: numbers.get(2).copied().unwrap_or(0.0),
                    });
                }
                ("noise", [std]) if *std >= 0.0 => waveform.noise_std += std,
                ("noise", _) => {
                    return Err(format!(
                        "`{term}`: expected noise:STDDEV with STDDEV >= 0"
                    ))
                }
                ("const", [value]) => waveform.constant += value,
                _ => {
                    return Err(format!(
                        "`{term}`: expected sine:AMPLITUDE:FREQUENCY_HZ[:PHASE_RAD], noise:STDDEV or const:VALUE"
                    ))
                }
            }
        }
        Ok(AxisSpec { axis, waveform })
    }
}

/// A running signal: the spec plus one noise generator per axis.
#[derive(Clone, Debug)]
pub struct Signal {
    spec: SignalSpec,
    noise: Vec<SplitMix64>,
}

impl Signal {
    /// Starts the signal for `seed`.
    pub fn new(spec: SignalSpec, seed: u64) -> Signal {
        let noise = (0..AXES.len() as u64)
            .map(|axis| SplitMix64::new(seed, axis))
            .collect();
        Signal { spec, noise }
    }

    /// The next reading, at sensor time `t_ns`: gyro, accel, temperature.
    pub fn next(&mut self, t_ns: u64) -> ([f64; 3], [f64; 3], f64) {
        let t = t_ns as f64 * 1e-9;
        let mut values = [0.0; 7];
        for (axis, value) in values.iter_mut().enumerate() {
            let w = &self.spec.axes[axis];
            let mut v = w.constant;
            for s in &w.sines {
                v += s.amplitude * (std::f64::consts::TAU * s.frequency_hz * t + s.phase_rad).sin();
            }
            if w.noise_std > 0.0 {
                v += w.noise_std * self.noise[axis].normal();
            }
            *value = v;
        }
        (
            [values[0], values[1], values[2]],
            [values[3], values[4], values[5]],
            values[6],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, n: u64) -> Vec<u64> {
        let mut s = Signal::new(SignalSpec::default(), seed);
        (0..n)
            .flat_map(|i| {
                let (g, a, t) = s.next(i * 1_000_000);
                [g[0], g[1], g[2], a[0], a[1], a[2], t].map(f64::to_bits)
            })
            .collect()
    }

    #[test]
    fn same_seed_is_bit_identical_and_other_seeds_differ() {
        assert_eq!(run(42, 1000), run(42, 1000));
        assert_ne!(run(42, 1000), run(43, 1000));
    }

    #[test]
    fn spec_terms_add_up() {
        let spec: AxisSpec = "gyro.y=const:1+sine:2:0.25+sine:1:0:1.5707963267948966"
            .parse()
            .expect("valid spec");
        assert_eq!(spec.axis, 1);
        let mut s = Signal::new(SignalSpec::with(&[spec]), 0);
        // At t = 1 s: 1 + 2·sin(π/2) + 1·sin(π/2) = 4.
        let (g, _, _) = s.next(1_000_000_000);
        assert!((g[1] - 4.0).abs() < 1e-9, "{}", g[1]);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, part) in [
            ("gyro.w=const:1", "unknown axis"),
            ("gyro.x", "expected AXIS="),
            ("gyro.x=sine:1", "expected sine:"),
            ("gyro.x=noise:-1", "STDDEV >= 0"),
            ("gyro.x=const:abc", "not a finite number"),
            ("gyro.x=sine:1:-2", "must not be negative"),
            ("gyro.x=ramp:1", "expected sine:"),
        ] {
            let err = spec.parse::<AxisSpec>().expect_err(spec);
            assert!(err.contains(part), "{spec}: {err}");
        }
    }
}
