//! Certificate renewal on the fleet stream: the node sends a CSR before its certificate
//! expires and gets the new one on the same stream, for its next handshake.

use aviary_certs::CheckedCsr;
use aviary_proto::v1 as pb;

use super::codec::ControlFrame;
use super::Fleet;

/// The answer to one renewal request of `node_id`: a certificate, or why not.
pub(super) async fn answer(
    fleet: &Fleet,
    node_id: &str,
    req: pb::CertificateRequest,
) -> ControlFrame {
    let result = match CheckedCsr::parse(&req.csr) {
        Ok(csr) => {
            let authority = fleet.identity.authority.current();
            fleet
                .registry
                .renew(node_id, &csr, &authority.issuer, fleet.identity.ttl)
                .await
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    let issued = match result {
        Ok(issued) => pb::IssuedCertificate {
            certificate_pem: issued.pem,
            ca_bundle_pem: fleet.identity.authority.current().bundle.pem.clone(),
            refused: String::new(),
        },
        Err(why) => {
            tracing::info!(node = node_id, reason = %why, "renewal refused");
            pb::IssuedCertificate {
                refused: why,
                ..Default::default()
            }
        }
    };
    let msg = pb::ControlMessage {
        nonce: String::new(),
        kind: Some(pb::control_message::Kind::Certificate(issued)),
    };
    ControlFrame {
        nonce: String::new(),
        body: prost::Message::encode_to_vec(&msg).into(),
    }
}

/// The trust bundle for the node to hold, signed by every CA key the control plane has.
pub(super) fn bundle_frame(bundle: &aviary_certs::SignedBundle) -> ControlFrame {
    let msg = pb::ControlMessage {
        nonce: String::new(),
        kind: Some(pb::control_message::Kind::TrustBundle(pb::TrustBundle {
            bundle_pem: bundle.pem.clone(),
            signatures: bundle.signatures.clone(),
        })),
    };
    ControlFrame {
        nonce: String::new(),
        body: prost::Message::encode_to_vec(&msg).into(),
    }
}
