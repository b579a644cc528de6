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
            let settings = &fleet.identity;
            fleet
                .registry
                .renew(node_id, &csr, &settings.issuer, settings.ttl)
                .await
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    let issued = match result {
        Ok(issued) => pb::IssuedCertificate {
            certificate_pem: issued.pem,
            ca_bundle_pem: fleet.identity.ca_bundle_pem.clone(),
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
