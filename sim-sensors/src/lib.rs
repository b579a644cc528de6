//! The IMU sensor stub (`aviary.sensors.v1.SensorStub`). Its contract lives in
//! `aviary-proto`; the replay, synthetic and bridge sources are tracked in issue 5.

pub use aviary_proto::sensors::v1 as pb;
