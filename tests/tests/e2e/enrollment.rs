//! Enrollment: a gateway makes its own key and joins by bootstrap token or by an admin's
//! accept; its labels are the control plane's, never its Hello's claim.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use aviary_certs::{Link, NodeKey};
use aviary_proto::v1 as pb;
use aviary_tests::{bin, eventually, ControlPlane, Edge, Fleet, Workspace};
use tonic::Code;

/// The token `aviary enroll-token create` printed alone on its last line.
pub(crate) fn create_token(
    cp: &ControlPlane,
    ws: &Workspace,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut all = vec!["enroll-token", "create"];
    all.extend_from_slice(args);
    let out = cp.cli(ws, &all)?;
    let last = out.lines().last().unwrap_or_default().trim().to_owned();
    anyhow::ensure!(
        last.starts_with("avt1_"),
        "no token on the last line: {out}"
    );
    Ok(last)
}

/// Every file under `dir`, as bytes.
fn all_bytes(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

/// The gateway's private key (PEM and its DER body) is in its own certs dir, 0600, and
/// nowhere in the control plane's data dir, its log or the deployment PKI.
fn key_stays_home(
    ws: &Workspace,
    cp: &ControlPlane,
    certs: &Path,
    node: &str,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let key_path = certs.join(format!("edge-{node}.key"));
    let mode = std::fs::metadata(&key_path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", key_path.display());
    let pem_text = std::fs::read_to_string(&key_path)?;
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem_text.as_bytes())?
        .secret_der()
        .to_vec();
    // In a PKCS#8 P-256 key (RFC 5915 inside RFC 5208) the 32-byte secret scalar starts
    // at byte 36: look for 24 bytes of it, and for the start of the PEM body.
    anyhow::ensure!(der.len() > 68, "not a PKCS#8 P-256 key");
    let secret_window = &der[36..60];
    let body: String = pem_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for dir in [cp.data_dir.as_path(), ws.pki.dir.as_path()] {
        for (path, bytes) in all_bytes(dir) {
            let found = bytes
                .windows(secret_window.len())
                .any(|w| w == secret_window)
                || String::from_utf8_lossy(&bytes).contains(&body[60..100]);
            assert!(!found, "{node}'s private key is in {}", path.display());
        }
    }
    assert!(!cp.log().contains(&body[60..100]));
    assert!(!ws.pki.dir.join(format!("edge-{node}.key")).exists());
    Ok(())
}

#[tokio::test]
async fn a_gateway_enrolls_with_a_token_and_gets_the_tokens_labels_not_its_claims(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let token = create_token(
        &cp,
        &ws,
        &[
            "--labels",
            "region=eu,tier=edge",
            "--uses",
            "2",
            "--ttl",
            "1h",
        ],
    )?;
    // Weights that tell the two regions apart.
    for (selector, weight) in [("region=eu", "10"), ("region=us", "90")] {
        cp.cli(
            &ws,
            &[
                "nodes",
                "set-weight",
                "--module",
                "app",
                "--weight",
                weight,
                "--selector",
                selector,
            ],
        )?;
    }
    let certs = ws.gateway_certs("gw-t1")?;
    let certs_arg = certs.display().to_string();
    // The daemon claims region=us in its Hello: ignored.
    let edge = Edge::start(
        &ws,
        &cp,
        "gw-t1",
        &[("region", "us")],
        &["--certs", &certs_arg, "--enroll-token", &token],
    )
    .await?;
    edge.wait_weight("app", 10).await?;
    let node = cp.node(&ws, "gw-t1").await?;
    let labels: std::collections::BTreeMap<_, _> = node.labels.clone().into_iter().collect();
    assert_eq!(
        labels,
        [
            ("region".to_owned(), "eu".to_owned()),
            ("tier".to_owned(), "edge".to_owned())
        ]
        .into()
    );
    assert_eq!(
        node.claimed_labels.get("region").map(String::as_str),
        Some("us")
    );
    assert!(
        node.enrolled_via.starts_with("token/"),
        "{}",
        node.enrolled_via
    );
    key_stays_home(&ws, &cp, &certs, "gw-t1")?;
    assert!(!cp.events(&ws, "enroll.issued").await?.is_empty());
    assert!(!cp.events(&ws, "node.label_claim_ignored").await?.is_empty());
    let listed = cp.cli(&ws, &["enroll-token", "list"])?;
    assert!(listed.contains("1/2"), "{listed}");
    assert!(
        !listed.contains(&token[token.len() - 20..]),
        "a secret was listed"
    );

    // An admin moves it: what it receives follows, and the claim still changes nothing.
    cp.cli(&ws, &["nodes", "label", "gw-t1", "region=us"])?;
    edge.wait_weight("app", 90).await?;
    assert!(!cp.events(&ws, "nodes.label").await?.is_empty());
    Ok(())
}

/// Runs `aviary-edge enroll` for `node` in the background.
fn spawn_enroll(
    cp: &ControlPlane,
    certs: &Path,
    node: &str,
) -> anyhow::Result<tokio::process::Child> {
    Ok(tokio::process::Command::new(bin("aviary-edge")?)
        .args(["enroll", "--control-plane", &cp.url(), "--certs"])
        .arg(certs)
        .args(["--node-id", node, "--label", "site=lab"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?)
}

async fn pending(
    cp: &ControlPlane,
    ws: &Workspace,
    node: &str,
) -> anyhow::Result<pb::EnrollmentRequest> {
    eventually(
        Duration::from_secs(30),
        &format!("{node}'s request"),
        || async {
            let mut admin = ws.admin(cp).await?;
            let list = admin
                .identities
                .list_enrollments(pb::ListEnrollmentsRequest {})
                .await?
                .into_inner();
            Ok(list.enrollments.into_iter().find(|e| e.node_id == node))
        },
    )
    .await
}

#[tokio::test]
async fn a_gateway_enrolls_by_approval_and_a_rejected_one_is_refused() -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let certs = ws.gateway_certs("gw-a")?;
    let enroll = spawn_enroll(&cp, &certs, "gw-a")?;
    let request = pending(&cp, &ws, "gw-a").await?;
    // What the admin compares with the gateway's own view of its key.
    let (key, created) = NodeKey::load_or_create(&certs.join("edge-gw-a.key"))?;
    assert!(!created);
    assert_eq!(request.key_fingerprint, key.fingerprint());
    assert_eq!(
        request.claimed_labels.get("site").map(String::as_str),
        Some("lab")
    );
    assert!(
        request.address.starts_with("127.0.0.1:"),
        "{}",
        request.address
    );
    let listed = cp.cli(&ws, &["nodes", "pending"])?;
    assert!(
        listed.contains("gw-a") && listed.contains("pending"),
        "{listed}"
    );
    cp.cli(
        &ws,
        &[
            "nodes",
            "accept",
            "gw-a",
            "--label",
            "region=eu",
            "--fingerprint",
            &request.key_fingerprint,
        ],
    )?;
    let out = tokio::time::timeout(Duration::from_secs(60), enroll.wait_with_output()).await??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(certs.join("edge-gw-a.pem").exists());
    let certs_arg = certs.display().to_string();
    let _edge = Edge::start(&ws, &cp, "gw-a", &[], &["--certs", &certs_arg]).await?;
    let node = eventually(Duration::from_secs(30), "gw-a connected", || async {
        let n = cp.node(&ws, "gw-a").await?;
        Ok(n.connected.then_some(n))
    })
    .await?;
    assert_eq!(node.labels.get("region").map(String::as_str), Some("eu"));
    assert_eq!(node.enrolled_via, "approval/admin/admin");
    key_stays_home(&ws, &cp, &certs, "gw-a")?;

    // Rejected: the gateway is told so and stops; its key stays refused.
    let certs_r = ws.gateway_certs("gw-r")?;
    let enroll = spawn_enroll(&cp, &certs_r, "gw-r")?;
    pending(&cp, &ws, "gw-r").await?;
    cp.cli(&ws, &["nodes", "reject", "gw-r", "--reason", "unknown box"])?;
    let out = tokio::time::timeout(Duration::from_secs(60), enroll.wait_with_output()).await??;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected"));
    assert!(!certs_r.join("edge-gw-r.pem").exists());
    for action in [
        "enroll.requested",
        "enroll.accepted",
        "enroll.rejected",
        "enroll.issued",
        "enroll.refused",
    ] {
        assert!(
            !cp.events(&ws, action).await?.is_empty(),
            "no {action} event"
        );
    }
    Ok(())
}

/// One Enroll call over a real handshake without a client certificate.
async fn enroll_once(
    cp: &ControlPlane,
    ws: &Workspace,
    node: &str,
    token: &str,
) -> Result<pb::EnrollResponse, tonic::Status> {
    let certs = ws
        .gateway_certs(node)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let run = async {
        let (key, _) = NodeKey::load_or_create(&certs.join(format!("edge-{node}.key")))?;
        let csr = key.csr(node, "aviary.local")?;
        let config =
            aviary_certs::anonymous_client_config(aviary_certs::ca_roots(&ws.pki.ca_cert())?)?;
        let channel = Link::with_config(&cp.url(), config)?.connect().await?;
        Ok::<_, anyhow::Error>((channel, csr))
    };
    let (channel, csr) = run
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    pb::enrollment_client::EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            node_id: node.into(),
            csr,
            token: token.into(),
            labels: Default::default(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn refused_because(cp: &ControlPlane, ws: &Workspace, why: &str) -> anyhow::Result<()> {
    eventually(
        Duration::from_secs(10),
        &format!("enroll.refused: {why}"),
        || async {
            Ok(cp
                .events(ws, "enroll.refused")
                .await?
                .iter()
                .any(|e| e.detail.contains(why))
                .then_some(()))
        },
    )
    .await
}

#[tokio::test]
async fn a_token_is_refused_past_its_uses_its_ttl_its_revocation_and_when_tampered(
) -> anyhow::Result<()> {
    let Fleet { ws, cp, .. } = Fleet::start(0).await?;
    let once = create_token(&cp, &ws, &["--uses", "1", "--ttl", "1h"])?;
    let issued = enroll_once(&cp, &ws, "gw-1", &once).await?;
    assert_eq!(issued.state, pb::EnrollState::Issued as i32);
    assert!(issued.certificate_pem.contains("BEGIN CERTIFICATE"));
    let denied = |r: Result<pb::EnrollResponse, tonic::Status>| match r {
        Err(s) => s.code() == Code::PermissionDenied && s.message() == "invalid enrollment token",
        Ok(_) => false,
    };
    assert!(
        denied(enroll_once(&cp, &ws, "gw-2", &once).await),
        "past its uses"
    );
    refused_because(&cp, &ws, "uses taken").await?;

    let short = create_token(&cp, &ws, &["--uses", "5", "--ttl", "1s"])?;
    let id = short.split('_').nth(1).unwrap_or_default().to_owned();
    // Wait for the control plane's own view of the clock to pass the expiry.
    let mut admin = ws.admin(&cp).await?;
    let expires = admin
        .identities
        .list_enroll_tokens(pb::ListEnrollTokensRequest {})
        .await?
        .into_inner()
        .tokens
        .into_iter()
        .find(|t| t.id == id)
        .and_then(|t| t.expires)
        .map_or(0, |t| t.seconds);
    eventually(Duration::from_secs(10), "the token's expiry", || async {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        Ok((now.as_secs() as i64 > expires).then_some(()))
    })
    .await?;
    assert!(
        denied(enroll_once(&cp, &ws, "gw-3", &short).await),
        "past its TTL"
    );
    refused_because(&cp, &ws, "expired").await?;

    let revoked = create_token(&cp, &ws, &["--uses", "5", "--ttl", "1h"])?;
    let id = revoked.split('_').nth(1).unwrap_or_default().to_owned();
    cp.cli(&ws, &["enroll-token", "revoke", &id])?;
    assert!(
        denied(enroll_once(&cp, &ws, "gw-4", &revoked).await),
        "revoked"
    );
    refused_because(&cp, &ws, "revoked").await?;

    let good = create_token(&cp, &ws, &["--uses", "5", "--ttl", "1h"])?;
    let last = if good.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &good[..good.len() - 1]);
    assert!(
        denied(enroll_once(&cp, &ws, "gw-5", &tampered).await),
        "tampered"
    );
    refused_because(&cp, &ws, "wrong secret").await?;
    assert!(
        denied(enroll_once(&cp, &ws, "gw-5", "avt1_nonsense").await),
        "malformed"
    );
    // The good token still works, and cannot take over a node enrolled otherwise.
    let ok = enroll_once(&cp, &ws, "gw-5", &good).await?;
    assert_eq!(ok.state, pb::EnrollState::Issued as i32);
    let takeover = enroll_once(&cp, &ws, "gw-1", &good).await;
    assert!(matches!(takeover, Err(s) if s.code() == Code::PermissionDenied));
    Ok(())
}

#[tokio::test]
async fn an_enrollment_flood_is_rate_limited_and_admins_keep_working() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let cp = ControlPlane::start(&ws, &["--enroll-rate", "5"]).await?;
    let config = aviary_certs::anonymous_client_config(aviary_certs::ca_roots(&ws.pki.ca_cert())?)?;
    let channel = Link::with_config(&cp.url(), config)?.connect().await?;
    let certs = ws.gateway_certs("flood")?;
    let (key, _) = NodeKey::load_or_create(&certs.join("edge-flood.key"))?;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..300 {
        let mut client = pb::enrollment_client::EnrollmentClient::new(channel.clone());
        let node = format!("flood-{i}");
        let csr = key.csr(&node, "aviary.local")?;
        flood.spawn(async move {
            client
                .enroll(pb::EnrollRequest {
                    node_id: node,
                    csr,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        });
    }
    // While it runs, an admin lists nodes and makes a token.
    let mut admin = ws.admin(&cp).await?;
    admin
        .nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await?;
    create_token(&cp, &ws, &["--uses", "1"])?;
    let mut shed = 0;
    let mut taken = 0;
    while let Some(r) = flood.join_next().await {
        match r? {
            Ok(()) => taken += 1,
            Err(Code::ResourceExhausted) => shed += 1,
            Err(other) => anyhow::bail!("unexpected {other:?}"),
        }
    }
    assert!(shed > 0 && taken > 0, "taken {taken}, shed {shed}");
    // Bursts of twice the rate, plus what the rate refilled while the flood ran.
    assert!(taken < 150, "taken {taken}");
    assert!(cp.metric("aviary_enrollments_shed_total").await? >= f64::from(shed));
    Ok(())
}
