//! Renewal in the registry: a node's certificate replaced before it ends, asked on its
//! own fleet stream, refused for a revoked node or too early.

use std::time::Duration;

use aviary_certs::{CheckedCsr, Issued, NodeIssuer};

use super::Registry;
use crate::audit::{now_ms, NewEvent};
use crate::error::ControlPlaneError;
use crate::store::Change;

impl Registry {
    /// Renews the certificate of `node_id`, asked on its own fleet stream. Refused for a
    /// revoked node, a certificate not issued here (made offline: it was never short),
    /// and before a sixth of the lifetime has passed (a stolen key cannot make the
    /// control plane sign in a loop). Refusals and renewals are audited.
    pub(crate) async fn renew(
        &self,
        node_id: &str,
        csr: &CheckedCsr,
        issuer: &NodeIssuer,
        ttl: Duration,
    ) -> Result<Issued, ControlPlaneError> {
        let _writer = self.writer.lock().await;
        let now = now_ms();
        let actor = format!("edge/{node_id}");
        let target = format!("node/{node_id}");
        let record = self.state().nodes.get(node_id).map(|e| e.record.clone());
        let refusal = match &record {
            None => Some(format!("node {node_id} is unknown")),
            Some(r) if r.revoked => Some(format!("node {node_id} is revoked")),
            Some(r) => match &r.enrolled {
                None => Some(format!(
                    "node {node_id} holds a certificate made offline (aviary-certs edge): \
                     enroll it to renew"
                )),
                Some(e) if e.too_early(now) => {
                    Some("too early: a certificate renews after a sixth of its lifetime".to_owned())
                }
                Some(_) => None,
            },
        };
        let (Some(mut record), None) = (record, refusal.clone()) else {
            let why = refusal.unwrap_or_default();
            metrics::counter!("aviary_renewals_refused_total").increment(1);
            let event = NewEvent::new(actor, "cert.renewal_refused", target, why.clone());
            self.journal.audit(event, false).await?;
            return Err(ControlPlaneError::PermissionDenied(why));
        };
        let issued = issuer.issue(node_id, csr, ttl)?;
        let rotated = record
            .enrolled
            .as_ref()
            .is_some_and(|e| e.key_fingerprint != csr.fingerprint);
        if let Some(e) = record.enrolled.as_mut() {
            e.renewed(csr.fingerprint.clone(), &issued, now);
        }
        let detail = format!(
            "serial {}, valid until {} (Unix ms){}",
            issued.serial,
            issued.not_after_ms,
            if rotated { ", new key" } else { "" }
        );
        self.commit(Change {
            nodes: vec![record.clone()],
            events: vec![NewEvent::new(actor, "cert.renewed", target, detail)],
            durable: true,
            ..Default::default()
        })
        .await?;
        metrics::counter!("aviary_renewals_total").increment(1);
        if let Some(entry) = self.state().nodes.get_mut(node_id) {
            entry.record.enrolled = record.enrolled;
        }
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::collections::BTreeMap;

    use super::*;
    use crate::journal::Journal;
    use crate::registry::{EnrollAttempt, EnrollOutcome};
    use crate::store::{SledStore, Store};

    /// A token-enrolled node renews after a sixth of its lifetime, not before; a revoked
    /// one and one whose certificate was made offline never; an accepted key re-enrolls
    /// by itself once its certificate ended.
    #[tokio::test]
    async fn renewal_and_reenrollment_follow_the_policies() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pki = aviary_certs::Pki::init(&dir.path().join("pki"), &Default::default())?;
        let issuer = NodeIssuer::open(&pki.dir)?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("data"))?);
        let registry = Registry::open(Arc::new(Journal::new(store)), 300).await?;
        let admin = aviary_certs::Identity::Admin("alice".into());
        let (_, token) = registry
            .create_token(&admin, BTreeMap::new(), 5, 3_600_000)
            .await?;
        let (key, _) = aviary_certs::NodeKey::load_or_create(&dir.path().join("k"))?;
        let csr = CheckedCsr::parse(&key.csr("gw-1", "aviary.local")?)?;
        let attempt = |token: Option<String>| EnrollAttempt {
            node_id: "gw-1".into(),
            csr: csr.clone(),
            token,
            claimed: BTreeMap::new(),
            address: "127.0.0.1:1".into(),
        };
        let ttl = Duration::from_secs(60);
        let issued = registry
            .enroll(attempt(Some(token.clone())), &issuer, ttl)
            .await?;
        assert!(matches!(issued, EnrollOutcome::Issued(_)));
        // Just issued: too early.
        let early = registry.renew("gw-1", &csr, &issuer, ttl).await;
        assert!(
            matches!(early, Err(ControlPlaneError::PermissionDenied(m)) if m.contains("early"))
        );
        // Once a sixth of its lifetime has passed, it renews: gw-3 has a one-second one.
        let csr3 = CheckedCsr::parse(&key.csr("gw-3", "aviary.local")?)?;
        let first = EnrollAttempt {
            node_id: "gw-3".into(),
            csr: csr3.clone(),
            token: Some(token.clone()),
            claimed: BTreeMap::new(),
            address: "127.0.0.1:3".into(),
        };
        registry
            .enroll(first, &issuer, Duration::from_secs(1))
            .await?;
        let renewed = loop {
            match registry.renew("gw-3", &csr3, &issuer, ttl).await {
                Ok(r) => break r,
                Err(ControlPlaneError::PermissionDenied(m)) if m.contains("early") => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => return Err(e.into()),
            }
        };
        let serials = registry.state().nodes["gw-3"]
            .record
            .enrolled
            .as_ref()
            .map(|e| e.live_serials(now_ms()))
            .unwrap_or_default();
        assert_eq!(serials[0].serial, renewed.serial);
        registry.revoke(&admin, "gw-3", "stolen", None).await?;
        let revoked = registry.renew("gw-3", &csr3, &issuer, ttl).await;
        assert!(
            matches!(revoked, Err(ControlPlaneError::PermissionDenied(m)) if m.contains("revoked"))
        );
        assert_eq!(registry.revocations()[0].0, "gw-3");
        assert_eq!(registry.revocations()[0].1[0].serial, renewed.serial);

        // Made offline: registered by its Hello, never renewed.
        registry.attach("gw-lab", Default::default()).await?;
        let lab = registry.renew("gw-lab", &csr, &issuer, ttl).await;
        assert!(
            matches!(lab, Err(ControlPlaneError::PermissionDenied(m)) if m.contains("offline"))
        );

        // Approval: pending, accepted, issued; the same key later comes back by itself.
        let csr2 = CheckedCsr::parse(&key.csr("gw-2", "aviary.local")?)?;
        let ask = || EnrollAttempt {
            node_id: "gw-2".into(),
            csr: csr2.clone(),
            token: None,
            claimed: BTreeMap::new(),
            address: "127.0.0.1:2".into(),
        };
        assert!(matches!(
            registry.enroll(ask(), &issuer, ttl).await?,
            EnrollOutcome::Pending
        ));
        let accept = crate::registry::Verdict::Accept {
            labels: BTreeMap::new(),
            fingerprint: Some(csr2.fingerprint.clone()),
        };
        registry.decide(&admin, "gw-2", accept).await?;
        assert!(matches!(
            registry.enroll(ask(), &issuer, ttl).await?,
            EnrollOutcome::Issued(_)
        ));
        assert!(matches!(
            registry.enroll(ask(), &issuer, ttl).await?,
            EnrollOutcome::Issued(_)
        ));
        Ok(())
    }
}
