//! `aviary.sensors.v1.SensorStub`: turns requests into validated subscriptions and
//! bridged samples; every refusal names the field and what would be accepted.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::config::{Config, Mode, Sensors, MAX_RATE_HZ};
use crate::faults::Faults;
use crate::hub::Hub;
use crate::pacer::Pacer;
use crate::pb;
use crate::source::SampleStream;
use crate::subscriber::{Feed, PulledStream, QueueStream};

/// The gRPC service.
pub struct SensorStubApi {
    config: Arc<Config>,
    ids: Vec<String>,
    hub: Arc<Hub>,
    pacer: Arc<Pacer>,
}

impl SensorStubApi {
    /// A service over `hub`, pacing with `pacer`.
    pub fn new(config: Arc<Config>, hub: Arc<Hub>, pacer: Arc<Pacer>) -> SensorStubApi {
        SensorStubApi {
            ids: config.sensors.ids(),
            config,
            hub,
            pacer,
        }
    }

    /// `sensor_id`, or the default for an empty one; NOT_FOUND lists what exists.
    fn sensor(&self, requested: &str) -> Result<(usize, String), Status> {
        if requested.is_empty() {
            return Ok((0, self.ids[0].clone()));
        }
        self.ids
            .iter()
            .position(|id| id == requested)
            .map(|i| (i, requested.to_owned()))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown sensor `{requested}`; this stub serves: {}",
                    self.ids.join(", ")
                ))
            })
    }
}

type SampleStreamBox = Pin<Box<dyn Stream<Item = Result<pb::ImuSample, Status>> + Send>>;

/// Every sensor of a stub gets its own noise from one seed.
fn sensor_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[tonic::async_trait]
impl pb::sensor_stub_server::SensorStub for SensorStubApi {
    type StreamImuStream = SampleStreamBox;

    async fn stream_imu(
        &self,
        request: Request<pb::StreamImuRequest>,
    ) -> Result<Response<SampleStreamBox>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let r = request.into_inner();
        let (index, sensor_id) = self.sensor(&r.sensor_id)?;
        if r.start_offset_ns > crate::units::MAX_SENSOR_NS {
            return Err(Status::invalid_argument(format!(
                "start_offset_ns {}: at most {} (a century of sensor time)",
                r.start_offset_ns,
                crate::units::MAX_SENSOR_NS
            )));
        }
        if !(r.rate_hz.is_finite() && (0.0..=MAX_RATE_HZ).contains(&r.rate_hz)) {
            return Err(Status::invalid_argument(format!(
                "rate_hz {}: must be between 0 (the configured rate) and {MAX_RATE_HZ}",
                r.rate_hz
            )));
        }
        let faults = match r.faults {
            Some(f) => Faults::try_from(f).map_err(Status::invalid_argument)?,
            None => self.config.faults.clone(),
        };
        let seed = sensor_seed(r.seed.unwrap_or(self.config.seed), index);
        if self.hub.len() >= self.config.max_subscribers {
            return Err(Status::resource_exhausted(format!(
                "{} subscribers already (--max-subscribers); try again later",
                self.config.max_subscribers
            )));
        }
        let speed = self.config.speed;
        let (stream, rate_hz) = match &self.config.sensors {
            Sensors::Synthetic { spec, rate_hz, .. } => {
                let rate = if r.rate_hz == 0.0 {
                    *rate_hz
                } else {
                    r.rate_hz
                };
                let stream = SampleStream::synthetic(
                    &sensor_id,
                    (**spec).clone(),
                    seed,
                    rate,
                    r.start_offset_ns,
                    &faults,
                );
                (Some(stream), rate)
            }
            Sensors::Replay {
                recordings,
                looping,
            } => {
                let recording = recordings[index].clone();
                if r.rate_hz != 0.0 {
                    return Err(Status::invalid_argument(format!(
                        "rate_hz {}: replay streams at the recorded rate ({:.1} Hz for `{sensor_id}`); \
                         leave it 0 and scale time with --speed",
                        r.rate_hz,
                        recording.rate_hz()
                    )));
                }
                let rate = recording.rate_hz();
                let stream =
                    SampleStream::replay(recording, *looping, r.start_offset_ns, seed, &faults)
                        .map_err(Status::out_of_range)?;
                (Some(stream), rate)
            }
            Sensors::Bridge { .. } => {
                if r.rate_hz != 0.0 || r.start_offset_ns != 0 || r.faults.is_some() {
                    return Err(Status::invalid_argument(
                        "bridge streams pass injected samples through as they come: \
                         rate_hz, start_offset_ns and faults must be unset",
                    ));
                }
                (None, 0.0)
            }
        };
        let feed = if stream.is_none() {
            Feed::Bridge
        } else if speed == 0.0 {
            Feed::Pulled
        } else {
            Feed::Paced
        };
        let sub = self.hub.subscribe(
            &sensor_id,
            peer.clone(),
            rate_hz,
            feed,
            self.config.queue_depth,
        );
        tracing::info!(stream = sub.id, %peer, sensor = %sensor_id, rate_hz, ?feed, "subscriber joined");
        let out: SampleStreamBox = match (stream, feed) {
            (Some(stream), Feed::Pulled) => {
                Box::pin(PulledStream::new(stream, sub, self.hub.clone()))
            }
            (Some(stream), _) => {
                self.pacer.add(stream, sub.clone(), speed);
                Box::pin(QueueStream::new(sub, self.hub.clone()))
            }
            (None, _) => Box::pin(QueueStream::new(sub, self.hub.clone())),
        };
        Ok(Response::new(out))
    }

    async fn inject_imu(
        &self,
        request: Request<Streaming<pb::ImuSample>>,
    ) -> Result<Response<pb::InjectImuResponse>, Status> {
        if self.config.sensors.mode() != Mode::Bridge {
            return Err(Status::failed_precondition(format!(
                "InjectImu needs --mode bridge; this stub is in {} mode",
                self.config.sensors.mode().as_str()
            )));
        }
        let mut incoming = request.into_inner();
        let mut accepted: u64 = 0;
        let mut reached = 0;
        while let Some(next) = incoming.next().await {
            let refuse = |what: String| {
                Status::invalid_argument(format!(
                    "sample {} refused: {what}; the {accepted} before it were delivered",
                    accepted + 1
                ))
            };
            let mut sample = next?;
            let (_, sensor_id) = self
                .sensor(&sample.sensor_id)
                .map_err(|s| refuse(s.message().to_owned()))?;
            sample.sensor_id = sensor_id;
            let (Some(g), Some(a)) = (&sample.gyro, &sample.accel) else {
                return Err(refuse("gyro and accel are required".into()));
            };
            let values = [g.x, g.y, g.z, a.x, a.y, a.z];
            if values.iter().any(|v| !v.is_finite()) || sample.temperature_c.is_infinite() {
                return Err(refuse("gyro and accel must be finite numbers".into()));
            }
            if let Err(last) = self
                .hub
                .advance_bridge_clock(&sample.sensor_id, sample.timestamp_ns)
            {
                return Err(refuse(format!(
                    "timestamp_ns {} is not after {last}, already sent for `{}`",
                    sample.timestamp_ns, sample.sensor_id
                )));
            }
            reached = self.hub.publish(&sample);
            accepted += 1;
        }
        Ok(Response::new(pb::InjectImuResponse {
            accepted,
            subscribers: u32::try_from(reached).unwrap_or(u32::MAX),
        }))
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::StubStatus>, Status> {
        let (samples_sent, samples_dropped, subscribers_dropped, streams) = self.hub.status();
        let (source, rate_hz) = match &self.config.sensors {
            Sensors::Synthetic { spec, rate_hz, .. } => (spec.to_string(), *rate_hz),
            Sensors::Replay {
                recordings,
                looping,
            } => (
                recordings
                    .iter()
                    .map(|r| {
                        format!(
                            "{} ({}, {} samples, {:.1} Hz{})",
                            r.source,
                            r.layout,
                            r.samples.len(),
                            r.rate_hz(),
                            if *looping { ", looping" } else { "" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                recordings.first().map_or(0.0, |r| r.rate_hz()),
            ),
            Sensors::Bridge { .. } => ("InjectImu".to_owned(), 0.0),
        };
        Ok(Response::new(pb::StubStatus {
            mode: self.config.sensors.mode().as_str().to_owned(),
            source,
            rate_hz,
            subscribers: u32::try_from(streams.len()).unwrap_or(u32::MAX),
            samples_sent,
            samples_dropped,
            sensors: self.ids.clone(),
            subscribers_dropped,
            speed: self.config.speed,
            streams,
        }))
    }
}
