//! Running modules: one supervisor task per module (`supervisor`), process start/stop and
//! socket hand-over (`spawn`), HTTP/TCP probes (`probe`).
//!
//! `Runtime::activate(module)` makes the running process match the module's current
//! slot on disk. The caller installs first and activates second; when activation fails
//! (the new version never becomes ready) the previous process keeps serving and the
//! caller rolls the slots back, so disk and processes agree again.

pub mod probe;
mod spawn;
mod supervisor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aviary_proto::manifest::Manifest;
use tokio::sync::{mpsc, oneshot};

use crate::modules::Modules;
pub use supervisor::Stats;
use supervisor::{Command, Launch};

/// The module processes of this daemon.
pub struct Runtime {
    modules: Modules,
    supervisors: Mutex<HashMap<String, Handle>>,
}

/// A module's supervisor task: its command channel and its figures.
type Handle = (mpsc::Sender<Command>, Arc<Stats>);

impl Runtime {
    /// A runtime over the installed `modules`.
    pub fn new(modules: Modules) -> Runtime {
        Runtime {
            modules,
            supervisors: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the processes of `module` match its current slot; `Err` says why the slot's
    /// version could not be made to run (the previous process, if any, still serves).
    pub async fn activate(&self, module: &str) -> Result<(), String> {
        let state = self.modules.state(module).map_err(|e| e.to_string())?;
        let Some(slot) = state.current else {
            return Ok(());
        };
        let dir = self.modules.slot_dir(module, &slot.id);
        let manifest = std::fs::read(dir.join("manifest.json"))
            .map_err(|e| format!("{}: {e}", dir.display()))
            .and_then(|b| Manifest::parse(&b).map_err(|e| e.to_string()))?;
        let Some(spec) = manifest.run else {
            return Ok(()); // a file module: installed is all there is to it
        };
        let launch = Launch {
            version: slot.version.clone(),
            slot: slot.id.clone(),
            artifact: dir.join("artifact"),
            dir,
            spec,
        };
        let tx = self.supervisor(module);
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(Command::Activate(Box::new(launch), reply_tx))
            .await
            .map_err(|_| "module supervisor is gone".to_owned())?;
        reply_rx
            .await
            .unwrap_or_else(|_| Err("module supervisor is gone".into()))
    }

    /// Health figures of every supervised module.
    pub fn stats(&self) -> Vec<(String, Arc<Stats>)> {
        let sups = self.supervisors.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = sups
            .iter()
            .map(|(name, (_, stats))| (name.clone(), stats.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn supervisor(&self, module: &str) -> mpsc::Sender<Command> {
        let mut sups = self.supervisors.lock().unwrap_or_else(|p| p.into_inner());
        sups.entry(module.to_owned())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(4);
                let stats = Arc::new(Stats::default());
                tokio::spawn(supervisor::supervise(module.to_owned(), rx, stats.clone()));
                (tx, stats)
            })
            .0
            .clone()
    }

    /// Stops every module process (daemon shutdown).
    pub fn stop_all(&self) {
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}
