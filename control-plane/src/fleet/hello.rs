//! What an edge sends besides answers, checked where it enters: its Hello and its health
//! reports become domain values here, or end the stream with the reason.

use aviary_proto::resource::Resource;
use aviary_proto::v1 as pb;
use tonic::Status;

use crate::node::{HealthRecord, ModuleRecord};
use crate::registry::HelloInfo;
use crate::selector::validate_label;

/// Most modules one node may name, in a Hello or a health report.
const MAX_MODULES: usize = 256;

/// A Hello validated into what the registry stores (proto types stop here). Resource
/// names this version does not know are ignored.
impl TryFrom<pb::Hello> for HelloInfo {
    type Error = Status;

    fn try_from(hello: pb::Hello) -> Result<HelloInfo, Status> {
        hello_info(hello)
    }
}

fn hello_info(hello: pb::Hello) -> Result<HelloInfo, Status> {
    if hello.labels.len() > 64 {
        return Err(Status::invalid_argument("at most 64 labels per node"));
    }
    for (k, v) in &hello.labels {
        validate_label(k, v)?;
    }
    if hello.modules.len() > MAX_MODULES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_MODULES} modules per node"
        )));
    }
    let short = |what: &str, s: &str| {
        if s.len() > 128 {
            Err(Status::invalid_argument(format!(
                "{what} longer than 128 bytes"
            )))
        } else {
            Ok(())
        }
    };
    short("arch", &hello.arch)?;
    short("daemon_version", &hello.daemon_version)?;
    let mut modules = Vec::with_capacity(hello.modules.len());
    for m in hello.modules {
        for (what, s) in [
            ("module name", &m.name),
            ("version", &m.version),
            ("sha256", &m.sha256),
            ("slot", &m.slot),
        ] {
            short(what, s)?;
        }
        modules.push(ModuleRecord {
            name: m.name,
            version: m.version,
            sha256: m.sha256,
            state: m.state,
            slot: m.slot,
        });
    }
    if hello.applied.len() > 2 * MAX_MODULES + 1 {
        return Err(Status::invalid_argument(format!(
            "at most {} applied resources",
            2 * MAX_MODULES + 1
        )));
    }
    let applied = hello
        .applied
        .iter()
        .filter_map(|a| Some((Resource::parse(&a.resource)?, a.revision)))
        .collect();
    Ok(HelloInfo {
        labels: hello.labels.into_iter().collect(),
        arch: hello.arch,
        daemon_version: hello.daemon_version,
        modules,
        applied,
    })
}

/// Validates a health report into per-module records (proto types stop here). A number
/// that is not finite, a bad module name or more modules than a Hello may carry ends the
/// stream with the reason: a daemon of ours never sends them.
pub(crate) fn health_records(
    report: pb::HealthReport,
) -> Result<Vec<(String, HealthRecord)>, Status> {
    if report.modules.len() > MAX_MODULES {
        return Err(Status::invalid_argument(format!(
            "a health report names at most {MAX_MODULES} modules"
        )));
    }
    let at_ms = crate::audit::now_ms();
    let cut = |s: String| -> String { s.chars().take(256).collect() };
    let mut out = Vec::with_capacity(report.modules.len());
    for m in report.modules {
        aviary_certs::validate_name("module", &m.module)
            .map_err(|e| Status::invalid_argument(format!("health report: {e}")))?;
        let latency = |what: &str, v: f64| {
            aviary_proto::finite::check(what, v, 0.0..=f64::MAX).map_err(|e| {
                Status::invalid_argument(format!("health report for {}: {e}", m.module))
            })
        };
        let record = HealthRecord {
            at_ms,
            probe_successes: m.probe_successes,
            probe_failures: m.probe_failures,
            latency_p50_ms: latency("latency_p50_ms", m.latency_p50_ms)?,
            latency_p99_ms: latency("latency_p99_ms", m.latency_p99_ms)?,
            process_state: cut(m.process_state),
            restarts: m.restarts,
            log_matches: m.log_matches,
            slot: cut(m.slot),
            version: cut(m.version),
            detail: cut(m.detail),
        };
        out.push((m.module, record));
    }
    Ok(out)
}
