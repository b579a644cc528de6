//! Drives `aviary-fleet-sim` processes for the benchmarks: starts them split over
//! processes, and turns their stdout lines into timestamped events.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::{bin, cpu_time, ControlPlane, Workspace};

/// One line of a simulator.
#[derive(Clone, Debug)]
pub enum Event {
    /// Node `idx` holds a stream (unix ns).
    Up(usize, u128),
    /// Node `idx` ACKed weights `revision`.
    Ack {
        /// Node index.
        idx: usize,
        /// Weights revision.
        revision: u64,
        /// Unix ns.
        at: u128,
    },
    /// Node `idx` ACKed a module update: installed `version`, or rolled back to it.
    Module {
        /// Node index.
        idx: usize,
        /// The version it now runs.
        version: String,
        /// A rollback to the previous slot.
        rollback: bool,
        /// Unix ns.
        at: u128,
    },
    /// A stream of some node was refused or ended with this code.
    Err(String),
}

/// Unix time in ns.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The `p`th percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn parse(line: &str) -> Option<Event> {
    let f: Vec<&str> = line.split_whitespace().collect();
    Some(match f.as_slice() {
        ["up", i, t] => Event::Up(i.parse().ok()?, t.parse().ok()?),
        ["ack", i, r, t] => Event::Ack {
            idx: i.parse().ok()?,
            revision: r.parse().ok()?,
            at: t.parse().ok()?,
        },
        ["mod", i, v, rollback, t] => Event::Module {
            idx: i.parse().ok()?,
            version: (*v).to_owned(),
            rollback: *rollback == "1",
            at: t.parse().ok()?,
        },
        ["err", _, code] => Event::Err((*code).to_owned()),
        _ => return None,
    })
}

/// Simulator processes and their merged events.
pub struct Sims {
    children: Vec<Child>,
    events: mpsc::Receiver<Event>,
}

impl Sims {
    /// Starts `nodes` simulated nodes against `cp`, `per_process` per process, with
    /// `extra` simulator flags (labels, health, ...).
    pub async fn start(
        ws: &Workspace,
        cp: &ControlPlane,
        nodes: usize,
        per_process: usize,
        extra: &[&str],
    ) -> anyhow::Result<Sims> {
        let (tx, events) = mpsc::channel(65_536);
        let mut children = Vec::new();
        let mut first = 0;
        while first < nodes {
            let count = per_process.min(nodes - first);
            let mut child = Command::new(bin("aviary-fleet-sim")?)
                .args(["--control-plane", &cp.url(), "--certs"])
                .arg(&ws.pki.dir)
                .args(["--nodes", &count.to_string(), "--first", &first.to_string()])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()?;
            let stdout = child.stdout.take().context("sim stdout")?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Some(event) = parse(&line) else { continue };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            });
            children.push(child);
            first += count;
        }
        Ok(Sims { children, events })
    }

    /// Collects events until `on` says done or `timeout`; returns errors seen by code.
    pub async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut on: impl FnMut(&Event) -> bool,
    ) -> anyhow::Result<BTreeMap<String, usize>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut errors = BTreeMap::new();
        loop {
            let event = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => bail!("simulators exited while waiting for {what}"),
                Err(_) => bail!(
                    "timed out after {timeout:?} waiting for {what} (stream errors seen: {errors:?})"
                ),
            };
            if let Event::Err(code) = &event {
                *errors.entry(code.clone()).or_default() += 1;
            }
            if on(&event) {
                return Ok(errors);
            }
        }
    }

    /// The next event, `None` once every simulator has exited.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// CPU time of every simulator process so far.
    pub fn cpu_time(&self) -> Duration {
        self.children
            .iter()
            .filter_map(|c| c.id())
            .filter_map(|pid| cpu_time(pid).ok())
            .sum()
    }

    /// Kills every simulator.
    pub async fn stop(mut self) {
        for child in &mut self.children {
            let _ = child.kill().await;
        }
    }
}
