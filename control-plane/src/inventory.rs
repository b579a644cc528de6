//! What each node runs now, module by module, and since when.
//!
//! One state machine per node, fed by three sources that each know part of the truth:
//! * the Hello (`hello`): every slot the node holds, authoritative at connect;
//! * the answer to a module update (`answered`): the version and sha256 the control plane
//!   sent, installed or gone back to;
//! * health reports (`reported`): which version runs and whether its process is up. Only
//!   these see a local rollback, which the node does on its own.
//!
//! Each transition returns whether anything changed, so the caller writes the node's
//! status only then: a steady fleet's reports cost no store write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One slot of a module as a node reported it in its Hello.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ModuleRecord {
    /// Module name.
    pub name: String,
    /// Installed version.
    pub version: String,
    /// Artifact sha256 (hex).
    pub sha256: String,
    /// `aviary.v1.ModuleState` value.
    pub state: i32,
    /// "current" or "previous".
    pub slot: String,
}

impl ModuleRecord {
    /// The node says this slot is the one it went back to (`MODULE_STATE_ROLLED_BACK`).
    pub(crate) fn went_back(&self) -> bool {
        self.state == 6
    }
}

/// One artifact of a module.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Artifact {
    /// SemVer version.
    pub version: String,
    /// sha256 (hex); empty until the control plane learns it.
    pub sha256: String,
}

/// What a module on a node is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RunState {
    /// On disk; not reported running (yet), or a module without a process.
    #[default]
    Installed,
    /// Its process started and is not ready yet.
    Starting,
    /// Its process runs.
    Running,
    /// Its process was stopped.
    Stopped,
    /// Its process exits and is restarted with backoff.
    Failed,
    /// The node went back to its previous slot, and that version runs.
    RolledBack,
}

impl RunState {
    /// The state a report's process state names, on a node that has or has not gone
    /// back to its previous slot; `None` for a word this version does not know.
    fn from_process(process: &str, on_previous: bool) -> Option<RunState> {
        Some(match process {
            "running" if on_previous => RunState::RolledBack,
            "running" => RunState::Running,
            "starting" => RunState::Starting,
            "backoff" => RunState::Failed,
            "stopped" => RunState::Stopped,
            _ => return None,
        })
    }
}

/// What a node did with a module update it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Applied (ACK): installed, or with `rollback`, gone back to its previous slot.
    Installed {
        /// The update was a rollback.
        rollback: bool,
    },
    /// Installed, never ready, undone by the node itself (a NACK saying so).
    WentBack,
}

/// One module on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InstalledModule {
    /// What runs (or is in use).
    pub current: Artifact,
    /// The other slot, kept for rollback.
    pub previous: Option<Artifact>,
    /// The node went back to the slot it kept, and has not installed since.
    pub on_previous: bool,
    /// What it is doing.
    pub state: RunState,
    /// Unix ms when `state` or `current` last changed.
    pub since_ms: u64,
}

impl InstalledModule {
    fn set(&mut self, state: RunState, now_ms: u64) -> bool {
        if self.state == state {
            return false;
        }
        self.state = state;
        self.since_ms = now_ms;
        true
    }

    /// Runs the other slot: going back to the one kept for rollback, or (from there)
    /// forward again to the one it left.
    fn swap(&mut self, now_ms: u64) {
        if let Some(previous) = self.previous.take() {
            self.previous = Some(std::mem::replace(&mut self.current, previous));
            self.on_previous = !self.on_previous;
            self.state = if self.on_previous {
                RunState::RolledBack
            } else {
                RunState::Installed
            };
            self.since_ms = now_ms;
        }
    }
}

/// module -> what runs on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct Inventory {
    modules: BTreeMap<String, InstalledModule>,
}

impl Inventory {
    /// Every module, by name.
    pub(crate) fn modules(&self) -> &BTreeMap<String, InstalledModule> {
        &self.modules
    }

    /// One module.
    #[cfg(test)]
    pub(crate) fn get(&self, module: &str) -> Option<&InstalledModule> {
        self.modules.get(module)
    }

    /// The slots a node holds, from its Hello: modules it no longer holds are dropped, and
    /// a module whose running artifact is unchanged keeps its state and since.
    pub(crate) fn hello(&mut self, slots: &[ModuleRecord], now_ms: u64) -> bool {
        let mut next: BTreeMap<String, InstalledModule> = BTreeMap::new();
        for s in slots.iter().filter(|s| s.slot != "previous") {
            let current = Artifact {
                version: s.version.clone(),
                sha256: s.sha256.clone(),
            };
            let previous = slots
                .iter()
                .find(|p| p.name == s.name && p.slot == "previous")
                .map(|p| Artifact {
                    version: p.version.clone(),
                    sha256: p.sha256.clone(),
                });
            let module = match self.modules.get(&s.name) {
                // Same artifact, and its word on a rollback agrees: what we knew stands.
                Some(known) if known.current == current && known.on_previous == s.went_back() => {
                    InstalledModule {
                        previous,
                        ..known.clone()
                    }
                }
                _ => InstalledModule {
                    current,
                    previous,
                    on_previous: s.went_back(),
                    state: if s.went_back() {
                        RunState::RolledBack
                    } else {
                        RunState::Installed
                    },
                    since_ms: now_ms,
                },
            };
            next.insert(s.name.clone(), module);
        }
        let changed = next != self.modules;
        self.modules = next;
        changed
    }

    /// The node answered the update that leads `module` to `to`.
    pub(crate) fn answered(
        &mut self,
        module: &str,
        to: Artifact,
        outcome: Outcome,
        now_ms: u64,
    ) -> bool {
        let rollback = match outcome {
            Outcome::Installed { rollback } => rollback,
            Outcome::WentBack => return self.went_back(module, to, now_ms),
        };
        let Some(m) = self.modules.get_mut(module) else {
            self.modules.insert(
                module.to_owned(),
                InstalledModule {
                    current: to,
                    since_ms: now_ms,
                    ..Default::default()
                },
            );
            return true;
        };
        let before = m.clone();
        if m.current.version == to.version {
            // Already there (a report may have shown the version before the ACK came):
            // the ACK brings the sha256.
            m.current.sha256 = to.sha256;
        } else if rollback
            && !m.on_previous
            && m.previous.as_ref().is_some_and(|p| p.version == to.version)
        {
            m.swap(now_ms);
            m.current.sha256 = to.sha256;
        } else {
            let old = std::mem::replace(&mut m.current, to);
            m.previous = Some(old);
            m.on_previous = rollback;
            m.state = if rollback {
                RunState::RolledBack
            } else {
                RunState::Installed
            };
            m.since_ms = now_ms;
        }
        *m != before
    }

    /// The node installed `failed`, found it not ready and went back to the slot it
    /// kept: `failed` is now its previous slot.
    fn went_back(&mut self, module: &str, failed: Artifact, now_ms: u64) -> bool {
        let Some(m) = self.modules.get_mut(module) else {
            return false;
        };
        let before = m.clone();
        if m.current.version == failed.version && m.previous.is_some() {
            // A report showed it running before it failed.
            m.swap(now_ms);
        } else {
            m.previous = Some(failed);
            m.on_previous = true;
            m.state = RunState::RolledBack;
            m.since_ms = now_ms;
        }
        *m != before
    }

    /// A health report of `module`: which version runs (`version`, empty if none), and
    /// its process state (`process`).
    pub(crate) fn reported(
        &mut self,
        module: &str,
        version: &str,
        process: &str,
        now_ms: u64,
    ) -> bool {
        let Some(m) = self.modules.get_mut(module) else {
            return false;
        };
        // Every node's report passes here each second: say what changed, copy nothing.
        let mut changed = false;
        if !version.is_empty() && version != m.current.version {
            changed = true;
            if m.previous.as_ref().is_some_and(|p| p.version == version) {
                // The node went back on its own (or forward again, from a rollback).
                m.swap(now_ms);
            } else {
                // A new version runs before its ACK came (the ACK brings its sha256).
                let old = std::mem::replace(
                    &mut m.current,
                    Artifact {
                        version: version.to_owned(),
                        sha256: String::new(),
                    },
                );
                m.previous = Some(old);
                m.on_previous = false;
                m.since_ms = now_ms;
            }
        }
        if let Some(state) = RunState::from_process(process, m.on_previous) {
            changed |= m.set(state, now_ms);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, version: &str, which: &str) -> ModuleRecord {
        ModuleRecord {
            name: name.into(),
            version: version.into(),
            sha256: format!("sha-{version}"),
            state: 3,
            slot: which.into(),
        }
    }

    const INSTALL: Outcome = Outcome::Installed { rollback: false };
    const ROLLBACK: Outcome = Outcome::Installed { rollback: true };

    #[test]
    fn a_version_that_never_got_ready_becomes_the_previous_slot() {
        let mut inv = Inventory::default();
        inv.hello(
            &[
                slot("app", "2.0.0", "current"),
                slot("app", "1.0.0", "previous"),
            ],
            0,
        );
        inv.reported("app", "2.0.0", "running", 1);
        assert!(inv.answered("app", art("3.0.0"), Outcome::WentBack, 2));
        let m = inv.get("app").expect("app");
        assert_eq!(
            (&m.current, m.previous.as_ref()),
            (&art("2.0.0"), Some(&art("3.0.0")))
        );
        assert_eq!((m.state, m.on_previous), (RunState::RolledBack, true));
        // Its reports keep saying so while 2.0.0 runs.
        assert!(!inv.reported("app", "2.0.0", "running", 3));
    }

    fn art(version: &str) -> Artifact {
        Artifact {
            version: version.into(),
            sha256: format!("sha-{version}"),
        }
    }

    #[test]
    fn hello_takes_both_slots_and_keeps_state_of_an_unchanged_module() {
        let mut inv = Inventory::default();
        assert!(inv.hello(&[slot("app", "1.0.0", "current")], 10));
        assert!(inv.reported("app", "1.0.0", "running", 20));
        let hello = [
            slot("app", "1.0.0", "current"),
            slot("app", "0.9.0", "previous"),
        ];
        assert!(inv.hello(&hello, 30));
        let m = inv.get("app").expect("app");
        assert_eq!((m.state, m.since_ms), (RunState::Running, 20));
        assert_eq!(m.previous, Some(art("0.9.0")));
        assert!(!inv.hello(&hello, 40), "the same Hello changes nothing");
        assert!(inv.hello(&[], 50));
        assert!(
            inv.get("app").is_none(),
            "a module the node no longer holds is gone"
        );
    }

    #[test]
    fn a_hello_says_which_slot_the_node_went_back_to() {
        // What a control plane that lost its last status flush hears on reconnect.
        let mut inv = Inventory::default();
        inv.hello(&[slot("app", "4.0.0", "current")], 0);
        let mut back = slot("app", "2.0.0", "current");
        back.state = 6;
        assert!(inv.hello(&[back, slot("app", "4.0.0", "previous")], 1));
        let m = inv.get("app").expect("app");
        assert_eq!(
            (m.current.version.as_str(), m.state),
            ("2.0.0", RunState::RolledBack)
        );
        assert!(m.on_previous);
        assert_eq!(m.previous, Some(art("4.0.0")));
    }

    #[test]
    fn an_install_keeps_the_old_version_as_previous_and_an_abort_goes_back() {
        let mut inv = Inventory::default();
        inv.hello(&[slot("app", "1.0.0", "current")], 0);
        assert!(inv.answered("app", art("2.0.0"), INSTALL, 5));
        let m = inv.get("app").expect("app");
        assert_eq!(
            (&m.current, m.previous.as_ref()),
            (&art("2.0.0"), Some(&art("1.0.0")))
        );
        assert_eq!(m.state, RunState::Installed);
        assert!(inv.reported("app", "2.0.0", "running", 6));
        assert_eq!(inv.get("app").map(|m| m.state), Some(RunState::Running));
        assert!(!inv.reported("app", "2.0.0", "running", 7));

        assert!(inv.answered("app", art("1.0.0"), ROLLBACK, 8));
        let m = inv.get("app").expect("app");
        assert_eq!(m.current, art("1.0.0"));
        assert_eq!(m.previous, Some(art("2.0.0")));
        assert!(m.on_previous);
        assert_eq!((m.state, m.since_ms), (RunState::RolledBack, 8));
        // Still rolled back while the old version runs.
        assert!(!inv.reported("app", "1.0.0", "running", 9));
        assert!(inv.reported("app", "1.0.0", "backoff", 10));
        assert_eq!(inv.get("app").map(|m| m.state), Some(RunState::Failed));
    }

    #[test]
    fn a_local_rollback_is_seen_in_the_reports() {
        let mut inv = Inventory::default();
        inv.hello(&[slot("app", "1.0.0", "current")], 0);
        // The new version starts before its (never sent) ACK, then fails readiness.
        assert!(inv.reported("app", "2.0.0", "starting", 1));
        let m = inv.get("app").expect("app");
        assert_eq!(
            (m.current.version.as_str(), m.state),
            ("2.0.0", RunState::Starting)
        );
        assert!(inv.reported("app", "1.0.0", "running", 2));
        let m = inv.get("app").expect("app");
        assert_eq!(m.current, art("1.0.0"), "the sha256 kept from the old slot");
        assert_eq!(m.state, RunState::RolledBack);
        assert!(m.on_previous);
        // Installing the version it left again goes forward, not back.
        assert!(inv.reported("app", "2.0.0", "running", 3));
        let m = inv.get("app").expect("app");
        assert_eq!(
            (m.current.version.as_str(), m.state),
            ("2.0.0", RunState::Running)
        );
        assert!(!m.on_previous);
        inv.answered("app", art("2.0.0"), INSTALL, 4);
        assert_eq!(
            inv.get("app").map(|m| m.current.clone()),
            Some(art("2.0.0"))
        );
    }

    #[test]
    fn an_ack_brings_the_sha256_of_a_version_seen_running_first() {
        let mut inv = Inventory::default();
        inv.hello(&[slot("app", "1.0.0", "current")], 0);
        inv.reported("app", "2.0.0", "running", 1);
        assert_eq!(inv.get("app").map(|m| m.current.sha256.as_str()), Some(""));
        assert!(inv.answered("app", art("2.0.0"), INSTALL, 2));
        let m = inv.get("app").expect("app");
        assert_eq!(m.current, art("2.0.0"));
        assert_eq!((m.state, m.since_ms), (RunState::Running, 1));
    }
}
