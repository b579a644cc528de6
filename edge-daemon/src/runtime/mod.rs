//! Running modules: one supervisor task per module (`supervisor`), process start/stop and
//! socket hand-over (`spawn`), what a module may touch (`sandbox`), HTTP/TCP probes
//! (`probe`).
//!
//! `Runtime::activate(module)` makes the running process match the module's current
//! slot on disk. The caller installs first and activates second; when activation fails
//! (the new version never becomes ready) the previous process keeps serving and the
//! caller rolls the slots back, so disk and processes agree again.
//!
//! What runs is the slot's signed run spec with the module's applied runtime config
//! (`config.json`) laid over it; `reconfigure` swaps to a new config the same way a new
//! version is swapped in, and the caller records the config only once it runs.

pub mod probe;
mod sandbox;
mod spawn;
mod supervisor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aviary_proto::manifest::Manifest;
use aviary_proto::overlay::RunOverlay;
use tokio::sync::{mpsc, oneshot};

use crate::modules::Modules;
pub use sandbox::Host;
pub use supervisor::Stats;
use supervisor::{Command, Launch};

/// The module processes of this daemon.
pub struct Runtime {
    modules: Modules,
    host: Arc<Host>,
    supervisors: Mutex<HashMap<String, Handle>>,
}

/// A module's supervisor task: its command channel and its figures.
type Handle = (mpsc::Sender<Command>, Arc<Stats>);

impl Runtime {
    /// A runtime over the installed `modules`, confining them as `host` allows.
    pub fn new(modules: Modules, host: Host) -> Runtime {
        Runtime {
            modules,
            host: Arc::new(host),
            supervisors: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the processes of `module` match its current slot; `Err` says why the slot's
    /// version could not be made to run (the previous process, if any, still serves).
    pub async fn activate(&self, module: &str) -> Result<(), String> {
        let overlay = self
            .modules
            .config(module)
            .map_err(|e| e.to_string())?
            .map(|c| c.overlay)
            .unwrap_or_default();
        match self.launch(module, &overlay)? {
            Some(launch) => self.run(module, launch).await,
            None => Ok(()),
        }
    }

    /// Makes `module` run with runtime config `overlay` (hot swap when the run spec it
    /// gives differs from what runs). `Err` says why not; the previous process still
    /// serves. Nothing installed, or a file module: nothing to do until it runs.
    pub async fn reconfigure(&self, module: &str, overlay: &RunOverlay) -> Result<(), String> {
        match self.launch(module, overlay)? {
            Some(launch) => self.run(module, launch).await,
            None => Ok(()),
        }
    }

    /// What to run for `module`'s current slot with `overlay`; `None` when nothing runs.
    fn launch(&self, module: &str, overlay: &RunOverlay) -> Result<Option<Launch>, String> {
        let state = self.modules.state(module).map_err(|e| e.to_string())?;
        let Some(slot) = state.current else {
            return Ok(None);
        };
        let dir = self.modules.slot_dir(module, &slot.id);
        let manifest = std::fs::read(dir.join("manifest.json"))
            .map_err(|e| format!("{}: {e}", dir.display()))
            .and_then(|b| Manifest::parse(&b).map_err(|e| e.to_string()))?;
        let Some(signed) = manifest.run else {
            return Ok(None); // a file module: installed is all there is to it
        };
        overlay
            .check_env(&signed)
            .map_err(|e| format!("runtime config refused: {e}"))?;
        let spec = overlay.apply_to(&signed);
        spec.validate()
            .map_err(|e| format!("run spec with the runtime config is invalid: {e}"))?;
        Ok(Some(Launch {
            version: slot.version.clone(),
            slot: slot.id.clone(),
            artifact: dir.join("artifact"),
            dir,
            spec,
            host: self.host.clone(),
        }))
    }

    async fn run(&self, module: &str, launch: Launch) -> Result<(), String> {
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
                let span = tracing::info_span!("module", module = %module);
                tokio::spawn(tracing::Instrument::instrument(
                    supervisor::supervise(module.to_owned(), rx, stats.clone()),
                    span,
                ));
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
