//! The `aviary` command line: an admin client of the control plane, plus `demo`.
#![forbid(unsafe_code)]

mod client;
mod config;
pub mod contexts;
mod demo;
mod identity;
mod json;
mod output;
pub mod release;
mod rollout_file;

use std::path::PathBuf;

use std::io::IsTerminal;

use anyhow::Context;
use aviary_proto::v1 as pb;
use clap::{Parser, Subcommand, ValueEnum};

use client::call;
pub use client::{retried, Admin};

/// Drives an Aviary control plane.
#[derive(Parser, Debug)]
#[command(name = "aviary", version)]
pub struct Cli {
    /// Control plane URL.
    #[arg(long, env = "AVIARY_CONTROL_PLANE", global = true)]
    pub control_plane: Option<String>,
    /// Directory with ca.pem and the admin certificate.
    #[arg(long, env = "AVIARY_CERTS", global = true)]
    pub certs: Option<PathBuf>,
    /// Which admin certificate: `admin` (admin.pem, the default) or NAME
    /// (admin-NAME.pem).
    #[arg(long, env = "AVIARY_ADMIN", global = true)]
    pub admin: Option<String>,
    /// Which context of the config file (`aviary context`) fills in what the flags and
    /// variables above leave unset; the current context when unset.
    #[arg(long, env = "AVIARY_CONTEXT", global = true)]
    pub context: Option<String>,
    /// Request ids of this command's changes are ID-1, ID-2, ... (random when unset): run
    /// a command again with the same id and what already landed is not done twice.
    #[arg(long, env = "AVIARY_REQUEST_ID", global = true)]
    pub request_id: Option<String>,
    /// Output: tables for people (`wide`: more columns), JSON or YAML for scripts (the
    /// JSON grpcurl prints), `name` for `kind/name` lines.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table, global = true)]
    pub output: Format,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Aligned columns, more of them.
    Wide,
    /// The call's response as grpcurl prints it (followed streams: one object per line).
    Json,
    /// The same document as YAML.
    Yaml,
    /// `kind/name`, one per line.
    Name,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs a whole local fleet on loopback, end to end.
    Demo {
        /// Number of edge daemons.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Check the results and exit instead of serving until Ctrl-C.
        #[arg(long)]
        exit_when_done: bool,
        /// Deploy this executable as the sample module instead of `aviary sample-module`
        /// (tests use the small `aviary-sample-module`).
        #[arg(long, hide = true)]
        sample_module: Option<PathBuf>,
    },
    /// Named control planes (kubeconfig-style contexts) in ~/.config/aviary/config.toml.
    Context {
        /// What to do with them.
        #[command(subcommand)]
        command: contexts::ContextCommand,
    },
    /// Prints a shell completion script, e.g. `source <(aviary completion bash)`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The fleet's nodes.
    Nodes {
        /// What to do with them.
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// The audit log.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
        /// Only events by or about this node.
        #[arg(long)]
        node: Option<String>,
        /// Only events by this actor (e.g. admin/alice).
        #[arg(long)]
        actor: Option<String>,
        /// Only actions starting with this (e.g. auth.).
        #[arg(long)]
        action: Option<String>,
    },
    /// Signed releases: sign, upload, list, get.
    Release {
        /// What to do.
        #[command(subcommand)]
        command: release::ReleaseCommand,
    },
    /// Rollouts: deploy a release to the nodes a selector matches, watch, abort.
    Rollout {
        /// What to do.
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// The demo's sample HTTP module (LISTEN_FDS, READY=1, graceful SIGTERM).
    #[command(hide = true)]
    SampleModule {
        /// Its flags: --port N, --stamp VERSION OUT, --never-ready, --crash-at-start,
        /// --log-errors.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Runtime config layers: base → overlay (label selector) → node, laid over the
    /// release's run spec without a new release.
    Config {
        /// What to do.
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// The deployment CA: where a rotation stands.
    Ca {
        /// What to do.
        #[command(subcommand)]
        command: identity::CaCommand,
    },
    /// Bootstrap tokens for zero-touch enrollment.
    EnrollToken {
        /// What to do.
        #[command(subcommand)]
        command: identity::TokenCommand,
    },
}

/// `aviary rollout ...`
#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Deploys a release: without steps to every selected node at once, with `--step`s
    /// as canary steps.
    Create {
        /// Module (or `module` in --file).
        #[arg(long, required_unless_present = "file")]
        module: Option<String>,
        /// Release version, uploaded before (or `version` in --file).
        #[arg(long, required_unless_present = "file")]
        version: Option<String>,
        /// A rollout.toml with module, version, selector, progress_deadline and [[step]]s
        /// (flags given as well win for module, version and selector).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Label selector; empty means every node.
        #[arg(long, default_value = "")]
        selector: String,
        /// Canary steps in order: `canary=20` (scale %), `weight=10` (the canaries'
        /// module weight), `pause=30s`, `pause` (until promoted), `analysis=60s` (judge
        /// the canaries with the thresholds below). None: every selected node at once.
        #[arg(long = "step")]
        steps: Vec<String>,
        /// A step that waits on nodes longer than this fails the rollout (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        progress_deadline: Option<std::time::Duration>,
        /// Thresholds of every `analysis=WINDOW` step.
        #[command(flatten)]
        analysis: AnalysisArgs,
    },
    /// Shows one rollout with its node counts.
    Get {
        /// Rollout id (r-N).
        id: String,
    },
    /// Lists rollouts, newest first.
    List {
        /// Only this module.
        #[arg(long)]
        module: Option<String>,
    },
    /// Aborts a rollout in progress: its nodes go back to their previous slot, no download.
    Abort {
        /// Rollout id.
        id: String,
    },
    /// Holds a progressing rollout where it stands.
    Pause {
        /// Rollout id.
        id: String,
    },
    /// Continues a paused rollout (an open-ended pause step counts as done).
    Resume {
        /// Rollout id.
        id: String,
    },
    /// Skips the current step; `--full` skips to the end (every selected node).
    Promote {
        /// Rollout id.
        id: String,
        /// Skip every remaining step.
        #[arg(long)]
        full: bool,
    },
    /// Follows a rollout: one line per change (state, step, node counts) until it ends.
    Watch {
        /// Rollout id.
        id: String,
    },
}

/// Thresholds for `--step analysis=WINDOW` (0 disables a check).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct AnalysisArgs {
    /// Canary probe error rate above which analysis fails (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = aviary_proto::finite::parse_non_negative)]
    pub max_error_rate: f64,
    /// Canary probe p99 latency (ms) above which analysis fails.
    #[arg(long, default_value_t = 0.0, value_parser = aviary_proto::finite::parse_non_negative)]
    pub max_p99_ms: f64,
    /// Canary log-pattern matches above which analysis fails.
    #[arg(long, default_value_t = 0)]
    pub max_log_matches: u64,
    /// Share of healthy canaries (%) below which analysis fails.
    #[arg(long, default_value_t = 0.0, value_parser = aviary_proto::finite::parse_non_negative)]
    pub min_healthy_percent: f64,
    /// Canary error rate minus the stable nodes' above which analysis fails (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = aviary_proto::finite::parse_non_negative)]
    pub max_error_rate_vs_baseline: f64,
    /// Canary health reports needed before judging.
    #[arg(long, default_value_t = 1)]
    pub min_reports: u32,
    /// Failed measurements before the rollout aborts.
    #[arg(long, default_value_t = 1)]
    pub failure_limit: u32,
}

/// Parses `--step` values into the wire steps.
fn parse_steps(steps: &[String], a: &AnalysisArgs) -> anyhow::Result<Vec<pb::Step>> {
    use pb::step::Kind;
    steps
        .iter()
        .map(|s| {
            let kind = match s.split_once('=') {
                Some(("canary", p)) => Kind::SetCanaryScale(pb::SetCanaryScale {
                    percent: p
                        .trim_end_matches('%')
                        .parse()
                        .with_context(|| format!("--step {s}"))?,
                }),
                Some(("pause", d)) => Kind::Pause(pb::Pause {
                    seconds: u32::try_from(
                        humantime::parse_duration(d)
                            .with_context(|| format!("--step {s}"))?
                            .as_secs(),
                    )
                    .unwrap_or(u32::MAX)
                    .max(1),
                }),
                Some(("analysis", d)) => Kind::Analysis(pb::Analysis {
                    window_seconds: u32::try_from(
                        humantime::parse_duration(d)
                            .with_context(|| format!("--step {s}"))?
                            .as_secs(),
                    )
                    .unwrap_or(u32::MAX)
                    .max(1),
                    max_error_rate: a.max_error_rate,
                    max_p99_latency_ms: a.max_p99_ms,
                    max_log_matches: a.max_log_matches,
                    min_healthy_percent: a.min_healthy_percent,
                    max_error_rate_vs_baseline: a.max_error_rate_vs_baseline,
                    min_reports: a.min_reports,
                    failure_limit: a.failure_limit,
                }),
                Some(("weight", w)) => Kind::SetWeight(pb::SetWeight {
                    weight: w.parse().with_context(|| format!("--step {s}"))?,
                }),
                None if s == "pause" => Kind::Pause(pb::Pause { seconds: 0 }),
                _ => anyhow::bail!(
                    "--step {s}: use canary=PERCENT, weight=N, pause=DURATION, pause or analysis=WINDOW"
                ),
            };
            Ok(pb::Step { kind: Some(kind) })
        })
        .collect()
}

/// `aviary nodes ...`
#[derive(Subcommand, Debug)]
pub enum NodesCommand {
    /// Lists nodes.
    List {
        /// Label selector, e.g. `region=eu,tier!=canary` or `region in (eu,us)`.
        #[arg(long, default_value = "")]
        selector: String,
        /// What they run and how they do, e.g. `modules.app.version = 1.2.0`,
        /// `modules.*.health = failing AND connected = true`.
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Shows one node.
    Get {
        /// Node id.
        id: String,
    },
    /// Sets a module's weight on the nodes a selector matches (now and when they join).
    SetWeight {
        /// Module name.
        #[arg(long)]
        module: String,
        /// 0..=100.
        #[arg(long)]
        weight: u32,
        /// Label selector; empty means every node.
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Revokes a node: refused from now on, cut off if connected.
    Revoke {
        /// Node id.
        id: String,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
    },
    /// Lists enrollment requests: node id, key fingerprint, claimed labels, address, time.
    Pending,
    /// Accepts a node's pending enrollment request, with the labels it gets.
    Accept {
        /// Node id.
        id: String,
        /// Label `k=v` (repeatable, or `k=v,k=v`).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// The key fingerprint you checked on the gateway: refused if the request is
        /// now for another key.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Rejects a node's pending enrollment request: its key is refused from then on.
    Reject {
        /// Node id.
        id: String,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "rejected by operator")]
        reason: String,
    },
    /// Revoked nodes and the serials of their certificates that have not expired.
    Revocations,
    /// Sets a node's selector labels (all of them): `aviary nodes label ID k=v ...`.
    Label {
        /// Node id.
        id: String,
        /// Labels `k=v`.
        labels: Vec<String>,
    },
}

/// Runs one CLI invocation.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    let target = Target {
        control_plane: cli.control_plane.clone(),
        certs: cli.certs.clone(),
        admin: cli.admin.clone(),
        context: cli.context.clone(),
        request_id: cli.request_id.clone(),
    };
    match cli.command {
        Command::Demo {
            nodes,
            exit_when_done,
            sample_module,
        } => demo::run(nodes, exit_when_done, sample_module).await,
        Command::Release { command } => release::run(command, format, connect(&target)).await,
        Command::Rollout { command } => {
            let mut admin = connect(&target).await?;
            match command {
                RolloutCommand::Create {
                    module,
                    version,
                    file,
                    selector,
                    steps,
                    progress_deadline,
                    analysis,
                } => {
                    let mut request = match &file {
                        Some(path) => rollout_file::read(path)?,
                        None => pb::CreateRolloutRequest::default(),
                    };
                    if let Some(m) = module {
                        request.module = m;
                    }
                    if let Some(v) = version {
                        request.version = v;
                    }
                    if !selector.is_empty() {
                        request.selector = selector;
                    }
                    if !steps.is_empty() {
                        request.steps = parse_steps(&steps, &analysis)?;
                    }
                    if let Some(d) = progress_deadline {
                        request.progress_deadline_seconds =
                            u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
                    }
                    request.request_id = admin.request_id();
                    let r = call!(admin.rollouts, create_rollout, request)?;
                    output::rollout(format, &r)?;
                }
                RolloutCommand::Get { id } => {
                    let r = admin
                        .rollouts
                        .get_rollout(pb::GetRolloutRequest { id })
                        .await?
                        .into_inner();
                    output::rollout(format, &r)?;
                }
                RolloutCommand::List { module } => {
                    let list = admin.all_rollouts(&module.unwrap_or_default()).await?;
                    output::rollouts(format, list)?;
                }
                RolloutCommand::Abort { id } => {
                    let request_id = admin.request_id();
                    let r = pb::RolloutRef { id, request_id };
                    let r = call!(admin.rollouts, abort_rollout, r)?;
                    output::rollout(format, &r)?;
                }
                RolloutCommand::Pause { id } => {
                    let request_id = admin.request_id();
                    let r = pb::RolloutRef { id, request_id };
                    let r = call!(admin.rollouts, pause_rollout, r)?;
                    output::rollout(format, &r)?;
                }
                RolloutCommand::Resume { id } => {
                    let request_id = admin.request_id();
                    let r = pb::RolloutRef { id, request_id };
                    let r = call!(admin.rollouts, resume_rollout, r)?;
                    output::rollout(format, &r)?;
                }
                RolloutCommand::Promote { id, full } => {
                    let request_id = admin.request_id();
                    let r = pb::PromoteRolloutRequest {
                        id,
                        full,
                        request_id,
                    };
                    let r = call!(admin.rollouts, promote_rollout, r)?;
                    output::rollout(format, &r)?;
                }
                RolloutCommand::Watch { id } => {
                    let mut stream = admin
                        .rollouts
                        .watch_rollout(pb::RolloutRef {
                            id,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    // On a terminal the line redraws in place; piped, a line per change.
                    let live = format == Format::Table && std::io::stdout().is_terminal();
                    let mut state = None;
                    while let Some(r) = stream.message().await? {
                        if live && state.is_some_and(|s| s != r.state) {
                            println!();
                        }
                        state = Some(r.state);
                        output::rollout_line(format, &r, live)?;
                    }
                    if live {
                        println!();
                    }
                }
            }
            Ok(())
        }
        Command::Context { command } => {
            let path = contexts::path()
                .context("no config file: set AVIARY_CONFIG, XDG_CONFIG_HOME or HOME")?;
            contexts::run(command, &path)
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "aviary", &mut std::io::stdout());
            Ok(())
        }
        Command::SampleModule { args } => {
            aviary_sample_module::run(args).await;
            Ok(())
        }
        Command::Config { command } => {
            let mut admin = connect(&target).await?;
            config::run(command, format, &mut admin).await
        }
        Command::Ca {
            command: identity::CaCommand::Status,
        } => {
            let mut admin = connect(&target).await?;
            identity::ca_status(format, &mut admin).await
        }
        Command::EnrollToken { command } => {
            let mut admin = connect(&target).await?;
            identity::tokens(command, format, &mut admin).await
        }
        Command::Nodes { command } => {
            let mut admin = connect(&target).await?;
            match command {
                NodesCommand::List { selector, filter } => {
                    output::nodes(format, admin.all_nodes(&selector, &filter).await?)?;
                }
                NodesCommand::Get { id } => {
                    output::node(format, &admin.node(&id).await?)?;
                }
                NodesCommand::SetWeight {
                    module,
                    weight,
                    selector,
                } => {
                    let reply = admin.set_weight(&module, weight, &selector).await?;
                    output::set_weight(format, &module, weight, &reply)?;
                }
                NodesCommand::Revoke { id, reason } => {
                    let request = pb::RevokeNodeRequest {
                        node_id: id.clone(),
                        reason,
                        request_id: admin.request_id(),
                    };
                    let reply = call!(admin.nodes, revoke_node, request)?;
                    output::revoke(format, &id, &reply)?;
                }
                NodesCommand::Pending => identity::pending(format, &mut admin).await?,
                NodesCommand::Revocations => identity::revocations(format, &mut admin).await?,
                NodesCommand::Accept {
                    id,
                    labels,
                    fingerprint,
                } => {
                    let accept = Some((labels, fingerprint));
                    identity::decide(format, &mut admin, id, accept, String::new()).await?;
                }
                NodesCommand::Reject { id, reason } => {
                    identity::decide(format, &mut admin, id, None, reason).await?;
                }
                NodesCommand::Label { id, labels } => {
                    identity::label(format, &mut admin, id, labels).await?;
                }
            }
            Ok(())
        }
        Command::Events {
            follow,
            node,
            actor,
            action,
        } => {
            let mut admin = connect(&target).await?;
            let filter = pb::EventFilter {
                node_id: node.unwrap_or_default(),
                actor: actor.unwrap_or_default(),
                action: action.unwrap_or_default(),
                ..Default::default()
            };
            if follow {
                let mut stream = admin
                    .audit
                    .watch_events(pb::WatchEventsRequest {
                        filter: Some(filter),
                        after_seq: 0,
                    })
                    .await?
                    .into_inner();
                while let Some(event) = stream.message().await? {
                    output::event_line(format, &event)?;
                }
            } else {
                let events = admin.all_events(filter).await?;
                output::events(format, events)?;
            }
            Ok(())
        }
    }
}

/// Where a command connects: flags (and their environment variables) first, then the
/// context.
struct Target {
    control_plane: Option<String>,
    certs: Option<PathBuf>,
    admin: Option<String>,
    context: Option<String>,
    request_id: Option<String>,
}

async fn connect(target: &Target) -> anyhow::Result<Admin> {
    let context = match contexts::path() {
        Some(path) => contexts::Contexts::load(&path)?.pick(target.context.as_deref())?,
        None if target.context.is_some() => {
            anyhow::bail!("no config file for --context: set AVIARY_CONFIG or HOME")
        }
        None => contexts::Context::default(),
    };
    let url = target
        .control_plane
        .clone()
        .or(context.control_plane)
        .context(
            "no control plane: pass --control-plane https://HOST:PORT, set AVIARY_CONTROL_PLANE or use a context (aviary context set)",
        )?;
    let certs = target.certs.clone().or(context.certs).context(
        "no certificates: pass --certs DIR, set AVIARY_CERTS or use a context (aviary context set)",
    )?;
    let admin = target
        .admin
        .clone()
        .or(context.admin)
        .unwrap_or_else(|| "admin".into());
    let mut client = Admin::connect(&url, &certs, &admin).await?;
    if let Some(base) = &target.request_id {
        client.set_request_base(base);
    }
    Ok(client)
}

/// A refusal for people: its code and message, then its `google.rpc` details (the
/// fields at fault, the reason and what is in the way, the missing resource).
pub fn describe_status(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let mut line = format!("{:?}: {}", status.code(), status.message());
    let details = status.get_error_details();
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            line.push_str(&format!(" [field {}: {}]", v.field, v.description));
        }
    }
    if let Some(info) = details.error_info() {
        let mut meta: Vec<String> = info
            .metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        meta.sort();
        if meta.is_empty() {
            line.push_str(&format!(" [reason {}]", info.reason));
        } else {
            line.push_str(&format!(" [reason {} {}]", info.reason, meta.join(" ")));
        }
    }
    if let Some(r) = details.resource_info() {
        line.push_str(&format!(
            " [{} {} not found]",
            r.resource_type, r.resource_name
        ));
    }
    line
}
