//! The control plane's certificates as they are on disk now: the server certificate and
//! the trust bundle its handshakes use, the CA that issues node certificates, and the
//! bundle it sends gateways. Reloaded on SIGHUP and when the files change, without
//! touching a connection that is already open (see `aviary_certs::ca` for the rotation
//! this serves).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use aviary_certs::{NodeIssuer, Refuse, SignedBundle, TlsFiles};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::audit::NewEvent;
use crate::error::ControlPlaneError;
use crate::journal::Journal;

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(2);
/// The files a reload reads.
const FILES: [&str; 5] = [
    "ca.pem",
    "ca.key",
    "ca-previous.key",
    "control-plane.pem",
    "control-plane.key",
];

/// What issuing node certificates needs: the CA, the lifetime, the bundle to hand out
/// and the rate enrollment is served at.
pub(crate) struct EnrollSettings {
    /// The issuing CA and the trust bundle, as reloaded.
    pub authority: Arc<Authority>,
    /// Their lifetime (`--node-cert-ttl`).
    pub ttl: std::time::Duration,
    /// Enroll calls admitted per second, fleet-wide (`--enroll-rate`).
    pub rate: f64,
}

/// One consistent load of the certs dir.
pub(crate) struct Loaded {
    /// Signs node certificates.
    pub issuer: NodeIssuer,
    /// What gateways are sent.
    pub bundle: SignedBundle,
    /// Fingerprints of the CAs in the bundle, in file order.
    pub cas: Vec<String>,
    /// Handshakes from now on.
    pub acceptor: TlsAcceptor,
}

/// See the module docs.
pub(crate) struct Authority {
    dir: PathBuf,
    refuse: Refuse,
    current: RwLock<Arc<Loaded>>,
    stamp: RwLock<Vec<Option<(SystemTime, u64)>>>,
    bundle: watch::Sender<Arc<SignedBundle>>,
}

fn stamp(dir: &Path) -> Vec<Option<(SystemTime, u64)>> {
    FILES
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn load(dir: &Path, refuse: &Refuse) -> Result<Loaded, ControlPlaneError> {
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("control-plane.pem"),
        key: dir.join("control-plane.key"),
    };
    let tls = aviary_certs::server_config_refusing(&files, refuse.clone())?;
    let bundle = SignedBundle::load(dir)?;
    let cas = aviary_certs::ca::bundle_certs(&bundle.pem)?
        .iter()
        .map(|c| aviary_certs::ca_fingerprint(c.as_ref()))
        .collect();
    Ok(Loaded {
        issuer: NodeIssuer::open(dir)?,
        bundle,
        cas,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
    })
}

impl Authority {
    /// Loads `dir`; `refuse` fails the handshakes of revoked nodes.
    pub(crate) fn open(dir: &Path, refuse: Refuse) -> Result<Arc<Authority>, ControlPlaneError> {
        let stamped = stamp(dir);
        let loaded = load(dir, &refuse)?;
        let bundle = watch::Sender::new(Arc::new(loaded.bundle.clone()));
        Ok(Arc::new(Authority {
            dir: dir.to_owned(),
            refuse,
            current: RwLock::new(Arc::new(loaded)),
            stamp: RwLock::new(stamped),
            bundle,
        }))
    }

    /// What is in force now.
    pub(crate) fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The bundle gateways should hold; changes with each reload that changes it.
    pub(crate) fn subscribe_bundle(&self) -> watch::Receiver<Arc<SignedBundle>> {
        self.bundle.subscribe()
    }

    /// Reads the dir again. A half-written rotation (files that do not fit together)
    /// fails and keeps what is in force.
    pub(crate) fn reload(&self) -> Result<(), ControlPlaneError> {
        let stamped = stamp(&self.dir);
        let loaded = load(&self.dir, &self.refuse)?;
        let changed = self.bundle.borrow().pem != loaded.bundle.pem
            || self.bundle.borrow().signatures.len() != loaded.bundle.signatures.len();
        if changed {
            self.bundle.send_replace(Arc::new(loaded.bundle.clone()));
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = stamped;
        Ok(())
    }

    fn files_changed(&self) -> bool {
        *self.stamp.read().unwrap_or_else(|p| p.into_inner()) != stamp(&self.dir)
    }
}

/// Reloads on SIGHUP and when the files change; every reload (or failed one) is audited.
pub(crate) async fn watch_files(
    authority: Arc<Authority>,
    journal: Arc<Journal>,
    shutdown: CancellationToken,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reloading on file change only");
            None
        }
    };
    let mut tick = tokio::time::interval(POLL);
    loop {
        let why = tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => "SIGHUP",
            _ = tick.tick() => {
                if !authority.files_changed() {
                    continue;
                }
                "file change"
            }
        };
        let (action, detail) = match authority.reload() {
            Ok(()) => {
                let now = authority.current();
                tracing::info!(why, issuing = now.issuer.ca_fingerprint(), cas = ?now.cas, "certificates reloaded");
                (
                    "ca.reloaded",
                    format!(
                        "{why}: issuing CA {}, trusted {}",
                        now.issuer.ca_fingerprint(),
                        now.cas.join(", ")
                    ),
                )
            }
            Err(e) => {
                tracing::error!(why, error = %e, "certificate reload failed; keeping the previous");
                ("ca.reload_failed", format!("{why}: {e}"))
            }
        };
        // Audited once per change: an unreadable file is not retried until it changes.
        *authority.stamp.write().unwrap_or_else(|p| p.into_inner()) = stamp(&authority.dir);
        let event = NewEvent::new("control-plane", action, "certs", detail);
        if let Err(e) = journal.audit(event, true).await {
            tracing::warn!(error = %e, "could not audit a certificate reload");
        }
    }
}
