//! The sample module: the small HTTP service the demo and the tests deploy. The tests run
//! it as `aviary-sample-module`; the demo as `aviary sample-module` (hidden), so the demo
//! needs nothing else built.
//!
//! * Serves `GET /` (its version), `GET /healthz` and `GET /greeting` (`$SAMPLE_GREETING`,
//!   for runtime config tests) on the socket the edge daemon hands it
//!   (`LISTEN_FDS`/`LISTEN_PID`, systemd's convention: fd 3), or on `--port` itself.
//! * Its version is not compiled in: it is read from a trailer appended to its own
//!   executable (`AVIARY-SAMPLE-VERSION=x.y.z` at the very end), so two "releases" are the
//!   same program with different bytes, as a small real delta
//!   (`aviary sample-module --stamp VERSION OUT` writes one).
//! * Misbehaviour on demand, for rollback tests: `--crash-at-start`, `--never-ready`
//!   (healthz answers 503), `--log-errors` (prints ERROR lines); `--idle` runs without a
//!   server (with `--log-errors`, an ERROR line every 200 ms).
//! * With `$SAMPLE_IMU` set to a sensor stub (`http://HOST:PORT`), it reads the stub's
//!   default IMU stream as a module under test on a HIL rig would, and `GET /imu` shows
//!   how many samples arrived and the last one (reconnecting if the stub goes away).
//! * SIGTERM is graceful: it stops accepting and finishes the requests it accepted, so a
//!   hot swap through a shared socket loses nothing.
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

const TRAILER: &str = "AVIARY-SAMPLE-VERSION=";

/// systemd's `Type=notify` protocol: `READY=1` to `NOTIFY_SOCKET` (a path, or `@name` in
/// the abstract namespace); nothing without it.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(b"READY=1\n", &addr));
    if let Err(e) = sent {
        eprintln!("sample: NOTIFY_SOCKET {target}: {e}");
    }
}

fn version() -> String {
    let Ok(exe) = std::env::current_exe().and_then(std::fs::read) else {
        return "unknown".into();
    };
    let tail = &exe[exe.len().saturating_sub(64)..];
    let text = String::from_utf8_lossy(tail);
    text.rfind(TRAILER)
        .map(|i| text[i + TRAILER.len()..].trim().to_owned())
        .unwrap_or_else(|| "unstamped".into())
}

/// The socket from the daemon, if it passed one to this very process (`LISTEN_FDS` and
/// `LISTEN_PID`, systemd's convention; listenfd checks both).
fn inherited() -> Option<TcpListener> {
    match listenfd::ListenFd::from_env().take_tcp_listener(0) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("sample: LISTEN_FDS: {e}");
            None
        }
    }
}

/// What the module has read from the sensor stub.
#[derive(Default)]
struct ImuSeen {
    samples: u64,
    last: Option<aviary_proto::sensors::v1::ImuSample>,
}

type SharedImu = Arc<std::sync::Mutex<ImuSeen>>;

/// Reads the stub's default stream into `seen` for as long as the module runs.
async fn read_imu(url: String, seen: SharedImu) {
    use aviary_proto::sensors::v1 as sensors;
    loop {
        let stream = async {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                .connect()
                .await?;
            let mut client = sensors::sensor_stub_client::SensorStubClient::new(channel);
            let mut stream = client
                .stream_imu(sensors::StreamImuRequest::default())
                .await?
                .into_inner();
            while let Some(sample) = stream.message().await? {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                seen.samples += 1;
                seen.last = Some(sample);
            }
            anyhow::Ok(())
        };
        if let Err(e) = stream.await {
            eprintln!("sample: sensor stub {url}: {e}; retrying in 1s");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn imu_report(seen: &SharedImu) -> (&'static str, String) {
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    match &seen.last {
        None => (
            "503 Service Unavailable",
            "no IMU samples (set SAMPLE_IMU=http://HOST:PORT of aviary-sensors)\n".into(),
        ),
        Some(s) => {
            let (g, a) = (s.gyro.unwrap_or_default(), s.accel.unwrap_or_default());
            (
                "200 OK",
                format!(
                    "samples {} sensor {} seq {} t_ns {} gyro {:.4} {:.4} {:.4} accel {:.3} {:.3} {:.3}\n",
                    seen.samples, s.sensor_id, s.seq, s.timestamp_ns, g.x, g.y, g.z, a.x, a.y, a.z
                ),
            )
        }
    }
}

async fn handle(stream: tokio::net::TcpStream, version: Arc<String>, ready: bool, imu: SharedImu) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = String::new();
    let read_request = async {
        reader.read_line(&mut line).await?;
        // Drain the headers.
        let mut header = String::new();
        while reader.read_line(&mut header).await? > 2 {
            header.clear();
        }
        Ok::<(), std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read_request)
        .await
        .map_or(true, |r| r.is_err())
    {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/healthz" if ready => ("200 OK", "ok\n".to_owned()),
        "/healthz" => ("503 Service Unavailable", "not ready\n".to_owned()),
        "/imu" => imu_report(&imu),
        // What its runtime config says (tests read which config runs).
        "/greeting" => (
            "200 OK",
            format!(
                "{}\n",
                std::env::var("SAMPLE_GREETING").unwrap_or_else(|_| "hello".into())
            ),
        ),
        _ => ("200 OK", format!("{version}\n")),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = write.write_all(reply.as_bytes()).await;
    // Tell the client we are done (it may read to EOF), then close.
    let _ = write.shutdown().await;
}

/// Writes `exe` with a version trailer to `out` (a "release" of the sample module).
pub fn stamp(exe: &std::path::Path, version: &str, out: &std::path::Path) -> std::io::Result<()> {
    let mut bytes = std::fs::read(exe)?;
    bytes.extend_from_slice(format!("\n{TRAILER}{version}").as_bytes());
    std::fs::write(out, bytes)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))
}

/// Runs the sample module with its own command-line `args` (after `sample-module`).
pub async fn run(args: Vec<String>) {
    if let Some(pos) = args.iter().position(|a| a == "--stamp") {
        // --stamp VERSION OUT: this binary with a version trailer.
        let (Some(v), Some(out)) = (args.get(pos + 1), args.get(pos + 2)) else {
            eprintln!("usage: aviary sample-module --stamp VERSION OUT");
            std::process::exit(64);
        };
        let result =
            std::env::current_exe().and_then(|exe| stamp(&exe, v, std::path::Path::new(out)));
        if let Err(e) = result {
            eprintln!("aviary sample-module: --stamp: {e}");
            std::process::exit(1);
        }
        return;
    }
    let flag = |f: &str| args.iter().any(|a| a == f);
    let version = Arc::new(version());
    if flag("--crash-at-start") {
        eprintln!("ERROR sample {version}: crashing at start as asked");
        std::process::exit(3);
    }
    if flag("--idle") {
        // No server: a worker process (for analysis tests and file-like services).
        println!("sample {version} running idle");
        notify_ready();
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            std::process::exit(1);
        };
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tick.tick() => {
                    if flag("--log-errors") {
                        eprintln!("ERROR sample {version}: something went wrong");
                    }
                }
            }
        }
    }
    let listener = match inherited() {
        Some(l) => l,
        None => {
            let port = args
                .iter()
                .position(|a| a == "--port")
                .and_then(|i| args.get(i + 1))
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or(8080);
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("ERROR sample {version}: bind 127.0.0.1:{port}: {e}");
                    std::process::exit(1);
                }
            }
        }
    };
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ERROR sample {version}: listener: {e}");
            std::process::exit(1);
        }
    };
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        eprintln!("ERROR sample {version}: cannot handle SIGTERM");
        std::process::exit(1);
    };
    let ready = !flag("--never-ready");
    let log_errors = flag("--log-errors");
    println!("sample {version} serving (ready: {ready})");
    if ready {
        notify_ready();
    }
    let imu = SharedImu::default();
    let imu_reader = std::env::var("SAMPLE_IMU")
        .ok()
        .map(|url| tokio::spawn(read_imu(url, imu.clone())));
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if log_errors {
                    eprintln!("ERROR sample {version}: something went wrong");
                }
                inflight.spawn(handle(stream, version.clone(), ready, imu.clone()));
            }
        }
    }
    // Graceful: stop accepting (a successor shares the socket), finish what was accepted.
    drop(listener);
    while inflight.join_next().await.is_some() {}
    if let Some(reader) = imu_reader {
        reader.abort();
    }
    println!("sample {version} stopped");
}
