//! An in-memory queue: per-topic FIFO, prefetch, redelivery on requeue or drop, a delivery
//! limit, dead-lettering with a reason, and broadcasts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast};

use crate::BackendError;
use crate::queue::{Acker, Consumer, DEFAULT_DELIVERY_LIMIT, Delivery, Headers, NoAck, Queue, Topic};

/// An in-memory queue; clones share the same topics.
#[derive(Clone)]
pub struct MemoryQueue {
    /// Topics and broadcast channel, shared by clones, consumers and ackers.
    inner: Arc<Inner>,
}

/// The shared state.
struct Inner {
    /// Messages per topic.
    topics: Mutex<HashMap<Topic, TopicState>>,
    /// Control broadcasts.
    broadcasts: broadcast::Sender<Vec<u8>>,
    /// Deliveries beyond this many dead-letter a message.
    delivery_limit: u32,
}

/// One topic's waiting messages and the wake-up for its consumers.
struct TopicState {
    /// Messages waiting for a consumer.
    ready: VecDeque<Message>,
    /// Woken once per message made ready.
    notify: Arc<Notify>,
}

/// A message and its delivery history.
#[derive(Clone)]
struct Message {
    /// Body.
    payload: Vec<u8>,
    /// How many times it was delivered.
    deliveries: u32,
    /// Dead-letter reason, for messages in `dagmq.dead`.
    error: Option<String>,
    /// Headers, as published.
    headers: Headers,
}

impl MemoryQueue {
    /// A queue with the default delivery limit.
    pub fn new() -> MemoryQueue {
        MemoryQueue::with_delivery_limit(DEFAULT_DELIVERY_LIMIT)
    }

    /// A queue that dead-letters a message on its `limit + 1`-th delivery.
    pub fn with_delivery_limit(limit: u32) -> MemoryQueue {
        let (broadcasts, _) = broadcast::channel(1024);
        MemoryQueue { inner: Arc::new(Inner { topics: Mutex::new(HashMap::new()), broadcasts, delivery_limit: limit }) }
    }
}

impl Default for MemoryQueue {
    fn default() -> MemoryQueue {
        MemoryQueue::new()
    }
}

impl Inner {
    /// The topics, even if a thread panicked while holding the lock (the data stays consistent
    /// because every critical section is a single push or pop).
    fn topics(&self) -> MutexGuard<'_, HashMap<Topic, TopicState>> {
        self.topics.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends (or, for requeues, prepends) a message and wakes one consumer.
    fn push(&self, topic: &Topic, message: Message, front: bool) {
        let mut topics = self.topics();
        let state = topics.entry(topic.clone()).or_insert_with(TopicState::new);
        if front {
            state.ready.push_front(message);
        } else {
            state.ready.push_back(message);
        }
        state.notify.notify_one();
    }

    /// Requeues, or dead-letters once the delivery limit is reached.
    fn requeue(&self, topic: &Topic, message: Message) {
        if message.deliveries > self.delivery_limit {
            let reason = format!("delivery limit of {} reached", self.delivery_limit);
            self.push(&Topic::Dead, Message { deliveries: 0, error: Some(reason), ..message }, false);
        } else {
            self.push(topic, message, true);
        }
    }
}

impl TopicState {
    fn new() -> TopicState {
        TopicState { ready: VecDeque::new(), notify: Arc::new(Notify::new()) }
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BackendError> {
        self.inner.push(topic, Message { payload, deliveries: 0, error: None, headers: Vec::new() }, false);
        Ok(())
    }

    async fn publish_with_headers(&self, messages: Vec<(Topic, Vec<u8>, Headers)>) -> Result<(), BackendError> {
        for (topic, payload, headers) in messages {
            self.inner.push(&topic, Message { payload, deliveries: 0, error: None, headers }, false);
        }
        Ok(())
    }

    async fn consume(&self, topic: &Topic, prefetch: u16) -> Result<Box<dyn Consumer>, BackendError> {
        Ok(Box::new(MemoryConsumer {
            inner: self.inner.clone(),
            topic: topic.clone(),
            prefetch: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
        }))
    }

    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), BackendError> {
        // No subscriber is not an error: nobody is running anything to stop.
        let _ = self.inner.broadcasts.send(payload);
        Ok(())
    }

    async fn subscribe_broadcasts(&self) -> Result<Box<dyn Consumer>, BackendError> {
        Ok(Box::new(BroadcastConsumer { receiver: self.inner.broadcasts.subscribe() }))
    }

    async fn depth(&self, topic: &Topic) -> Result<u64, BackendError> {
        Ok(self.inner.topics().get(topic).map_or(0, |t| t.ready.len() as u64))
    }

    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// Consumes one topic.
struct MemoryConsumer {
    /// The queue.
    inner: Arc<Inner>,
    /// The topic.
    topic: Topic,
    /// One permit per unsettled delivery.
    prefetch: Arc<Semaphore>,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, BackendError>> {
        let permit = self.prefetch.clone().acquire_owned().await.ok()?;
        loop {
            let notify = {
                let mut topics = self.inner.topics();
                let state = topics.entry(self.topic.clone()).or_insert_with(TopicState::new);
                if let Some(mut message) = state.ready.pop_front() {
                    message.deliveries += 1;
                    let headers = message.headers.clone();
                    let delivery = Delivery::new(
                        message.payload.clone(),
                        message.deliveries > 1,
                        message.error.clone(),
                        Box::new(MemoryAcker {
                            inner: self.inner.clone(),
                            topic: self.topic.clone(),
                            message: Some(message),
                            _permit: permit,
                        }),
                    )
                    .with_headers(headers);
                    return Some(Ok(delivery));
                }
                state.notify.clone()
            };
            notify.notified().await;
        }
    }
}

/// Settles one in-memory delivery; requeues on drop if never settled.
struct MemoryAcker {
    /// The queue.
    inner: Arc<Inner>,
    /// Where the message came from.
    topic: Topic,
    /// The message, until settled.
    message: Option<Message>,
    /// Frees a prefetch slot when the delivery is settled or dropped.
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BackendError> {
        self.message = None;
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, reason: &str) -> Result<(), BackendError> {
        if let Some(message) = self.message.take() {
            let dead = Message { deliveries: 0, error: Some(reason.to_string()), ..message };
            self.inner.push(&Topic::Dead, dead, false);
        }
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), BackendError> {
        if let Some(message) = self.message.take() {
            self.inner.requeue(&self.topic, message);
        }
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            self.inner.requeue(&self.topic, message);
        }
    }
}

/// Receives broadcasts; a subscriber that lags loses the oldest ones, as a fanout queue
/// with a length limit would.
struct BroadcastConsumer {
    /// The broadcast channel.
    receiver: broadcast::Receiver<Vec<u8>>,
}

#[async_trait]
impl Consumer for BroadcastConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, BackendError>> {
        loop {
            match self.receiver.recv().await {
                Ok(payload) => return Some(Ok(Delivery::new(payload, false, None, Box::new(NoAck)))),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_travel_with_the_message_and_its_redelivery() {
        let queue = MemoryQueue::new();
        let topic = Topic::Tasks("default".to_string());
        let headers = vec![("traceparent".to_string(), "00-ab-cd-01".to_string())];
        queue.publish_with_headers(vec![(topic.clone(), b"one".to_vec(), headers.clone())]).await.expect("publish");
        queue.publish(&topic, b"two".to_vec()).await.expect("publish");
        let mut consumer = queue.consume(&topic, 10).await.expect("consume");
        let first = consumer.next().await.expect("open").expect("delivery");
        assert_eq!(first.header("traceparent"), Some("00-ab-cd-01"));
        let second = consumer.next().await.expect("open").expect("delivery");
        assert_eq!(second.header("traceparent"), None, "a message without headers has none");
        first.requeue().await.expect("requeue");
        let again = consumer.next().await.expect("open").expect("delivery");
        assert!(again.redelivered);
        assert_eq!(again.headers, headers);
    }
}
