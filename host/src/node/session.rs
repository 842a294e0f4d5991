//! One broker session: everything a node holds on the broker while it is
//! connected (the connection, the consuming channel, one subscription per
//! module, the shared `unrouted` queue and its own control queue) and the
//! loop that serves them, handing each delivery to [`crate::request`] as a
//! task of its own.
//!
//! A session fails as a whole: when its connection or its consuming channel
//! fails, every subscription goes with it, the broker returns what the
//! session held unacked to the queues, and the node opens a new session that
//! declares everything again. Requests still running for a lost session are
//! dropped: they can no longer be acked, and the broker hands them out again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lapin::message::Delivery;
use lapin::options::BasicQosOptions;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::control;
use super::shared::Shared;
use super::subscriptions::{self, Source, Subscriptions};
use crate::amqp::{self, Brokers, ControlLimit};
use crate::names::ModuleName;
use crate::registry::Update;
use crate::request::{self, Context};
use crate::settler::{Settlement, Settler};
use crate::wire::request::Stamps;

/// How long declaring and subscribing may take once connected.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a session could not open.
#[derive(Debug)]
pub(super) enum OpenError {
    /// The broker is away, or went away meanwhile: try again.
    Transient(anyhow::Error),
    /// The broker refused this node's configuration: trying again cannot help.
    Permanent(anyhow::Error),
}

impl OpenError {
    pub fn cause(&self) -> &anyhow::Error {
        match self {
            OpenError::Transient(error) | OpenError::Permanent(error) => error,
        }
    }

    pub fn into_cause(self) -> anyhow::Error {
        match self {
            OpenError::Transient(error) | OpenError::Permanent(error) => error,
        }
    }

    fn classify(error: anyhow::Error) -> OpenError {
        if amqp::lapin_cause(&error).is_some_and(amqp::is_refusal) {
            OpenError::Permanent(error)
        } else {
            OpenError::Transient(error)
        }
    }
}

/// How a session's serving ended.
pub(super) enum SessionEnd {
    /// The node's shutdown signal came.
    Shutdown,
    /// The connection or the consuming channel failed.
    Lost(anyhow::Error),
}

pub(super) struct Session {
    /// Counts the node's sessions, from 1.
    pub number: u64,
    /// Which of the node's brokers it is connected to.
    pub broker: usize,
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    consume: Channel,
    /// The control queue's channel, with a prefetch of its own.
    control: Channel,
    /// Where the consuming channel's deliveries are settled.
    settler: Settler,
    /// Where the control channel's are.
    control_settler: Settler,
    subscriptions: Subscriptions,
    /// What this session's request tasks get.
    context: Arc<Context>,
}

impl Session {
    /// Connects to the first of `brokers` that answers, starting with the
    /// `first`th, declares the topology and subscribes to every module in the
    /// registry. When this returns, requests published to the exchange reach
    /// this node.
    pub async fn open(
        shared: &Arc<Shared>,
        brokers: &Brokers,
        first: usize,
        number: u64,
    ) -> Result<Session, OpenError> {
        let (connection, broker) = brokers
            .connect(first, &format!("wasmrpc node {}", shared.identity.id))
            .await
            .map_err(|error| {
                let permanent = error.is_permanent();
                let error = anyhow::Error::new(error);
                if permanent {
                    OpenError::Permanent(error)
                } else {
                    OpenError::Transient(error)
                }
            })?;
        let connection = Arc::new(connection);
        // What the broker stamps on redeliveries depends on its version: a
        // header it does not stamp may be a caller's.
        let version = brokers.get(broker).version().await;
        let stamps = Stamps::of_version(version.as_deref());
        // A broker that takes the connection and then answers nothing (one
        // shutting down, say) must not hold the node forever.
        let subscribed = tokio::time::timeout(
            OPEN_TIMEOUT,
            Session::subscribe(shared, &connection, number, (broker, stamps)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the broker did not complete the session's declarations within {} s",
                OPEN_TIMEOUT.as_secs()
            ))
        });
        match subscribed {
            Ok(session) => {
                tracing::info!(
                    node = %shared.identity.id,
                    session = number,
                    broker = %brokers.get(broker),
                    broker_version = version.as_deref().unwrap_or("unknown"),
                    exchange = %shared.identity.topology.exchange(),
                    modules = shared.modules.registry.names().len(),
                    concurrency = shared.identity.concurrency,
                    prefetch = shared.identity.prefetch,
                    "node ready"
                );
                Ok(session)
            }
            Err(error) => {
                let _ = connection
                    .close(200, "failed to open a session".into())
                    .await;
                Err(OpenError::classify(error))
            }
        }
    }

    async fn subscribe(
        shared: &Arc<Shared>,
        connection: &Arc<Connection>,
        number: u64,
        (broker, stamps): (usize, Stamps),
    ) -> anyhow::Result<Session> {
        let consume = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        consume
            .basic_qos(shared.identity.prefetch, BasicQosOptions::default())
            .await
            .context("failed to set the prefetch")?;
        let topology = &shared.identity.topology;
        amqp::declare_topology(connection, topology).await?;

        let mut subscriptions = Subscriptions::new(
            &shared.identity.id,
            topology.clone(),
            shared.identity.delivery_limit,
        );
        let unrouted = topology.unrouted_queue();
        subscriptions
            .consume(&consume, &unrouted, Source::Unrouted, false)
            .await?;
        // Its own channel: the control queue's prefetch is small (a deploy
        // order may be tens of MiB), the modules' is not.
        let control = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        control
            .basic_qos(control::PREFETCH, BasicQosOptions::default())
            .await
            .context("failed to set the control queue's prefetch")?;
        // Orders wait in the broker, not here: twice the largest this node
        // takes, and a little for questions; the broker refuses more.
        let limit = match &shared.modules.deploys {
            Some(deploys) => ControlLimit::for_deploys(deploys.max_size as u64),
            None => ControlLimit::QuestionsOnly,
        };
        let control_queue = amqp::declare_control_queue(&control, topology, limit).await?;
        subscriptions
            .consume(&control, &control_queue, Source::Control, false)
            .await?;
        for name in shared.modules.registry.names() {
            subscriptions.subscribe(connection, &consume, &name).await?;
        }
        // Modules still compiling: their requests wait in their queues.
        for name in shared.modules.loader.loading() {
            if shared.modules.registry.get(&name).is_none() {
                subscriptions.prepare(connection, &name).await?;
            }
        }
        // Modules whose files failed to load here: their callers hear why.
        for (name, _) in shared.modules.loader.failures() {
            if shared.modules.registry.get(&name).is_none() {
                subscriptions.stand_in(connection, &consume, &name).await?;
            }
        }
        let context = Arc::new(Context::for_session(&shared.requests, stamps));
        let lost = context.lost.clone();
        let session = Session {
            number,
            broker,
            shared: shared.clone(),
            connection: connection.clone(),
            settler: Settler::start(consume.clone(), lost.clone()),
            control_settler: Settler::start(control.clone(), lost),
            consume,
            control,
            subscriptions,
            context,
        };
        session.publish_subscribed();
        Ok(session)
    }

    /// Tells the node's probe which modules this session consumes.
    fn publish_subscribed(&self) {
        *self.shared.shown.subscribed.lock().expect("node lock") =
            self.subscriptions.active().cloned().collect();
    }

    /// Serves deliveries and follows registry updates until `shutdown`
    /// completes or the session fails.
    pub async fn serve(
        &mut self,
        updates: &mut mpsc::UnboundedReceiver<Update>,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
        tasks: &TaskTracker,
    ) -> SessionEnd {
        // Requests for modules that failed to load while no session was
        // open may wait in their queues: they are answered why.
        for (name, why) in self.shared.modules.loader.failures() {
            self.retire(name, None, Some(why), tasks);
        }
        loop {
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return SessionEnd::Shutdown,
                Some(update) = updates.recv() => {
                    self.follow(update, tasks).await;
                    self.publish_subscribed();
                }
                next = self.subscriptions.next() => match next {
                    Some((source, Some(Ok(delivery)))) => self.dispatch(source, delivery, tasks).await,
                    Some((source, Some(Err(error)))) => {
                        // lapin's error already names its cause: don't chain it.
                        return SessionEnd::Lost(anyhow::anyhow!("consuming {source} failed: {error}"));
                    }
                    Some((Source::Module(name), None)) => {
                        self.ended(name, tasks).await;
                        self.publish_subscribed();
                    }
                    Some((source, None)) => {
                        return SessionEnd::Lost(anyhow::anyhow!("the broker cancelled the subscription to {source}"));
                    }
                    None => return SessionEnd::Lost(anyhow::anyhow!("no subscriptions left")),
                },
            }
        }
    }

    /// Warm shutdown: stop consuming, let the requests in flight finish and
    /// answer, give back what was prefetched but not started, close.
    pub async fn stop(mut self, tasks: &TaskTracker) {
        let in_flight = tasks.len();
        tracing::info!(node = %self.shared.identity.id, in_flight, "shutting down: no new requests, finishing those in flight");
        self.subscriptions.cancel_all(&self.consume).await;
        // Requests still waiting for a slot go back to their queue at once
        // rather than running during shutdown.
        self.shared.requests.stopping.cancel();
        tasks.close();
        tasks.wait().await;
        // What the tasks settled is said before the channels close.
        let patience = Duration::from_secs(5);
        tokio::join!(
            self.settler.finish(patience),
            self.control_settler.finish(patience)
        );
        // Closing the channels returns anything prefetched but never handled.
        let _ = self.consume.close(200, "node shutting down".into()).await;
        let _ = self.control.close(200, "node shutting down".into()).await;
        let _ = self
            .connection
            .close(200, "node shutting down".into())
            .await;
    }

    /// The session is lost: its request tasks stop where they are (the
    /// broker hands their requests out again), and what is left of its
    /// connection is closed.
    pub fn abandon(self) {
        self.context.lost.cancel();
        let connection = self.connection;
        tokio::spawn(async move {
            let close = connection.close(200, "session lost".into());
            let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
        });
    }

    async fn dispatch(&mut self, source: Source, delivery: Delivery, tasks: &TaskTracker) {
        let context = self.context.clone();
        let ticket = match source {
            Source::Control => self.control_settler.ticket(delivery.delivery_tag),
            Source::Module(_) | Source::Unrouted => self.settler.ticket(delivery.delivery_tag),
        };
        match source {
            Source::Unrouted => {
                let target = self.unrouted(&delivery);
                tasks.spawn(request::handle(context, target, delivery, ticket));
            }
            Source::Control => {
                tasks.spawn(control::answer(
                    self.shared.clone(),
                    context,
                    delivery,
                    ticket,
                ));
            }
            // The version that serves a request is the one served when it arrives.
            Source::Module(name) => match self.shared.modules.registry.get(&name) {
                Some(module) => {
                    tasks.spawn(request::handle(
                        context,
                        request::Target::Module(module),
                        delivery,
                        ticket,
                    ));
                }
                None if self.subscriptions.standing_in(&name).is_some() => {
                    self.stand_in(name, delivery, ticket, tasks).await;
                }
                // Left in a subscription being cancelled: the queue hands it to
                // another node, or the last node out answers it.
                None => ticket.settle(Settlement::Requeue),
            },
        }
    }

    /// A request for a module this node stands in for (its file failed to
    /// load here): answered why, unless another node consumes the queue,
    /// which may serve it: then it goes back there, and this node steps
    /// aside.
    async fn stand_in(
        &mut self,
        name: ModuleName,
        delivery: Delivery,
        ticket: crate::settler::Ticket,
        tasks: &TaskTracker,
    ) {
        let queue = self.shared.identity.topology.module_queue(&name);
        let others = subscriptions::consumers(&self.connection, &queue)
            .await
            .is_none_or(|count| count > 1);
        let failure = self.shared.modules.loader.failure(&name);
        match (others, failure) {
            (false, Some(why)) => {
                let target = request::Target::Failed(name, why);
                tasks.spawn(request::handle(
                    self.context.clone(),
                    target,
                    delivery,
                    ticket,
                ));
            }
            _ => {
                tracing::info!(module = %name, "another node consumes the module's queue: no longer standing in for it");
                ticket.settle(Settlement::Requeue);
                self.subscriptions.step_aside(&self.consume, &name).await;
            }
        }
    }

    /// What to do with a request that no module queue took: a module it
    /// serves now (its subscription is starting) it runs; one it is loading
    /// gets it forwarded to the module's queue, bound now or in a moment;
    /// one that failed to load is answered why; anything else is not found.
    fn unrouted(&self, delivery: &Delivery) -> request::Target {
        let Ok(name) = delivery.routing_key.as_str().parse::<ModuleName>() else {
            return request::Target::Unrouted;
        };
        if let Some(module) = self.shared.modules.registry.get(&name) {
            request::Target::Module(module)
        } else if self.subscriptions.bound(&name) || self.shared.modules.loader.is_loading(&name) {
            request::Target::Forward(name)
        } else if let Some(why) = self.shared.modules.loader.failure(&name) {
            request::Target::Failed(name, why)
        } else {
            request::Target::Unrouted
        }
    }

    /// Lets a module's queue go, if no node serves it: see
    /// [`subscriptions::retire`].
    fn retire(
        &self,
        name: ModuleName,
        declared: Option<std::time::Instant>,
        failure: Option<String>,
        tasks: &TaskTracker,
    ) {
        tasks.spawn(subscriptions::retire(
            self.connection.clone(),
            self.context.clone(),
            self.shared.identity.topology.clone(),
            name,
            declared,
            failure,
            self.subscriptions.wanted(),
        ));
    }

    /// Follows a change the loader made to the registry.
    async fn follow(&mut self, update: Update, tasks: &TaskTracker) {
        match update {
            Update::Loading(name) => {
                if let Err(error) = self.subscriptions.prepare(&self.connection, &name).await {
                    tracing::warn!(module = %name, "cannot hold the module's requests while it loads: {error:#}");
                }
            }
            Update::Failed(name, why) => {
                let declared = self.subscriptions.failed(&name);
                let stood = self
                    .subscriptions
                    .stand_in(&self.connection, &self.consume, &name)
                    .await;
                if let Err(error) = stood {
                    tracing::warn!(module = %name, "cannot stand in for the module that failed to load: {error:#}");
                    self.retire(name, declared, Some(why), tasks);
                }
            }
            Update::Refused(name, why) => {
                let declared = self.subscriptions.failed(&name);
                self.retire(name, declared, Some(why), tasks);
            }
            Update::Added(name) => {
                if let Err(error) = self
                    .subscriptions
                    .added(&self.connection, &self.consume, &name)
                    .await
                {
                    tracing::error!(module = %name, "cannot serve the module: {error:#}");
                }
            }
            Update::Replaced(_) => {}
            Update::Removed(name) => {
                self.subscriptions.removed(&self.consume, &name).await;
                // If the subscription is already gone (it never started), retire now.
                if !self.subscriptions.consuming(&name) {
                    self.ended(name, tasks).await;
                }
            }
        }
    }

    /// A module's subscription has ended: subscribe again if the module came
    /// back meanwhile, else let its queue go if no node serves it any more.
    async fn ended(&mut self, name: ModuleName, tasks: &TaskTracker) {
        // What the subscription left is back in the queue before the last
        // node out answers what the queue holds.
        self.settler.flushed().await;
        match self
            .subscriptions
            .ended(&self.connection, &self.consume, &name)
            .await
        {
            Ok(subscriptions::AfterEnd::Resubscribed) => {}
            Ok(subscriptions::AfterEnd::Retire(declared)) => {
                // A stand-in that stepped aside answers what is left as why.
                let failure = self.shared.modules.loader.failure(&name);
                self.retire(name, declared, failure, tasks)
            }
            Err(error) => tracing::error!(module = %name, "cannot serve the module: {error:#}"),
        }
    }
}
