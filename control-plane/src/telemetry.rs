//! Prometheus metrics of the control plane: histogram buckets and every help text.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Serves Prometheus metrics on `addr` (must be called inside the runtime).
pub fn init_metrics(addr: SocketAddr) -> Result<(), String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("aviary_propagation_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full("aviary_delta_build_seconds".into()),
            &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0],
        )
        .map_err(|e| e.to_string())?;
    aviary_startup::serve_metrics(addr, builder)?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "aviary_connected_nodes",
        "Edge nodes with a live fleet stream."
    );
    describe_counter!("aviary_streams_admitted_total", "Fleet streams admitted.");
    describe_counter!(
        "aviary_requests_replayed_total",
        "Mutations answered from their request id's record instead of being done again."
    );
    describe_counter!(
        "aviary_heartbeats_total",
        "Health reports received (each is the node's heartbeat; empty when it runs no module)."
    );
    describe_counter!(
        "aviary_store_status_writes_total",
        "Node statuses written to the store (answers, inventory and health-word changes)."
    );
    describe_gauge!(
        "aviary_store_healthy",
        "1 while the metadata store takes writes; 0 from an I/O error until a write succeeds."
    );
    describe_counter!(
        "aviary_store_errors_total",
        "I/O errors of the metadata store (and watermark writes that failed)."
    );
    describe_counter!(
        "aviary_store_quarantined_total",
        "Unreadable records moved to the quarantine tree at start."
    );
    describe_counter!(
        "aviary_audit_events_pruned_total",
        "Audit events deleted by the retention (--audit-retention-events, --audit-retention-age)."
    );
    describe_gauge!(
        "aviary_open_connections",
        "Authenticated connections open (their HTTP/2 session started)."
    );
    describe_counter!(
        "aviary_refusals_unaudited_total",
        "Refused handshakes and calls past the audit budget: counted, not audited."
    );
    describe_counter!(
        "aviary_config_updates_sent_total",
        "Runtime config updates sent on fleet streams."
    );
    describe_counter!(
        "aviary_health_ignored_total",
        "Health reports about modules a node neither runs nor is meant to run, dropped."
    );
    describe_counter!(
        "aviary_streams_shed_total",
        "Fleet streams refused with UNAVAILABLE by admission control."
    );
    describe_counter!(
        "aviary_acks_total",
        "Desired-state messages acknowledged by edges."
    );
    describe_counter!(
        "aviary_nacks_total",
        "Desired-state messages refused by edges."
    );
    describe_counter!(
        "aviary_stale_answers_total",
        "ACKs/NACKs ignored because their nonce was stale."
    );
    describe_counter!(
        "aviary_weight_assignments_sent_total",
        "Weight assignments sent on fleet streams."
    );
    describe_counter!(
        "aviary_handshakes_refused_total",
        "TLS connections refused (handshake failure or no identity)."
    );
    describe_counter!(
        "aviary_calls_refused_total",
        "gRPC calls refused with PERMISSION_DENIED."
    );
    describe_counter!(
        "aviary_transfer_bytes_total",
        Unit::Bytes,
        "Module payload bytes sent on fleet streams, by encoding."
    );
    describe_counter!(
        "aviary_module_updates_sent_total",
        "Module updates (installs and rollbacks) sent on fleet streams."
    );
    describe_histogram!(
        "aviary_delta_build_seconds",
        Unit::Seconds,
        "Time to build one bsdiff delta."
    );
    describe_counter!(
        "aviary_delta_bytes_saved_total",
        Unit::Bytes,
        "Artifact bytes minus delta bytes, per delta built."
    );
    describe_counter!(
        "aviary_delta_cache_hits_total",
        "Payloads served from the on-disk cache, by kind."
    );
    describe_counter!(
        "aviary_delta_builds_joined_total",
        "Payload requests that waited on a build already in flight instead of starting one."
    );
    describe_counter!(
        "aviary_delta_cache_evictions_total",
        "Cached payloads deleted to keep the cache within --delta-cache-bytes."
    );
    describe_gauge!(
        "aviary_delta_cache_bytes",
        Unit::Bytes,
        "Bytes of built payloads in the on-disk cache."
    );
    describe_counter!(
        "aviary_rollout_transitions_total",
        "Rollout state changes, by the state entered."
    );
    describe_counter!(
        "aviary_releases_uploaded_total",
        "Release artifacts stored after their signature and digest checked out."
    );
    describe_histogram!(
        "aviary_propagation_seconds",
        Unit::Seconds,
        "Time from commit of a desired state to the edge's ACK."
    );
}
