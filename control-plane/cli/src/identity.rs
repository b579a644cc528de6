//! Node identities: `aviary nodes pending|accept|reject|label` and
//! `aviary enroll-token create|list|revoke`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use aviary_proto::v1 as pb;
use clap::Subcommand;

use crate::output::structured;
use crate::{Admin, Format};

/// `aviary ca ...`
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// The issuing CA, the trusted ones, and how many nodes still hold a certificate
    /// from an older CA (retire it with `aviary-certs ca retire` only at 0).
    Status,
}

/// `aviary enroll-token ...`
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Makes a bootstrap token; prints it alone on the last line (shown once: the
    /// control plane keeps only its hash).
    Create {
        /// Labels every node enrolled with it gets, `k=v,k=v`.
        #[arg(long, default_value = "")]
        labels: String,
        /// Nodes it may enroll.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is good for (e.g. `72h`).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Lists tokens (never their secrets).
    List,
    /// Refuses every later use of a token.
    Revoke {
        /// Token id (the part after `avt1_`).
        id: String,
    },
}

/// Parses `k=v,k=v` (or one `k=v`).
pub(crate) fn parse_labels<'a>(
    items: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for item in items
        .into_iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.trim().is_empty())
    {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("label {item:?} is not key=value"))?;
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}

fn show(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    let text: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if text.is_empty() {
        "-".into()
    } else {
        text.join(",")
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map_or_else(|| "-".into(), ToString::to_string)
}

/// `aviary enroll-token ...`
pub(crate) async fn tokens(
    command: TokenCommand,
    format: Format,
    admin: &mut Admin,
) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { labels, uses, ttl } => {
            let request = pb::CreateEnrollTokenRequest {
                labels: parse_labels([labels.as_str()])?.into_iter().collect(),
                max_uses: uses,
                ttl_seconds: ttl.as_secs().max(1),
            };
            let reply = admin
                .identities
                .create_enroll_token(request)
                .await?
                .into_inner();
            if !structured(format, &reply)? {
                if let Some(t) = &reply.token {
                    println!(
                        "token {}: {} uses, expires {}, labels {}",
                        t.id,
                        t.max_uses,
                        time(&t.expires),
                        show(&t.labels)
                    );
                }
                println!("{}", reply.secret);
            }
        }
        TokenCommand::List => {
            let reply = admin
                .identities
                .list_enroll_tokens(pb::ListEnrollTokensRequest {})
                .await?
                .into_inner();
            if !structured(format, &reply)? {
                println!(
                    "{:<18} {:>9} {:<22} {:<8} LABELS",
                    "ID", "USES", "EXPIRES", "STATE"
                );
                for t in &reply.tokens {
                    let state = if t.revoked { "revoked" } else { "active" };
                    println!(
                        "{:<18} {:>9} {:<22} {:<8} {}",
                        t.id,
                        format!("{}/{}", t.uses, t.max_uses),
                        time(&t.expires),
                        state,
                        show(&t.labels)
                    );
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let reply = admin
                .identities
                .revoke_enroll_token(pb::RevokeEnrollTokenRequest { id: id.clone() })
                .await?
                .into_inner();
            if !structured(format, &reply)? {
                println!(
                    "token {id} revoked after {} of {} uses",
                    reply.uses, reply.max_uses
                );
            }
        }
    }
    Ok(())
}

/// `aviary nodes pending`.
pub(crate) async fn pending(format: Format, admin: &mut Admin) -> anyhow::Result<()> {
    let reply = admin
        .identities
        .list_enrollments(pb::ListEnrollmentsRequest {})
        .await?
        .into_inner();
    if structured(format, &reply)? {
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:<24} {:<22} {:<72} CLAIMED",
        "NODE", "DECISION", "ADDRESS", "REQUESTED", "KEY"
    );
    for e in &reply.enrollments {
        let decision = pb::EnrollmentDecision::try_from(e.decision)
            .map(|d| {
                d.as_str_name()
                    .trim_start_matches("ENROLLMENT_DECISION_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|_| "unknown".into());
        println!(
            "{:<20} {:<10} {:<24} {:<22} {:<72} {}",
            e.node_id,
            decision,
            e.address,
            time(&e.requested),
            e.key_fingerprint,
            show(&e.claimed_labels)
        );
    }
    Ok(())
}

/// `aviary nodes accept|reject`.
pub(crate) async fn decide(
    format: Format,
    admin: &mut Admin,
    id: String,
    accept: Option<(Vec<String>, Option<String>)>,
    reason: String,
) -> anyhow::Result<()> {
    let reply = match accept {
        Some((labels, fingerprint)) => {
            let request = pb::AcceptEnrollmentRequest {
                node_id: id.clone(),
                labels: parse_labels(labels.iter().map(String::as_str))?
                    .into_iter()
                    .collect(),
                key_fingerprint: fingerprint.unwrap_or_default(),
            };
            admin.identities.accept_enrollment(request).await?
        }
        None => {
            let request = pb::RejectEnrollmentRequest {
                node_id: id.clone(),
                reason,
            };
            admin.identities.reject_enrollment(request).await?
        }
    }
    .into_inner();
    if !structured(format, &reply)? {
        let verb = if reply.decision == pb::EnrollmentDecision::Accepted as i32 {
            "accepted"
        } else {
            "rejected"
        };
        println!("node {id} {verb} (key {})", reply.key_fingerprint);
    }
    Ok(())
}

/// `aviary nodes label`.
pub(crate) async fn label(
    format: Format,
    admin: &mut Admin,
    id: String,
    labels: Vec<String>,
) -> anyhow::Result<()> {
    let request = pb::SetNodeLabelsRequest {
        node_id: id.clone(),
        labels: parse_labels(labels.iter().map(String::as_str))?
            .into_iter()
            .collect(),
    };
    let reply = admin
        .identities
        .set_node_labels(request)
        .await?
        .into_inner();
    if !structured(format, &reply)? {
        println!(
            "node {id} labels {} (revision {})",
            show(&reply.labels),
            reply.desired_revision
        );
    }
    Ok(())
}

/// `aviary nodes revocations`.
pub(crate) async fn revocations(format: Format, admin: &mut Admin) -> anyhow::Result<()> {
    let reply = admin
        .identities
        .list_revocations(pb::ListRevocationsRequest {})
        .await?
        .into_inner();
    if structured(format, &reply)? {
        return Ok(());
    }
    println!("{:<20} {:<34} NOT AFTER", "NODE", "SERIAL");
    for r in &reply.revocations {
        if r.serials.is_empty() {
            println!("{:<20} {:<34} -", r.node_id, "(made offline)");
        }
        for s in &r.serials {
            println!("{:<20} {:<34} {}", r.node_id, s.serial, time(&s.not_after));
        }
    }
    Ok(())
}

/// `aviary ca status`.
pub(crate) async fn ca_status(format: Format, admin: &mut Admin) -> anyhow::Result<()> {
    let s = admin
        .identities
        .get_ca_status(pb::GetCaStatusRequest {})
        .await?
        .into_inner();
    if structured(format, &s)? {
        return Ok(());
    }
    println!("issuing CA    {}", s.issuing_ca);
    for ca in &s.trusted_cas {
        println!("trusted CA    {ca}");
    }
    println!("nodes on the issuing CA   {}", s.nodes_on_issuing_ca);
    println!("nodes on an older CA      {}", s.nodes_on_older_ca);
    println!("nodes made offline        {}", s.nodes_made_offline);
    if !s.older_ca_nodes.is_empty() {
        println!("older-CA nodes: {}", s.older_ca_nodes.join(", "));
    }
    Ok(())
}
