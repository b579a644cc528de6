//! The sensor stub over real sockets: replay of the repo's real recordings, seeded synthetic
//! streams, pacing under a stalled subscriber, the bridge, and clear refusals.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aviary_proto::sensors::v1 as pb;
use aviary_tests::sensors::{imu_data, read_samples, SensorStub};
use aviary_tests::{eventually, Daemon, Workspace};

const DEG: f64 = std::f64::consts::PI / 180.0;
const G: f64 = 9.806_65;

/// One recorded row: t_ns since the first, gyro rad/s, accel m/s².
type Row = (u64, [f64; 3], [f64; 3]);

/// A recording parsed independently of the stub.
fn expected(file: &str, time_scale_ns: f64) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(imu_data(file))?;
    let mut rows = Vec::new();
    let mut first = None;
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<f64> = line
            .trim()
            .split(',')
            .map(|v| v.parse::<f64>())
            .collect::<Result<_, _>>()?;
        let t = (f[0] * time_scale_ns).round() as u64;
        let t0 = *first.get_or_insert(t);
        rows.push((
            t - t0,
            [f[1] * DEG, f[2] * DEG, f[3] * DEG],
            [f[4] * G, f[5] * G, f[6] * G],
        ));
    }
    Ok(rows)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

fn check_sample(
    s: &pb::ImuSample,
    t_ns: u64,
    gyro: [f64; 3],
    accel: [f64; 3],
) -> anyhow::Result<()> {
    let g = s.gyro.context("gyro")?;
    let a = s.accel.context("accel")?;
    // x-io timestamps are exact decimals; the float parse above may be off by 1 ns.
    if s.timestamp_ns.abs_diff(t_ns) > 1
        || !close(g.x, gyro[0])
        || !close(g.y, gyro[1])
        || !close(g.z, gyro[2])
        || !close(a.x, accel[0])
        || !close(a.y, accel[1])
        || !close(a.z, accel[2])
    {
        bail!("sample {s:?} differs from the recording ({t_ns}, {gyro:?}, {accel:?})");
    }
    Ok(())
}

#[test]
fn the_recordings_are_upstreams_bytes() -> anyhow::Result<()> {
    // The sums in sim-sensors/data/imu/README.md: a checkout that converted line endings
    // or a hand edit would replay something that was never recorded.
    for (file, sum) in [
        (
            "xio3_inertial.csv",
            "6f7a9f0ead32451ce8e881650a3702757ac17228a9bb38fc246cb6044c24f6ee",
        ),
        (
            "ngimu_sensors.csv",
            "5bb127f5886477f71e405df9662e61291ecc6a2b9f01751a1983d87d8f32b38d",
        ),
    ] {
        let bytes = std::fs::read(imu_data(file)).with_context(|| file.to_string())?;
        anyhow::ensure!(
            aviary_proto::digest::Sha256::of(&bytes).hex() == sum,
            "{file} is not the recording sim-sensors/data/imu/README.md names"
        );
        anyhow::ensure!(
            bytes.windows(2).any(|w| w == b"\r\n"),
            "{file} lost its CRLF"
        );
    }
    Ok(())
}

#[tokio::test]
async fn replay_of_both_recordings_yields_every_sample_in_si_units() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let stub =
        SensorStub::replay(&ws, &["xio3_inertial.csv", "ngimu_sensors.csv"], "0", &[]).await?;
    let status = stub.status().await?;
    assert_eq!(status.sensors, vec!["xio3_inertial", "ngimu_sensors"]);
    for (sensor, file, scale, count) in [
        ("xio3_inertial", "xio3_inertial.csv", 1e3, 500),
        ("ngimu_sensors", "ngimu_sensors.csv", 1e9, 499),
    ] {
        let want = expected(file, scale)?;
        assert_eq!(want.len(), count);
        let got = read_samples(
            &mut stub.client().await?,
            pb::StreamImuRequest {
                sensor_id: sensor.into(),
                ..Default::default()
            },
            10_000,
        )
        .await?;
        // At --speed 0 without --loop the stream ends after the last sample.
        assert_eq!(got.len(), count, "{sensor}");
        for (i, ((_, s), (t, g, a))) in got.iter().zip(&want).enumerate() {
            assert_eq!(s.seq, i as u64);
            assert_eq!(s.sensor_id, sensor);
            check_sample(s, *t, *g, *a).with_context(|| format!("{sensor} row {}", i + 2))?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn looped_replay_repeats_the_recording_with_increasing_timestamps() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let stub = SensorStub::replay(&ws, &["xio3_inertial.csv"], "0", &["--loop"]).await?;
    let want = expected("xio3_inertial.csv", 1e3)?;
    let got = read_samples(&mut stub.client().await?, Default::default(), 2 * 500 + 10).await?;
    assert_eq!(got.len(), 1010);
    let span = want[499].0;
    let period = got[500].1.timestamp_ns;
    // The loop gap is one recorded interval (the median, 20.034 ms).
    assert!(
        period > span && period - span < 20_100_000,
        "loop period {period}, span {span}"
    );
    assert!(got
        .windows(2)
        .all(|w| w[1].1.timestamp_ns > w[0].1.timestamp_ns));
    for (i, (_, s)) in got.iter().enumerate() {
        let (t, g, a) = want[i % 500];
        check_sample(s, t + (i / 500) as u64 * period, g, a)?;
        assert_eq!(s.seq, i as u64);
    }
    Ok(())
}

#[tokio::test]
async fn real_time_replay_keeps_the_recorded_spacing() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    // Ten times real time: the 9.98 s recording (with its real jitter) in about 1 s.
    let stub = SensorStub::replay(&ws, &["ngimu_sensors.csv"], "10", &[]).await?;
    let got = read_samples(&mut stub.client().await?, Default::default(), 1000).await?;
    assert_eq!(got.len(), 499);
    let (t0, first) = (got[0].0, got[0].1.timestamp_ns);
    let mut worst = Duration::ZERO;
    for (at, s) in &got {
        let due = Duration::from_nanos((s.timestamp_ns - first) / 10);
        let arrived = at.duration_since(t0);
        worst = worst.max(arrived.abs_diff(due));
    }
    // Generous for a shared CI machine; the pacer's own error is tens of microseconds
    // (see docs/perf.md for jitter figures).
    assert!(
        worst < Duration::from_millis(150),
        "worst arrival error {worst:?}"
    );
    let total = got[498].0.duration_since(t0);
    assert!(
        total > Duration::from_millis(900),
        "whole replay took {total:?}"
    );
    Ok(())
}

async fn synthetic(
    stub: &SensorStub,
    seed: Option<u64>,
    n: usize,
) -> anyhow::Result<Vec<pb::ImuSample>> {
    let request = pb::StreamImuRequest {
        seed,
        faults: Some(pb::Faults {
            dropout_rate: 0.01,
            spike_rate: 0.01,
            spike_gyro: 3.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(read_samples(&mut stub.client().await?, request, n)
        .await?
        .into_iter()
        .map(|(_, s)| s)
        .collect())
}

#[tokio::test]
async fn same_seed_gives_the_same_stream_bit_for_bit() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let stub = SensorStub::start(
        &ws,
        &[
            "--mode",
            "synthetic",
            "--speed",
            "0",
            "--rate-hz",
            "1000",
            "--seed",
            "7",
            "--axis",
            "gyro.x=sine:1:5+noise:0.05",
        ],
    )
    .await?;
    let a = synthetic(&stub, None, 5000).await?;
    let b = synthetic(&stub, Some(7), 5000).await?;
    let c = synthetic(&stub, Some(8), 5000).await?;
    // prost messages compare floats by value; compare the encoded bytes to be bit-exact.
    let bytes = |v: &[pb::ImuSample]| {
        v.iter()
            .map(prost::Message::encode_to_vec)
            .collect::<Vec<_>>()
    };
    assert_eq!(bytes(&a), bytes(&b));
    assert_ne!(bytes(&a), bytes(&c));
    // Evenly spaced at the requested rate; dropouts show as seq gaps, not time shifts.
    for s in &a {
        assert_eq!(s.timestamp_ns, s.seq * 1_000_000);
    }
    assert!(
        a.last().map(|s| s.seq).unwrap_or(0) > 5000,
        "dropouts leave gaps in seq"
    );
    // The noise is the part that differs: same sine, different deviates.
    let diff = a.iter().zip(&c).filter(|(x, y)| x.gyro != y.gyro).count();
    assert!(diff > 4000, "{diff}");
    Ok(())
}

#[tokio::test]
async fn a_stalled_subscriber_among_twenty_at_1khz_delays_nobody() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let stub = SensorStub::start(
        &ws,
        &[
            "--mode",
            "synthetic",
            "--rate-hz",
            "1000",
            "--queue-depth",
            "200",
            "--subscriber-timeout",
            "2s",
        ],
    )
    .await?;
    // The stalled client is a silent peer: its bytes stop at a frozen proxy, so its own
    // HTTP/2 library cannot give up first, and its small window lets the stub notice
    // within a second instead of after the megabytes a default client accepts.
    let proxy = aviary_tests::proxy::Proxy::start(stub.addr).await?;
    let mut stalled_client = SensorStub::client_via(proxy.addr, 64 * 1024).await?;
    let stalled = stalled_client
        .stream_imu(pb::StreamImuRequest::default())
        .await?
        .into_inner();
    proxy.set(aviary_tests::proxy::Mode::Freeze);
    let shared = stub.client().await?;
    let readers: Vec<_> = (0..19)
        .map(|_| {
            let mut client = shared.clone();
            tokio::spawn(async move { read_samples(&mut client, Default::default(), 5000).await })
        })
        .collect();
    let mut worst_gap = Duration::ZERO;
    for r in readers {
        let got = r.await??;
        assert_eq!(got.len(), 5000);
        for w in got.windows(2) {
            assert_eq!(w[1].1.seq, w[0].1.seq + 1, "a reader lost samples");
            assert_eq!(w[1].1.timestamp_ns - w[0].1.timestamp_ns, 1_000_000);
            worst_gap = worst_gap.max(w[1].0.duration_since(w[0].0));
        }
    }
    // 5 s of stream while one subscriber read nothing; a shared 2-core CI box may pause a
    // reader for a while, but never for the seconds a blocked fan-out would cost.
    assert!(
        worst_gap < Duration::from_millis(250),
        "worst gap {worst_gap:?}"
    );
    let status = stub.status().await?;
    assert_eq!(
        status.subscribers_dropped,
        1,
        "{status:?}\n{}",
        std::fs::read_to_string(&stub.log)?
    );
    assert!(status.samples_dropped > 0, "{status:?}");
    assert!(
        status.streams.iter().all(|s| s.samples_dropped == 0),
        "{status:?}"
    );
    let metrics = reqwest_metrics(&stub).await?;
    assert!(
        metrics.contains("aviary_sensor_subscribers_cut_total 1"),
        "{metrics}"
    );
    drop(stalled);
    Ok(())
}

async fn reqwest_metrics(stub: &SensorStub) -> anyhow::Result<String> {
    eventually(Duration::from_secs(10), "metrics", || async {
        Ok(Some(
            aviary_tests::http_get(stub.metrics, "/metrics").await?,
        ))
    })
    .await
}

#[tokio::test]
async fn bridged_samples_reach_every_subscriber_in_order() -> anyhow::Result<()> {
    const N: u64 = 500;
    const M: usize = 5;
    let ws = Workspace::new()?;
    let stub = SensorStub::start(&ws, &["--mode", "bridge", "--sensor-id", "rig0"]).await?;
    let mut readers = Vec::new();
    for _ in 0..M {
        let mut client = stub.client().await?;
        readers.push(tokio::spawn(async move {
            read_samples(&mut client, Default::default(), N as usize).await
        }));
    }
    eventually(Duration::from_secs(10), "subscribers", || async {
        Ok((stub.status().await?.subscribers as usize == M).then_some(()))
    })
    .await?;
    let samples: Vec<pb::ImuSample> = (0..N)
        .map(|i| pb::ImuSample {
            sensor_id: String::new(),
            seq: i,
            timestamp_ns: 1_000 + i * 5_000_000,
            gyro: Some(pb::Vector3 {
                x: i as f64,
                y: 0.0,
                z: -1.0,
            }),
            accel: Some(pb::Vector3 {
                x: 0.0,
                y: 0.0,
                z: G,
            }),
            temperature_c: 21.5,
        })
        .collect();
    let response = stub
        .client()
        .await?
        .inject_imu(tokio_stream::iter(samples.clone()))
        .await?
        .into_inner();
    assert_eq!(response.accepted, N);
    assert_eq!(response.subscribers, M as u32);
    for r in readers {
        let got = r.await??;
        assert_eq!(got.len(), N as usize);
        for ((_, g), sent) in got.iter().zip(&samples) {
            assert_eq!(g.sensor_id, "rig0");
            assert_eq!(
                (g.seq, g.timestamp_ns, &g.gyro),
                (sent.seq, sent.timestamp_ns, &sent.gyro)
            );
        }
    }
    // Time must move forward: a replayed batch is refused, naming the sample.
    let err = stub
        .client()
        .await?
        .inject_imu(tokio_stream::iter(samples[..1].to_vec()))
        .await
        .expect_err("old timestamp");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("sample 1 refused: timestamp_ns 1000 is not after"),
        "{}",
        err.message()
    );
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_stub_keeps_serving() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let stub = SensorStub::start(&ws, &["--mode", "synthetic", "--speed", "0"]).await?;
    let mut client = stub.client().await?;
    let cases = [
        (
            pb::StreamImuRequest {
                sensor_id: "imu9".into(),
                ..Default::default()
            },
            tonic::Code::NotFound,
            "unknown sensor `imu9`; this stub serves: imu0",
        ),
        (
            pb::StreamImuRequest {
                rate_hz: -5.0,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "rate_hz -5",
        ),
        (
            pb::StreamImuRequest {
                rate_hz: 1e9,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "and 100000",
        ),
        (
            pb::StreamImuRequest {
                faults: Some(pb::Faults {
                    dropout_rate: 1.5,
                    ..Default::default()
                }),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "dropout_rate 1.5 is not a probability",
        ),
        // Issue 11: extreme u64 values made sensor time wrap.
        (
            pb::StreamImuRequest {
                start_offset_ns: u64::MAX,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "start_offset_ns 18446744073709551615: at most",
        ),
        (
            pb::StreamImuRequest {
                faults: Some(pb::Faults {
                    bias_at_ns: u64::MAX,
                    timestamp_jitter_ns: u64::MAX,
                    ..Default::default()
                }),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "bias_at_ns 18446744073709551615 is past",
        ),
    ];
    for (request, code, part) in cases {
        let err = client.stream_imu(request).await.expect_err(part);
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(part), "{}", err.message());
    }
    let err = client
        .inject_imu(tokio_stream::iter(Vec::<pb::ImuSample>::new()))
        .await
        .expect_err("not a bridge");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // Still serving; a client that goes away mid-stream is forgotten.
    let got = read_samples(&mut client, Default::default(), 10).await?;
    assert_eq!(got.len(), 10);
    eventually(
        Duration::from_secs(10),
        "the departed subscriber to be forgotten",
        || async { Ok((stub.status().await?.subscribers == 0).then_some(())) },
    )
    .await?;
    Ok(())
}

/// `aviary-sensors ARGS` must exit 64 with `part` on stderr.
fn refused_at_start(args: &[&str], part: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new(aviary_tests::bin("aviary-sensors")?)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(stderr.contains(part), "{args:?}: {stderr}");
    Ok(())
}

#[test]
fn malformed_recordings_and_absurd_rates_stop_the_stub_naming_the_spot() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let header = "Timestamp (us),Gyroscope X (deg/s),Gyroscope Y (deg/s),Gyroscope Z (deg/s),Accelerometer X (g),Accelerometer Y (g),Accelerometer Z (g)\n";
    for (name, body, part) in [
        (
            "missing.csv",
            "0,1,2,3,4,5,6\n20,1,2,3,4,5\n",
            "missing.csv:3:7: expected 7 columns",
        ),
        (
            "text.csv",
            "0,1,2,3,4,5,6\n20,1,two,3,4,5,6\n",
            "text.csv:3:3: `two` is not a number",
        ),
        (
            "unsorted.csv",
            "0,1,2,3,4,5,6\n40,1,2,3,4,5,6\n20,1,2,3,4,5,6\n",
            "unsorted.csv:4:1: timestamp 20 is not after the one on line 3",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{header}{body}"))?;
        refused_at_start(
            &["--mode", "replay", "--file", &path.to_string_lossy()],
            part,
        )?;
    }
    // Issue 11: `--file /dev/zero` grew the stub without bound.
    refused_at_start(
        &["--mode", "replay", "--file", "/dev/zero"],
        "/dev/zero: larger than 268435456 bytes",
    )?;
    refused_at_start(&["--mode", "synthetic", "--rate-hz", "0"], "--rate-hz 0")?;
    refused_at_start(
        &["--mode", "synthetic", "--rate-hz", "5000000"],
        "at most 100000",
    )?;
    Ok(())
}

#[tokio::test]
async fn sigterm_ends_open_streams_with_unavailable_and_exits_cleanly() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let mut stub = SensorStub::start(&ws, &["--mode", "synthetic", "--rate-hz", "500"]).await?;
    let mut stream = stub
        .client()
        .await?
        .stream_imu(pb::StreamImuRequest::default())
        .await?
        .into_inner();
    stream.message().await?.context("first sample")?;
    let started = Instant::now();
    let status = stub.terminate().await?;
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}; log:\n{}",
        started.elapsed(),
        std::fs::read_to_string(&stub.log)?
    );
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => bail!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    Ok(())
}

#[tokio::test]
async fn with_certs_the_stub_serves_mtls_and_refuses_plaintext() -> anyhow::Result<()> {
    let ws = Workspace::new()?;
    let pki = ws.pki.dir.to_string_lossy().into_owned();
    let stub = SensorStub::start(
        &ws,
        &["--mode", "synthetic", "--speed", "0", "--certs", &pki],
    )
    .await?;
    let files = aviary_certs::TlsFiles {
        ca: ws.pki.dir.join("ca.pem"),
        cert: ws.pki.dir.join("admin.pem"),
        key: ws.pki.dir.join("admin.key"),
    };
    let channel = aviary_certs::Link::new(&format!("https://{}", stub.addr), &files)?
        .connect()
        .await?;
    let mut client = pb::sensor_stub_client::SensorStubClient::new(channel);
    let got = read_samples(&mut client, Default::default(), 5).await?;
    assert_eq!(got.len(), 5);
    // A plaintext client never gets a sample.
    let plain = tokio::time::timeout(Duration::from_secs(5), async {
        stub.client()
            .await?
            .get_status(pb::GetStatusRequest {})
            .await?;
        anyhow::Ok(())
    })
    .await;
    assert!(
        !matches!(plain, Ok(Ok(()))),
        "plaintext call succeeded against a TLS stub"
    );
    Ok(())
}
