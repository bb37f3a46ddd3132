//! The gRPC listener's connections, bounded: at most `DMPAY_GRPC_CONNECTIONS_MAX` open
//! at once and `DMPAY_GRPC_CONNECTIONS_PER_IP_MAX` from one address, and each closed
//! when its client has sent nothing for `DMPAY_GRPC_IDLE_TIMEOUT`.
//!
//! Without these, every TCP connection a client opens and never uses stays open for
//! ever, each holding a socket, buffers and a task; a few thousand silent ones from one
//! host were enough to exhaust the process's file descriptors. A connection over the cap
//! is accepted and closed at once (so the kernel's backlog does not fill with it), and
//! counted. A healthy client is never idle that long: the server pings every
//! `DMPAY_GRPC_KEEPALIVE_INTERVAL` (HTTP/2 PING, which hyper closes the connection over
//! when it goes unanswered for `DMPAY_GRPC_KEEPALIVE_TIMEOUT`), and the client's answer
//! counts as activity; a client that never completes the HTTP/2 handshake, or a peer
//! that is gone, is. A client that completes the handshake and then only answers PINGs
//! holds its connection; the cap per address keeps one host from holding them all.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::telemetry::Metrics;

/// Accepted connections waiting for the server to take them.
const ACCEPT_QUEUE: usize = 128;

/// How the listener's connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open at once; more are closed as they come.
    pub open_max: usize,
    /// Open at once from one IP address (behind a load balancer, every connection comes
    /// from its addresses: set this as high as `open_max`).
    pub per_ip_max: usize,
    /// A connection whose client sent nothing for this long is closed.
    pub idle_timeout: Duration,
}

/// One accepted connection: the socket, its place among the open ones, and the time its
/// client last sent something.
pub struct Conn {
    stream: TcpStream,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _place: OwnedSemaphorePermit,
    peer: Option<(IpAddr, PerIp)>,
    metrics: Metrics,
}

/// Open connections per client address. A std mutex: held for a map update, never
/// across an await; an entry goes when its count reaches zero, so the map holds at most
/// as many addresses as there are open connections.
type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.counters().connections_open.fetch_sub(1, Relaxed);
        if let Some((ip, per_ip)) = &self.peer {
            let mut map = per_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = map.get_mut(ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(ip);
                }
            }
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let deadline = Instant::now() + self.idle_timeout;
                    self.idle.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.metrics.counters().connections_idle_closed.fetch_add(1, Relaxed);
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client sent nothing for too long")))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Connections the kernel completes and queues for `accept` (Linux caps it at
/// `net.core.somaxconn`). A reconnect storm (a chat backend's clients after a deploy)
/// overflows a short queue, and a client whose handshake the kernel dropped is only
/// accepted after SYN-ACK retransmissions, seconds later.
const ACCEPT_BACKLOG: u32 = 4096;

/// The gRPC listener on `addr`, with a deep accept queue.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Accepts connections on `listener` until the returned stream is dropped, within
/// `limits`.
pub fn incoming(listener: TcpListener, limits: ConnectionLimits, metrics: Metrics) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let places = Arc::new(Semaphore::new(limits.open_max));
    let per_ip: PerIp = Arc::default();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, addr) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ip = addr.ip();
            let admitted = {
                let mut map = per_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let n = map.entry(ip).or_insert(0);
                if *n >= limits.per_ip_max {
                    if *n == 0 {
                        map.remove(&ip);
                    }
                    None
                } else {
                    match places.clone().try_acquire_owned() {
                        Ok(place) => {
                            *n += 1;
                            Some(place)
                        }
                        Err(_) => {
                            if *n == 0 {
                                map.remove(&ip);
                            }
                            None
                        }
                    }
                }
            };
            let Some(place) = admitted else {
                metrics.counters().connections_refused.fetch_add(1, Relaxed);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            metrics.counters().connections_open.fetch_add(1, Relaxed);
            let conn = Conn {
                stream,
                idle_timeout: limits.idle_timeout,
                idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                _place: place,
                peer: Some((ip, per_ip.clone())),
                metrics: metrics.clone(),
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
