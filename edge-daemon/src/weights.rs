//! The node's load-balancing weights: what the control plane assigned, what is in effect
//! now, and how that is exposed locally.
//!
//! Invariants:
//! * Readers (`snapshot`) never lock: the view is swapped in whole through an `ArcSwap`.
//! * `state.json` (what was assigned, and when we last heard from the control plane) and
//!   `weights.json` (the view) are each replaced atomically: temp file, fsync, rename.
//! * Fail safe: after `ttl_seconds` without a control plane every weight is 0; the assigned
//!   weights return when the control plane answers again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::EdgeError;

/// Largest weight; the control plane uses the same bound.
pub const MAX_WEIGHT: u32 = 100;

/// What the control plane assigned (persisted in `state.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    /// Revision of the assignment; 0 = never assigned.
    pub revision: u64,
    /// module -> 0..=100.
    pub weights: BTreeMap<String, u32>,
    /// How long the weights hold without a control plane.
    pub ttl_seconds: u32,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct PersistedState {
    assignment: Assignment,
    /// Unix milliseconds we last heard from the control plane.
    last_contact_ms: u64,
}

/// The weights in effect, as `GET /v1/weights` and `weights.json` show them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct View {
    /// Revision of the assignment in effect.
    pub revision: u64,
    /// Effective weights: the assigned ones, or all 0 after the TTL ran out.
    pub weights: BTreeMap<String, u32>,
    /// True while the fleet stream is up.
    pub connected: bool,
    /// RFC 3339 time the weights fall to 0 unless the control plane returns; null while
    /// connected.
    pub expires_at: Option<String>,
}

/// A view and its JSON encoding, swapped in together.
#[derive(Debug)]
pub struct Snapshot {
    /// The view.
    pub view: View,
    /// `serde_json` of the view, served as is.
    pub json: Vec<u8>,
}

struct Inner {
    state: PersistedState,
    connected: bool,
}

/// The weights holder (see the module docs).
pub struct Weights {
    state_path: PathBuf,
    view_path: PathBuf,
    inner: Mutex<Inner>,
    current: ArcSwap<Snapshot>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl Weights {
    /// Loads `state.json` from `state_dir` (or starts empty) and writes the current view.
    pub fn load(state_dir: &Path) -> Result<Weights, EdgeError> {
        std::fs::create_dir_all(state_dir).map_err(|source| EdgeError::State {
            path: state_dir.to_owned(),
            source,
        })?;
        let state_path = state_dir.join("state.json");
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| EdgeError::CorruptState {
                    path: state_path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PersistedState::default(),
            Err(source) => {
                return Err(EdgeError::State {
                    path: state_path,
                    source,
                })
            }
        };
        let weights = Weights {
            view_path: state_dir.join("weights.json"),
            state_path,
            inner: Mutex::new(Inner {
                state,
                connected: false,
            }),
            current: ArcSwap::from_pointee(Snapshot {
                view: View {
                    revision: 0,
                    weights: BTreeMap::new(),
                    connected: false,
                    expires_at: None,
                },
                json: Vec::new(),
            }),
        };
        let inner = weights.lock();
        weights.publish(&inner)?;
        drop(inner);
        Ok(weights)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The weights in effect now (lock-free).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The revision last applied (for the Hello).
    pub fn applied_revision(&self) -> u64 {
        self.lock().state.assignment.revision
    }

    /// Validates and applies an assignment; on error nothing changes.
    pub fn apply(&self, assignment: Assignment) -> Result<(), EdgeError> {
        validate(&assignment)?;
        let mut inner = self.lock();
        if assignment.revision < inner.state.assignment.revision {
            return Err(EdgeError::InvalidAssignment(format!(
                "revision {} is older than the applied revision {}",
                assignment.revision, inner.state.assignment.revision
            )));
        }
        let next = PersistedState {
            assignment,
            last_contact_ms: now_ms(),
        };
        write_json(&self.state_path, &next)?;
        inner.state = next;
        self.publish(&inner)
    }

    /// The fleet stream came up (`true`: the control plane accepted our Hello) or went
    /// down (`false`).
    ///
    /// Only contact counts: a failed reconnect must not restart the TTL, or a daemon
    /// retrying faster than its TTL would never fail safe. A stream that was up until now
    /// is contact until now (a silent peer is dropped within two keepalive intervals, so
    /// that bounds how late the TTL can start).
    pub fn set_connected(&self, connected: bool) -> Result<(), EdgeError> {
        let mut inner = self.lock();
        let was_connected = inner.connected;
        inner.connected = connected;
        if connected || was_connected {
            self.touch_locked(&mut inner)
        } else {
            self.publish(&inner)
        }
    }

    /// Records contact with the control plane now (called periodically while connected, so
    /// a daemon restart after a crash knows how fresh its weights are). Ignored while
    /// disconnected.
    pub fn touch(&self) -> Result<(), EdgeError> {
        let mut inner = self.lock();
        if !inner.connected {
            return Ok(());
        }
        self.touch_locked(&mut inner)
    }

    fn touch_locked(&self, inner: &mut Inner) -> Result<(), EdgeError> {
        let next = PersistedState {
            assignment: inner.state.assignment.clone(),
            last_contact_ms: now_ms(),
        };
        write_json(&self.state_path, &next)?;
        inner.state = next;
        self.publish(inner)
    }

    /// When the weights fall to 0 unless the control plane answers first; `None` while
    /// connected or when nothing was ever assigned.
    pub fn expiry(&self) -> Option<SystemTime> {
        let inner = self.lock();
        expiry_ms(&inner).map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Re-evaluates the view (call at `expiry()`); returns true if the weights just fell.
    pub fn refresh(&self) -> Result<bool, EdgeError> {
        let inner = self.lock();
        let before = self.snapshot().view.weights.clone();
        self.publish(&inner)?;
        Ok(self.snapshot().view.weights != before)
    }

    /// Computes the view from `inner` and swaps it in (file first, then memory).
    fn publish(&self, inner: &Inner) -> Result<(), EdgeError> {
        let assignment = &inner.state.assignment;
        let expires = expiry_ms(inner);
        let expired = expires.is_some_and(|t| now_ms() >= t);
        let weights = if expired {
            assignment.weights.keys().map(|k| (k.clone(), 0)).collect()
        } else {
            assignment.weights.clone()
        };
        let view = View {
            revision: assignment.revision,
            weights,
            connected: inner.connected,
            expires_at: expires.map(rfc3339),
        };
        if view == self.current.load().view && !self.current.load().json.is_empty() {
            return Ok(());
        }
        let json = serde_json::to_vec(&view).map_err(|source| EdgeError::CorruptState {
            path: self.view_path.clone(),
            source,
        })?;
        write_bytes(&self.view_path, &json)?;
        self.current.store(Arc::new(Snapshot { view, json }));
        Ok(())
    }
}

fn expiry_ms(inner: &Inner) -> Option<u64> {
    let a = &inner.state.assignment;
    if inner.connected || a.revision == 0 {
        return None;
    }
    Some(inner.state.last_contact_ms + u64::from(a.ttl_seconds) * 1000)
}

fn validate(a: &Assignment) -> Result<(), EdgeError> {
    if a.ttl_seconds == 0 {
        return Err(EdgeError::InvalidAssignment(
            "ttl_seconds must be at least 1".into(),
        ));
    }
    for (module, weight) in &a.weights {
        aviary_certs::validate_name("module", module)
            .map_err(|e| EdgeError::InvalidAssignment(e.to_string()))?;
        if *weight > MAX_WEIGHT {
            return Err(EdgeError::InvalidAssignment(format!(
                "weight {weight} for module {module} is over {MAX_WEIGHT}"
            )));
        }
    }
    Ok(())
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), EdgeError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| EdgeError::CorruptState {
        path: path.to_owned(),
        source,
    })?;
    write_bytes(path, &bytes)
}

/// Temp file in the same directory, fsync, rename over `path`, fsync the directory.
fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), EdgeError> {
    let err = |source| EdgeError::State {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(revision: u64, weight: u32, ttl_seconds: u32) -> Assignment {
        Assignment {
            revision,
            weights: [("gateway".to_string(), weight)].into(),
            ttl_seconds,
        }
    }

    #[test]
    fn invalid_assignments_leave_the_old_weights() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let w = Weights::load(dir.path())?;
        w.set_connected(true)?;
        w.apply(assignment(3, 30, 60))?;
        assert!(w.apply(assignment(4, 101, 60)).is_err());
        assert!(w.apply(assignment(2, 10, 60)).is_err());
        assert!(w.apply(assignment(5, 10, 0)).is_err());
        let view = &w.snapshot().view;
        assert_eq!((view.revision, view.weights["gateway"]), (3, 30));
        let on_disk: View =
            serde_json::from_slice(&std::fs::read(dir.path().join("weights.json"))?)?;
        assert_eq!(&on_disk, view);
        Ok(())
    }

    #[test]
    fn weights_survive_a_restart_and_fall_to_zero_after_the_ttl() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let w = Weights::load(dir.path())?;
            w.set_connected(true)?;
            w.apply(assignment(7, 30, 1))?;
            w.set_connected(false)?;
            assert_eq!(w.snapshot().view.weights["gateway"], 30);
        }
        let w = Weights::load(dir.path())?;
        assert_eq!(w.applied_revision(), 7);
        let expiry = w.expiry().ok_or_else(|| anyhow::anyhow!("no expiry"))?;
        std::thread::sleep(expiry.duration_since(SystemTime::now()).unwrap_or_default());
        assert!(w.refresh()?);
        assert_eq!(w.snapshot().view.weights["gateway"], 0);
        w.set_connected(true)?;
        assert_eq!(w.snapshot().view.weights["gateway"], 30);
        assert_eq!(w.snapshot().view.expires_at, None);
        Ok(())
    }

    #[test]
    fn failed_reconnects_do_not_restart_the_ttl() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let w = Weights::load(dir.path())?;
        w.set_connected(true)?;
        w.apply(assignment(3, 30, 60))?;
        w.set_connected(false)?;
        let expiry = w.expiry().ok_or_else(|| anyhow::anyhow!("no expiry"))?;
        // Every failed attempt reports "disconnected" again; none of them is contact.
        let later = SystemTime::now() + Duration::from_millis(20);
        while SystemTime::now() < later {
            w.set_connected(false)?;
            w.touch()?;
        }
        assert_eq!(w.expiry(), Some(expiry));
        let reloaded = Weights::load(dir.path())?;
        assert_eq!(reloaded.expiry(), Some(expiry));
        Ok(())
    }
}
