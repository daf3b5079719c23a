//! Reaching the real RabbitMQ and Redis: addresses from the environment, a fresh namespace per
//! test, and the CI rule that a test which cannot reach a service fails (never skips) when
//! `DAGMQ_REQUIRE_SERVICES=1`.

use std::sync::Arc;

use dagmq_redis::RedisStore;

/// Redis address for tests.
pub fn redis_url() -> String {
    std::env::var("DAGMQ_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// RabbitMQ address for tests.
pub fn amqp_url() -> String {
    std::env::var("DAGMQ_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A namespace no other test uses.
pub fn namespace() -> String {
    format!("dagmq-test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Whether a missing service must fail the test: with `DAGMQ_REQUIRE_SERVICES` set (to
/// anything but `0`), and in CI (`CI` set to anything but `false` or `0`; CI systems set it to
/// `true`, `1`, `yes` or their own name).
fn required() -> bool {
    let set = |name: &str, off: &[&str]| {
        std::env::var(name)
            .is_ok_and(|v| !v.trim().is_empty() && !off.contains(&v.trim().to_ascii_lowercase().as_str()))
    };
    set("DAGMQ_REQUIRE_SERVICES", &["0"]) || set("CI", &["false", "0"])
}

/// Handles an unreachable service: panics in CI, otherwise says so and lets the test return.
pub fn unavailable(service: &str, err: impl std::fmt::Display) -> Option<std::convert::Infallible> {
    if required() {
        panic!("{service} is required (DAGMQ_REQUIRE_SERVICES or CI is set) but unreachable: {err}");
    }
    eprintln!("skipping: {service} unreachable ({err}); set DAGMQ_REQUIRE_SERVICES=1 to fail instead");
    None
}

/// A Redis store under a fresh prefix, or `None` (outside CI) when Redis is down.
pub async fn redis_store() -> Option<Arc<RedisStore>> {
    match RedisStore::connect(&redis_url(), &namespace(), None).await {
        Ok(store) => Some(Arc::new(store)),
        Err(err) => {
            unavailable("redis", err)?;
            None
        }
    }
}

/// A RabbitMQ queue under a fresh namespace, or `None` (outside CI) when RabbitMQ is down.
pub async fn rabbit_queue(delivery_limit: u32) -> Option<dagmq_rabbitmq::RabbitQueue> {
    let mut config = dagmq_rabbitmq::RabbitConfig::new(amqp_url());
    config.namespace = namespace();
    config.delivery_limit = delivery_limit;
    config.queue_expires = Some(std::time::Duration::from_secs(600));
    match dagmq_rabbitmq::RabbitQueue::connect(config).await {
        Ok(queue) => Some(queue),
        Err(err) => {
            unavailable("rabbitmq", err)?;
            None
        }
    }
}
