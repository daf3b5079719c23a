//! Status updates as batched wake-ups. The store already holds every outcome when its update is
//! sent, so the update only wakes the scheduler: one publisher sends, in one confirmed message,
//! every update that finished while its previous message was being confirmed. Under load a
//! message carries many outcomes; alone, an update goes out at once, as it did unbatched. A lost
//! update costs latency (the scheduler's sweep finds the outcome), never state.

use std::sync::Arc;

use dagmq_core::messages::{self, StatusUpdate};
use dagmq_core::{BackendError, Queue, Topic};
use tokio::sync::{mpsc, oneshot};

/// Most bytes of updates in one status message (far below the 1 MiB message limit).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Most updates in one status message.
const MAX_BATCH_UPDATES: usize = 1000;

/// An update waiting to be sent, with who waits for its confirmation.
type Pending = (Vec<u8>, oneshot::Sender<Result<(), BackendError>>);

/// Hands status updates to the worker's one publisher of `dagmq.status`, or, unbatched,
/// publishes each itself.
#[derive(Clone)]
pub(crate) enum StatusSender {
    /// Through the publisher.
    Batched(mpsc::UnboundedSender<Pending>),
    /// One message each (an in-memory queue, whose publish costs no round trip to save).
    Direct(Arc<dyn Queue>),
}

impl StatusSender {
    /// Starts the publisher (it ends once every sender is dropped), or none when `batched` is off.
    pub(crate) fn start(queue: Arc<dyn Queue>, batched: bool) -> StatusSender {
        if !batched {
            return StatusSender::Direct(queue);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish_loop(queue, rx));
        StatusSender::Batched(tx)
    }

    /// Whether a send waits for a broker's confirm (batched), rather than for an in-memory
    /// publish.
    pub(crate) fn confirms_take_time(&self) -> bool {
        matches!(self, StatusSender::Batched(_))
    }

    /// Sends one update; returns once the queue has it durably (in a message with others).
    pub(crate) async fn send(&self, update: &StatusUpdate) -> Result<(), BackendError> {
        match self {
            StatusSender::Direct(queue) => queue.publish(&Topic::Status, messages::encode(update)).await,
            StatusSender::Batched(tx) => {
                let (done, confirmed) = oneshot::channel();
                tx.send((messages::encode(update), done))
                    .map_err(|_| BackendError::new("the status publisher has stopped"))?;
                confirmed.await.map_err(|_| BackendError::new("the status publisher has stopped"))?
            }
        }
    }
}

/// Publishes what is waiting, one message at a time: the updates that arrive meanwhile make up
/// the next message.
async fn publish_loop(queue: Arc<dyn Queue>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut bytes = first.0.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_UPDATES {
            let Ok(next) = rx.try_recv() else { break };
            if bytes + next.0.len() > MAX_BATCH_BYTES {
                carry = Some(next);
                break;
            }
            bytes += next.0.len();
            batch.push(next);
        }
        let (encoded, waiting): (Vec<Vec<u8>>, Vec<_>) = batch.into_iter().unzip();
        let result = queue.publish(&Topic::Status, messages::encode_status(&encoded)).await;
        for done in waiting {
            let _ = done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagmq_core::TaskState;
    use dagmq_core::memory::MemoryQueue;

    fn update(task_id: &str) -> StatusUpdate {
        StatusUpdate {
            v: messages::VERSION,
            run_id: "r".into(),
            task_id: task_id.into(),
            try_number: 1,
            state: TaskState::Success,
            worker: None,
            error: None,
            next: Vec::new(),
        }
    }

    #[tokio::test]
    async fn updates_sent_together_arrive_in_fewer_messages_and_in_order() {
        let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let mut consumer = queue.consume(&Topic::Status, 1000).await.unwrap();
        let sender = StatusSender::start(queue.clone(), true);
        let ids: Vec<String> = (0..200).map(|n| format!("t{n}")).collect();
        let sends: Vec<_> = ids
            .iter()
            .map(|id| {
                let (sender, update) = (sender.clone(), update(id));
                tokio::spawn(async move { sender.send(&update).await })
            })
            .collect();
        for send in sends {
            send.await.unwrap().unwrap();
        }
        let mut got = Vec::new();
        let mut deliveries = 0;
        while got.len() < ids.len() {
            let delivery = consumer.next().await.unwrap().unwrap();
            deliveries += 1;
            got.extend(messages::decode_status(&delivery.payload).unwrap().into_iter().map(|u| u.task_id));
            delivery.ack().await.unwrap();
        }
        assert_eq!(got, ids, "every update arrives once, in the order sent");
        assert!(deliveries < ids.len(), "200 updates sent at once share messages ({deliveries} messages)");
        // Alone, an update is a plain status update.
        sender.send(&update("alone")).await.unwrap();
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(messages::decode::<StatusUpdate>(&delivery.payload).unwrap(), update("alone"));
    }
}
