//! A userspace TCP proxy for failure injection (there is no `tc netem` here): pass
//! traffic, delay it (a long path: every byte arrives a fixed time after it was sent, in
//! order, without limiting throughput), throttle it (a slow uplink), blackhole it (both
//! directions stop, sockets stay open: a silent peer), or cut every connection (a peer
//! that vanishes mid-transfer).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Hold every byte; connections stay open (a blackhole).
    Freeze,
    /// Deliver every byte this long after it was read, each way.
    Latency(std::time::Duration),
    /// Forward at most this many bytes per second each way (a slow uplink).
    Throttle(u32),
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    cut: Arc<watch::Sender<u64>>,
    _tasks: JoinSet<()>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let cut = Arc::new(watch::Sender::new(0u64));
        let mut tasks = JoinSet::new();
        let (m, c) = (mode.clone(), cut.clone());
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let cut_rx = c.subscribe();
                conns.spawn(pipe(ri, wo, m.subscribe(), cut_rx.clone()));
                conns.spawn(pipe(ro, wi, m.subscribe(), cut_rx));
            }
        });
        Ok(Proxy {
            addr,
            mode,
            cut,
            _tasks: tasks,
        })
    }

    /// Switches every connection, existing and new, to `mode`.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every current connection; later ones pass as the mode says.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// One direction of a connection: a reader stamps each chunk with when it may be
/// delivered, a writer delivers in order at that time (so latency adds delay, not a
/// throughput cap), and both honour freezes, throttles and cuts.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    mut cut: watch::Receiver<u64>,
) {
    cut.mark_unchanged();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let mut cut_w = cut.clone();
    let writer = async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::select! {
                _ = cut_w.changed() => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if *mode.borrow_and_update() == Mode::Freeze {
                tokio::select! {
                    _ = cut.changed() => return,
                    r = mode.changed() => if r.is_err() { return } else { continue },
                }
            }
            let n = tokio::select! {
                _ = cut.changed() => return,
                _ = mode.changed() => continue,
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
            };
            let current = *mode.borrow();
            let delay = match current {
                Mode::Latency(d) => d,
                _ => std::time::Duration::ZERO,
            };
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
            if let Mode::Throttle(rate) = current {
                let pause = std::time::Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
                tokio::select! {
                    _ = cut.changed() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    };
    // The reader ends at EOF, a cut or a closed writer; the writer delivers what is
    // queued unless cut, then both halves drop and the sockets close.
    tokio::join!(writer, reader);
}
