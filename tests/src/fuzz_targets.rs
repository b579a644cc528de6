//! The fuzz targets' bodies: `tests/fuzz` runs them under libFuzzer (`scripts/fuzz`), and
//! the test below replays their corpus (`tests/fuzz/corpus/TARGET/`) on every
//! `scripts/test`, so whatever a fuzzer once found stays fixed. Each takes raw bytes;
//! a panic (or an allocation past the fuzzer's limit) is the only failure.

use std::io::Read;

use aviary_proto::bundle::BundleHeader;
use aviary_proto::delta;
use aviary_proto::digest::Sha256;
use aviary_proto::manifest::{Manifest, RunSpec};
use aviary_proto::overlay::RunOverlay;
use aviary_proto::v1 as pb;
use prost::Message;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name, as `cargo fuzz` and the corpus directories name them.
pub const TARGETS: [(&str, Target); 6] = [
    ("manifest", manifest),
    ("overlay", overlay),
    ("delta", delta_and_bundle),
    ("fleet_codec", fleet_codec),
    ("csv", csv),
    ("store_record", store_record),
];

pub use aviary_control_plane::fuzzing::store_record;

/// A signed manifest's JSON and a run spec's TOML, parsed and checked.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = Manifest::parse(data) {
        // What parses is valid and survives its own encoding.
        let again = Manifest::parse(&m.to_json());
        assert_eq!(again.ok().as_ref(), Some(&m));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = toml::from_str::<RunSpec>(text) {
            let _ = spec.validate();
            let _ = spec.ready_timeout();
        }
    }
}

/// A config overlay as TOML and in its wire form; merged and laid over a run spec.
pub fn overlay(data: &[u8]) {
    let spec = RunSpec {
        overlay_env: vec!["APP_*".into()],
        ..RunSpec::default()
    };
    let mut parsed = Vec::new();
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(o) = RunOverlay::from_toml(text) {
            parsed.push(o);
        }
    }
    if let Ok(p) = pb::RunOverlay::decode(data) {
        if let Ok(o) = RunOverlay::from_proto(p) {
            // The wire form round-trips.
            assert_eq!(RunOverlay::from_proto(o.to_proto()).ok().as_ref(), Some(&o));
            parsed.push(o);
        }
    }
    for o in &parsed {
        let _ = o.check_env(&spec);
        let _ = o.apply_to(&spec).validate();
    }
    let (merged, _) = RunOverlay::merge(parsed.iter().map(|o| ("layer", o)));
    let _ = merged.apply_to(&spec).validate();
}

/// A delta or full payload against a fixed base, and a bundle header.
pub fn delta_and_bundle(data: &[u8]) {
    let base: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let target = Sha256::of(b"target");
    if let Ok((_, out)) = delta::apply_delta(base.as_slice(), data, &target, 6, Vec::new()) {
        assert_eq!(out, b"target");
    }
    if let Ok(out) = delta::apply_full(data, &target, 6, Vec::new()) {
        assert_eq!(out, b"target");
    }
    let mut r = data;
    if let Ok(header) = BundleHeader::read(&mut r) {
        let _ = Manifest::parse(&header.manifest);
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
    }
}

/// Fleet messages both ways: the control plane's checks of what an edge sends, and the
/// edge's of what a control plane sends.
pub fn fleet_codec(data: &[u8]) {
    aviary_control_plane::fuzzing::edge_message(data);
    if let Ok(msg) = pb::ControlMessage::decode(data) {
        match msg.kind {
            Some(pb::control_message::Kind::Config(c)) => {
                if let Some(o) = c.overlay {
                    let _ = RunOverlay::from_proto(o);
                }
            }
            Some(pb::control_message::Kind::ModuleUpdate(u)) => {
                let _ = Manifest::parse(&u.manifest);
                if let Some(p) = u.payload {
                    let _ = Sha256::parse_hex(&p.sha256);
                    let _ = delta::max_payload_size(p.size);
                }
            }
            _ => {}
        }
    }
}

/// A recorded IMU CSV (EuRoC or x-io).
pub fn csv(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(r) = aviary_sensors::recording::Recording::parse("fuzz", "fuzz.csv", &text) {
        let _ = (r.span_ns(), r.loop_period_ns(), r.rate_hz());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of every target's corpus, through its target.
    #[test]
    fn the_fuzz_corpus_replays_clean() -> anyhow::Result<()> {
        let root = crate::repo_root().join("tests/fuzz/corpus");
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                target(&std::fs::read(&path)?);
                n += 1;
            }
            assert!(n > 0, "{} has no seeds", dir.display());
        }
        Ok(())
    }

    /// Writes the seed corpus (run by hand when a format changes:
    /// `cargo test -p aviary-tests --lib write_seed_corpus -- --ignored`).
    #[test]
    #[ignore]
    fn write_seed_corpus() -> anyhow::Result<()> {
        let root = crate::repo_root().join("tests/fuzz/corpus");
        let put = |target: &str, name: &str, bytes: &[u8]| -> anyhow::Result<()> {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(name), bytes)?;
            Ok(())
        };
        let run = RunSpec {
            args: vec!["--port".into(), "8080".into()],
            env: [("RUST_LOG".to_string(), "info".to_string())].into(),
            listen: Some("127.0.0.1:8080".into()),
            ready_timeout: Some("5s".into()),
            log_patterns: vec!["ERROR".into()],
            overlay_env: vec!["APP_*".into()],
            probes: vec![aviary_proto::manifest::ProbeSpec {
                http: Some("http://127.0.0.1:8080/healthz".into()),
                interval: Some("1s".into()),
                ..Default::default()
            }],
            ..RunSpec::default()
        };
        let manifest = Manifest {
            module: "gateway".into(),
            version: "1.2.3-rc.1+b7".into(),
            target: "x86_64".into(),
            sha256: Sha256::of(b"target").hex(),
            size: 6,
            run: Some(run.clone()),
        };
        put("manifest", "signed.json", &manifest.to_json())?;
        put(
            "manifest",
            "run.toml",
            b"args = [\"--port\", \"8080\"]\nlisten = \"127.0.0.1:8080\"\nready_timeout = \"30s\"\n[[probe]]\ntcp = \"127.0.0.1:8080\"\ninterval = \"1s\"\n",
        )?;
        let overlay = RunOverlay::from_toml(
            "args = [\"--fast\"]\nenv = { RUST_LOG = \"debug\", APP_MODE = \"eu\" }\nready_timeout = \"3s\"\n[[probe]]\nhttp = \"http://127.0.0.1:9/healthz\"\n",
        )?;
        put("overlay", "eu.toml", b"env = { RUST_LOG = \"debug\", APP_MODE = \"eu\" }\n[[probe]]\ntcp = \"127.0.0.1:9\"\n")?;
        put("overlay", "wire.pb", &overlay.to_proto().encode_to_vec())?;
        let base: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        put(
            "delta",
            "delta.bin",
            &delta::write_delta(&base, b"target", 3, Vec::new())?,
        )?;
        put(
            "delta",
            "full.bin",
            &delta::write_full(&b"target"[..], 3, Vec::new())?,
        )?;
        let mut bundle = Vec::new();
        BundleHeader {
            manifest: manifest.to_json(),
            signature: vec![7; 64],
            payload: aviary_proto::bundle::PayloadInfo::of(
                aviary_proto::bundle::Encoding::FullZstd,
                None,
                b"payload",
            ),
        }
        .write(&mut bundle)?;
        put("delta", "bundle.bin", &bundle)?;
        let hello = pb::EdgeMessage {
            kind: Some(pb::edge_message::Kind::Hello(pb::Hello {
                node_id: "gw-1".into(),
                labels: [("region".to_string(), "eu".to_string())].into(),
                arch: "x86_64".into(),
                daemon_version: "0.1.0".into(),
                modules: vec![pb::ModuleStatus {
                    name: "gateway".into(),
                    version: "1.0.0".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        put("fleet_codec", "hello.pb", &hello.encode_to_vec())?;
        let health = pb::EdgeMessage {
            kind: Some(pb::edge_message::Kind::Health(pb::HealthReport {
                modules: vec![pb::ModuleHealth {
                    module: "gateway".into(),
                    probe_successes: 5,
                    latency_p50_ms: 1.5,
                    latency_p99_ms: 9.25,
                    process_state: "running".into(),
                    ..Default::default()
                }],
            })),
        };
        put("fleet_codec", "health.pb", &health.encode_to_vec())?;
        let update = pb::ControlMessage {
            nonce: "n1".into(),
            kind: Some(pb::control_message::Kind::ModuleUpdate(pb::ModuleUpdate {
                module: "gateway".into(),
                to_version: "1.2.3".into(),
                manifest: manifest.to_json(),
                signature: vec![1; 64],
                payload: Some(pb::Payload {
                    encoding: pb::PayloadEncoding::BsdiffZstd as i32,
                    base_sha256: Sha256::of(&base).hex(),
                    size: 120,
                    sha256: Sha256::of(b"p").hex(),
                }),
                transfer_id: "t-1".into(),
                ..Default::default()
            })),
        };
        put("fleet_codec", "update.pb", &update.encode_to_vec())?;
        put(
            "csv",
            "euroc.csv",
            b"#timestamp [ns],w_RS_S_x [rad s^-1],w_RS_S_y [rad s^-1],w_RS_S_z [rad s^-1],a_RS_S_x [m s^-2],a_RS_S_y [m s^-2],a_RS_S_z [m s^-2]\n1403636579758555392,-0.099,0.142,0.026,8.125,-0.035,-2.370\n1403636579763555584,-0.098,0.139,0.026,8.033,-0.035,-2.369\n",
        )?;
        let recordings = crate::repo_root().join("sim-sensors/data/imu");
        for e in std::fs::read_dir(&recordings)?.flatten() {
            if e.path().extension().is_some_and(|x| x == "csv") {
                let text = std::fs::read(e.path())?;
                let head: Vec<u8> = text
                    .split(|b| *b == b'\n')
                    .take(20)
                    .flat_map(|l| l.iter().copied().chain([b'\n']))
                    .collect();
                put("csv", &e.file_name().to_string_lossy(), &head)?;
            }
        }
        let records: [(u8, &str); 7] = [
            (
                0,
                r#"{"node_id":"gw-1","labels":{"region":"eu"},"arch":"x86_64","daemon_version":"0.1.0","modules":[],"label_revision":3,"revoked":false}"#,
            ),
            (
                1,
                r#"{"acked_revision":4,"nacked":{"revision":5,"error":"no"},"last_seen_ms":1,"modules":{"m":{"acked_revision":1,"nacked":null,"transfer":{"version":"1.0.0","encoding":"full_zstd","offset":5,"size":9},"health":{"at_ms":1,"probe_successes":2,"probe_failures":0,"latency_p50_ms":1.5,"latency_p99_ms":3.25,"process_state":"running","restarts":0,"log_matches":0,"slot":"a","version":"1.0.0","detail":""}}},"configs":{}}"#,
            ),
            (
                2,
                r#"{"seq":3,"module":"gateway","selector":"region=eu","weight":40}"#,
            ),
            (
                3,
                r#"{"module":"m","version":"1.0.0","artifacts":{},"attachments":{},"created_at":{"secs_since_epoch":1,"nanos_since_epoch":2}}"#,
            ),
            (
                4,
                r#"{"id":"r-5","seq":5,"module":"m","version":"1.0.0","selector":"","state":"Progressing","abort_seq":0,"message":"","created_ms":1,"updated_ms":2,"steps":[{"Analysis":{"window_seconds":60,"max_error_rate":0.01,"max_p99_latency_ms":200.0,"max_log_matches":0,"min_healthy_percent":90.0,"max_error_rate_vs_baseline":0.0,"min_reports":1,"failure_limit":1}}]}"#,
            ),
            (
                5,
                r#"{"seq":6,"module":"m","scope":"Base","overlay":{"env":{"RUST_LOG":"debug"}},"version":1}"#,
            ),
            (
                6,
                r#"{"seq":1,"time_ms":2,"actor":"admin/a","action":"nodes.set_weight","target":"module/m","detail":"x"}"#,
            ),
        ];
        for (kind, json) in records {
            let mut bytes = vec![kind];
            bytes.extend_from_slice(json.as_bytes());
            put("store_record", &format!("{kind}.json"), &bytes)?;
        }
        Ok(())
    }
}
