//! Telling the broker what became of each delivery: the one place in the
//! node that acks, requeues or rejects.
//!
//! A channel's deliveries are settled through one [`Settler`]: each delivery
//! becomes a [`Ticket`] when it arrives, and settling the ticket (once: it
//! is consumed) only notes the settlement. The settler's task, whenever it
//! wakes, says everything noted so far in as few frames as exactness allows:
//! one `basic.ack` with `multiple` for the longest run of tags, from the
//! lowest not yet settled, whose every delivery is settled; a single ack for
//! each other acked delivery (held acks would eat the prefetch while a slow
//! request runs); and every nack and reject alone and first, so a multiple
//! ack never covers a delivery that was to go back or be set aside. Under
//! load the tasks of many requests finish between two wakes, and one frame
//! settles them all instead of a frame, a lapin RPC task and two wakes of
//! its I/O thread each.
//!
//! A lost session settles nothing: its settler stops at once, and the broker
//! hands out again whatever the channel held unsettled.
//!
//! No task can leak a delivery: a ticket dropped unsettled while its session
//! lives (its task panicked, or returned early by mistake) returns the
//! delivery to its queue with `basic.reject`, which RabbitMQ counts as a
//! failed delivery, so the queue's delivery limit still ends a request that
//! kills every task it reaches.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the broker is told about a delivery once its reply is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Done: the broker forgets it.
    Ack,
    /// Not done here: back to its queue, for this node or another.
    Requeue,
    /// Never to be run again: the queue dead-letters it (or drops it, if
    /// the queue has no dead-letter exchange).
    DeadLetter,
}

/// One channel's settler: where its deliveries become [`Ticket`]s.
pub(crate) struct Settler {
    notes: mpsc::UnboundedSender<Note>,
    task: JoinHandle<()>,
}

/// The promise to settle one delivery, kept by whoever handles it. Settling
/// consumes it, so a delivery cannot be settled twice (which the broker
/// answers by closing the channel). A task whose session is lost gives it up
/// ([`Ticket::abandon`]); dropping it unsettled otherwise is a bug, which
/// the drop logs and survives by returning the delivery to its queue.
#[derive(Debug)]
pub(crate) struct Ticket {
    tag: u64,
    notes: mpsc::UnboundedSender<Note>,
    /// Settled or abandoned: nothing left to do when dropped.
    done: bool,
}

#[derive(Debug)]
enum Note {
    Arrived(u64),
    Settled(u64, Settlement),
    /// Dropped unsettled: back to its queue, counted as a failed delivery.
    Dropped(u64),
    /// Answered once everything noted before has been said.
    Flush(oneshot::Sender<()>),
}

impl Settler {
    /// Starts settling `channel`'s deliveries, until every handle to this
    /// settler is gone (then it says what is left and ends) or `lost` is
    /// cancelled (then it ends at once, saying nothing more).
    pub(crate) fn start(channel: Channel, lost: CancellationToken) -> Settler {
        let (notes, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(channel, received, lost));
        Settler { notes, task }
    }

    /// The ticket of a delivery that has just arrived on the channel.
    pub(crate) fn ticket(&self, tag: u64) -> Ticket {
        // A send fails only once the settler has ended with its session;
        // the ticket then settles nothing, which is what a lost session does.
        let _ = self.notes.send(Note::Arrived(tag));
        Ticket {
            tag,
            notes: self.notes.clone(),
            done: false,
        }
    }

    /// Waits until every settlement noted so far has been said to the
    /// broker (or the session is lost): before anything that must see the
    /// queue as those settlements leave it.
    pub(crate) async fn flushed(&self) {
        let (done, said) = oneshot::channel();
        if self.notes.send(Note::Flush(done)).is_ok() {
            let _ = said.await;
        }
    }

    /// Waits until what was settled has been said to the broker, once every
    /// ticket is settled or dropped (up to `patience`): before a channel is
    /// closed, or its settlements would be lost with it.
    pub(crate) async fn finish(self, patience: Duration) {
        let Settler { notes, task } = self;
        drop(notes);
        if tokio::time::timeout(patience, task).await.is_err() {
            tracing::warn!(
                "settling the channel's last deliveries took too long: the broker hands them out again"
            );
        }
    }
}

impl Ticket {
    pub(crate) fn settle(mut self, settlement: Settlement) {
        self.done = true;
        let _ = self.notes.send(Note::Settled(self.tag, settlement));
    }

    /// Gives the delivery up because its session is lost: the broker hands
    /// it out again by itself, and nothing can be said on the channel.
    pub(crate) fn abandon(mut self) {
        self.done = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A closed settler has ended with its session: nothing to say.
        if self.done || self.notes.is_closed() {
            return;
        }
        tracing::error!(
            delivery_tag = self.tag,
            "a delivery's task ended without settling it (a bug: did it panic?): \
             returning the delivery to its queue"
        );
        let _ = self.notes.send(Note::Dropped(self.tag));
    }
}

async fn run(channel: Channel, mut notes: mpsc::UnboundedReceiver<Note>, lost: CancellationToken) {
    let mut ledger = Ledger::default();
    let mut batch = Vec::with_capacity(256);
    let mut frames = Vec::with_capacity(16);
    let mut flushes = Vec::new();
    loop {
        let received = tokio::select! {
            biased;
            () = lost.cancelled() => return,
            received = notes.recv_many(&mut batch, 1024) => received,
        };
        if received == 0 {
            return;
        }
        for note in batch.drain(..) {
            match note {
                Note::Arrived(tag) => ledger.arrived(tag),
                Note::Settled(tag, settlement) => ledger.settled(tag, settlement, &mut frames),
                Note::Dropped(tag) => ledger.dropped(tag, &mut frames),
                Note::Flush(done) => flushes.push(done),
            }
        }
        ledger.due(&mut frames);
        for frame in frames.drain(..) {
            if lost.is_cancelled() {
                return;
            }
            if let Err(error) = send(&channel, frame).await {
                // The channel is gone (the session is lost, or about to be
                // noticed lost): the broker has the deliveries back already.
                tracing::debug!(
                    ?frame,
                    "cannot settle: {error}; the broker hands the deliveries out again"
                );
                return;
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn send(channel: &Channel, frame: Frame) -> lapin::Result<()> {
    // A request set aside is rejected, one given back is nacked: from
    // RabbitMQ 4.3, `basic.reject` counts as a failed delivery (the quorum
    // queue's delivery limit counts those) and dead-letters when it does not
    // requeue, while a `basic.nack` that does not requeue may requeue anyway
    // ("undeliverable here"), and one that requeues counts nothing.
    match frame {
        Frame::Ack { tag, multiple } => channel.basic_ack(tag, BasicAckOptions { multiple }).await,
        Frame::Requeue(tag) => {
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            channel.basic_nack(tag, options).await
        }
        Frame::Reject(tag) => {
            channel
                .basic_reject(tag, BasicRejectOptions { requeue: false })
                .await
        }
        Frame::Fail(tag) => {
            channel
                .basic_reject(tag, BasicRejectOptions { requeue: true })
                .await
        }
    }
}

/// A settling frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Ack {
        tag: u64,
        multiple: bool,
    },
    Requeue(u64),
    Reject(u64),
    /// Requeued as a failed delivery: a ticket dropped unsettled.
    Fail(u64),
}

/// Which of a channel's deliveries are settled, and which frames say so.
#[derive(Debug, Default)]
struct Ledger {
    /// Every tag up to this one is settled (tags count from 1 on a channel).
    floor: u64,
    /// Tags above the floor that arrived, and what became of each.
    open: BTreeMap<u64, Held>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// Its handling goes on.
    Running,
    /// To be acked.
    Acked,
    /// Said to the broker already, alone.
    Said,
}

impl Ledger {
    fn arrived(&mut self, tag: u64) {
        if tag > self.floor {
            self.open.insert(tag, Held::Running);
        }
    }

    /// Notes a settlement; a nack or reject is said at once, alone.
    fn settled(&mut self, tag: u64, settlement: Settlement, frames: &mut Vec<Frame>) {
        let held = match self.open.get_mut(&tag) {
            Some(held @ Held::Running) => held,
            _ => {
                // Unreachable while tickets are settled once: saying it
                // again would close the channel.
                tracing::error!(tag, "a delivery settled twice, or never seen: ignored");
                return;
            }
        };
        match settlement {
            Settlement::Ack => *held = Held::Acked,
            Settlement::Requeue => {
                *held = Held::Said;
                frames.push(Frame::Requeue(tag));
            }
            Settlement::DeadLetter => {
                *held = Held::Said;
                frames.push(Frame::Reject(tag));
            }
        }
    }

    /// Notes a ticket dropped unsettled: its delivery goes back at once,
    /// alone, as a failure.
    fn dropped(&mut self, tag: u64, frames: &mut Vec<Frame>) {
        if let Some(held @ Held::Running) = self.open.get_mut(&tag) {
            *held = Held::Said;
            frames.push(Frame::Fail(tag));
        }
    }

    /// The acks that are due now: one with `multiple` for the run of settled
    /// tags above the floor, one alone for every other acked delivery.
    fn due(&mut self, frames: &mut Vec<Frame>) {
        let mut top = None;
        let mut run = 0;
        while let Some(entry) = self.open.first_entry() {
            if *entry.key() != self.floor + 1 || *entry.get() == Held::Running {
                break;
            }
            if *entry.get() == Held::Acked {
                top = Some(*entry.key());
                run += 1;
            }
            self.floor = *entry.key();
            entry.remove();
        }
        if let Some(tag) = top {
            frames.push(Frame::Ack {
                tag,
                multiple: run > 1,
            });
        }
        // Above a delivery still running (or a tag not seen yet), a
        // multiple ack would settle what it must not: these go alone.
        for (&tag, held) in self.open.iter_mut() {
            if *held == Held::Acked {
                *held = Held::Said;
                frames.push(Frame::Ack {
                    tag,
                    multiple: false,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(arrived: impl IntoIterator<Item = u64>) -> Ledger {
        let mut ledger = Ledger::default();
        for tag in arrived {
            ledger.arrived(tag);
        }
        ledger
    }

    fn wake(ledger: &mut Ledger, settled: &[(u64, Settlement)]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for &(tag, settlement) in settled {
            ledger.settled(tag, settlement, &mut frames);
        }
        ledger.due(&mut frames);
        frames
    }

    const ACK: Settlement = Settlement::Ack;

    /// An ack of `tag` alone.
    fn one(tag: u64) -> Frame {
        Frame::Ack {
            tag,
            multiple: false,
        }
    }

    /// An ack of every tag up to `tag`.
    fn upto(tag: u64) -> Frame {
        Frame::Ack {
            tag,
            multiple: true,
        }
    }

    /// A queue of its own on the test broker, holding `bodies`, and a
    /// channel consuming it with acks.
    async fn consuming(bodies: &[&str]) -> (lapin::Connection, Channel, String, lapin::Consumer) {
        use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
        use lapin::types::FieldTable;
        let url = std::env::var("AMQP_URL").unwrap_or_else(|_| crate::amqp::DEFAULT_URL.into());
        let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .expect("the test broker");
        let channel = connection.create_channel().await.unwrap();
        let queue = format!("wasmrpc-test-settler-{}", uuid::Uuid::new_v4().simple());
        // Exclusive: the queue is this connection's alone, and goes with it.
        let options = QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
            .unwrap();
        for body in bodies {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    lapin::BasicProperties::default(),
                )
                .await
                .unwrap();
        }
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "settler-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (connection, channel, queue, consumer)
    }

    /// What is left in `queue` once the consuming channel is closed (the
    /// broker then requeues whatever it held unsettled).
    async fn left_after_closing(
        connection: &lapin::Connection,
        channel: Channel,
        queue: &str,
    ) -> u32 {
        use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
        channel.close(200, "done".into()).await.unwrap();
        let look = connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let left = look
            .queue_declare(queue.into(), passive, Default::default())
            .await
            .unwrap()
            .message_count();
        look.queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        left
    }

    #[tokio::test]
    async fn a_failed_delivery_between_acked_ones_settles_each_once_on_the_broker() {
        use tokio_stream::StreamExt as _;
        let (connection, channel, queue, mut consumer) =
            consuming(&["ok", "set aside", "ok", "back", "ok"]).await;
        let settler = Settler::start(channel.clone(), CancellationToken::new());
        let mut tickets = Vec::new();
        for _ in 0..5 {
            let delivery = consumer.next().await.unwrap().unwrap();
            let ticket = settler.ticket(delivery.delivery_tag);
            let settlement = match delivery.data.as_slice() {
                b"set aside" => Settlement::DeadLetter,
                b"back" => Settlement::Requeue,
                _ => ACK,
            };
            tickets.push((ticket, settlement));
        }
        // The requeued one comes straight back (to this consumer): it is
        // acked in its turn, the sixth delivery.
        for (ticket, settlement) in tickets.into_iter().rev() {
            ticket.settle(settlement);
        }
        let again = consumer.next().await.unwrap().unwrap();
        assert_eq!(again.data, b"back");
        assert!(again.redelivered);
        settler.ticket(again.delivery_tag).settle(ACK);
        settler.finish(Duration::from_secs(5)).await;
        // A double settlement would have closed the channel (406).
        assert!(channel.status().connected(), "{:?}", channel.status());
        assert_eq!(left_after_closing(&connection, channel, &queue).await, 0);
    }

    #[tokio::test]
    async fn a_lost_session_settles_nothing() {
        use tokio_stream::StreamExt as _;
        let (connection, channel, queue, mut consumer) = consuming(&["a", "b", "c"]).await;
        let lost = CancellationToken::new();
        let settler = Settler::start(channel.clone(), lost.clone());
        let mut tickets = Vec::new();
        for _ in 0..3 {
            let delivery = consumer.next().await.unwrap().unwrap();
            tickets.push(settler.ticket(delivery.delivery_tag));
        }
        lost.cancel();
        for ticket in tickets {
            ticket.settle(ACK);
        }
        settler.finish(Duration::from_secs(5)).await;
        assert_eq!(left_after_closing(&connection, channel, &queue).await, 3);
    }

    #[tokio::test]
    async fn a_ticket_dropped_by_a_panicking_task_returns_its_delivery() {
        use tokio_stream::StreamExt as _;
        let (connection, channel, queue, mut consumer) = consuming(&["boom", "ok"]).await;
        let settler = Settler::start(channel.clone(), CancellationToken::new());
        for _ in 0..2 {
            let delivery = consumer.next().await.unwrap().unwrap();
            let ticket = settler.ticket(delivery.delivery_tag);
            let task = tokio::spawn(async move {
                assert_ne!(delivery.data, b"boom", "the task panics on purpose");
                ticket.settle(ACK);
            });
            let _ = task.await;
        }
        // The panicking task's delivery comes back, redelivered.
        let again = consumer.next().await.unwrap().unwrap();
        assert_eq!(again.data, b"boom");
        assert!(again.redelivered);
        settler.ticket(again.delivery_tag).settle(ACK);
        settler.finish(Duration::from_secs(5)).await;
        assert!(channel.status().connected(), "{:?}", channel.status());
        assert_eq!(left_after_closing(&connection, channel, &queue).await, 0);
    }

    #[test]
    fn a_dropped_ticket_is_said_alone_and_first() {
        let mut ledger = ledger(1..=3);
        let mut frames = Vec::new();
        ledger.settled(1, ACK, &mut frames);
        ledger.dropped(2, &mut frames);
        ledger.settled(3, ACK, &mut frames);
        ledger.due(&mut frames);
        assert_eq!(frames, [Frame::Fail(2), upto(3)]);
    }

    #[test]
    fn a_run_of_acks_is_one_frame() {
        let mut ledger = ledger(1..=5);
        let frames = wake(
            &mut ledger,
            &[(3, ACK), (1, ACK), (2, ACK), (5, ACK), (4, ACK)],
        );
        assert_eq!(frames, [upto(5)]);
        assert!(ledger.open.is_empty());
        assert_eq!(ledger.floor, 5);
    }

    #[test]
    fn a_lone_ack_is_not_multiple() {
        let mut ledger = ledger([1]);
        assert_eq!(wake(&mut ledger, &[(1, ACK)]), [one(1)]);
    }

    #[test]
    fn acks_above_a_running_delivery_go_alone_and_are_not_said_again() {
        let mut ledger = ledger(1..=4);
        let frames = wake(&mut ledger, &[(1, ACK), (3, ACK), (4, ACK)]);
        assert_eq!(frames, [one(1), one(3), one(4)]);
        // 2 ends: nothing above it is said twice.
        assert_eq!(wake(&mut ledger, &[(2, ACK)]), [one(2)]);
        assert!(ledger.open.is_empty());
        assert_eq!(ledger.floor, 4);
    }

    #[test]
    fn a_failed_delivery_between_acked_ones_is_said_alone_and_first() {
        let mut ledger = ledger(1..=5);
        let frames = wake(
            &mut ledger,
            &[
                (1, ACK),
                (2, Settlement::DeadLetter),
                (3, ACK),
                (4, Settlement::Requeue),
                (5, ACK),
            ],
        );
        assert_eq!(frames, [Frame::Reject(2), Frame::Requeue(4), upto(5),]);
    }

    #[test]
    fn a_tag_not_seen_yet_stops_the_run() {
        // Deliveries of two consumers on one channel may be seen out of
        // order: 2 has not arrived here, so an ack of 3 must not cover it.
        let mut ledger = ledger([1, 3]);
        let frames = wake(&mut ledger, &[(1, ACK), (3, ACK)]);
        assert_eq!(frames, [one(1), one(3),]);
        ledger.arrived(2);
        ledger.arrived(4);
        ledger.arrived(5);
        let frames = wake(&mut ledger, &[(4, ACK), (2, ACK), (5, ACK)]);
        assert_eq!(frames, [upto(5)]);
    }

    #[test]
    fn a_second_settlement_is_ignored() {
        let mut ledger = ledger([1, 2]);
        assert_eq!(
            wake(&mut ledger, &[(1, Settlement::Requeue), (1, ACK)]),
            [Frame::Requeue(1)]
        );
        assert_eq!(wake(&mut ledger, &[(2, ACK), (2, ACK)]), [one(2)]);
        assert!(wake(&mut ledger, &[(2, ACK), (7, ACK)]).is_empty());
    }

    #[test]
    fn every_delivery_is_settled_exactly_once_whatever_the_order() {
        // Random arrival and settlement orders: each tag is covered by
        // exactly one frame, and a multiple ack covers only acked tags.
        for seed in 0..500 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let n = rng.u64(1..40);
            let mut arrivals: Vec<u64> = (1..=n).collect();
            // Arrivals are nearly in order: swap a few neighbours.
            for _ in 0..rng.usize(0..4) {
                let i = rng.usize(0..arrivals.len());
                if i + 1 < arrivals.len() {
                    arrivals.swap(i, i + 1);
                }
            }
            let fate: Vec<Settlement> = (0..=n)
                .map(|_| match rng.u8(0..10) {
                    0 => Settlement::Requeue,
                    1 => Settlement::DeadLetter,
                    _ => ACK,
                })
                .collect();
            let mut order = arrivals.clone();
            rng.shuffle(&mut order);
            let mut ledger = Ledger::default();
            let mut said: BTreeMap<u64, Settlement> = BTreeMap::new();
            let mut pending_arrivals = arrivals.into_iter();
            let mut settled = Vec::new();
            for tag in order {
                // Every tag arrives before it settles; others arrive meanwhile.
                while !ledger.open.contains_key(&tag) && tag > ledger.floor {
                    let next = pending_arrivals.next().expect("the tag arrives");
                    ledger.arrived(next);
                }
                settled.push((tag, fate[tag as usize]));
                if rng.bool() {
                    for frame in wake(&mut ledger, &settled) {
                        cover(&mut said, frame, &fate);
                    }
                    settled.clear();
                }
            }
            for frame in wake(&mut ledger, &settled) {
                cover(&mut said, frame, &fate);
            }
            assert_eq!(said.len() as u64, n, "seed {seed}: {said:?}");
            for (tag, settlement) in said {
                assert_eq!(settlement, fate[tag as usize], "seed {seed}, tag {tag}");
            }
        }

        fn cover(said: &mut BTreeMap<u64, Settlement>, frame: Frame, fate: &[Settlement]) {
            fn once(said: &mut BTreeMap<u64, Settlement>, tag: u64, settlement: Settlement) {
                assert!(
                    said.insert(tag, settlement).is_none(),
                    "tag {tag} settled twice"
                );
            }
            match frame {
                Frame::Requeue(tag) => once(said, tag, Settlement::Requeue),
                Frame::Reject(tag) => once(said, tag, Settlement::DeadLetter),
                Frame::Fail(tag) => panic!("tag {tag} dropped: no ticket is, here"),
                Frame::Ack {
                    tag,
                    multiple: false,
                } => once(said, tag, ACK),
                Frame::Ack {
                    tag,
                    multiple: true,
                } => {
                    // What the broker does: every tag up to `tag` not yet settled.
                    let open: Vec<u64> = (1..=tag).filter(|t| !said.contains_key(t)).collect();
                    for t in open {
                        assert_eq!(fate[t as usize], ACK, "a multiple ack covered tag {t}");
                        once(said, t, ACK);
                    }
                }
            }
        }
    }
}
