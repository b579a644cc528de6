//! On-disk layout of installed modules, and its one atomic switch.
//!
//! ```text
//! STATE_DIR/modules/NAME/state.json          {"current": Slot, "previous": Slot}
//! STATE_DIR/modules/NAME/slots/ID/artifact   the executable or file, complete and fsynced
//! STATE_DIR/modules/NAME/slots/ID/manifest.json, manifest.sig
//! STATE_DIR/modules/NAME/tmp/                everything in flight
//! STATE_DIR/modules/NAME/config.json         {"revision": 9, "overlay": {...}}: the runtime
//!                                            config layers applied (absent: none)
//! ```
//! Directories from `STATE_DIR` down to each slot are 0711: a module that runs as its own
//! user reaches and executes its artifact but cannot list or change what is installed.
//!
//! Invariant: `state.json` only ever names complete slot directories, and it is replaced
//! atomically (temp, fsync, rename, fsync dir). A `kill -9` or power cut at any instant
//! therefore leaves the module at its old or its new version, never a mix; whatever was
//! in flight is under `tmp/` or an unreferenced slot, both removed by `clean`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use aviary_proto::overlay::RunOverlay;

use super::InstallError;

/// One installed version of a module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// SemVer version.
    pub version: String,
    /// sha256 (hex) of the artifact.
    pub sha256: String,
    /// Directory name under `slots/`.
    pub id: String,
    /// Whether the manifest has a run spec.
    pub runnable: bool,
}

/// Which slots a module has.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleState {
    /// What runs (or, for file modules, what is in use).
    pub current: Option<Slot>,
    /// What ran before: the target of a rollback without download.
    pub previous: Option<Slot>,
    /// The control plane's module revision that made this state (0: offline bundle).
    #[serde(default)]
    pub revision: u64,
    /// `current` is the slot this module went back to (a rollback, by the control plane
    /// or on its own), until the next install: the Hello says so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
}

/// The merged runtime config layers a module runs with, as the control plane sent them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedConfig {
    /// The control plane's config revision.
    pub revision: u64,
    /// Laid over the run spec of whatever version is current.
    pub overlay: RunOverlay,
}

/// The `modules/` directory of a state dir.
#[derive(Clone, Debug)]
pub struct Modules {
    root: PathBuf,
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::from_io(path, source)
}

/// One path component: no separator, no NUL, not `.` or `..`, at most 255 bytes.
fn safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// Removes `path` if it is a symlink (not following it).
fn replace_symlink(path: &Path) -> Result<(), InstallError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            tracing::warn!(path = %path.display(), "symlink in the state dir removed");
            std::fs::remove_file(path).map_err(io(path))
        }
        _ => Ok(()),
    }
}

/// Mode of the directories on the way to a slot: a module running as its own user must
/// reach and execute its artifact, but may not list or change what is installed.
pub(crate) const PASSAGE_MODE: u32 = 0o711;

/// Gives `dir` [`PASSAGE_MODE`].
pub(crate) fn make_passage(dir: &Path) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PASSAGE_MODE)).map_err(io(dir))
}

/// fsync a directory, so renames into it survive a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

impl Modules {
    /// Opens (creating) `STATE_DIR/modules`.
    pub fn open(state_dir: &Path) -> Result<Modules, InstallError> {
        let root = state_dir.join("modules");
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        // Absolute: modules run with their slot as working directory.
        let root = std::fs::canonicalize(&root).map_err(io(&root))?;
        let modules = Modules { root };
        modules.open_passages(state_dir)?;
        Ok(modules)
    }

    /// Every directory from the state dir down to each slot gets [`PASSAGE_MODE`], also
    /// those an older daemon made 0700: a module with a `user` could not start its own
    /// artifact. Temporary and partial files stay private.
    fn open_passages(&self, state_dir: &Path) -> Result<(), InstallError> {
        make_passage(state_dir)?;
        make_passage(&self.root)?;
        let entries = std::fs::read_dir(&self.root).map_err(io(&self.root))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // Only real module directories: never through a symlink.
            if aviary_proto::manifest::validate_module_name(&name).is_err()
                || !entry.file_type().is_ok_and(|t| t.is_dir())
            {
                continue;
            }
            make_passage(&entry.path())?;
            let slots = entry.path().join("slots");
            if !std::fs::symlink_metadata(&slots).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            make_passage(&slots)?;
            for slot in std::fs::read_dir(&slots).map_err(io(&slots))?.flatten() {
                if slot.file_type().is_ok_and(|t| t.is_dir()) {
                    make_passage(&slot.path())?;
                }
            }
        }
        Ok(())
    }

    /// The `modules/` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `modules/NAME` (the name is validated by the manifest before it gets here).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `modules/NAME`, after checking `NAME` is a module name: every method that writes
    /// or removes goes through here, so no message can point one outside `modules/`.
    fn checked_dir(&self, name: &str) -> Result<PathBuf, InstallError> {
        aviary_proto::manifest::validate_module_name(name).map_err(InstallError::Manifest)?;
        Ok(self.dir(name))
    }

    /// `modules/NAME/tmp`, created; a symlink in its place is removed, never followed.
    pub fn tmp(&self, name: &str) -> Result<PathBuf, InstallError> {
        let tmp = self.checked_dir(name)?.join("tmp");
        replace_symlink(&tmp)?;
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        Ok(tmp)
    }

    /// `modules/NAME/slots/ID`.
    pub fn slot_dir(&self, name: &str, id: &str) -> PathBuf {
        self.dir(name).join("slots").join(id)
    }

    /// The artifact of a slot.
    pub fn artifact(&self, name: &str, slot: &Slot) -> PathBuf {
        self.slot_dir(name, &slot.id).join("artifact")
    }

    /// The module's slots; empty when it was never installed.
    pub fn state(&self, name: &str) -> Result<ModuleState, InstallError> {
        let path = self.checked_dir(name)?.join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let corrupt = |reason: String| InstallError::Corrupt {
                    path: path.clone(),
                    reason,
                };
                let state: ModuleState =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                // Slot ids become paths too.
                for slot in [&state.current, &state.previous].into_iter().flatten() {
                    if !safe_file_name(&slot.id) {
                        return Err(corrupt(format!("slot id {:?} is not a file name", slot.id)));
                    }
                }
                Ok(state)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModuleState::default()),
            Err(e) => Err(InstallError::from_io(&path, e)),
        }
    }

    /// Switches the module to `state` atomically.
    pub fn write_state(&self, name: &str, state: &ModuleState) -> Result<(), InstallError> {
        self.write_json(name, "state.json", state)
    }

    /// The runtime config the module runs with, if the control plane ever sent one.
    pub fn config(&self, name: &str) -> Result<Option<AppliedConfig>, InstallError> {
        let path = self.checked_dir(name)?.join("config.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| InstallError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(InstallError::from_io(&path, e)),
        }
    }

    /// Records the runtime config the module now runs with, atomically.
    pub fn write_config(&self, name: &str, config: &AppliedConfig) -> Result<(), InstallError> {
        std::fs::create_dir_all(self.dir(name)).map_err(io(&self.dir(name)))?;
        self.write_json(name, "config.json", config)
    }

    /// Config revisions applied, by module (for the Hello).
    pub fn configs(&self) -> Result<Vec<(String, u64)>, InstallError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(io(&self.root))?;
        for entry in entries {
            let name = entry.map_err(io(&self.root))?.file_name();
            let name = name.to_string_lossy();
            if aviary_proto::manifest::validate_module_name(&name).is_err() {
                continue;
            }
            if let Some(c) = self.config(&name)? {
                out.push((name.into_owned(), c.revision));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Replaces `modules/NAME/FILE` atomically (temp, fsync, rename, fsync dir).
    fn write_json<T: Serialize>(
        &self,
        name: &str,
        file: &str,
        value: &T,
    ) -> Result<(), InstallError> {
        let dir = self.checked_dir(name)?;
        let path = dir.join(file);
        let tmp = dir.join(format!("{file}.tmp"));
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| InstallError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(InstallError::from_io(&path, e));
        }
        sync_dir(&dir)
    }

    /// Every installed module and its slots, by name. A module whose `state.json` cannot
    /// be read is left out (and logged): one damaged file must not stop the others.
    pub fn list(&self) -> Result<Vec<(String, ModuleState)>, InstallError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(io(&self.root))?;
        for entry in entries {
            let entry = entry.map_err(io(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let state = match self.state(&name) {
                Ok(state) => state,
                Err(e) => {
                    metrics::counter!("aviary_edge_unreadable_modules_total").increment(1);
                    tracing::error!(module = %name, error = %e, "module left out: its state cannot be read");
                    continue;
                }
            };
            if state.current.is_some() {
                out.push((name, state));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes everything of `name` that `state.json` does not name: in-flight files and
    /// slots of interrupted or superseded installs.
    pub fn clean(&self, name: &str) -> Result<(), InstallError> {
        let state = self.state(name)?;
        let dir = self.checked_dir(name)?;
        // A symlink planted for `tmp` or `slots` would have its target emptied below.
        replace_symlink(&dir.join("tmp"))?;
        replace_symlink(&dir.join("slots"))?;
        let keep: Vec<&str> = [&state.current, &state.previous]
            .into_iter()
            .flatten()
            .map(|s| s.id.as_str())
            .collect();
        let tmp = self.dir(name).join("tmp");
        if tmp.is_dir() {
            for entry in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
                let path = entry.map_err(io(&tmp))?.path();
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
        let slots = self.dir(name).join("slots");
        if slots.is_dir() {
            for entry in std::fs::read_dir(&slots).map_err(io(&slots))? {
                let entry = entry.map_err(io(&slots))?;
                let id = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(&id.as_str()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let _ = std::fs::remove_file(self.dir(name).join("state.json.tmp"));
        let _ = std::fs::remove_file(self.dir(name).join("config.json.tmp"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0)
    }

    #[test]
    fn open_makes_the_way_to_every_slot_passable_but_nothing_else() -> Result<(), InstallError> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let state = dir.path().join("state");
        // As a daemon before this one left them, under UMask=0077.
        let slot = state.join("modules/sample/slots/1.0.0-abc");
        let tmp = state.join("modules/sample/tmp");
        let elsewhere = dir.path().join("elsewhere");
        for d in [&slot, &tmp, &elsewhere] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        std::os::unix::fs::symlink(&elsewhere, state.join("modules/linked"))
            .map_err(io(&elsewhere))?;
        for d in [&state, &slot, &tmp, &elsewhere] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).map_err(io(d))?;
        }
        Modules::open(&state)?;
        for d in [
            state.clone(),
            state.join("modules"),
            state.join("modules/sample"),
            state.join("modules/sample/slots"),
            slot,
        ] {
            assert_eq!(mode(&d), PASSAGE_MODE, "{}", d.display());
        }
        // What is in flight stays private, and no symlink is followed.
        assert_eq!(mode(&tmp), 0o700);
        assert_eq!(mode(&elsewhere), 0o700);
        Ok(())
    }
}
