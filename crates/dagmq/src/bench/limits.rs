//! The limits beside dagmq's figures: the broker's own (`raw_limits`: persistent publishes with
//! confirms, and the publish-consume-Redis round trip of one hop) and Redis's (`bench store`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use dagmq_core::{Queue, RunState, Store, Topic};
use dagmq_rabbitmq::{RabbitConfig, RabbitQueue};
use dagmq_redis::RedisStore;

use super::{Backends, percentile, runtime};
use crate::{CliError, CliResult};

/// The broker's own limits on this machine: persistent publishes with confirms consumed and
/// acknowledged on one quorum queue, and a sequential publish-consume-Redis-publish-consume
/// round trip (the floor of one dependency hop).
pub(super) async fn raw_limits(amqp: &str, redis: &str, namespace: &str) -> CliResult<()> {
    let mut config = RabbitConfig::new(amqp);
    config.namespace = format!("{namespace}-raw");
    config.queue_expires = Some(Duration::from_secs(600));
    let publisher = RabbitQueue::connect(config.clone()).await.map_err(runtime)?;
    let consumer_side = RabbitQueue::connect(config).await.map_err(runtime)?;
    let topic = Topic::Tasks("raw".into());
    let mut consumer = consumer_side.consume(&topic, 1000).await.map_err(runtime)?;
    let total = 10_000usize;
    let started = Instant::now();
    let publish = {
        let publisher = publisher.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for _ in 0..total / 500 {
                publisher.publish_many((0..500).map(|_| (topic.clone(), vec![b'x'; 200])).collect()).await?;
            }
            Ok::<(), dagmq_core::BackendError>(())
        })
    };
    for _ in 0..total {
        let delivery = consumer.next().await.ok_or_else(|| runtime("raw consumer closed"))?.map_err(runtime)?;
        delivery.ack().await.map_err(runtime)?;
    }
    publish.await.map_err(runtime)?.map_err(runtime)?;
    let elapsed = started.elapsed();
    println!(
        "bench=raw_throughput mode=distributed messages={total} elapsed_ms={:.1} msgs_per_s={:.0}",
        elapsed.as_secs_f64() * 1e3,
        total as f64 / elapsed.as_secs_f64()
    );

    let store = RedisStore::connect(redis, &format!("{namespace}-raw"), None).await.map_err(runtime)?;
    let hop_a = Topic::Tasks("hop-a".into());
    let hop_b = Topic::Tasks("hop-b".into());
    let mut consume_a = consumer_side.consume(&hop_a, 10).await.map_err(runtime)?;
    let mut consume_b = consumer_side.consume(&hop_b, 10).await.map_err(runtime)?;
    let mut hops = Vec::new();
    for i in 0..500 {
        let started = Instant::now();
        publisher.publish(&hop_a, b"a".to_vec()).await.map_err(runtime)?;
        let delivery = consume_a.next().await.ok_or_else(|| runtime("closed"))?.map_err(runtime)?;
        delivery.ack().await.map_err(runtime)?;
        store.append_log("raw", "hop", i, &["x".to_string()]).await.map_err(runtime)?;
        publisher.publish(&hop_b, b"b".to_vec()).await.map_err(runtime)?;
        let delivery = consume_b.next().await.ok_or_else(|| runtime("closed"))?.map_err(runtime)?;
        delivery.ack().await.map_err(runtime)?;
        hops.push(started.elapsed().as_secs_f64() * 1e6);
    }
    hops.sort_by(f64::total_cmp);
    println!(
        "bench=raw_round_trip mode=distributed hops={} p50_us={:.1} p99_us={:.1}",
        hops.len(),
        percentile(&hops, 0.5),
        percentile(&hops, 0.99)
    );
    let _ = store.delete_all().await;
    let _ = publisher.delete_topology(&["raw", "hop-a", "hop-b"]).await;
    Ok(())
}

pub(super) async fn cleanup(amqp: &str, redis: &str, namespace: &str) {
    let mut config = RabbitConfig::new(amqp);
    config.namespace = namespace.to_string();
    config.queue_expires = Some(Duration::from_secs(600));
    if let Ok(queue) = RabbitQueue::connect(config).await {
        let _ = queue.delete_topology(&["default"]).await;
    }
    if let Ok(store) = RedisStore::connect(redis, namespace, None).await {
        let _ = store.delete_all().await;
    }
}

/// `bench store`: `n` queued tasks of one run, each claimed and then finished by one of 64
/// callers sharing a store (as a worker's tries share its connections), with Redis's CPU time
/// meanwhile: what Redis sustains of the worker's share of a task, without the broker.
pub(super) async fn store_ceiling(n: usize, backends: &Backends) -> CliResult<()> {
    let Backends::Services { redis, namespace, .. } = backends else {
        return Err(CliError::usage("bench store needs --amqp and --redis"));
    };
    let store = Arc::new(RedisStore::connect(redis, namespace, None).await.map_err(runtime)?);
    let now = Utc::now();
    let run = dagmq_core::RunRecord {
        run_id: "store-ceiling".to_string(),
        dag_id: "bench-store".to_string(),
        state: RunState::Running,
        kind: dagmq_core::RunKind::Manual,
        logical_date: now,
        params: Default::default(),
        key: None,
        created_at: now,
        started_at: Some(now),
        ended_at: None,
        dag_version: None,
    };
    let tasks: Vec<dagmq_core::TaskInstance> = (0..n)
        .map(|i| dagmq_core::TaskInstance::pending(format!("t{i}"), Vec::new(), "default", 0).next_try(now))
        .collect();
    store.create_run(&run, &tasks).await.map_err(runtime)?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu_before = backends.redis_cpu().await;
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..64 {
        let (store, next) = (store.clone(), next.clone());
        callers.spawn(async move {
            let claimant = dagmq_core::store::Claimant {
                worker: format!("bench-{caller}"),
                instance: format!("bench-{caller}"),
                at: Utc::now(),
            };
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), dagmq_core::BackendError>(());
                }
                let answer = store.claim_try("store-ceiling", &format!("t{i}"), 1, &claimant, &[]).await?;
                let Some(mut done) = answer.task.filter(|_| answer.claimed) else {
                    return Err(dagmq_core::BackendError::new(format!("task t{i} was not claimed")));
                };
                done.state = dagmq_core::TaskState::Success;
                done.ended_at = Some(Utc::now());
                store.finish_try("store-ceiling", &done, &[]).await?;
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.map_err(runtime)?.map_err(runtime)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, backends.redis_cpu().await) {
        (Some(before), Some(after)) => after - before,
        _ => 0.0,
    };
    println!(
        "bench=store mode=distributed n={n} elapsed_ms={:.1} tasks_per_s={:.0} redis_cpu_percent={:.0} redis_cpu_ms_per_1000_tasks={:.1}",
        elapsed * 1e3,
        n as f64 / elapsed.max(1e-9),
        cpu * 100.0 / elapsed.max(1e-9),
        cpu * 1e6 / n.max(1) as f64,
    );
    Ok(())
}
