//! `aviary config ...`: runtime config layers (base → overlay by selector → node).

use std::path::PathBuf;

use anyhow::Context;
use aviary_proto::overlay::RunOverlay;
use aviary_proto::v1 as pb;
use clap::{Args, Subcommand};

use crate::client::call;
use crate::{Admin, Format};

/// Which layer of a module's config.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct LayerArgs {
    /// The base layer: every node that runs the module.
    #[arg(long)]
    base: bool,
    /// An overlay: the nodes this label selector matches (`region=eu,tier!=canary`).
    #[arg(long)]
    selector: Option<String>,
    /// One node.
    #[arg(long)]
    node: Option<String>,
}

impl LayerArgs {
    fn scope(&self) -> pb::ConfigScope {
        pb::ConfigScope {
            selector: self.selector.clone().unwrap_or_default(),
            node_id: self.node.clone().unwrap_or_default(),
        }
    }
}

/// `aviary config ...`
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Sets one layer from a partial run spec (TOML: args, env, ready_timeout,
    /// log_patterns, [[probe]]); the nodes it covers swap to it.
    Set {
        /// Module name.
        #[arg(long)]
        module: String,
        /// Which layer.
        #[command(flatten)]
        layer: LayerArgs,
        /// The overlay file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Deletes one layer; its nodes fall back to the layers below.
    Delete {
        /// Module name.
        #[arg(long)]
        module: String,
        /// Which layer.
        #[command(flatten)]
        layer: LayerArgs,
    },
    /// The merged config of a module on one node, and the layer each value came from.
    Get {
        /// Module name.
        #[arg(long)]
        module: String,
        /// Node id.
        #[arg(long)]
        node: String,
    },
    /// Every layer (of one module).
    List {
        /// Only this module.
        #[arg(long)]
        module: Option<String>,
    },
}

/// Runs one `aviary config` command.
pub(crate) async fn run(
    command: ConfigCommand,
    format: Format,
    admin: &mut Admin,
) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Set {
            module,
            layer,
            file,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let overlay =
                RunOverlay::from_toml(&text).with_context(|| format!("{}", file.display()))?;
            let request = pb::SetConfigRequest {
                module: module.clone(),
                scope: Some(layer.scope()),
                overlay: Some(overlay.to_proto()),
                request_id: admin.request_id(),
            };
            let r = call!(admin.configs, set_config, request)?;
            changed(format, "set", &module, &r)?;
        }
        ConfigCommand::Delete { module, layer } => {
            let request = pb::DeleteConfigRequest {
                module: module.clone(),
                scope: Some(layer.scope()),
                request_id: admin.request_id(),
            };
            let r = call!(admin.configs, delete_config, request)?;
            changed(format, "deleted", &module, &r)?;
        }
        ConfigCommand::Get { module, node } => {
            let c = admin
                .configs
                .get_config(pb::GetConfigRequest {
                    module,
                    node_id: node,
                })
                .await?
                .into_inner();
            node_config(format, &c)?;
        }
        ConfigCommand::List { module } => {
            let list = admin.all_configs(&module.unwrap_or_default()).await?;
            layers(format, list)?;
        }
    }
    Ok(())
}

fn changed(
    format: Format,
    what: &str,
    module: &str,
    r: &pb::SetConfigResponse,
) -> anyhow::Result<()> {
    if crate::output::structured(format, r)? {
        return Ok(());
    }
    if format == Format::Name {
        for id in &r.node_ids {
            println!("node/{id}");
        }
        return Ok(());
    }
    println!(
        "config of {module} {what} (layer v{}): covers {} node(s) now; audit event {}",
        r.version,
        r.node_ids.len(),
        r.event_seq
    );
    Ok(())
}

/// `(key, value)` rows of an overlay, keys as in `NodeConfig.sources`.
fn rows(o: &Option<pb::RunOverlay>) -> Vec<(String, String)> {
    let Ok(o) = RunOverlay::from_proto(o.clone().unwrap_or_default()) else {
        return Vec::new();
    };
    let list = |v: &[String]| serde_json::to_string(v).unwrap_or_default();
    let mut out = Vec::new();
    if let Some(a) = &o.args {
        out.push(("args".into(), list(a)));
    }
    for (k, v) in &o.env {
        out.push((format!("env.{k}"), v.clone()));
    }
    if let Some(t) = &o.ready_timeout {
        out.push(("ready_timeout".into(), t.clone()));
    }
    if let Some(p) = &o.log_patterns {
        out.push(("log_patterns".into(), list(p)));
    }
    if let Some(p) = &o.probes {
        let probes: Vec<String> = p
            .iter()
            .map(|p| match (&p.http, &p.tcp) {
                (Some(h), _) => format!("http {h}"),
                (_, Some(t)) => format!("tcp {t}"),
                _ => "?".into(),
            })
            .collect();
        out.push(("probes".into(), probes.join(", ")));
    }
    out
}

fn node_config(format: Format, c: &pb::NodeConfig) -> anyhow::Result<()> {
    if crate::output::structured(format, c)? {
        return Ok(());
    }
    match format {
        Format::Name => println!("config/{}/{}", c.module, c.node_id),
        _ => {
            let rows: Vec<Vec<String>> = rows(&c.overlay)
                .into_iter()
                .map(|(k, v)| {
                    let from = c.sources.get(&k).cloned().unwrap_or_default();
                    vec![k, v, from]
                })
                .collect();
            println!("config of {} on {}", c.module, c.node_id);
            if rows.is_empty() {
                println!("(no layer overrides anything: the release's run spec as signed)");
            } else {
                crate::output::table(&["KEY", "VALUE", "FROM"], &rows);
                println!("everything else: the release's run spec as signed");
            }
            let state = if c.nacked_revision > 0 && c.nacked_revision >= c.desired_revision {
                format!("refused: {}", c.nack_error)
            } else if c.acked_revision >= c.desired_revision {
                "applied".into()
            } else {
                format!("pending (node has r{})", c.acked_revision)
            };
            println!("revision r{}: {state}", c.desired_revision);
        }
    }
    Ok(())
}

fn layers(format: Format, layers: Vec<pb::ConfigLayer>) -> anyhow::Result<()> {
    let list = pb::ListConfigsResponse {
        layers,
        ..Default::default()
    };
    if crate::output::structured(format, &list)? {
        return Ok(());
    }
    let layers = list.layers;
    match format {
        Format::Name => {
            for l in &layers {
                println!("config/{}/{}", l.module, l.name);
            }
        }
        _ => {
            let rows: Vec<Vec<String>> = layers
                .iter()
                .map(|l| {
                    let sets: Vec<String> = rows(&l.overlay)
                        .into_iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    vec![
                        l.module.clone(),
                        l.name.clone(),
                        format!("v{}", l.version),
                        sets.join(" "),
                    ]
                })
                .collect();
            crate::output::table(&["MODULE", "LAYER", "VERSION", "SETS"], &rows);
        }
    }
    Ok(())
}
