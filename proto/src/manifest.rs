//! The release manifest: what a release key signs, and what an edge checks before it
//! touches anything. The signed bytes are the manifest JSON exactly as uploaded; parsing
//! never re-serialises them.
//!
//! ```json
//! {"module":"sample","version":"2.3.1-rc2+esp32s3","target":"x86_64",
//!  "sha256":"…64 hex…","size":123456,
//!  "run":{"args":["--port","8080"],"listen":"127.0.0.1:8080","ready_timeout":"30s",
//!         "probe":[{"http":"http://127.0.0.1:8080/healthz","interval":"1s"}]}}
//! ```
//! `run` absent: a file module (firmware, model, data), installed but never started.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::Sha256;
use crate::sandbox;

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// Why a manifest, run spec or name is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Not valid manifest JSON (unknown field, wrong type, ...).
    #[error("manifest is not valid: {0}")]
    Syntax(String),
    /// A field has a value outside its rules.
    #[error("manifest field {field}: {reason}")]
    Field {
        /// The field (dotted path).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn field(field: &'static str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Field {
        field,
        reason: reason.into(),
    }
}

/// A signed description of one artifact of one release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Module name: `[a-z0-9][a-z0-9._-]*`, at most 63 bytes, no `..`.
    pub module: String,
    /// SemVer 2.0 version.
    pub version: String,
    /// One of [`crate::arch::TARGETS`].
    pub target: String,
    /// sha256 of the artifact, lowercase hex.
    pub sha256: String,
    /// Size of the artifact in bytes.
    pub size: u64,
    /// How the edge runs the artifact; absent for file modules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSpec>,
}

impl Manifest {
    /// Parses and validates manifest bytes (the signed ones, unchanged).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Syntax(format!(
                "{} bytes, at most {MAX_MANIFEST_BYTES}",
                bytes.len()
            )));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Canonical JSON of this manifest (what `aviary release sign` writes and signs).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs and maps of strings cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_module_name(&self.module)?;
        parse_version(&self.version)?;
        if !crate::arch::is_target(&self.target) {
            return Err(field(
                "target",
                format!(
                    "{:?} is not one of {}",
                    self.target,
                    crate::arch::TARGETS.join(", ")
                ),
            ));
        }
        if Sha256::parse_hex(&self.sha256).is_none() || self.sha256 != self.sha256.to_lowercase() {
            return Err(field("sha256", "must be 64 lowercase hex digits"));
        }
        if let Some(run) = &self.run {
            run.validate()?;
        }
        Ok(())
    }

    /// The artifact digest.
    pub fn digest(&self) -> Sha256 {
        // validate() guarantees it parses; a default digest never matches real bytes.
        Sha256::parse_hex(&self.sha256).unwrap_or(Sha256([0; 32]))
    }

    /// The parsed version.
    pub fn semver(&self) -> semver::Version {
        parse_version(&self.version).unwrap_or_else(|_| semver::Version::new(0, 0, 0))
    }
}

/// Checks a module name: it becomes a directory name on every edge, so no `/`, no `..`,
/// nothing hidden, nothing a shell or systemd would mangle.
pub fn validate_module_name(name: &str) -> Result<(), ManifestError> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok_first
        || name.len() > 63
        || name.contains("..")
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(field(
            "module",
            format!(
                "{name:?}: use 1-63 of [a-z0-9._-], starting with a letter or digit, no \"..\""
            ),
        ));
    }
    Ok(())
}

/// Longest version: it becomes part of a slot directory's name on the edge (with the
/// artifact's short hash), which must fit a file name.
pub const MAX_VERSION_LEN: usize = 128;

/// Parses a SemVer 2.0 version (`2.3.1-rc2+esp32s3`) of at most `MAX_VERSION_LEN` bytes.
pub fn parse_version(v: &str) -> Result<semver::Version, ManifestError> {
    if v.len() > MAX_VERSION_LEN {
        return Err(field(
            "version",
            format!("{} bytes; at most {MAX_VERSION_LEN}", v.len()),
        ));
    }
    semver::Version::parse(v).map_err(|e| field("version", format!("{v:?} is not SemVer 2.0: {e}")))
}

/// SemVer precedence: build metadata is ignored (`1.0.0+a` and `1.0.0+b` are equal).
pub fn precedence(a: &semver::Version, b: &semver::Version) -> std::cmp::Ordering {
    a.cmp_precedence(b)
}

/// How the edge runs a module (the DESIGN.md run spec, in the manifest as JSON and in
/// `--run-spec FILE` as TOML).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Arguments; the artifact itself is the executable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment added to the daemon's minimal one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A socket the daemon owns and hands over (`LISTEN_FDS`), `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// How long a new version may take to pass its probes (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout: Option<String>,
    /// Log lines containing any of these are counted for analysis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_patterns: Vec<String>,
    /// Working directory (default: the module's slot directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// User to run as (the daemon must be allowed to switch to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The module says when it is ready with `READY=1` on `NOTIFY_SOCKET` (systemd's
    /// `Type=notify`). With a shared `listen` socket this is what tells a new process's
    /// readiness apart from the old one's, which answers probes on the same port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<bool>,
    /// Readiness and health probes.
    #[serde(default, rename = "probe", skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeSpec>,
    /// Variables runtime config layers (which no release key signs) may set: names, or
    /// prefixes ending in `*` (`APP_*`). Besides these only `overlay::DEFAULT_OVERLAY_ENV`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlay_env: Vec<String>,
    /// Device nodes the module may open (`/dev/ttyUSB0`); without any it can open only
    /// `/dev/null`, `zero`, `full`, `random` and `urandom`, as under `PrivateDevices=`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Socket families besides AF_UNIX, AF_INET and AF_INET6 (`AF_CAN`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address_families: Vec<String>,
    /// Paths the module may create, change and remove files beneath; nothing else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable: Vec<String>,
    /// The module may map memory that is writable and executable (JIT runtimes: Node.js,
    /// the JVM, .NET, LuaJIT); refused by default, like `MemoryDenyWriteExecute=`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jit: bool,
    /// Memory limit (`256M`, as systemd's `MemoryMax=`); over it the kernel kills the
    /// module and the daemon restarts or rolls back as for any crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<String>,
}

/// One HTTP or TCP probe.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    /// `http://HOST:PORT/PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// `HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// Expected HTTP status (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    /// Default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Default 500ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Consecutive failures before the module counts as failing (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
}

fn duration(
    what: &'static str,
    s: &Option<String>,
    default: Duration,
) -> Result<Duration, ManifestError> {
    match s {
        None => Ok(default),
        Some(s) => match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() && d <= Duration::from_secs(24 * 3600) => Ok(d),
            Ok(_) => Err(field(what, format!("{s:?} must be between 1ms and 24h"))),
            Err(e) => Err(field(what, format!("{s:?}: {e}"))),
        },
    }
}

fn socket_addr(what: &'static str, s: &str) -> Result<std::net::SocketAddr, ManifestError> {
    s.parse()
        .map_err(|_| field(what, format!("{s:?} is not IP:PORT")))
        .and_then(|a: std::net::SocketAddr| {
            if a.port() == 0 {
                Err(field(what, format!("{s:?}: port 0")))
            } else {
                Ok(a)
            }
        })
}

impl RunSpec {
    /// Checks every value the edge will rely on.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if let Some(listen) = &self.listen {
            socket_addr("run.listen", listen)?;
        }
        self.ready_timeout()?;
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(field("run.env", format!("{k:?} is not a variable name")));
            }
        }
        for k in &self.overlay_env {
            let name = k.strip_suffix('*').unwrap_or(k);
            let ok = !name.is_empty()
                && name.len() <= 128
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(field(
                    "run.overlay_env",
                    format!("{k:?} is not a variable name or a NAME* prefix"),
                ));
            }
        }
        if self
            .args
            .iter()
            .chain(self.env.values())
            .any(|a| a.contains('\0'))
        {
            return Err(field("run.args", "NUL bytes are not allowed"));
        }
        for p in &self.probes {
            p.validate()?;
        }
        for d in &self.devices {
            sandbox::check_path(d).map_err(|e| field("run.devices", e))?;
        }
        for w in &self.writable {
            sandbox::check_path(w).map_err(|e| field("run.writable", e))?;
        }
        for f in &self.address_families {
            if sandbox::address_family(f).is_none() {
                let known: Vec<&str> = sandbox::EXTRA_ADDRESS_FAMILIES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect();
                return Err(field(
                    "run.address_families",
                    format!("{f:?} is not one of {}", known.join(", ")),
                ));
            }
        }
        self.memory_max()?;
        Ok(())
    }

    /// The memory limit in bytes, if the spec sets one.
    pub fn memory_max(&self) -> Result<Option<u64>, ManifestError> {
        self.memory_max
            .as_deref()
            .map(|m| sandbox::parse_memory(m).map_err(|e| field("run.memory_max", e)))
            .transpose()
    }

    /// How long a new version may take to become ready.
    pub fn ready_timeout(&self) -> Result<Duration, ManifestError> {
        duration(
            "run.ready_timeout",
            &self.ready_timeout,
            Duration::from_secs(30),
        )
    }
}

/// What a probe checks, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeTarget {
    /// GET this URL; `host:port` is also TCP-checked when the GET fails.
    Http {
        /// `HOST:PORT` of the URL.
        addr: std::net::SocketAddr,
        /// Path and query.
        path: String,
        /// Status that counts as success.
        expect_status: u16,
    },
    /// Connect to this address.
    Tcp(std::net::SocketAddr),
}

impl ProbeSpec {
    /// Checks the probe.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.target()?;
        self.interval()?;
        self.timeout()?;
        if self.failure_threshold == Some(0) {
            return Err(field("run.probe.failure_threshold", "must be at least 1"));
        }
        Ok(())
    }

    /// The parsed target.
    pub fn target(&self) -> Result<ProbeTarget, ManifestError> {
        match (&self.http, &self.tcp) {
            (Some(url), None) => {
                let rest = url.strip_prefix("http://").ok_or_else(|| {
                    field(
                        "run.probe.http",
                        format!("{url:?}: only http://IP:PORT/PATH"),
                    )
                })?;
                let (hostport, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, "/"),
                };
                let expect_status = self.expect_status.unwrap_or(200);
                if !(100..=599).contains(&expect_status) {
                    return Err(field("run.probe.expect_status", format!("{expect_status}")));
                }
                Ok(ProbeTarget::Http {
                    addr: socket_addr("run.probe.http", hostport)?,
                    path: path.to_owned(),
                    expect_status,
                })
            }
            (None, Some(addr)) => Ok(ProbeTarget::Tcp(socket_addr("run.probe.tcp", addr)?)),
            _ => Err(field("run.probe", "exactly one of http or tcp")),
        }
    }

    /// Time between probes.
    pub fn interval(&self) -> Result<Duration, ManifestError> {
        duration("run.probe.interval", &self.interval, Duration::from_secs(1))
    }

    /// Time one probe may take.
    pub fn timeout(&self) -> Result<Duration, ManifestError> {
        duration(
            "run.probe.timeout",
            &self.timeout,
            Duration::from_millis(500),
        )
    }

    /// Consecutive failures before the module counts as failing.
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold.unwrap_or(3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            module: "sample".into(),
            version: "2.3.1-rc2+esp32s3".into(),
            target: "x86_64".into(),
            sha256: Sha256::of(b"x").hex(),
            size: 1,
            run: Some(RunSpec {
                args: vec!["--port".into(), "8080".into()],
                listen: Some("127.0.0.1:8080".into()),
                probes: vec![ProbeSpec {
                    http: Some("http://127.0.0.1:8080/healthz".into()),
                    ..ProbeSpec::default()
                }],
                ..RunSpec::default()
            }),
        }
    }

    #[test]
    fn a_manifest_round_trips_through_its_json() -> Result<(), ManifestError> {
        let m = manifest();
        assert_eq!(Manifest::parse(&m.to_json())?, m);
        let file_module = Manifest { run: None, ..m };
        assert_eq!(Manifest::parse(&file_module.to_json())?, file_module);
        Ok(())
    }

    #[test]
    fn semver_precedence_follows_the_spec_and_ignores_build_metadata() -> Result<(), ManifestError>
    {
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "2.3.1-rc2+esp32s3",
            "2.3.1",
        ];
        for pair in chain.windows(2) {
            let (a, b) = (parse_version(pair[0])?, parse_version(pair[1])?);
            assert_eq!(
                precedence(&a, &b),
                std::cmp::Ordering::Less,
                "{} < {}",
                pair[0],
                pair[1]
            );
        }
        assert_eq!(
            precedence(&parse_version("1.0.0+a")?, &parse_version("1.0.0+b")?),
            std::cmp::Ordering::Equal
        );
        for bad in ["1.0", "v1.0.0", "01.0.0", "1.0.0-", ""] {
            assert!(parse_version(bad).is_err(), "{bad} accepted");
        }
        Ok(())
    }

    #[test]
    fn hostile_or_broken_fields_are_refused() {
        let bad = [
            Manifest {
                module: "../etc".into(),
                ..manifest()
            },
            Manifest {
                module: "a/b".into(),
                ..manifest()
            },
            Manifest {
                module: ".hidden".into(),
                ..manifest()
            },
            Manifest {
                module: "x..y".into(),
                ..manifest()
            },
            Manifest {
                module: "Upper".into(),
                ..manifest()
            },
            Manifest {
                version: "latest".into(),
                ..manifest()
            },
            Manifest {
                target: "z80".into(),
                ..manifest()
            },
            Manifest {
                sha256: "abc".into(),
                ..manifest()
            },
            Manifest {
                sha256: Sha256::of(b"x").hex().to_uppercase(),
                ..manifest()
            },
        ];
        for m in bad {
            assert!(m.validate().is_err(), "{m:?} accepted");
        }
        let mut m = manifest();
        if let Some(run) = m.run.as_mut() {
            run.probes[0].tcp = Some("127.0.0.1:1".into());
        }
        assert!(
            m.validate().is_err(),
            "probe with both http and tcp accepted"
        );
        let mut m = manifest();
        if let Some(run) = m.run.as_mut() {
            run.listen = Some("127.0.0.1:0".into());
        }
        assert!(m.validate().is_err());
        assert!(Manifest::parse(br#"{"module":"a","extra":1}"#).is_err());
        assert!(Manifest::parse(b"not json").is_err());
    }

    #[test]
    fn sandbox_fields_round_trip_and_bad_ones_are_refused() {
        let spec: RunSpec = toml::from_str(
            "devices = [\"/dev/ttyUSB0\"]\naddress_families = [\"AF_CAN\"]\n\
             writable = [\"/var/lib/app\"]\njit = true\nmemory_max = \"256M\"",
        )
        .expect("parses");
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.memory_max(), Ok(Some(256 << 20)));
        let json = serde_json::to_vec(&spec).expect("serialises");
        assert_eq!(serde_json::from_slice::<RunSpec>(&json).ok(), Some(spec));
        // An empty spec says nothing of the sandbox: the defaults are the tight ones.
        assert_eq!(
            serde_json::to_string(&RunSpec::default()).ok().as_deref(),
            Some("{}")
        );

        let bad = [
            "devices = [\"ttyUSB0\"]",
            "devices = [\"/dev/../etc/shadow\"]",
            "writable = [\"/\"]",
            "address_families = [\"AF_KEY\"]",
            "address_families = [\"can\"]",
            "memory_max = \"lots\"",
            "memory_max = \"1K\"",
            "jit = \"yes\"",
        ];
        for b in bad {
            let parsed = toml::from_str::<RunSpec>(b);
            assert!(
                parsed.map(|s| s.validate().is_err()).unwrap_or(true),
                "{b} accepted"
            );
        }
    }

    #[test]
    fn a_version_too_long_for_a_slot_name_is_refused() {
        let long = format!("1.0.0-{}", "a".repeat(MAX_VERSION_LEN));
        let err = parse_version(&long)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("at most 128"), "{err}");
        assert!(parse_version(&format!("1.0.0-{}", "a".repeat(100))).is_ok());
    }
}
