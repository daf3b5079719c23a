//! Consumers: manual acknowledgement with prefetch, dead-lettering with a reason header, and
//! requeue on drop; broadcast subscriptions on an exclusive queue.

use std::sync::Arc;

use async_trait::async_trait;
use dagmq_core::BackendError;
use dagmq_core::queue::{Acker, Consumer, Delivery, NoAck, Topic};
use futures_lite::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::{ERROR_HEADER, Inner, amqp_error};

/// Consumes one queue on a channel of its own.
struct RabbitConsumer {
    /// The queue's owner, for dead-lettering.
    inner: Arc<Inner>,
    /// The queue name, for messages.
    name: String,
    /// The lapin consumer stream.
    stream: lapin::Consumer,
    /// Kept so the channel lives as long as the consumer.
    _channel: Channel,
    /// Whether deliveries need settling (false for broadcasts).
    manual_ack: bool,
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
    Ok(Box::new(RabbitConsumer { inner, name, stream, _channel: channel, manual_ack: true }))
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
    Ok(Box::new(RabbitConsumer { inner, name: exchange, stream, _channel: channel, manual_ack: false }))
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
                let acker: Box<dyn Acker> = if self.manual_ack {
                    Box::new(RabbitAcker {
                        inner: self.inner.clone(),
                        source: self.name.clone(),
                        payload: delivery.data.clone(),
                        acker: Some(delivery.acker),
                    })
                } else {
                    Box::new(NoAck)
                };
                let message_id = delivery.properties.message_id().as_ref().map(|id| id.to_string());
                Some(Ok(Delivery::new(delivery.data, delivery.redelivered, error, acker).with_message_id(message_id)))
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
    /// lapin's acker, until settled.
    acker: Option<lapin::Acker>,
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BackendError> {
        match self.acker.take() {
            Some(acker) => acker.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(amqp_error),
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
            let _ = acker.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
            return Err(err);
        }
        acker.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(amqp_error)
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), BackendError> {
        match self.acker.take() {
            Some(acker) => acker
                .nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() })
                .await
                .map(|_| ())
                .map_err(amqp_error),
            None => Ok(()),
        }
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = acker.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
            });
        }
    }
}
