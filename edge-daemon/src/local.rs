//! The daemon's modules as the fleet stream and the config applier share them.

use std::sync::Arc;

use crate::modules::Installer;
use crate::runtime::Runtime;

/// The daemon's modules: what is installed, and the processes running them.
pub(crate) struct Local {
    pub(crate) installer: Arc<Installer>,
    pub(crate) runtime: Arc<Runtime>,
    /// Held from install to activation, so the reconciler never sees a slot switch
    /// half-done (and never rolls back what the stream is about to ACK).
    pub(crate) busy: tokio::sync::Mutex<()>,
}
