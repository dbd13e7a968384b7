//! A TCP fault proxy between a client and a broker, on a loopback port of the test's own.
//!
//! It forwards bytes both ways; [`Proxy::stall`] stops forwarding (a partition: TCP keeps what
//! it was sent, and delivers it when the partition heals, unless an end gave up first); and a
//! [`Drop`] filter removes some of the broker's publish confirms, whole frames, on their way to
//! the client: JetStream PubAcks (`MSG` frames whose payload is `{"stream":…}`, except those of
//! a duplicate), or AMQP `basic.ack` method frames (which a broker sends only to confirm).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Which confirms the proxy removes: every `every`-th one.
#[derive(Debug, Clone, Copy)]
pub enum Drop {
    /// None.
    Nothing,
    /// JetStream PubAcks of new messages (a duplicate's always passes, so a retried publish
    /// is confirmed).
    NatsPubAcks { every: u64 },
    /// AMQP publisher confirms.
    AmqpConfirms { every: u64 },
}

/// A running proxy; it stops with the test.
pub struct Proxy {
    pub addr: SocketAddr,
    stalled: watch::Sender<bool>,
    dropping: watch::Sender<bool>,
    /// Confirms removed so far.
    pub dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl std::ops::Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// A proxy to `upstream` (`host:port`) removing the confirms `drop` names.
    pub async fn start(upstream: &str, drop: Drop) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
        let addr = listener.local_addr().expect("proxy addr");
        let (stalled, _) = watch::channel(false);
        let (dropping, _) = watch::channel(true);
        let dropped = Arc::new(AtomicU64::new(0));
        let (upstream, tx, count) = (upstream.to_string(), stalled.clone(), dropped.clone());
        let on = dropping.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, tx.subscribe(), None));
                let filter = Filter::new(drop, on.subscribe(), count.clone());
                tokio::spawn(pump(sr, cw, tx.subscribe(), Some(filter)));
            }
        });
        Proxy {
            addr,
            stalled,
            dropping,
            dropped,
            task,
        }
    }

    /// Stops (`true`) or resumes (`false`) forwarding, on every connection, new ones too.
    pub fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }

    /// Forwarding is stopped.
    pub fn is_stalled(&self) -> bool {
        *self.stalled.borrow()
    }

    /// Removes the confirms its [`Drop`] names (`true`, from the start) or none (`false`), from
    /// now on, on every connection.
    pub fn set_dropping(&self, on: bool) {
        self.dropping.send_replace(on);
    }
}

/// Copies `from` to `to`, holding while stalled, through `filter` if any.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
    mut filter: Option<Filter>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = stalled.changed() => continue,
        };
        let out = match &mut filter {
            Some(f) => f.pass(&buf[..n]),
            None => buf[..n].to_vec(),
        };
        // A partition that starts now holds what was read, as TCP would.
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Reassembles the broker's frames and removes the chosen confirms.
struct Filter {
    drop: Drop,
    on: watch::Receiver<bool>,
    pending: Vec<u8>,
    confirms: u64,
    dropped: Arc<AtomicU64>,
}

impl Filter {
    fn new(drop: Drop, on: watch::Receiver<bool>, dropped: Arc<AtomicU64>) -> Filter {
        Filter {
            drop,
            on,
            pending: Vec::new(),
            confirms: 0,
            dropped,
        }
    }

    /// What of `bytes` (and what was held before) goes on: whole frames, less the removed ones.
    fn pass(&mut self, bytes: &[u8]) -> Vec<u8> {
        let every = match self.drop {
            Drop::Nothing => return bytes.to_vec(),
            Drop::NatsPubAcks { every } | Drop::AmqpConfirms { every } => every.max(1),
        };
        let on = *self.on.borrow();
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut at = 0;
        while let Some((len, confirm)) = frame(self.drop, &self.pending[at..]) {
            let frame = &self.pending[at..at + len];
            let removed = confirm && on && {
                self.confirms += 1;
                self.confirms.is_multiple_of(every)
            };
            if removed {
                self.dropped.fetch_add(1, Ordering::SeqCst);
            } else {
                out.extend_from_slice(frame);
            }
            at += len;
        }
        self.pending.drain(..at);
        out
    }
}

/// The length of the whole frame at the start of `b`, and whether it is a confirm; `None` until
/// it has all arrived.
fn frame(framing: Drop, b: &[u8]) -> Option<(usize, bool)> {
    match framing {
        Drop::NatsPubAcks { .. } => nats_frame(b),
        Drop::AmqpConfirms { .. } => amqp_frame(b),
        Drop::Nothing => (!b.is_empty()).then_some((b.len(), false)),
    }
}

/// A NATS server frame: a control line, with a payload for `MSG` and `HMSG`.
fn nats_frame(b: &[u8]) -> Option<(usize, bool)> {
    let eol = b.windows(2).position(|w| w == b"\r\n")?;
    let Ok(line) = std::str::from_utf8(&b[..eol]) else {
        // Not a line of the protocol's: passed on as it is.
        return Some((eol + 2, false));
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let payload = match words.first().copied() {
        Some("MSG") => words.last()?.parse::<usize>().ok()?,
        Some("HMSG") => words.last()?.parse::<usize>().ok()?,
        _ => return Some((eol + 2, false)),
    };
    let len = eol + 2 + payload + 2;
    if b.len() < len {
        return None;
    }
    let body = &b[eol + 2..eol + 2 + payload];
    let text = String::from_utf8_lossy(body);
    let ack = words[0] == "MSG" && text.starts_with("{\"stream\":") && !text.contains("duplicate");
    Some((len, ack))
}

/// An AMQP frame: type, channel, size, payload, end octet.
fn amqp_frame(b: &[u8]) -> Option<(usize, bool)> {
    if b.len() < 7 {
        return None;
    }
    if b.starts_with(b"AMQP") {
        // A protocol header (the server's answer to a version it does not speak).
        return Some((b.len().min(8), false));
    }
    let size = u32::from_be_bytes([b[3], b[4], b[5], b[6]]) as usize;
    let len = 7 + size + 1;
    if b.len() < len {
        return None;
    }
    assert_eq!(b[len - 1], 0xCE, "the proxy lost the AMQP framing");
    const METHOD: u8 = 1;
    let basic_ack = b[0] == METHOD && size >= 4 && b[7..11] == [0, 60, 0, 80];
    Some((len, basic_ack))
}
