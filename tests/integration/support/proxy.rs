//! A TCP proxy between a node and its broker, for faults the broker itself
//! must not suffer (other tests share it): cut every connection, or stall
//! them (stop forwarding, keep the sockets open), then restore.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with the bytes it is handed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    /// Every connection is closed, and new ones are closed as they come.
    Cut,
    /// Nothing is forwarded, nothing is closed: a network that went silent.
    Stall,
}

pub struct Proxy {
    port: u16,
    target_url: String,
    mode: watch::Sender<Mode>,
    accepting: JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port to the broker at `target_url`.
    pub async fn start(target_url: &str) -> Proxy {
        let target = broker_address(target_url);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = watch::Sender::new(Mode::Forward);
        let accepting = tokio::spawn({
            let mode = mode.clone();
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if *mode.borrow() == Mode::Cut {
                        continue;
                    }
                    tokio::spawn(relay(inbound, target, mode.subscribe()));
                }
            }
        });
        Proxy {
            port,
            target_url: target_url.to_owned(),
            mode,
            accepting,
        }
    }

    /// The broker URL, through the proxy.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&self.target_url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }

    /// Closes every connection, and every new one until [`Proxy::restore`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Stops forwarding without closing anything.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Forwards again (what was held during a stall goes through).
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.mode.send_replace(Mode::Cut);
    }
}

/// The broker's socket address, from its URL.
fn broker_address(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).unwrap();
    let host = match url.host_str() {
        Some("localhost") | None => "127.0.0.1",
        Some(host) => host,
    };
    format!("{host}:{}", url.port().unwrap_or(5672))
        .parse()
        .expect("the tests' broker is at an IP address or localhost")
}

/// Relays one connection both ways until either side closes or the proxy
/// is cut; then closes both.
async fn relay(inbound: TcpStream, target: SocketAddr, mode: watch::Receiver<Mode>) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (from_client, to_client) = inbound.into_split();
    let (from_broker, to_broker) = outbound.into_split();
    tokio::select! {
        () = pipe(from_client, to_broker, mode.clone()) => {}
        () = pipe(from_broker, to_client, mode) => {}
    }
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut mode: watch::Receiver<Mode>) {
    let mut buffer = vec![0; 64 << 10];
    loop {
        let Ok(now) = mode
            .wait_for(|mode| *mode != Mode::Stall)
            .await
            .map(|mode| *mode)
        else {
            return;
        };
        if now == Mode::Cut {
            return;
        }
        tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // A stall or cut that comes mid-write applies to the next read.
                    if to.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = mode.changed() => if changed.is_err() {
                return;
            },
        }
    }
}
