//! Runtime config updates from the control plane: the merged config layers of one
//! module, applied by a hot swap (or restart) of the module and recorded only once the
//! module runs with them. A config that is invalid, or under which the module never
//! becomes ready, is refused and the previous config keeps running.

use std::sync::Arc;

use aviary_proto::manifest::validate_module_name;
use aviary_proto::overlay::RunOverlay;
use aviary_proto::v1 as pb;

use crate::local::Local;
use crate::modules::AppliedConfig;

/// What applying a config did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Recorded; the processes were already running with it (or nothing runs).
    Recorded,
    /// The module was swapped to a process with the new config.
    Swapped,
}

/// Applies `update`; `Err` is the NACK reason.
pub(crate) async fn apply(local: &Arc<Local>, update: pb::ConfigUpdate) -> Result<Applied, String> {
    let module = update.module;
    validate_module_name(&module).map_err(|e| e.to_string())?;
    let overlay = RunOverlay::from_proto(update.overlay.unwrap_or_default())
        .map_err(|e| format!("{e}; the previous config keeps running"))?;
    let next = AppliedConfig {
        revision: update.revision,
        overlay,
    };
    let _busy = local.busy.lock().await;
    let modules = local.installer.modules().clone();
    let name = module.clone();
    let previous = tokio::task::spawn_blocking(move || modules.config(&name))
        .await
        .map_err(|e| format!("config task: {e}"))?
        .map_err(|e| e.to_string())?;
    let unchanged = previous.as_ref().is_some_and(|p| p.overlay == next.overlay)
        || (previous.is_none() && next.overlay.is_empty());
    if !unchanged {
        local
            .runtime
            .reconfigure(&module, &next.overlay)
            .await
            .map_err(|e| format!("{e}; the previous config keeps running"))?;
    }
    let modules = local.installer.modules().clone();
    let (name, record) = (module.clone(), next.clone());
    let written = tokio::task::spawn_blocking(move || modules.write_config(&name, &record))
        .await
        .map_err(|e| format!("config task: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = written {
        // Not recorded means not applied: go back to what the state dir says runs.
        if !unchanged {
            let old = previous.map(|p| p.overlay).unwrap_or_default();
            if let Err(back) = local.runtime.reconfigure(&module, &old).await {
                tracing::error!(%module, error = %back, "previous config does not start either");
            }
        }
        return Err(format!("could not record the config: {e}"));
    }
    Ok(if unchanged {
        Applied::Recorded
    } else {
        Applied::Swapped
    })
}
