//! Logging and Prometheus metrics set-up for `aviary-sensors`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;

use crate::config::LogFormat;

/// Installs the tracing subscriber (`RUST_LOG` filters, default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Serves Prometheus metrics on `addr` (must be called inside the runtime).
pub fn init_metrics(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        // Per-stream lag gauges of closed streams disappear instead of piling up; live
        // ones are set on every sample, and the subscriber gauge is refreshed each second.
        .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(30)))
        .install()
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
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
