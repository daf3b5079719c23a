//! The `Queue` abstraction: topics, confirmed publishes, consumers with explicit settlement.
//! Shaped after RabbitMQ (confirms, manual ack, dead-lettering, redelivered flag) so the
//! in-memory implementation and the broker behave the same.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;

use crate::BackendError;
use crate::task::CancelSignal;

/// Deliveries beyond this many of one message dead-letter it (RabbitMQ's `x-delivery-limit`).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 10;

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// Task-to-exec messages for one worker pool: `dagmq.tasks.<pool>`.
    Tasks(String),
    /// Status updates from workers: `dagmq.status`.
    Status,
    /// Run triggers from anyone: `dagmq.triggers`.
    Triggers,
    /// Messages that could not be processed: `dagmq.dead`.
    Dead,
}

impl Topic {
    /// The queue name, without any namespace prefix.
    pub fn name(&self) -> String {
        match self {
            Topic::Tasks(pool) => format!("dagmq.tasks.{pool}"),
            Topic::Status => "dagmq.status".to_string(),
            Topic::Triggers => "dagmq.triggers".to_string(),
            Topic::Dead => "dagmq.dead".to_string(),
        }
    }
}

/// A message's headers, (name, value) pairs: AMQP headers in RabbitMQ. Optional to every reader:
/// a message without them is read as before.
pub type Headers = Vec<(String, String)>;

/// A message queue with confirmed publishes and explicitly settled deliveries.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Publishes one persistent message; returns once the queue has it durably.
    async fn publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BackendError>;

    /// Publishes several messages, confirming them together; returns once all are durable.
    async fn publish_many(&self, messages: Vec<(Topic, Vec<u8>)>) -> Result<(), BackendError> {
        for (topic, payload) in messages {
            self.publish(&topic, payload).await?;
        }
        Ok(())
    }

    /// Publishes several messages with headers (task messages carry their trace parent),
    /// confirming them together. A backend that carries no headers publishes the bodies alone,
    /// which readers accept: every header is optional.
    async fn publish_with_headers(&self, messages: Vec<(Topic, Vec<u8>, Headers)>) -> Result<(), BackendError> {
        self.publish_many(messages.into_iter().map(|(topic, payload, _)| (topic, payload)).collect()).await
    }

    /// Starts consuming `topic` with at most `prefetch` unsettled deliveries at a time.
    async fn consume(&self, topic: &Topic, prefetch: u16) -> Result<Box<dyn Consumer>, BackendError>;

    /// Sends a control message to every current subscriber (not persisted, not queued).
    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), BackendError>;

    /// Receives broadcasts from now on; deliveries need no settlement.
    async fn subscribe_broadcasts(&self) -> Result<Box<dyn Consumer>, BackendError>;

    /// Messages waiting in `topic` (not counting unsettled deliveries).
    async fn depth(&self, topic: &Topic) -> Result<u64, BackendError>;

    /// Whether the queue answers.
    async fn ping(&self) -> Result<(), BackendError>;
}

/// A stream of deliveries from one topic.
#[async_trait]
pub trait Consumer: Send {
    /// The next delivery; `None` once the consumer is closed for good. Cancel-safe: a call
    /// dropped before it answers loses no delivery (a worker's slot polls it once, to take a
    /// delivery at hand without waiting: [`Subscription::try_next`]).
    async fn next(&mut self) -> Option<Result<Delivery, BackendError>>;
}

/// One delivered message. Settle it with `ack`, `dead_letter` or `requeue`; dropping it
/// unsettled requeues it, as a broker does when a channel closes.
pub struct Delivery {
    /// The message body.
    pub payload: Vec<u8>,
    /// Whether this message was delivered before (to anyone).
    pub redelivered: bool,
    /// For dead-lettered messages: why (the `x-dagmq-error` header).
    pub error: Option<String>,
    /// The producer's message id (AMQP `message_id`), when it set one.
    pub message_id: Option<String>,
    /// The message's text headers, as published (see [`Queue::publish_with_headers`]).
    pub headers: Headers,
    /// Settles the delivery with the queue.
    acker: Box<dyn Acker>,
}

/// How a delivery is settled; one implementation per queue backend.
#[async_trait]
pub trait Acker: Send {
    /// The message is done with.
    async fn ack(self: Box<Self>) -> Result<(), BackendError>;
    /// The message cannot be processed: move it to `dagmq.dead` with `reason`.
    async fn dead_letter(self: Box<Self>, reason: &str) -> Result<(), BackendError>;
    /// Put the message back for another delivery (counted against the delivery limit).
    async fn requeue(self: Box<Self>) -> Result<(), BackendError>;
}

impl Delivery {
    /// A delivery from a backend.
    pub fn new(payload: Vec<u8>, redelivered: bool, error: Option<String>, acker: Box<dyn Acker>) -> Delivery {
        Delivery { payload, redelivered, error, message_id: None, headers: Vec::new(), acker }
    }

    /// The same delivery with the producer's message id.
    pub fn with_message_id(mut self, message_id: Option<String>) -> Delivery {
        self.message_id = message_id.filter(|id| !id.is_empty());
        self
    }

    /// The same delivery with the message's headers.
    pub fn with_headers(mut self, headers: Headers) -> Delivery {
        self.headers = headers;
        self
    }

    /// The value of header `name`, if the message has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_str())
    }

    /// The message is done with.
    pub async fn ack(self) -> Result<(), BackendError> {
        self.acker.ack().await
    }

    /// Moves the message to `dagmq.dead` with `reason`.
    pub async fn dead_letter(self, reason: &str) -> Result<(), BackendError> {
        self.acker.dead_letter(reason).await
    }

    /// Puts the message back.
    pub async fn requeue(self) -> Result<(), BackendError> {
        self.acker.requeue().await
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("bytes", &self.payload.len())
            .field("redelivered", &self.redelivered)
            .field("error", &self.error)
            .field("message_id", &self.message_id)
            .field("headers", &self.headers)
            .finish()
    }
}

/// The settlement of deliveries that need none (broadcasts): every call succeeds and does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(self: Box<Self>) -> Result<(), BackendError> {
        Ok(())
    }
    async fn dead_letter(self: Box<Self>, _reason: &str) -> Result<(), BackendError> {
        Ok(())
    }
    async fn requeue(self: Box<Self>) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A consumer that outlives queue failures: it consumes again, with backoff from 100 ms to 5 s,
/// whenever opening or reading fails, until shutdown. The scheduler and workers read every topic
/// through one.
pub struct Subscription {
    /// The queue.
    queue: Arc<dyn Queue>,
    /// What to consume: a topic with its prefetch, or the broadcasts.
    source: Option<(Topic, u16)>,
    /// The current consumer, if open.
    consumer: Option<Box<dyn Consumer>>,
    /// Wait before the next attempt after a failure.
    delay: Duration,
    /// Whether the consumer closed for good while [`Subscription::try_next`] read it.
    ended: bool,
}

impl Subscription {
    /// Consumes `topic` with at most `prefetch` unsettled deliveries.
    pub fn topic(queue: Arc<dyn Queue>, topic: Topic, prefetch: u16) -> Subscription {
        Subscription {
            queue,
            source: Some((topic, prefetch)),
            consumer: None,
            delay: Duration::from_millis(100),
            ended: false,
        }
    }

    /// Receives the control broadcasts.
    pub fn broadcasts(queue: Arc<dyn Queue>) -> Subscription {
        Subscription { queue, source: None, consumer: None, delay: Duration::from_millis(100), ended: false }
    }

    fn name(&self) -> String {
        self.source.as_ref().map_or_else(|| "broadcasts".to_string(), |(topic, _)| topic.name())
    }

    /// The next delivery; `None` once `shutdown` fires or the queue closes for good.
    pub async fn next(&mut self, shutdown: &CancelSignal) -> Option<Delivery> {
        if self.ended {
            return None;
        }
        loop {
            if self.consumer.is_none() {
                let opened = match &self.source {
                    Some((topic, prefetch)) => self.queue.consume(topic, *prefetch).await,
                    None => self.queue.subscribe_broadcasts().await,
                };
                match opened {
                    Ok(consumer) => self.consumer = Some(consumer),
                    Err(err) => {
                        tracing::error!("consuming {}: {err}; retrying in {:?}", self.name(), self.delay);
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            _ = tokio::time::sleep(self.delay) => {}
                        }
                        self.delay = (self.delay * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let consumer = self.consumer.as_mut()?;
            let next = tokio::select! {
                _ = shutdown.cancelled() => return None,
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    self.delay = Duration::from_millis(100);
                    return Some(delivery);
                }
                Some(Err(err)) => {
                    tracing::error!("consuming {}: {err}", self.name());
                    self.consumer = None;
                }
                None => return None,
            }
        }
    }

    /// A delivery the open consumer holds already, if any: never waits, and never opens a
    /// consumer (`None` then). A consumer that fails here is dropped, and [`Subscription::next`]
    /// consumes again.
    pub fn try_next(&mut self) -> Option<Delivery> {
        let polled = {
            let consumer = self.consumer.as_mut()?;
            let mut next = std::pin::pin!(consumer.next());
            next.as_mut().poll(&mut Context::from_waker(Waker::noop()))
        };
        match polled {
            Poll::Ready(Some(Ok(delivery))) => {
                self.delay = Duration::from_millis(100);
                Some(delivery)
            }
            Poll::Ready(Some(Err(err))) => {
                tracing::error!("consuming {}: {err}", self.name());
                self.consumer = None;
                None
            }
            Poll::Ready(None) => {
                self.ended = true;
                None
            }
            Poll::Pending => None,
        }
    }
}

/// Awaits every future at once, in this task (no task is spawned), and answers their outputs
/// in order: for settling a batch of deliveries together rather than one after another.
pub async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    let mut remaining = pending.len();
    std::future::poll_fn(|cx| {
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none()
                && let Poll::Ready(value) = future.as_mut().poll(cx)
            {
                *output = Some(value);
                remaining -= 1;
            }
        }
        if remaining == 0 { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod join_tests {
    use super::join_all;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn join_all_waits_for_all_at_once_and_keeps_the_order() {
        let started = tokio::time::Instant::now();
        let delays = [30u64, 10, 20];
        let outputs = join_all(delays.iter().map(|&ms| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        }))
        .await;
        assert_eq!(outputs, vec![30, 10, 20]);
        assert_eq!(started.elapsed(), Duration::from_millis(30), "concurrently, not one after another");
        assert!(join_all(Vec::<std::future::Ready<u8>>::new()).await.is_empty());
    }
}
