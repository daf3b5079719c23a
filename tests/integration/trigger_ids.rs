//! Triggers published by outside producers without a `key` are deduplicated by the AMQP
//! `message_id` they set: a producer that publishes again after a lost confirm creates one run.

use std::sync::Arc;
use std::time::Duration;

use dagmq_core::store::RunFilter;
use dagmq_core::{Dag, DagRegistry, Store, TaskSpec};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::services::{amqp_url, rabbit_queue, redis_store};

#[tokio::test(flavor = "multi_thread")]
async fn keyless_triggers_with_one_message_id_make_one_run() {
    let Some(rabbit) = rabbit_queue(10).await else { return };
    let Some(store) = redis_store().await else { return };
    let triggers = rabbit.queue_name(&dagmq_core::Topic::Triggers);
    let mut dags = DagRegistry::new();
    dags.add(Dag::builder("etl").task(TaskSpec::rust("a", dagmq_worker::Noop)).build().unwrap()).unwrap();
    let config = dagmq_scheduler::SchedulerConfig::new(dags, Arc::new(dagmq_core::SystemClock));
    let (stop, signal) = dagmq_core::CancelSignal::new();
    let queue: Arc<dyn dagmq_core::Queue> = Arc::new(rabbit);
    let (_handle, scheduler) = dagmq_scheduler::spawn(config, queue, store.clone(), signal);

    // A producer of its own, setting message ids; the last message is order-18's, so once its
    // run exists every copy before it was handled.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    for (message_id, copies) in [("order-17", 3), ("order-18", 1)] {
        for _ in 0..copies {
            let properties = BasicProperties::default().with_message_id(message_id.into());
            channel
                .basic_publish(
                    "".into(),
                    triggers.as_str().into(),
                    BasicPublishOptions::default(),
                    br#"{"v":1,"dag_id":"etl"}"#,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let runs = store.list_runs(&RunFilter { limit: 10, ..Default::default() }).await.unwrap();
        if runs.iter().any(|r| r.key.as_deref() == Some("order-18")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "runs: {runs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs = store.list_runs(&RunFilter { limit: 10, ..Default::default() }).await.unwrap();
    let mut keys: Vec<_> = runs.iter().map(|r| r.key.clone().unwrap_or_default()).collect();
    keys.sort();
    assert_eq!(keys, vec!["order-17", "order-18"], "one run per message id: {runs:?}");
    stop.cancel();
    scheduler.await.unwrap().unwrap();
    store.delete_all().await.unwrap();
}
