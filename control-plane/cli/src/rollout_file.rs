//! `aviary rollout create --file rollout.toml`: a rollout spec in TOML.
//!
//! ```toml
//! module = "sample"
//! version = "1.3.0"
//! selector = "tier=edge"
//! progress_deadline = "15m"
//!
//! [[step]]
//! canary = 20
//! [[step]]
//! weight = 10
//! [[step]]
//! analysis = "60s"
//! max_error_rate = 0.01
//! max_p99_ms = 200
//! max_log_matches = 0
//! min_healthy_percent = 90
//! max_error_rate_vs_baseline = 0.005
//! min_reports = 30
//! failure_limit = 2
//! [[step]]
//! pause = "until-promoted"   # or a duration: "10m"
//! [[step]]
//! canary = 100
//! ```

use std::path::Path;

use anyhow::{bail, Context};
use aviary_proto::v1 as pb;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    module: String,
    version: String,
    #[serde(default)]
    selector: String,
    #[serde(default)]
    progress_deadline: Option<String>,
    #[serde(default, rename = "step")]
    steps: Vec<StepSpec>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StepSpec {
    canary: Option<u32>,
    weight: Option<u32>,
    pause: Option<String>,
    analysis: Option<String>,
    #[serde(default)]
    max_error_rate: f64,
    #[serde(default)]
    max_p99_ms: f64,
    #[serde(default)]
    max_log_matches: u64,
    #[serde(default)]
    min_healthy_percent: f64,
    #[serde(default)]
    max_error_rate_vs_baseline: f64,
    #[serde(default)]
    min_reports: u32,
    #[serde(default)]
    failure_limit: u32,
}

fn seconds(what: &str, text: &str) -> anyhow::Result<u32> {
    let d = humantime::parse_duration(text).with_context(|| format!("{what} = {text:?}"))?;
    Ok(u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1))
}

/// Reads a rollout spec into the wire request.
pub(super) fn read(path: &Path) -> anyhow::Result<pb::CreateRolloutRequest> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--file {}", path.display()))?;
    let file: File = toml::from_str(&text).with_context(|| format!("--file {}", path.display()))?;
    let mut steps = Vec::with_capacity(file.steps.len());
    for (i, s) in file.steps.iter().enumerate() {
        use pb::step::Kind;
        let kinds = [
            s.canary.is_some(),
            s.weight.is_some(),
            s.pause.is_some(),
            s.analysis.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            bail!(
                "{}: step {} needs exactly one of canary, weight, pause, analysis",
                path.display(),
                i + 1
            );
        }
        let kind = if let Some(p) = s.canary {
            Kind::SetCanaryScale(pb::SetCanaryScale { percent: p })
        } else if let Some(w) = s.weight {
            Kind::SetWeight(pb::SetWeight { weight: w })
        } else if let Some(p) = &s.pause {
            let secs = if p == "until-promoted" || p.is_empty() {
                0
            } else {
                seconds("pause", p)?
            };
            Kind::Pause(pb::Pause { seconds: secs })
        } else {
            let window = s.analysis.as_deref().unwrap_or_default();
            // TOML spells NaN and infinity (`nan`, `inf`): refuse them here, by name.
            for (what, value, max) in [
                ("max_error_rate", s.max_error_rate, 1.0),
                ("max_p99_ms", s.max_p99_ms, f64::MAX),
                ("min_healthy_percent", s.min_healthy_percent, 100.0),
                (
                    "max_error_rate_vs_baseline",
                    s.max_error_rate_vs_baseline,
                    1.0,
                ),
            ] {
                aviary_proto::finite::check(what, value, 0.0..=max)
                    .map_err(|e| anyhow::anyhow!("{}: step {}: {e}", path.display(), i + 1))?;
            }
            Kind::Analysis(pb::Analysis {
                window_seconds: seconds("analysis", window)?,
                max_error_rate: s.max_error_rate,
                max_p99_latency_ms: s.max_p99_ms,
                max_log_matches: s.max_log_matches,
                min_healthy_percent: s.min_healthy_percent,
                max_error_rate_vs_baseline: s.max_error_rate_vs_baseline,
                min_reports: s.min_reports.max(1),
                failure_limit: s.failure_limit.max(1),
            })
        };
        steps.push(pb::Step { kind: Some(kind) });
    }
    Ok(pb::CreateRolloutRequest {
        module: file.module,
        version: file.version,
        selector: file.selector,
        steps,
        progress_deadline_seconds: match &file.progress_deadline {
            Some(d) => seconds("progress_deadline", d)?,
            None => 0,
        },
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_mistakes_are_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rollout.toml");
        let doc: String = include_str!("rollout_file.rs")
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .filter_map(|l| l.strip_prefix("//! "))
            .skip_while(|l| !l.starts_with("module"))
            .take_while(|l| !l.starts_with("```"))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&path, doc)?;
        let r = read(&path)?;
        assert_eq!((r.module.as_str(), r.steps.len()), ("sample", 5));
        assert_eq!(r.progress_deadline_seconds, 900);
        std::fs::write(
            &path,
            "module = \"m\"\nversion = \"1.0.0\"\n[[step]]\ncanary = 5\nweight = 3\n",
        )?;
        assert!(read(&path).is_err());
        std::fs::write(
            &path,
            "module = \"m\"\nversion = \"1.0.0\"\n[[step]]\ncanry = 5\n",
        )?;
        assert!(read(&path).is_err());
        for (line, named) in [
            ("max_p99_ms = inf", "max_p99_ms"),
            ("max_error_rate = nan", "max_error_rate"),
            ("min_healthy_percent = 101", "min_healthy_percent"),
        ] {
            std::fs::write(
                &path,
                format!(
                    "module = \"m\"\nversion = \"1.0.0\"\n[[step]]\nanalysis = \"1m\"\n{line}\n"
                ),
            )?;
            let e = read(&path)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(e.contains(named) && e.contains("step 1"), "{line}: {e}");
        }
        Ok(())
    }
}
