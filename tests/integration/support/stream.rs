//! A stream of calls, as a busy caller makes them while a fault happens,
//! recorded so that a test can check afterwards that every call was
//! answered, and answered right.
//!
//! Each worker calls `fib` with its own client and waits for the reply
//! before its next call. A worker whose connection dies (its broker
//! restarted) records the calls it lost with it and connects again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wasmrpc::amqp::Brokers;
use wasmrpc::client::{Client, ClientError};

use super::oracle;

/// What became of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The right answer.
    Right,
    /// An answer, and a wrong one.
    Wrong(String),
    /// No reply within the call's timeout.
    NoReply,
    /// The caller's own connection died while it waited: its direct
    /// reply-to went with it.
    CallerLost(String),
}

#[derive(Clone, Debug)]
pub struct Call {
    pub issued: Instant,
    pub done: Instant,
    pub outcome: Outcome,
}

pub struct CallStream {
    stop: CancellationToken,
    workers: Vec<JoinHandle<()>>,
    calls: Arc<Mutex<Vec<Call>>>,
    right: watch::Receiver<usize>,
}

impl CallStream {
    /// Starts `workers` callers of module `fib` on `exchange`, each waiting
    /// up to `timeout` for a reply.
    pub fn start(
        brokers: Brokers,
        exchange: &str,
        workers: usize,
        timeout: Duration,
    ) -> CallStream {
        let stop = CancellationToken::new();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let right = watch::Sender::new(0usize);
        let workers = (0..workers)
            .map(|worker| {
                let (stop, calls, right) = (stop.clone(), calls.clone(), right.clone());
                let (brokers, exchange) = (brokers.clone(), exchange.to_owned());
                tokio::spawn(async move {
                    let mut client = None;
                    let mut n = worker as u32;
                    while !stop.is_cancelled() {
                        let Some(caller) = &client else {
                            client = connect(&brokers, &exchange, &stop).await;
                            continue;
                        };
                        n = (n + 7) % 90;
                        let issued = Instant::now();
                        let reply = caller.call("fib", n.to_string().as_bytes(), timeout).await;
                        let outcome = match reply {
                            Ok(reply)
                                if reply.error.is_none()
                                    && reply.body == oracle::fib_decimal(n).as_bytes() =>
                            {
                                Outcome::Right
                            }
                            Ok(reply) => Outcome::Wrong(format!(
                                "{:?}: {}",
                                reply.error,
                                String::from_utf8_lossy(&reply.body)
                            )),
                            Err(ClientError::Timeout(_)) => Outcome::NoReply,
                            Err(error) => {
                                client = None;
                                Outcome::CallerLost(error.to_string())
                            }
                        };
                        if outcome == Outcome::Right {
                            right.send_modify(|right| *right += 1);
                        }
                        calls.lock().unwrap().push(Call {
                            issued,
                            done: Instant::now(),
                            outcome,
                        });
                    }
                })
            })
            .collect();
        CallStream {
            stop,
            workers,
            right: right.subscribe(),
            calls,
        }
    }

    /// Waits until `more` calls have been answered right from now on.
    pub async fn answered(&self, more: usize, within: Duration) {
        let mut right = self.right.clone();
        let target = *right.borrow() + more;
        tokio::time::timeout(within, right.wait_for(|&n| n >= target))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{more} more calls were not answered within {within:?}; calls so far: {}",
                    summary(&self.calls.lock().unwrap())
                )
            })
            .unwrap();
    }

    /// Stops issuing calls, waits for those in flight, and returns them all.
    pub async fn finish(self) -> Vec<Call> {
        self.stop.cancel();
        for worker in self.workers {
            worker.await.unwrap();
        }
        Arc::try_unwrap(self.calls).unwrap().into_inner().unwrap()
    }
}

async fn connect(brokers: &Brokers, exchange: &str, stop: &CancellationToken) -> Option<Client> {
    loop {
        if let Ok(client) = Client::connect(brokers, exchange).await {
            return Some(client);
        }
        // The broker is away: try again shortly, until the test stops.
        let pause = tokio::time::sleep(Duration::from_millis(100));
        stop.run_until_cancelled(pause).await?;
    }
}

/// Counts of each outcome, for messages.
pub fn summary(calls: &[Call]) -> String {
    let count =
        |pick: fn(&Outcome) -> bool| calls.iter().filter(|call| pick(&call.outcome)).count();
    format!(
        "{} calls: {} right, {} wrong, {} unanswered, {} lost with their caller's connection",
        calls.len(),
        count(|o| *o == Outcome::Right),
        count(|o| matches!(o, Outcome::Wrong(_))),
        count(|o| *o == Outcome::NoReply),
        count(|o| matches!(o, Outcome::CallerLost(_))),
    )
}
