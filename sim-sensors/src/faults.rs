//! Hardware faults injected into a stream for HIL tests: dropouts, bias steps and drift,
//! spikes, saturation, stuck-at values and timestamp jitter.
//!
//! Configured per stub (`--fault KEY=VALUE`, the keys of `aviary.sensors.v1.Faults`) or
//! per stream (`StreamImuRequest.faults`). Invariant: an injector draws only from its own
//! seeded generator, so a seed replays the same faults, and timestamps stay strictly
//! increasing whatever the jitter.

use std::str::FromStr;

use crate::pb;
use crate::rng::SplitMix64;

/// Validated fault settings; all zero means no faults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Chance per sample that a dropout starts.
    pub dropout_rate: f64,
    /// Samples lost per dropout (≥ 1).
    pub dropout_length: u32,
    /// Step bias on the gyro, rad/s.
    pub gyro_bias: [f64; 3],
    /// Step bias on the accelerometer, m/s².
    pub accel_bias: [f64; 3],
    /// Sensor time at which bias and drift begin.
    pub bias_at_ns: u64,
    /// Gyro drift, rad/s per second after `bias_at_ns`.
    pub gyro_drift: [f64; 3],
    /// Accelerometer drift, m/s² per second after `bias_at_ns`.
    pub accel_drift: [f64; 3],
    /// Chance per sample of a spike.
    pub spike_rate: f64,
    /// Gyro spike height, rad/s.
    pub spike_gyro: f64,
    /// Accelerometer spike height, m/s².
    pub spike_accel: f64,
    /// Gyro saturation, rad/s (0 = none).
    pub gyro_range: f64,
    /// Accelerometer saturation, m/s² (0 = none).
    pub accel_range: f64,
    /// Chance per sample that the output freezes.
    pub stuck_rate: f64,
    /// Samples frozen per stuck episode (≥ 1).
    pub stuck_length: u32,
    /// Maximum timestamp displacement, ns.
    pub timestamp_jitter_ns: u64,
}

impl Faults {
    /// True when nothing is injected.
    pub fn is_off(&self) -> bool {
        *self
            == Faults {
                dropout_length: self.dropout_length,
                stuck_length: self.stuck_length,
                ..Faults::default()
            }
    }

    /// Applies one `KEY=VALUE` (vector keys take `X,Y,Z`).
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("`{assignment}`: expected KEY=VALUE, e.g. dropout_rate=0.01"))?;
        let key = key.trim();
        let scalar = || -> Result<f64, String> {
            match value.trim().parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(format!("{key}: `{value}` is not a finite number")),
            }
        };
        let count = || -> Result<u64, String> {
            value
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("{key}: `{value}` is not a whole number"))
        };
        let vector = || -> Result<[f64; 3], String> {
            let parts: Vec<f64> = value
                .split(',')
                .map(|p| p.trim().parse::<f64>().ok().filter(|v| v.is_finite()))
                .collect::<Option<Vec<f64>>>()
                .ok_or_else(|| format!("{key}: `{value}` is not X,Y,Z"))?;
            <[f64; 3]>::try_from(parts).map_err(|_| format!("{key}: `{value}` is not X,Y,Z"))
        };
        match key {
            "dropout_rate" => self.dropout_rate = scalar()?,
            "dropout_length" => {
                self.dropout_length = u32::try_from(count()?).map_err(|e| e.to_string())?
            }
            "gyro_bias" => self.gyro_bias = vector()?,
            "accel_bias" => self.accel_bias = vector()?,
            "bias_at_ns" => self.bias_at_ns = count()?,
            "gyro_drift" => self.gyro_drift = vector()?,
            "accel_drift" => self.accel_drift = vector()?,
            "spike_rate" => self.spike_rate = scalar()?,
            "spike_gyro" => self.spike_gyro = scalar()?,
            "spike_accel" => self.spike_accel = scalar()?,
            "gyro_range" => self.gyro_range = scalar()?,
            "accel_range" => self.accel_range = scalar()?,
            "stuck_rate" => self.stuck_rate = scalar()?,
            "stuck_length" => {
                self.stuck_length = u32::try_from(count()?).map_err(|e| e.to_string())?
            }
            "timestamp_jitter_ns" => self.timestamp_jitter_ns = count()?,
            other => {
                return Err(format!(
                    "unknown fault `{other}` (dropout_rate, dropout_length, gyro_bias, accel_bias, \
                     bias_at_ns, gyro_drift, accel_drift, spike_rate, spike_gyro, spike_accel, \
                     gyro_range, accel_range, stuck_rate, stuck_length, timestamp_jitter_ns)"
                ))
            }
        }
        self.validate()
    }

    /// Rates are probabilities, ranges and heights not negative; lengths 0 mean 1.
    fn validate(&mut self) -> Result<(), String> {
        for (name, p) in [
            ("dropout_rate", self.dropout_rate),
            ("spike_rate", self.spike_rate),
            ("stuck_rate", self.stuck_rate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} {p} is not a probability in [0, 1]"));
            }
        }
        for (name, v) in [
            ("spike_gyro", self.spike_gyro),
            ("spike_accel", self.spike_accel),
            ("gyro_range", self.gyro_range),
            ("accel_range", self.accel_range),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} {v} must be a finite number >= 0"));
            }
        }
        let all = self
            .gyro_bias
            .iter()
            .chain(&self.accel_bias)
            .chain(&self.gyro_drift)
            .chain(&self.accel_drift);
        if let Some(v) = all.into_iter().find(|v| !v.is_finite()) {
            return Err(format!("bias and drift must be finite, got {v}"));
        }
        // Sensor time is u64 nanoseconds: bounds that keep every sum of them far from
        // wrapping (a century of sensor time; a second of jitter).
        if self.bias_at_ns > crate::units::MAX_SENSOR_NS {
            return Err(format!(
                "bias_at_ns {} is past {} (a century)",
                self.bias_at_ns,
                crate::units::MAX_SENSOR_NS
            ));
        }
        if self.timestamp_jitter_ns > 1_000_000_000 {
            return Err(format!(
                "timestamp_jitter_ns {} is more than a second",
                self.timestamp_jitter_ns
            ));
        }
        for (name, n) in [
            ("dropout_length", self.dropout_length),
            ("stuck_length", self.stuck_length),
        ] {
            if n > 1_000_000 {
                return Err(format!("{name} {n} is more than 1000000 samples"));
            }
        }
        self.dropout_length = self.dropout_length.max(1);
        self.stuck_length = self.stuck_length.max(1);
        Ok(())
    }
}

impl FromStr for Faults {
    type Err = String;

    /// `KEY=VALUE;KEY=VALUE` (one flag may carry several).
    fn from_str(text: &str) -> Result<Faults, String> {
        let mut faults = Faults::default();
        for part in text.split(';').filter(|p| !p.trim().is_empty()) {
            faults.set(part)?;
        }
        faults.validate()?;
        Ok(faults)
    }
}

fn vector(v: Option<pb::Vector3>) -> [f64; 3] {
    v.map(|v| [v.x, v.y, v.z]).unwrap_or_default()
}

impl TryFrom<pb::Faults> for Faults {
    type Error = String;

    fn try_from(p: pb::Faults) -> Result<Faults, String> {
        let mut faults = Faults {
            dropout_rate: p.dropout_rate,
            dropout_length: p.dropout_length,
            gyro_bias: vector(p.gyro_bias),
            accel_bias: vector(p.accel_bias),
            bias_at_ns: p.bias_at_ns,
            gyro_drift: vector(p.gyro_drift),
            accel_drift: vector(p.accel_drift),
            spike_rate: p.spike_rate,
            spike_gyro: p.spike_gyro,
            spike_accel: p.spike_accel,
            gyro_range: p.gyro_range,
            accel_range: p.accel_range,
            stuck_rate: p.stuck_rate,
            stuck_length: p.stuck_length,
            timestamp_jitter_ns: p.timestamp_jitter_ns,
        };
        faults.validate().map_err(|e| format!("faults: {e}"))?;
        Ok(faults)
    }
}

/// One stream's fault state.
#[derive(Clone, Debug)]
pub struct Injector {
    faults: Faults,
    rng: SplitMix64,
    dropout_left: u32,
    stuck_left: u32,
    last_values: Option<([f64; 3], [f64; 3])>,
    last_timestamp: Option<u64>,
}

/// A sample before it becomes a message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    /// Sensor time.
    pub t_ns: u64,
    /// rad/s.
    pub gyro: [f64; 3],
    /// m/s².
    pub accel: [f64; 3],
}

impl Injector {
    /// An injector drawing from `seed` (its own stream, apart from the signal's noise).
    pub fn new(faults: Faults, seed: u64) -> Injector {
        Injector {
            faults,
            rng: SplitMix64::new(seed, 0xFA17),
            dropout_left: 0,
            stuck_left: 0,
            last_values: None,
            last_timestamp: None,
        }
    }

    /// The reading as the faulty sensor reports it, or `None` if it is dropped.
    pub fn apply(&mut self, mut r: Reading) -> Option<Reading> {
        let f = &self.faults;
        if r.t_ns >= f.bias_at_ns {
            let since = (r.t_ns - f.bias_at_ns) as f64 * 1e-9;
            for i in 0..3 {
                r.gyro[i] += f.gyro_bias[i] + f.gyro_drift[i] * since;
                r.accel[i] += f.accel_bias[i] + f.accel_drift[i] * since;
            }
        }
        if self.rng.chance(f.spike_rate) {
            for i in 0..3 {
                r.gyro[i] += self.rng.sign() * f.spike_gyro;
                r.accel[i] += self.rng.sign() * f.spike_accel;
            }
        }
        if self.stuck_left == 0 && self.rng.chance(f.stuck_rate) {
            self.stuck_left = f.stuck_length;
        }
        if self.stuck_left > 0 {
            self.stuck_left -= 1;
            if let Some((gyro, accel)) = self.last_values {
                r.gyro = gyro;
                r.accel = accel;
            }
        }
        clamp(&mut r.gyro, f.gyro_range);
        clamp(&mut r.accel, f.accel_range);
        self.last_values = Some((r.gyro, r.accel));
        if f.timestamp_jitter_ns > 0 {
            let j = f.timestamp_jitter_ns as f64;
            let shift = ((self.rng.next_f64() * 2.0 - 1.0) * j).round() as i64;
            r.t_ns = r.t_ns.saturating_add_signed(shift);
        }
        if let Some(last) = self.last_timestamp {
            r.t_ns = r.t_ns.max(last + 1);
        }
        if self.dropout_left == 0 && self.rng.chance(f.dropout_rate) {
            self.dropout_left = f.dropout_length;
        }
        if self.dropout_left > 0 {
            self.dropout_left -= 1;
            return None;
        }
        self.last_timestamp = Some(r.t_ns);
        Some(r)
    }
}

fn clamp(values: &mut [f64; 3], range: f64) {
    if range > 0.0 {
        for v in values {
            *v = v.clamp(-range, range);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(i: u64) -> Reading {
        Reading {
            t_ns: i * 1_000_000,
            gyro: [0.1, -0.2, 0.3],
            accel: [0.0, 0.0, 9.8],
        }
    }

    fn run(faults: &Faults, seed: u64) -> Vec<Option<Reading>> {
        let mut inj = Injector::new(faults.clone(), seed);
        (0..2000).map(|i| inj.apply(reading(i))).collect()
    }

    #[test]
    fn dropouts_are_seeded_and_come_in_bursts() {
        let faults: Faults = "dropout_rate=0.01;dropout_length=5".parse().expect("valid");
        let a = run(&faults, 1);
        assert_eq!(a, run(&faults, 1));
        assert_ne!(a, run(&faults, 2));
        let dropped = a.iter().filter(|r| r.is_none()).count();
        assert!(dropped > 20, "{dropped}");
        // Every dropout is a run of at least 5 (runs may touch).
        let mut run_len = 0;
        for r in a.iter().chain([Some(reading(0))].iter()) {
            if r.is_none() {
                run_len += 1;
            } else {
                assert!(run_len == 0 || run_len >= 5, "run of {run_len}");
                run_len = 0;
            }
        }
    }

    #[test]
    fn bias_drift_and_saturation() {
        let faults: Faults =
            "gyro_bias=1,0,0;bias_at_ns=500000000;accel_drift=0,0,1;accel_range=10"
                .parse()
                .expect("valid");
        let out = run(&faults, 0);
        let before = out[499].expect("kept");
        assert_eq!(before.gyro[0], 0.1);
        let after = out[500].expect("kept");
        assert!((after.gyro[0] - 1.1).abs() < 1e-12);
        // 1.5 s after the step: 9.8 + 1.5 m/s² drift, clamped at 10.
        assert_eq!(out[1999].expect("kept").accel[2], 10.0);
    }

    #[test]
    fn stuck_values_repeat_and_spikes_jump() {
        let faults: Faults = "stuck_rate=1;stuck_length=3".parse().expect("valid");
        let mut inj = Injector::new(faults, 0);
        let first = inj.apply(reading(0)).expect("kept");
        let mut moved = reading(1);
        moved.gyro = [5.0, 5.0, 5.0];
        assert_eq!(inj.apply(moved).expect("kept").gyro, first.gyro);

        let faults: Faults = "spike_rate=1;spike_gyro=100".parse().expect("valid");
        let out = Injector::new(faults, 0).apply(reading(0)).expect("kept");
        assert!(out.gyro.iter().all(|g| g.abs() > 99.0));
    }

    #[test]
    fn jitter_keeps_timestamps_increasing() {
        let faults: Faults = "timestamp_jitter_ns=2000000".parse().expect("valid");
        let out: Vec<u64> = run(&faults, 3)
            .into_iter()
            .flatten()
            .map(|r| r.t_ns)
            .collect();
        assert!(out.windows(2).all(|w| w[1] > w[0]));
        assert!(out
            .iter()
            .enumerate()
            .any(|(i, t)| *t != i as u64 * 1_000_000));
    }

    #[test]
    fn bad_faults_are_refused() {
        for (text, part) in [
            ("dropout_rate=2", "not a probability"),
            ("gyro_bias=1,2", "not X,Y,Z"),
            ("spike_gyro=-1", ">= 0"),
            ("wobble=1", "unknown fault"),
            ("dropout_rate", "expected KEY=VALUE"),
        ] {
            let err = text.parse::<Faults>().expect_err(text);
            assert!(err.contains(part), "{text}: {err}");
        }
        let bad = pb::Faults {
            stuck_rate: -0.5,
            ..Default::default()
        };
        assert!(Faults::try_from(bad).is_err());
    }
}
