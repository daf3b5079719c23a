//! Consumers: manual acknowledgement with prefetch, dead-lettering with a reason header, and
//! requeue on drop; broadcast subscriptions on an exclusive queue.
//!
//! Acknowledgements are batched per channel ([`AckBatch`]): while one acknowledgement is being
//! sent, the others that arrive wait and go out together, as one `multiple` acknowledgement of
//! the longest run of settled deliveries at the head of the channel's unsettled ones and single
//! acknowledgements for the rest. A quorum queue appends one settlement to its log per
//! acknowledgement frame, so this saves the broker work on every busy consumer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use dagmq_core::BackendError;
use dagmq_core::queue::{Acker, Consumer, Delivery, NoAck, Topic, join_all};
use futures_lite::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, DeliveryTag, FieldTable, LongString};
use tokio::sync::oneshot;

use crate::{ERROR_HEADER, Inner, amqp_error};

/// Consumes one queue on a channel of its own.
struct RabbitConsumer {
    /// The queue's owner, for dead-lettering.
    inner: Arc<Inner>,
    /// The queue name, for messages.
    name: String,
    /// The lapin consumer stream.
    stream: lapin::Consumer,
    /// Acknowledgements on the consumer's channel; `None` for broadcasts (nothing to settle).
    acks: Option<Arc<AckBatch>>,
}

pub(crate) async fn consume(
    inner: Arc<Inner>,
    topic: &Topic,
    prefetch: u16,
) -> Result<Box<dyn Consumer>, BackendError> {
    let live = inner.live().await?;
    inner.ensure_declared(&live, topic).await?;
    let channel = live.connection.create_channel().await.map_err(amqp_error)?;
    channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await.map_err(amqp_error)?;
    let name = inner.name(&topic.name());
    let stream = channel
        .basic_consume(name.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(|e| BackendError::new(format!("rabbitmq: consuming {name}: {e}")))?;
    Ok(Box::new(RabbitConsumer { inner, name, stream, acks: Some(Arc::new(AckBatch::new(channel))) }))
}

pub(crate) async fn subscribe(inner: Arc<Inner>) -> Result<Box<dyn Consumer>, BackendError> {
    let live = inner.live().await?;
    let channel = live.connection.create_channel().await.map_err(amqp_error)?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .map_err(amqp_error)?;
    let exchange = inner.name("dagmq.control");
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp_error)?;
    let stream = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        )
        .await
        .map_err(amqp_error)?;
    // The consumer stream keeps its channel open.
    Ok(Box::new(RabbitConsumer { inner, name: exchange, stream, acks: None }))
}

#[async_trait]
impl Consumer for RabbitConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, BackendError>> {
        match self.stream.next().await {
            Some(Ok(delivery)) => {
                let header = |name: &str| {
                    delivery.properties.headers().as_ref().and_then(|h| match h.inner().get(name) {
                        Some(AMQPValue::LongString(text)) => {
                            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
                        }
                        _ => None,
                    })
                };
                // Our own reason, or the broker's when it dead-lettered the message itself.
                let error = header(ERROR_HEADER).or_else(|| {
                    header("x-first-death-reason").map(|reason| format!("dead-lettered by the broker: {reason}"))
                });
                let acker: Box<dyn Acker> = match &self.acks {
                    Some(acks) => {
                        acks.delivered(delivery.delivery_tag);
                        Box::new(RabbitAcker {
                            inner: self.inner.clone(),
                            source: self.name.clone(),
                            payload: delivery.data.clone(),
                            tag: delivery.delivery_tag,
                            acks: acks.clone(),
                            acker: Some(delivery.acker),
                        })
                    }
                    None => Box::new(NoAck),
                };
                let message_id = delivery.properties.message_id().as_ref().map(|id| id.to_string());
                // The text headers a reader may want (the trace parent); the broker's own
                // (x-death, ...) and any of another type stay out.
                let headers = delivery.properties.headers().as_ref().map_or_else(Vec::new, |table| {
                    table
                        .inner()
                        .iter()
                        .filter(|(name, _)| !name.as_str().starts_with("x-"))
                        .filter_map(|(name, value)| match value {
                            AMQPValue::LongString(text) => {
                                Some((name.as_str().to_string(), String::from_utf8_lossy(text.as_bytes()).into_owned()))
                            }
                            _ => None,
                        })
                        .collect()
                });
                Some(Ok(Delivery::new(delivery.data, delivery.redelivered, error, acker)
                    .with_message_id(message_id)
                    .with_headers(headers)))
            }
            Some(Err(err)) => Some(Err(BackendError::new(format!("rabbitmq: consumer of {}: {err}", self.name)))),
            // The broker cancelled the consumer or the connection closed: the owner consumes again.
            None => Some(Err(BackendError::new(format!("rabbitmq: consumer of {} ended", self.name)))),
        }
    }
}

/// Settles one delivery; an unsettled delivery is requeued when dropped.
struct RabbitAcker {
    /// For publishing to the dead-letter queue.
    inner: Arc<Inner>,
    /// The queue it came from, recorded on dead-lettered messages.
    source: String,
    /// The body, for dead-lettering.
    payload: Vec<u8>,
    /// The delivery's tag on its channel.
    tag: DeliveryTag,
    /// The channel's acknowledgements.
    acks: Arc<AckBatch>,
    /// lapin's acker (for requeueing), until settled.
    acker: Option<lapin::Acker>,
}

impl RabbitAcker {
    /// Sends a requeueing negative acknowledgement and then takes the delivery off the
    /// unsettled ones (not before: a `multiple` acknowledgement must not overtake it).
    async fn requeue_now(acker: lapin::Acker, acks: &AckBatch, tag: DeliveryTag) -> Result<(), BackendError> {
        let sent = acker.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
        acks.settled(tag);
        sent.map(|_| ()).map_err(amqp_error)
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BackendError> {
        match self.acker.take() {
            Some(_) => self.acks.ack(self.tag).await,
            None => Ok(()),
        }
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), BackendError> {
        let Some(acker) = self.acker.take() else { return Ok(()) };
        let mut headers = FieldTable::default();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(LongString::from(reason)));
        headers.insert("x-dagmq-source".into(), AMQPValue::LongString(LongString::from(self.source.as_str())));
        let payload = std::mem::take(&mut self.payload);
        if let Err(err) = self.inner.publish_batch(vec![(Topic::Dead, payload, Some(headers))]).await {
            let _ = RabbitAcker::requeue_now(acker, &self.acks, self.tag).await;
            return Err(err);
        }
        self.acks.ack(self.tag).await
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), BackendError> {
        match self.acker.take() {
            Some(acker) => RabbitAcker::requeue_now(acker, &self.acks, self.tag).await,
            None => Ok(()),
        }
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (acks, tag) = (self.acks.clone(), self.tag);
            runtime.spawn(async move {
                let _ = RabbitAcker::requeue_now(acker, &acks, tag).await;
            });
        }
    }
}

/// The acknowledgements of one consumer's channel, sent in batches.
///
/// A delivery is *unsettled* from its arrival until it is acknowledged or its requeue has been
/// sent. Whoever acknowledges while no batch is being sent sends a batch itself (no task, no
/// timer); the acknowledgements that arrived meanwhile go out from a task, batch after batch,
/// until none is left (`Sending`); the others wait for theirs. A `multiple` acknowledgement
/// covers only settled deliveries: the tags of the channel's deliveries rise, and everything at
/// or below the tag it names is acknowledged here and not being requeued.
struct AckBatch {
    /// The consumer's channel.
    channel: Channel,
    /// Unsettled deliveries and acknowledgements not yet sent.
    state: Mutex<AckState>,
}

/// What [`AckBatch`] guards.
#[derive(Default)]
struct AckState {
    /// Tags of the deliveries not yet settled (acknowledgements waiting to be sent included).
    unsettled: BTreeSet<DeliveryTag>,
    /// Acknowledgements waiting to be sent, each with whoever waits for it.
    waiting: BTreeMap<DeliveryTag, oneshot::Sender<Result<(), String>>>,
    /// Whether someone is sending a batch.
    sending: bool,
}

/// The acknowledgements of one batch: the head run as one frame, the rest one frame each.
struct Batch {
    /// The highest tag of the settled run at the head of the unsettled deliveries.
    head: Option<DeliveryTag>,
    /// The tags acknowledged singly (each above a delivery still unsettled).
    singles: Vec<DeliveryTag>,
    /// Everyone waiting for an acknowledgement of this batch.
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

impl AckBatch {
    fn new(channel: Channel) -> AckBatch {
        AckBatch { channel, state: Mutex::new(AckState::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, AckState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A delivery arrived.
    fn delivered(&self, tag: DeliveryTag) {
        self.lock().unsettled.insert(tag);
    }

    /// A delivery's requeue was sent.
    fn settled(&self, tag: DeliveryTag) {
        self.lock().unsettled.remove(&tag);
    }

    /// Acknowledges one delivery; returns once its acknowledgement was handed to the connection.
    async fn ack(self: &Arc<Self>, tag: DeliveryTag) -> Result<(), BackendError> {
        let (sender, receiver) = oneshot::channel();
        let lead = {
            let mut state = self.lock();
            state.waiting.insert(tag, sender);
            !std::mem::replace(&mut state.sending, true)
        };
        if lead {
            Sending { acks: self.clone(), done: false }.first().await;
        }
        match receiver.await {
            Ok(result) => result.map_err(BackendError::new),
            Err(_) => Err(BackendError::new("rabbitmq: acknowledgement abandoned".to_string())),
        }
    }

    /// Takes the waiting acknowledgements as a batch; none left ends the sending.
    fn take_batch(&self) -> Option<Batch> {
        let mut state = self.lock();
        if state.waiting.is_empty() {
            state.sending = false;
            return None;
        }
        let state = &mut *state;
        let mut batch = Batch { head: None, singles: Vec::new(), waiters: Vec::with_capacity(state.waiting.len()) };
        while let Some(&first) = state.unsettled.first() {
            let Some(waiter) = state.waiting.remove(&first) else { break };
            state.unsettled.pop_first();
            batch.head = Some(first);
            batch.waiters.push(waiter);
        }
        for (tag, waiter) in std::mem::take(&mut state.waiting) {
            state.unsettled.remove(&tag);
            batch.singles.push(tag);
            batch.waiters.push(waiter);
        }
        Some(batch)
    }

    /// Sends one batch and tells its waiters. `join_all` polls the frames in order, and each
    /// frame is queued on the connection at its first poll, so the `multiple` one goes first.
    async fn send(&self, batch: Batch) {
        let head = batch.head.map(|tag| (tag, true));
        let singles = batch.singles.iter().map(|&tag| (tag, false));
        let frames = head
            .into_iter()
            .chain(singles)
            .map(|(tag, multiple)| self.channel.basic_ack(tag, BasicAckOptions { multiple }));
        let result = join_all(frames)
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(drop)
            .map_err(|err| format!("rabbitmq: acknowledging: {err}"));
        for waiter in batch.waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

/// The sender of batches. The caller that leads sends the first batch (its own acknowledgement
/// in it) and hands what arrived meanwhile to a task, so no caller waits for others' batches;
/// a caller that goes away mid-send hands over the same way.
struct Sending {
    /// The batcher.
    acks: Arc<AckBatch>,
    /// Set once nothing is left to send.
    done: bool,
}

impl Sending {
    /// Sends one batch; what arrives meanwhile goes to a task (on drop).
    async fn first(mut self) {
        if let Some(batch) = self.acks.take_batch() {
            self.acks.send(batch).await;
        }
        let mut state = self.acks.lock();
        if state.waiting.is_empty() {
            state.sending = false;
            self.done = true;
        }
    }

    /// Sends batches until none is left.
    async fn run(mut self) {
        while let Some(batch) = self.acks.take_batch() {
            self.acks.send(batch).await;
        }
        self.done = true;
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        // A batch already taken had its frames handed to the connection at its first poll;
        // what waits still needs sending.
        if !self.done
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let rest = Sending { acks: self.acks.clone(), done: false };
            runtime.spawn(rest.run());
        }
    }
}
