//! Prometheus metrics of `aviary-sensors`: every help text.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;

/// Serves Prometheus metrics on `addr` (must be called inside the runtime).
pub fn init_metrics(addr: SocketAddr) -> Result<(), String> {
    let builder = PrometheusBuilder::new()
        // Per-stream lag gauges of closed streams disappear instead of piling up; live
        // ones are set on every sample, and the subscriber gauge is refreshed each second.
        .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(30)));
    aviary_startup::serve_metrics(addr, builder)?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(
        "aviary_sensor_samples_sent_total",
        "Samples taken by StreamImu clients."
    );
    describe_counter!(
        "aviary_sensor_samples_dropped_total",
        "Samples dropped because a subscriber's queue was full (oldest first)."
    );
    describe_counter!(
        "aviary_sensor_samples_injected_total",
        "Samples accepted by InjectImu."
    );
    describe_counter!(
        "aviary_sensor_subscribers_cut_total",
        "Subscribers disconnected after reading nothing for --subscriber-timeout."
    );
    describe_gauge!("aviary_sensor_subscribers", "Open StreamImu calls.");
    describe_gauge!(
        "aviary_sensor_stream_lag_seconds",
        Unit::Seconds,
        "Per stream: how long after its due time the last sample was taken by the client."
    );
}
