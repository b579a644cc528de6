//! One subscriber's sample generator: a replayed recording or a synthetic signal, with
//! that stream's faults applied and `seq` numbers assigned.
//!
//! Invariant: sensor time (`timestamp_ns`) is computed from the sample index, never
//! accumulated, so it is evenly spaced (synthetic) or exactly as recorded (replay, plus
//! one loop period per loop) and cannot drift however long the stream runs.

use std::sync::Arc;

use crate::faults::{Faults, Injector, Reading};
use crate::pb;
use crate::recording::Recording;
use crate::synthetic::{Signal, SignalSpec};

/// Where samples come from.
#[derive(Debug)]
enum Origin {
    Synthetic {
        signal: Box<Signal>,
        period_ns: f64,
        start_ns: u64,
        index: u64,
    },
    Replay {
        recording: Arc<Recording>,
        index: usize,
        loop_no: u64,
        looping: bool,
    },
}

/// One step of a stream: when it is due (sensor time) and the sample, unless a fault
/// dropped it.
#[derive(Clone, Debug, PartialEq)]
pub struct Tick {
    /// Sensor time of the sample (before jitter): pacing is derived from it.
    pub sensor_ns: u64,
    /// What the subscriber receives; `None` for a dropout.
    pub sample: Option<pb::ImuSample>,
}

pub use crate::units::MAX_SENSOR_NS;

/// A stream of samples for one subscriber.
#[derive(Debug)]
pub struct SampleStream {
    sensor_id: String,
    origin: Origin,
    faults: Option<Injector>,
    seq: u64,
}

impl SampleStream {
    /// A synthetic stream at `rate_hz` starting at sensor time `start_ns`.
    pub fn synthetic(
        sensor_id: &str,
        spec: SignalSpec,
        seed: u64,
        rate_hz: f64,
        start_ns: u64,
        faults: &Faults,
    ) -> SampleStream {
        SampleStream {
            sensor_id: sensor_id.to_owned(),
            origin: Origin::Synthetic {
                signal: Box::new(Signal::new(spec, seed)),
                period_ns: 1e9 / rate_hz,
                start_ns,
                index: 0,
            },
            faults: injector(faults, seed),
            seq: 0,
        }
    }

    /// A replay from sensor time `start_ns`; `Err` if that is past the end of a
    /// recording that does not loop.
    pub fn replay(
        recording: Arc<Recording>,
        looping: bool,
        start_ns: u64,
        seed: u64,
        faults: &Faults,
    ) -> Result<SampleStream, String> {
        let period = recording.loop_period_ns().max(1);
        let (loop_no, within) = if looping {
            (start_ns / period, start_ns % period)
        } else {
            (0, start_ns)
        };
        if !looping && within > recording.span_ns() {
            return Err(format!(
                "start_offset_ns {start_ns} is past the end of `{}` ({} ns long; --loop replays it forever)",
                recording.name,
                recording.span_ns()
            ));
        }
        let (loop_no, index) = match recording.samples.iter().position(|s| s.t_ns >= within) {
            Some(i) => (loop_no, i),
            // Between the last sample and the loop point: start at the next loop.
            None => (loop_no + 1, 0),
        };
        Ok(SampleStream {
            sensor_id: recording.name.clone(),
            origin: Origin::Replay {
                recording,
                index,
                loop_no,
                looping,
            },
            faults: injector(faults, seed),
            seq: 0,
        })
    }

    /// The next step, or `None` when a non-looping replay has sent its last sample.
    pub fn next_tick(&mut self) -> Option<Tick> {
        let (sensor_ns, gyro, accel, temperature_c) = match &mut self.origin {
            Origin::Synthetic {
                signal,
                period_ns,
                start_ns,
                index,
            } => {
                // Sensor time never wraps: a stream that would pass u64 ends instead.
                let offset = (*index as f64 * *period_ns).round();
                let t = if offset < u64::MAX as f64 {
                    start_ns.checked_add(offset as u64)?
                } else {
                    return None;
                };
                *index += 1;
                let (g, a, temp) = signal.next(t);
                (t, g, a, temp)
            }
            Origin::Replay {
                recording,
                index,
                loop_no,
                looping,
            } => {
                if *index == recording.samples.len() {
                    if !*looping {
                        return None;
                    }
                    *index = 0;
                    *loop_no += 1;
                }
                let s = recording.samples[*index];
                *index += 1;
                let t = loop_no
                    .checked_mul(recording.loop_period_ns())
                    .and_then(|t| t.checked_add(s.t_ns))?;
                (t, s.gyro, s.accel, s.temperature_c.unwrap_or(f64::NAN))
            }
        };
        let seq = self.seq;
        self.seq += 1;
        let reading = Reading {
            t_ns: sensor_ns,
            gyro,
            accel,
        };
        let reading = match &mut self.faults {
            Some(inj) => inj.apply(reading),
            None => Some(reading),
        };
        Some(Tick {
            sensor_ns,
            sample: reading.map(|r| pb::ImuSample {
                sensor_id: self.sensor_id.clone(),
                seq,
                timestamp_ns: r.t_ns,
                gyro: Some(vector(r.gyro)),
                accel: Some(vector(r.accel)),
                temperature_c,
            }),
        })
    }
}

fn injector(faults: &Faults, seed: u64) -> Option<Injector> {
    (!faults.is_off()).then(|| Injector::new(faults.clone(), seed))
}

fn vector(v: [f64; 3]) -> pb::Vector3 {
    pb::Vector3 {
        x: v[0],
        y: v[1],
        z: v[2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recording() -> Arc<Recording> {
        let text = "#timestamp [ns],w_x,w_y,w_z,a_x,a_y,a_z\n100,0,0,0,0,0,1\n110,0,0,0,0,0,2\n130,0,0,0,0,0,3\n";
        Arc::new(Recording::parse("r", "r.csv", text).expect("valid"))
    }

    fn times(s: &mut SampleStream, n: usize) -> Vec<u64> {
        (0..n)
            .map_while(|_| s.next_tick())
            .filter_map(|t| t.sample.map(|s| s.timestamp_ns))
            .collect()
    }

    #[test]
    fn sensor_time_ends_a_stream_rather_than_wrap() {
        let mut s = SampleStream::synthetic(
            "imu0",
            SignalSpec::default(),
            1,
            1000.0,
            u64::MAX - 2_500_000,
            &Faults::default(),
        );
        let t = times(&mut s, 10);
        assert_eq!(t.len(), 3, "{t:?}");
        assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
        let mut looped =
            SampleStream::replay(recording(), true, u64::MAX - 60, 0, &Faults::default())
                .expect("ok");
        let t = times(&mut looped, 10);
        assert!(t.windows(2).all(|w| w[0] < w[1]) && t.len() < 10, "{t:?}");
    }

    #[test]
    fn replay_loops_with_monotonic_time() {
        let mut s = SampleStream::replay(recording(), true, 0, 0, &Faults::default()).expect("ok");
        // span 30, median interval 20 → loop period 50.
        assert_eq!(times(&mut s, 7), vec![0, 10, 30, 50, 60, 80, 100]);
        let mut once =
            SampleStream::replay(recording(), false, 0, 0, &Faults::default()).expect("ok");
        assert_eq!(times(&mut once, 10), vec![0, 10, 30]);
    }

    #[test]
    fn replay_start_offset_skips_in() {
        let mut s =
            SampleStream::replay(recording(), false, 15, 0, &Faults::default()).expect("ok");
        assert_eq!(times(&mut s, 5), vec![30]);
        let mut looped =
            SampleStream::replay(recording(), true, 140, 0, &Faults::default()).expect("ok");
        assert_eq!(times(&mut looped, 2), vec![150, 160]);
        assert!(SampleStream::replay(recording(), false, 31, 0, &Faults::default()).is_err());
    }

    #[test]
    fn synthetic_time_is_evenly_spaced() {
        let mut s = SampleStream::synthetic(
            "imu0",
            SignalSpec::default(),
            1,
            3000.0,
            0,
            &Faults::default(),
        );
        let t = times(&mut s, 300_001);
        // 100 s at 3 kHz: still on the grid (333,333.33 ns rounded), no accumulated error.
        assert_eq!(t[300_000], 100_000_000_000);
        assert!(t
            .windows(2)
            .all(|w| (333_333..=333_334).contains(&(w[1] - w[0]))));
    }
}
