//! A running `aviary-sensors` and plaintext clients for it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use aviary_proto::sensors::v1 as pb;
use pb::sensor_stub_client::SensorStubClient;
use tonic::transport::{Channel, Endpoint};

use crate::{bin, free_port, spawn_and_read, Process, Workspace};

/// One of the repo's real IMU recordings (`sim-sensors/data/imu/`).
pub fn imu_data(file: &str) -> PathBuf {
    crate::repo_root().join("sim-sensors/data/imu").join(file)
}

/// A running sensor stub.
pub struct SensorStub {
    child: Process,
    /// The gRPC address.
    pub addr: SocketAddr,
    /// Its Prometheus address.
    pub metrics: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl SensorStub {
    /// Starts `aviary-sensors ARGS --listen 127.0.0.1:0` with a metrics port.
    pub async fn start(ws: &Workspace, args: &[&str]) -> anyhow::Result<SensorStub> {
        let metrics = free_port()?;
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend([
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            metrics.to_string(),
        ]);
        let log = ws.path(&format!("sensors-{}.log", fastrand::u32(..)));
        let (child, addr) =
            spawn_and_read(&bin("aviary-sensors")?, &all, &log, "listening on ").await?;
        Ok(SensorStub {
            child: Process(Some(child)),
            addr: addr.parse()?,
            metrics,
            log,
        })
    }

    /// A stub replaying the repo's recordings `files` (names under `sim-sensors/data/imu`)
    /// at `speed` (0: as fast as read), with `extra` flags.
    pub async fn replay(
        ws: &Workspace,
        files: &[&str],
        speed: &str,
        extra: &[&str],
    ) -> anyhow::Result<SensorStub> {
        let paths: Vec<String> = files
            .iter()
            .map(|f| imu_data(f).display().to_string())
            .collect();
        let mut args = vec!["--mode", "replay", "--speed", speed];
        for p in &paths {
            args.extend(["--file", p.as_str()]);
        }
        args.extend(extra);
        SensorStub::start(ws, &args).await
    }

    /// A new plaintext connection (each has its own HTTP/2 flow-control window).
    pub async fn client(&self) -> anyhow::Result<SensorStubClient<Channel>> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connect to the sensor stub at {}", self.addr))?;
        Ok(SensorStubClient::new(channel))
    }

    /// A connection to `addr` (e.g. a [`crate::proxy::Proxy`] in front of the stub) whose
    /// HTTP/2 windows are `bytes`: how much a client that stops reading lets the server
    /// send before the server notices.
    pub async fn client_via(
        addr: SocketAddr,
        bytes: u32,
    ) -> anyhow::Result<SensorStubClient<Channel>> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .initial_stream_window_size(bytes)
            .initial_connection_window_size(bytes)
            .connect()
            .await?;
        Ok(SensorStubClient::new(channel))
    }

    /// `GetStatus`.
    pub async fn status(&self) -> anyhow::Result<pb::StubStatus> {
        Ok(self
            .client()
            .await?
            .get_status(pb::GetStatusRequest {})
            .await?
            .into_inner())
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }
}

impl crate::Daemon for SensorStub {
    fn process(&mut self) -> &mut Process {
        &mut self.child
    }
}

/// Reads `n` samples of `request` (or until the stream ends), with arrival times.
pub async fn read_samples(
    client: &mut SensorStubClient<Channel>,
    request: pb::StreamImuRequest,
    n: usize,
) -> anyhow::Result<Vec<(std::time::Instant, pb::ImuSample)>> {
    let mut stream = client.stream_imu(request).await?.into_inner();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
            Err(_) => anyhow::bail!("no sample for 30s after {} samples", out.len()),
            Ok(Ok(Some(s))) => out.push((std::time::Instant::now(), s)),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(status.into()),
        }
    }
    Ok(out)
}
