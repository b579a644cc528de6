//! Runtime config layers: partial run specs laid over the signed one.
//!
//! A layer overrides only what it sets: `env` key by key, every other field as a whole
//! (`[[probe]]` replaces the list). Layers are merged lowest first (base → overlays →
//! node), then the merge is laid over the manifest's run spec on the edge. Both ends use
//! this one definition, so what the control plane shows is what the edge runs.
//!
//! Overlays are not signed by the release key, so they may not change what runs or as
//! whom: no `listen`, `user` or `working_dir`. Variables are allowed by name, not
//! refused by name: an overlay may set only those its release's signed run spec lists in
//! `overlay_env`, and a few harmless ones (`DEFAULT_OVERLAY_ENV`). Whatever a release
//! lists, a variable that makes the dynamic loader or an interpreter load other code
//! (`LD_PRELOAD`, `PYTHONPATH`, ...) is refused as well.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{ManifestError, ProbeSpec, RunSpec};
use crate::v1 as pb;

/// Most arguments, variables, patterns or probes one overlay may set.
const MAX_ITEMS: usize = 256;
/// Longest argument, variable value or pattern.
const MAX_VALUE: usize = 4096;

/// Variables any overlay may set, whatever the release lists: logging and time zone.
pub const DEFAULT_OVERLAY_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "TZ",
];

/// Variables an overlay may never set, even if a release lists them: they would make the
/// module load code that no release key signed.
const FORBIDDEN_ENV: &[&str] = &[
    "LD_",
    "DYLD_",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PERL5LIB",
    "PERL5OPT",
    "RUBYLIB",
    "RUBYOPT",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "BASH_ENV",
    "ENV",
    "PATH",
];

/// Why an overlay is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OverlayError {
    /// Not valid overlay TOML/JSON (unknown field, wrong type, ...).
    #[error("config overlay is not valid: {0}")]
    Syntax(String),
    /// A field has a value outside its rules.
    #[error("config field {field}: {reason}")]
    Field {
        /// The field (dotted path).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<ManifestError> for OverlayError {
    fn from(e: ManifestError) -> OverlayError {
        match e {
            ManifestError::Syntax(s) => OverlayError::Syntax(s),
            ManifestError::Field { field, reason } => OverlayError::Field {
                field: field.trim_start_matches("run.").to_owned(),
                reason,
            },
        }
    }
}

fn field(field: &str, reason: impl Into<String>) -> OverlayError {
    OverlayError::Field {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// A partial run spec (the `config set --file OVERLAY.toml` format).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOverlay {
    /// Replaces the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Variables set or replaced.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Replaces the ready timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout: Option<String>,
    /// Replaces the log patterns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_patterns: Option<Vec<String>>,
    /// Replaces the probe list.
    #[serde(default, rename = "probe", skip_serializing_if = "Option::is_none")]
    pub probes: Option<Vec<ProbeSpec>>,
}

/// Which layer each merged value came from: `"args"`, `"env.NAME"`, `"ready_timeout"`,
/// `"log_patterns"`, `"probes"` → layer name.
pub type Sources = BTreeMap<String, String>;

impl RunOverlay {
    /// Parses an overlay file (TOML) and validates it.
    pub fn from_toml(text: &str) -> Result<RunOverlay, OverlayError> {
        let overlay: RunOverlay =
            toml::from_str(text).map_err(|e| OverlayError::Syntax(e.message().to_owned()))?;
        overlay.validate()?;
        Ok(overlay)
    }

    /// True when it overrides nothing.
    pub fn is_empty(&self) -> bool {
        *self == RunOverlay::default()
    }

    /// Checks every value, alone (the merged run spec is checked again on the edge).
    pub fn validate(&self) -> Result<(), OverlayError> {
        let counts = [
            ("args", self.args.as_ref().map_or(0, Vec::len)),
            ("env", self.env.len()),
            (
                "log_patterns",
                self.log_patterns.as_ref().map_or(0, Vec::len),
            ),
            ("probe", self.probes.as_ref().map_or(0, Vec::len)),
        ];
        for (what, n) in counts {
            if n > MAX_ITEMS {
                return Err(field(what, format!("{n} entries; at most {MAX_ITEMS}")));
            }
        }
        for (k, v) in &self.env {
            if let Some(bad) = FORBIDDEN_ENV.iter().find(|f| {
                if f.ends_with('_') {
                    k.starts_with(*f)
                } else {
                    k == *f
                }
            }) {
                return Err(field(
                    &format!("env.{k}"),
                    format!("{bad}* may change what code runs; only a signed release can set it"),
                ));
            }
            if v.len() > MAX_VALUE {
                return Err(field(&format!("env.{k}"), "longer than 4096 bytes"));
            }
        }
        let values = self
            .args
            .iter()
            .flatten()
            .chain(self.log_patterns.iter().flatten());
        if values.into_iter().any(|v| v.len() > MAX_VALUE) {
            return Err(field("args", "a value longer than 4096 bytes"));
        }
        // The run spec's own rules cover names, NUL bytes, durations and probe targets.
        self.apply_to(&RunSpec::default()).validate()?;
        Ok(())
    }

    /// Refuses every variable `spec` (the signed run spec it is laid over) does not allow
    /// overlays to set, naming them all.
    pub fn check_env(&self, spec: &RunSpec) -> Result<(), OverlayError> {
        let allowed = |k: &str| {
            DEFAULT_OVERLAY_ENV.contains(&k)
                || spec.overlay_env.iter().any(|a| match a.strip_suffix('*') {
                    Some(prefix) => k.starts_with(prefix),
                    None => a == k,
                })
        };
        let refused: Vec<&str> = self
            .env
            .keys()
            .map(String::as_str)
            .filter(|k| !allowed(k))
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(field(
            &refused
                .iter()
                .map(|k| format!("env.{k}"))
                .collect::<Vec<_>>()
                .join(", "),
            format!(
                "not allowed: a runtime config may set only the variables the release's signed run spec lists in overlay_env ({}) and {}",
                if spec.overlay_env.is_empty() {
                    "none".to_owned()
                } else {
                    spec.overlay_env.join(", ")
                },
                DEFAULT_OVERLAY_ENV.join(", ")
            ),
        ))
    }

    /// `spec` with this overlay laid over it.
    pub fn apply_to(&self, spec: &RunSpec) -> RunSpec {
        let mut out = spec.clone();
        if let Some(args) = &self.args {
            out.args = args.clone();
        }
        out.env
            .extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(t) = &self.ready_timeout {
            out.ready_timeout = Some(t.clone());
        }
        if let Some(p) = &self.log_patterns {
            out.log_patterns = p.clone();
        }
        if let Some(p) = &self.probes {
            out.probes = p.clone();
        }
        out
    }

    /// Merges `layers`, lowest first, and names the layer each value came from.
    pub fn merge<'a>(
        layers: impl IntoIterator<Item = (&'a str, &'a RunOverlay)>,
    ) -> (RunOverlay, Sources) {
        let mut out = RunOverlay::default();
        let mut sources = Sources::new();
        for (name, layer) in layers {
            let mut set = |key: &str| {
                sources.insert(key.to_owned(), name.to_owned());
            };
            if let Some(args) = &layer.args {
                out.args = Some(args.clone());
                set("args");
            }
            for (k, v) in &layer.env {
                out.env.insert(k.clone(), v.clone());
                set(&format!("env.{k}"));
            }
            if let Some(t) = &layer.ready_timeout {
                out.ready_timeout = Some(t.clone());
                set("ready_timeout");
            }
            if let Some(p) = &layer.log_patterns {
                out.log_patterns = Some(p.clone());
                set("log_patterns");
            }
            if let Some(p) = &layer.probes {
                out.probes = Some(p.clone());
                set("probes");
            }
        }
        (out, sources)
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::RunOverlay {
        let list = |v: &Option<Vec<String>>| {
            v.as_ref().map(|values| pb::StringList {
                values: values.clone(),
            })
        };
        pb::RunOverlay {
            args: list(&self.args),
            env: self.env.clone().into_iter().collect(),
            ready_timeout: self.ready_timeout.clone().unwrap_or_default(),
            log_patterns: list(&self.log_patterns),
            probes: self.probes.as_ref().map(|probes| pb::ProbeList {
                probes: probes
                    .iter()
                    .map(|p| pb::Probe {
                        http: p.http.clone().unwrap_or_default(),
                        tcp: p.tcp.clone().unwrap_or_default(),
                        expect_status: p.expect_status.map_or(0, u32::from),
                        interval: p.interval.clone().unwrap_or_default(),
                        timeout: p.timeout.clone().unwrap_or_default(),
                        failure_threshold: p.failure_threshold.unwrap_or(0),
                    })
                    .collect(),
            }),
        }
    }

    /// From the wire form, validated.
    pub fn from_proto(p: pb::RunOverlay) -> Result<RunOverlay, OverlayError> {
        let some = |s: String| (!s.is_empty()).then_some(s);
        let probes = match p.probes {
            None => None,
            Some(list) => Some(
                list.probes
                    .into_iter()
                    .map(|p| {
                        let expect_status = match p.expect_status {
                            0 => None,
                            s => Some(u16::try_from(s).map_err(|_| {
                                field("probe.expect_status", format!("{s} is not an HTTP status"))
                            })?),
                        };
                        Ok(ProbeSpec {
                            http: some(p.http),
                            tcp: some(p.tcp),
                            expect_status,
                            interval: some(p.interval),
                            timeout: some(p.timeout),
                            failure_threshold: (p.failure_threshold > 0)
                                .then_some(p.failure_threshold),
                        })
                    })
                    .collect::<Result<Vec<_>, OverlayError>>()?,
            ),
        };
        let overlay = RunOverlay {
            args: p.args.map(|l| l.values),
            env: p.env.into_iter().collect(),
            ready_timeout: some(p.ready_timeout),
            log_patterns: p.log_patterns.map(|l| l.values),
            probes,
        };
        overlay.validate()?;
        Ok(overlay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            args: vec!["--port".into(), "8080".into()],
            env: [("RUST_LOG".to_string(), "info".to_string())].into(),
            probes: vec![ProbeSpec {
                tcp: Some("127.0.0.1:8080".into()),
                ..ProbeSpec::default()
            }],
            ..RunSpec::default()
        }
    }

    #[test]
    fn later_layers_win_and_env_merges_key_by_key() {
        let base =
            RunOverlay::from_toml("env = { RUST_LOG = \"debug\", A = \"1\" }\nargs = [\"-v\"]")
                .expect("base");
        let eu = RunOverlay::from_toml(
            "env = { A = \"2\" }\n[[probe]]\nhttp = \"http://127.0.0.1:9/h\"",
        )
        .expect("eu");
        let (merged, sources) = RunOverlay::merge([("base", &base), ("eu", &eu)]);
        assert_eq!(merged.env["RUST_LOG"], "debug");
        assert_eq!(merged.env["A"], "2");
        assert_eq!(sources["env.A"], "eu");
        assert_eq!(sources["env.RUST_LOG"], "base");
        assert_eq!(sources["args"], "base");
        assert_eq!(sources["probes"], "eu");
        let run = merged.apply_to(&spec());
        assert_eq!(run.args, vec!["-v"]);
        assert_eq!(run.probes.len(), 1);
        assert_eq!(run.probes[0].http.as_deref(), Some("http://127.0.0.1:9/h"));
        // Fields no layer sets keep the release's values.
        assert_eq!(RunOverlay::default().apply_to(&spec()), spec());
    }

    #[test]
    fn an_overlay_cannot_widen_the_sandbox() {
        // Only a release key may grant devices, families, paths, JIT or memory.
        for field in [
            "devices = [\"/dev/mem\"]",
            "address_families = [\"AF_PACKET\"]",
            "writable = [\"/etc\"]",
            "jit = true",
            "memory_max = \"64G\"",
            "user = \"root\"",
        ] {
            assert!(RunOverlay::from_toml(field).is_err(), "{field} accepted");
        }
    }

    #[test]
    fn bad_overlays_are_refused_with_the_field() {
        let port =
            RunOverlay::from_toml("[[probe]]\ntcp = \"127.0.0.1:70000\"").expect_err("refused");
        assert!(port.to_string().contains("probe.tcp"), "{port}");
        let preload =
            RunOverlay::from_toml("env = { LD_PRELOAD = \"/tmp/x.so\" }").expect_err("refused");
        assert!(preload.to_string().contains("env.LD_PRELOAD"), "{preload}");
        let user = RunOverlay::from_toml("user = \"root\"").expect_err("refused");
        assert!(matches!(user, OverlayError::Syntax(_)), "{user}");
        let timeout = RunOverlay::from_toml("ready_timeout = \"soon\"").expect_err("refused");
        assert!(timeout.to_string().contains("ready_timeout"), "{timeout}");
    }

    #[test]
    fn the_wire_form_round_trips_and_keeps_empty_lists_apart_from_absent_ones() {
        let o = RunOverlay::from_toml(
            "args = []\nenv = { X = \"y\" }\nready_timeout = \"5s\"\n[[probe]]\nhttp = \"http://127.0.0.1:8/\"\nexpect_status = 204\nfailure_threshold = 2",
        )
        .expect("overlay");
        let back = RunOverlay::from_proto(o.to_proto()).expect("round trip");
        assert_eq!(back, o);
        assert_eq!(back.args, Some(vec![]));
        assert_eq!(back.log_patterns, None);
    }

    #[test]
    fn the_edge_refuses_what_a_control_plane_should_have_refused() {
        // The edge does not trust the control plane's checks: the wire form is validated.
        let mut p = RunOverlay::default().to_proto();
        p.probes = Some(pb::ProbeList {
            probes: vec![pb::Probe {
                tcp: "127.0.0.1:70000".into(),
                ..Default::default()
            }],
        });
        let e = RunOverlay::from_proto(p).expect_err("refused");
        assert!(e.to_string().contains("probe.tcp"), "{e}");
        let mut p = RunOverlay::default().to_proto();
        p.env.insert("LD_AUDIT".into(), "/x.so".into());
        assert!(RunOverlay::from_proto(p).is_err());
    }

    #[test]
    fn only_variables_the_signed_spec_allows_may_be_set() {
        let overlay = |keys: &[&str]| RunOverlay {
            env: keys
                .iter()
                .map(|k| (k.to_string(), "v".to_string()))
                .collect(),
            ..RunOverlay::default()
        };
        let mut signed = spec();
        // Nothing listed: only the defaults.
        assert!(overlay(&["RUST_LOG", "TZ"]).check_env(&signed).is_ok());
        let err = overlay(&["GCONV_PATH", "APP_MODE", "RUST_LOG"])
            .check_env(&signed)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("env.APP_MODE, env.GCONV_PATH"), "{err}");
        assert!(!err.contains("env.RUST_LOG"), "{err}");
        // Names and prefixes the release signed.
        signed.overlay_env = vec!["APP_*".into(), "GREETING".into()];
        assert!(overlay(&["APP_MODE", "APP_X", "GREETING"])
            .check_env(&signed)
            .is_ok());
        assert!(overlay(&["GREETINGS"]).check_env(&signed).is_err());
        assert!(signed.validate().is_ok());
        signed.overlay_env = vec!["BAD-NAME".into()];
        assert!(signed.validate().is_err());
    }
}
