//! Named contexts, as kubeconfig has them: which control plane, which certificates and
//! which admin a command talks to, kept in `~/.config/aviary/config.toml` (or
//! `$AVIARY_CONFIG`), with one current context. Flags win over environment variables,
//! and both win over the context.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::output::table;

/// Where one context points.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    /// Control plane URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<String>,
    /// Directory with ca.pem and the admin certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certs: Option<PathBuf>,
    /// Which admin certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
}

/// The config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Contexts {
    /// The context commands use when `--context` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// `aviary context ...`
#[derive(Subcommand, Debug)]
pub enum ContextCommand {
    /// Lists the contexts; `*` marks the current one.
    List,
    /// Makes NAME the current context.
    Use {
        /// Context name.
        name: String,
    },
    /// Creates or changes context NAME (only the values given change).
    Set {
        /// Context name.
        name: String,
        /// Control plane URL.
        #[arg(long = "url")]
        url: Option<String>,
        /// Directory with ca.pem and the admin certificate.
        #[arg(long = "certs-dir")]
        certs_dir: Option<PathBuf>,
        /// Which admin certificate.
        #[arg(long = "admin-name")]
        admin_name: Option<String>,
    },
    /// Deletes context NAME.
    Delete {
        /// Context name.
        name: String,
    },
}

/// The config file's path: `$AVIARY_CONFIG`, else `$XDG_CONFIG_HOME/aviary/config.toml`,
/// else `~/.config/aviary/config.toml`.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AVIARY_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("aviary").join("config.toml"))
}

impl Contexts {
    /// Reads `path`; a missing file is no contexts.
    pub fn load(path: &Path) -> anyhow::Result<Contexts> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("{}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Contexts::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes `path` whole (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = toml::to_string(self)?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The context named `name`, or the current one when `None` (none if there is no
    /// current context). A name that does not exist is an error.
    pub fn pick(&self, name: Option<&str>) -> anyhow::Result<Context> {
        let Some(name) = name.or(self.current_context.as_deref()) else {
            return Ok(Context::default());
        };
        match self.contexts.get(name) {
            Some(c) => Ok(c.clone()),
            None => bail!(
                "no context {name:?} (aviary context list shows them; aviary context set {name} --url ... makes it)"
            ),
        }
    }
}

/// Runs `aviary context ...` against the file at `path`.
pub fn run(command: ContextCommand, path: &Path) -> anyhow::Result<()> {
    let mut all = Contexts::load(path)?;
    match command {
        ContextCommand::List => {
            let rows: Vec<Vec<String>> = all
                .contexts
                .iter()
                .map(|(name, c)| {
                    let current = all.current_context.as_deref() == Some(name.as_str());
                    vec![
                        if current { "*" } else { "" }.into(),
                        name.clone(),
                        c.control_plane.clone().unwrap_or_default(),
                        c.certs
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        c.admin.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                &["CURRENT", "NAME", "CONTROL PLANE", "CERTS", "ADMIN"],
                &rows,
            );
            return Ok(());
        }
        ContextCommand::Use { name } => {
            all.pick(Some(&name))?;
            all.current_context = Some(name.clone());
            println!("current context: {name}");
        }
        ContextCommand::Set {
            name,
            url,
            certs_dir,
            admin_name,
        } => {
            let c = all.contexts.entry(name.clone()).or_default();
            if url.is_some() {
                c.control_plane = url;
            }
            if let Some(dir) = certs_dir {
                // Absolute: the context is used from any directory.
                c.certs = Some(std::path::absolute(&dir).unwrap_or(dir));
            }
            if admin_name.is_some() {
                c.admin = admin_name;
            }
            if all.current_context.is_none() {
                all.current_context = Some(name.clone());
            }
            println!("context {name} set");
        }
        ContextCommand::Delete { name } => {
            if all.contexts.remove(&name).is_none() {
                bail!("no context {name:?}");
            }
            if all.current_context.as_deref() == Some(name.as_str()) {
                all.current_context = None;
            }
            println!("context {name} deleted");
        }
    }
    all.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_round_trip_and_pick_the_current_one() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("aviary/config.toml");
        assert_eq!(Contexts::load(&path)?, Contexts::default());
        run(
            ContextCommand::Set {
                name: "lab".into(),
                url: Some("https://127.0.0.1:7443".into()),
                certs_dir: Some(dir.path().join("pki")),
                admin_name: Some("alice".into()),
            },
            &path,
        )?;
        run(
            ContextCommand::Set {
                name: "prod".into(),
                url: Some("https://cp.example:7443".into()),
                certs_dir: None,
                admin_name: None,
            },
            &path,
        )?;
        let all = Contexts::load(&path)?;
        assert_eq!(
            all.current_context.as_deref(),
            Some("lab"),
            "the first one set"
        );
        assert_eq!(all.pick(None)?.admin.as_deref(), Some("alice"));
        run(
            ContextCommand::Use {
                name: "prod".into(),
            },
            &path,
        )?;
        let all = Contexts::load(&path)?;
        assert_eq!(
            all.pick(None)?.control_plane.as_deref(),
            Some("https://cp.example:7443")
        );
        assert!(all.pick(Some("nope")).is_err());
        assert!(run(
            ContextCommand::Use {
                name: "nope".into()
            },
            &path
        )
        .is_err());
        run(
            ContextCommand::Delete {
                name: "prod".into(),
            },
            &path,
        )?;
        assert_eq!(Contexts::load(&path)?.pick(None)?, Context::default());
        std::fs::write(&path, "current-context = 3\n")?;
        assert!(
            Contexts::load(&path).is_err(),
            "a malformed file is an error"
        );
        Ok(())
    }
}
