//! A TCP proxy on 127.0.0.1 between one member and Redis, with two faults under the test's
//! control: added latency per chunk, and a black hole that stops forwarding in both directions
//! without closing anything (data waits in the proxy and flows again when healed, as after a
//! partition that TCP retransmission survives).
//!
//! Each direction of a connection is a reader task and a writer task joined by a queue of
//! `(due, chunk)`: the reader stamps each chunk with its arrival time plus the latency, the writer
//! forwards it once due and not black-holed. So latency delays every chunk without throttling a
//! stream of them, and order is kept. An end of stream is queued like data, so a peer's close is
//! held back by the black hole too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

#[derive(Debug)]
struct Control {
    latency_us: AtomicU64,
    /// `true` while forwarding; `false` is the black hole.
    open: watch::Sender<bool>,
}

/// The running proxy; dropping it closes every connection.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    control: Arc<Control>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let listener = runtime
            .block_on(TcpListener::bind(("127.0.0.1", 0)))
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let control = Arc::new(Control {
            latency_us: AtomicU64::new(0),
            open: watch::Sender::new(true),
        });
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
        runtime.spawn(accept(listener, upstream, Arc::clone(&control)));
        Proxy {
            port,
            control,
            runtime: Some(runtime),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<proxy port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Delay added to every chunk, each direction.
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).expect("fits");
        self.control.latency_us.store(us, Ordering::SeqCst);
    }

    /// Stops forwarding, both directions; connections stay open.
    pub fn black_hole(&self) {
        self.control.open.send_replace(false);
    }

    /// Forwards again, starting with whatever waited.
    pub fn heal(&self) {
        self.control.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, control: Arc<Control>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            // Connecting is not forwarding: the client's handshake with us already succeeded,
            // as it would with a black hole in the network.
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, Arc::clone(&control)));
            tokio::spawn(pipe(sr, cw, control));
        });
    }
}

/// One direction: read chunks, forward each when due and not black-holed.
async fn pipe(
    mut from: impl AsyncRead + Unpin + Send + 'static,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    control: Arc<Control>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let latency = {
        let control = Arc::clone(&control);
        move || Duration::from_micros(control.latency_us.load(Ordering::SeqCst))
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let due = Instant::now() + latency();
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((due, chunk)).is_err() || n == 0 {
                return;
            }
        }
    });
    let mut open = control.open.subscribe();
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if open.wait_for(|open| *open).await.is_err() {
            return;
        }
        match chunk {
            Some(bytes) => {
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            None => {
                let _ = to.shutdown().await;
                return;
            }
        }
    }
}
