//! Starts the daemon's parts and runs until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aviary_certs::TlsFiles;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::modules::{Installer, Modules};
use crate::runtime::{Host, Runtime};
use crate::weights::Weights;
use crate::{local_http, session, EdgeError};

/// What a started daemon tells its caller.
#[derive(Clone, Debug)]
pub struct Ready {
    /// The bound local HTTP address, if any.
    pub local_addr: Option<SocketAddr>,
}

/// Runs the daemon until `shutdown`. `ready` gets the local address once serving.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
) -> Result<(), EdgeError> {
    let enroll = crate::enroll::EnrollOptions {
        control_plane: config.control_plane.clone(),
        certs: config.certs.clone(),
        node_id: config.node_id.clone(),
        token: config.enroll_token.clone(),
        labels: config.labels.clone(),
    };
    if crate::enroll::needs_enrollment(&config.certs, &config.node_id)
        && !crate::enroll::enroll(&enroll, &shutdown).await?
    {
        return Ok(());
    }
    let files = TlsFiles {
        ca: config.certs.join("ca.pem"),
        cert: config.certs.join(format!("edge-{}.pem", config.node_id)),
        key: config.certs.join(format!("edge-{}.key", config.node_id)),
    };
    crate::renewal::finish_rotation(&files.cert, &files.key)?;
    // Re-read after each renewal: the next handshake presents the new certificate.
    let client_identity = aviary_certs::ClientIdentity::load(&files.cert, &files.key)?;
    let renewal = Arc::new(crate::renewal::Renewal::new(
        client_identity,
        enroll,
        config.keepalive,
        config.rotate_key,
    )?);
    // Checked once up front: a bad URL or CA is a configuration error, not a retry.
    renewal.link()?;
    let state_dir = config.state_dir.clone();
    let weights = Arc::new(
        tokio::task::spawn_blocking(move || Weights::load(&state_dir))
            .await
            .map_err(|e| EdgeError::InvalidAssignment(format!("load task: {e}")))??,
    );

    // Release keys come from the same directory as the certificates; the control plane
    // cannot make this daemon run anything they did not sign.
    let trusted = aviary_certs::TrustedKeys::load(&config.certs)?;
    if trusted.is_empty() {
        tracing::warn!(certs = %config.certs.display(), "no release-signing.pub: every module update will be refused");
    }
    let modules = Modules::open(&config.state_dir)
        .map_err(|e| EdgeError::InvalidAssignment(format!("module store: {e}")))?;
    // Modules never read the node's key or the daemon's state, whatever user they run as.
    let host = Host::detect(&[&config.state_dir, &config.certs]);
    let runtime = Arc::new(Runtime::new(modules.clone(), host));
    let installer = Arc::new(Installer::new(
        modules.clone(),
        trusted,
        config.arch.clone(),
    ));
    let local = Arc::new(crate::local::Local {
        installer,
        runtime: runtime.clone(),
        busy: tokio::sync::Mutex::new(()),
    });

    let mut tasks = tokio::task::JoinSet::new();
    let mut local_addr = None;
    if let Some(addr) = config.local_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| EdgeError::Bind {
                context: format!("--local-listen {addr}"),
                source,
            })?;
        local_addr = listener.local_addr().ok();
        tasks.spawn(local_http::serve(
            listener,
            weights.clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(expire_weights(weights.clone(), shutdown.clone()));
    tasks.spawn(reconcile(local.clone(), shutdown.clone()));
    tasks.spawn(watchdog(shutdown.clone()));

    // Ready means serving local state, not connected: a gateway must work offline.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(node_id = %config.node_id, local = ?local_addr, "edge daemon ready");
    if let Some(tx) = ready {
        let _ = tx.send(Ready { local_addr });
    }
    let identity = session::Identity {
        node_id: config.node_id.clone(),
        labels: config.labels.clone(),
        arch: config.arch.clone(),
        renewal,
    };
    let span = tracing::info_span!("fleet_stream", node_id = %identity.node_id);
    tracing::Instrument::instrument(
        session::run(identity, weights, local, shutdown.clone()),
        span,
    )
    .await;
    runtime.stop_all();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    tracing::info!("edge daemon stopped");
    Ok(())
}

/// Keeps module processes matching the slots on disk: at start (whatever was installed
/// runs again, with or without a control plane) and after `aviary-edge apply` on a
/// running daemon. A version that does not become ready is rolled back locally.
async fn reconcile(local: Arc<crate::local::Local>, shutdown: CancellationToken) {
    // Slots seen failing to start: not tried again (no flip-flopping between two bad ones).
    let mut failed: std::collections::HashSet<(String, String)> = Default::default();
    loop {
        let installed = {
            let installer = local.installer.clone();
            tokio::task::spawn_blocking(move || installer.modules().list())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        };
        for (name, state) in installed {
            let Some(current) = state.current.clone() else {
                continue;
            };
            if failed.contains(&(name.clone(), current.id.clone())) {
                continue;
            }
            let _busy = local.busy.lock().await;
            let Err(reason) = local.runtime.activate(&name).await else {
                continue;
            };
            failed.insert((name.clone(), current.id.clone()));
            tracing::warn!(module = %name, %reason, "installed version not ready: rolling back locally");
            let installer = local.installer.clone();
            let (n, revision) = (name.clone(), state.revision);
            let previous_failed = state
                .previous
                .as_ref()
                .is_some_and(|p| failed.contains(&(name.clone(), p.id.clone())));
            if previous_failed {
                tracing::error!(module = %name, "neither the current nor the previous version starts");
                continue;
            }
            let back =
                tokio::task::spawn_blocking(move || installer.rollback(&n, None, revision)).await;
            match back {
                Ok(Ok(slot)) => {
                    metrics::counter!("aviary_edge_local_rollbacks_total").increment(1);
                    if let Err(e) = local.runtime.activate(&name).await {
                        tracing::error!(module = %name, version = %slot.version, error = %e, "previous version does not start either");
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(module = %name, error = %e, "no version to roll back to")
                }
                Err(e) => tracing::error!(module = %name, error = %e, "rollback task failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Drops the weights to 0 when their TTL runs out without a control plane.
async fn expire_weights(weights: Arc<Weights>, shutdown: CancellationToken) {
    loop {
        let wait = weights
            .expiry()
            .map(|t| {
                t.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            })
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let w = weights.clone();
        match tokio::task::spawn_blocking(move || w.refresh()).await {
            Ok(Ok(true)) => {
                tracing::warn!("no control plane for the weights' TTL: weights set to 0")
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not write weights"),
            Err(e) => tracing::error!(error = %e, "weights task failed"),
        }
    }
}

/// Pings the systemd watchdog at half its interval when `WatchdogSec=` is set.
async fn watchdog(shutdown: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => { let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]); }
        }
    }
}
