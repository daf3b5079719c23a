//! One suite of `Queue` behaviour, run against the in-memory queue and against RabbitMQ.

use std::time::Duration;

use dagmq_core::memory::MemoryQueue;
use dagmq_core::{Consumer, Delivery, Queue, Topic};

use crate::services::rabbit_queue;

/// The consumer's next delivery, failing after 10 s.
pub(crate) async fn next(consumer: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10s")
        .expect("consumer open")
        .expect("no queue error")
}

async fn wait_depth(queue: &dyn Queue, topic: &Topic, expected: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let depth = queue.depth(topic).await.unwrap();
        if depth == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "depth of {} is {depth}, expected {expected}", topic.name());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn contract(queue: &dyn Queue, delivery_limit: u32) {
    let tasks = Topic::Tasks("contract".into());
    // Order, ack, depth.
    queue.publish_many((0..3).map(|i| (tasks.clone(), format!("m{i}").into_bytes())).collect()).await.unwrap();
    wait_depth(queue, &tasks, 3).await;
    let mut consumer = queue.consume(&tasks, 10).await.unwrap();
    for i in 0..3 {
        let delivery = next(&mut consumer).await;
        assert_eq!(delivery.payload, format!("m{i}").into_bytes());
        assert!(!delivery.redelivered);
        delivery.ack().await.unwrap();
    }
    wait_depth(queue, &tasks, 0).await;

    // Requeue comes back marked redelivered; so does a dropped delivery.
    queue.publish(&tasks, b"again".to_vec()).await.unwrap();
    let first = next(&mut consumer).await;
    first.requeue().await.unwrap();
    let second = next(&mut consumer).await;
    assert_eq!(second.payload, b"again");
    assert!(second.redelivered);
    drop(second);
    let third = next(&mut consumer).await;
    assert!(third.redelivered);
    third.ack().await.unwrap();

    // Dead-lettering keeps the payload and the reason.
    queue.publish(&tasks, b"bad".to_vec()).await.unwrap();
    next(&mut consumer).await.dead_letter("task: malformed message: expected value").await.unwrap();
    let mut dead = queue.consume(&Topic::Dead, 10).await.unwrap();
    let delivery = next(&mut dead).await;
    assert_eq!(delivery.payload, b"bad");
    assert_eq!(delivery.error.as_deref(), Some("task: malformed message: expected value"));
    delivery.ack().await.unwrap();

    // The delivery limit dead-letters a message that keeps coming back.
    queue.publish(&tasks, b"poison".to_vec()).await.unwrap();
    let mut deliveries = 0;
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => d.unwrap().unwrap(),
            d = dead.next() => {
                let d = d.unwrap().unwrap();
                assert_eq!(d.payload, b"poison");
                assert!(d.error.is_some(), "a reason is recorded");
                d.ack().await.unwrap();
                break;
            }
        };
        deliveries += 1;
        assert!(deliveries <= delivery_limit + 1, "delivered {deliveries} times");
        delivery.requeue().await.unwrap();
    }
    assert!(deliveries >= delivery_limit, "dead-lettered after only {deliveries} deliveries");

    // Headers travel with a message (a task message's `traceparent`), and with its redelivery;
    // a message published without any has none.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string();
    let headers = vec![("traceparent".to_string(), traceparent.clone())];
    queue.publish_with_headers(vec![(tasks.clone(), b"traced".to_vec(), headers)]).await.unwrap();
    queue.publish(&tasks, b"plain".to_vec()).await.unwrap();
    let traced = next(&mut consumer).await;
    assert_eq!((traced.payload.as_slice(), traced.header("traceparent")), (&b"traced"[..], Some(traceparent.as_str())));
    traced.requeue().await.unwrap();
    // The requeued message may come back before or after the plain one.
    for _ in 0..2 {
        let delivery = next(&mut consumer).await;
        if delivery.payload == b"traced" {
            assert_eq!((delivery.redelivered, delivery.header("traceparent")), (true, Some(traceparent.as_str())));
        } else {
            assert_eq!((delivery.payload.as_slice(), delivery.headers.len()), (&b"plain"[..], 0));
        }
        delivery.ack().await.unwrap();
    }

    // Broadcasts reach every subscriber.
    let mut one = queue.subscribe_broadcasts().await.unwrap();
    let mut two = queue.subscribe_broadcasts().await.unwrap();
    queue.broadcast(b"stop r1".to_vec()).await.unwrap();
    assert_eq!(next(&mut one).await.payload, b"stop r1");
    assert_eq!(next(&mut two).await.payload, b"stop r1");
    queue.ping().await.unwrap();
}

/// Many deliveries settled at once, in a scrambled order, some acknowledged and some put back
/// (requeued or dropped): every acknowledgement reaches the broker once (a lost one would fill
/// the prefetch and stall the consumer; a repeated one would close the channel), and exactly
/// the ones put back come again.
async fn concurrent_settlement(queue: &dyn Queue) {
    let topic = Topic::Tasks("settle".into());
    let total = 200usize;
    let prefetch = 20u16;
    queue.publish_many((0..total).map(|i| (topic.clone(), i.to_string().into_bytes())).collect()).await.unwrap();
    let mut consumer = queue.consume(&topic, prefetch).await.unwrap();
    let mut acked = std::collections::BTreeSet::new();
    let mut put_back = std::collections::BTreeSet::new();
    let mut seed = 7u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.len() < total {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {total} acknowledged", acked.len());
        // A prefetch's worth (or what is left), settled all at once in a scrambled order.
        let mut batch = Vec::new();
        while batch.len() < usize::from(prefetch) && acked.len() + batch.len() < total {
            batch.push(next(&mut consumer).await);
        }
        for i in (1..batch.len()).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            batch.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let mut settling = tokio::task::JoinSet::new();
        for delivery in batch {
            let n: usize = std::str::from_utf8(&delivery.payload).unwrap().parse().unwrap();
            let was_put_back = put_back.contains(&n);
            assert_eq!(delivery.redelivered, was_put_back, "message {n} redelivered only if put back");
            // Every seventh message is put back once: requeued or dropped, alternately.
            if n.is_multiple_of(7) && !was_put_back {
                put_back.insert(n);
                settling.spawn(async move {
                    if n.is_multiple_of(2) {
                        delivery.requeue().await.unwrap();
                    } else {
                        drop(delivery);
                    }
                });
            } else {
                assert!(acked.insert(n), "message {n} delivered again after its acknowledgement");
                settling.spawn(async move { delivery.ack().await.unwrap() });
            }
        }
        while let Some(done) = settling.join_next().await {
            done.unwrap();
        }
    }
    assert_eq!(put_back.len(), total.div_ceil(7));
    wait_depth(queue, &topic, 0).await;
    // The consumer still works: nothing closed its channel.
    queue.publish(&topic, b"last".to_vec()).await.unwrap();
    let last = next(&mut consumer).await;
    assert_eq!(last.payload, b"last");
    last.ack().await.unwrap();
}

#[tokio::test]
async fn memory_queue_keeps_the_contract() {
    contract(&MemoryQueue::with_delivery_limit(3), 3).await;
    concurrent_settlement(&MemoryQueue::with_delivery_limit(3)).await;
}

#[tokio::test]
async fn rabbitmq_queue_keeps_the_contract() {
    let Some(queue) = rabbit_queue(3).await else { return };
    contract(&queue, 3).await;
    concurrent_settlement(&queue).await;
    queue.delete_topology(&["contract", "settle"]).await.unwrap();
}
