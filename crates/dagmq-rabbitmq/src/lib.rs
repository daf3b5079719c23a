//! dagmq-rabbitmq: the `Queue` over RabbitMQ.
//!
//! Topology (names prefixed by `NAMESPACE.` when a namespace is set), declared idempotently on
//! every (re)connection:
//! - `dagmq.tasks.<pool>` — durable quorum queues, declared when first used, with an explicit
//!   `x-delivery-limit` and dead-lettering to `dagmq.dead`;
//! - `dagmq.status`, `dagmq.triggers` — the same kind of queue;
//! - `dagmq.dead` — a quorum queue for what could not be processed, the reason in `x-dagmq-error`;
//! - `dagmq.control` — a fanout exchange; each subscriber binds its own exclusive queue.
//!
//! Publishes are persistent and mandatory, on a channel in confirm mode; a batch is published
//! first and its confirms awaited together. A returned or nacked message is an error. On
//! connection loss the next call reconnects and re-declares; consumers end with an error, and
//! their owners consume again. Callers republish what was not confirmed.
//!
//! # A cluster of nodes
//!
//! The URL may be a comma-separated list ([`node_urls`]): the nodes of one RabbitMQ cluster. A
//! process connects to the first node that answers, trying them in turn from an index that
//! varies from process to process (so processes spread over the nodes), each attempt bounded
//! by [`RabbitConfig::connect_timeout`]. When its node goes, the connection fails, and the next
//! call (a consumer's owner consuming again, a publish) connects to another node, starting with
//! the one after the lost node. Confirms outstanding at the loss fail with the connection: the
//! callers republish them, and the store's compare-and-set drops the duplicates this can make.
//! A refused publish (a nack) gives the connection a new publishing channel: after a quorum
//! queue's leader is lost, a channel can go on refusing until it is replaced.
//!
//! Quorum queues are replicated by RabbitMQ. dagmq sets no `x-quorum-initial-group-size`, so a
//! queue gets RabbitMQ's default: a member on every node of the cluster when it is declared
//! (three replicas on a three-node cluster; it keeps working while a majority, two, is up). A
//! queue declared while the cluster had fewer nodes (dagmq started before the other nodes
//! joined), or nodes added later, do not grow it: RabbitMQ 3.10 leaves membership to the
//! operator (`rabbitmq-queues grow NODE all`, after a node joins). Re-declaring with another
//! group size would fail against the queues already there, so dagmq leaves it to RabbitMQ.

mod consumer;

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dagmq_core::queue::{Consumer, DEFAULT_DELIVERY_LIMIT, Headers, Queue, Topic};
use dagmq_core::{BackendError, TlsSettings};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

/// How to reach RabbitMQ and name things there.
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    /// `amqp://user:password@host:port/vhost`, or the nodes of one cluster as a comma-separated
    /// list of such URLs ([`node_urls`]).
    pub url: String,
    /// Prefix of every queue and exchange name, so installations and tests share a broker.
    pub namespace: String,
    /// Deliveries after which a message is dead-lettered (`x-delivery-limit`).
    pub delivery_limit: u32,
    /// Queues unused this long are deleted by the broker (`x-expires`); for tests.
    pub queue_expires: Option<Duration>,
    /// Private CA and client certificate for an `amqps://` URL (the system's roots otherwise).
    pub tls: TlsSettings,
    /// The longest wait for one node to accept a connection and the topology's declaration,
    /// before the next node is tried.
    pub connect_timeout: Duration,
}

impl RabbitConfig {
    /// Defaults: no namespace, the default delivery limit, queues kept.
    pub fn new(url: impl Into<String>) -> RabbitConfig {
        RabbitConfig {
            url: url.into(),
            namespace: String::new(),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            queue_expires: None,
            tls: TlsSettings::default(),
            connect_timeout: CONNECT_TIMEOUT,
        }
    }
}

/// The nodes of one RabbitMQ cluster from a comma-separated list of URLs (one URL is a list of
/// one). Every element must be an `amqp://` or `amqps://` URL, all of one scheme; an empty
/// element is an error. A comma inside a password must be percent-encoded (`%2C`). Errors show
/// the URLs with their passwords masked.
pub fn node_urls(list: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = list.split(',').map(|url| url.trim().to_string()).collect();
    let scheme = |url: &str| url.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    for (i, url) in urls.iter().enumerate() {
        if url.is_empty() {
            return Err(format!(
                "the RabbitMQ URL list {} has an empty element (number {} of {})",
                mask_url(list),
                i + 1,
                urls.len()
            ));
        }
        if !matches!(scheme(url).as_deref(), Some("amqp" | "amqps")) {
            return Err(format!("the RabbitMQ URL {} is not an amqp:// or amqps:// URL", mask_url(url)));
        }
    }
    if urls.iter().any(|url| scheme(url) != scheme(&urls[0])) {
        return Err(format!(
            "the RabbitMQ URLs {} mix amqp:// and amqps://: give every node the same scheme",
            mask_url(list)
        ));
    }
    Ok(urls)
}

/// A queue over one RabbitMQ broker or cluster; clones share the connection.
#[derive(Clone)]
pub struct RabbitQueue {
    /// Shared by clones, consumers and ackers.
    inner: Arc<Inner>,
}

/// The shared state.
pub(crate) struct Inner {
    /// Configuration.
    config: RabbitConfig,
    /// The nodes' URLs, from `config.url`.
    nodes: Vec<String>,
    /// The node to try first at the next connection (modulo the number of nodes).
    next: AtomicUsize,
    /// The live connection, if any.
    live: tokio::sync::Mutex<Option<Live>>,
}

/// One connection with its publishing channel.
#[derive(Clone)]
pub(crate) struct Live {
    /// The connection.
    connection: Arc<Connection>,
    /// A channel in confirm mode for publishing.
    publisher: Channel,
    /// Task pools declared on this connection.
    declared: Arc<Mutex<HashSet<String>>>,
    /// The index of the node it is connected to.
    node: usize,
}

/// The TLS settings as lapin takes them: the CA bundle is trusted besides the system's roots.
fn tls_config(tls: &TlsSettings) -> lapin::tcp::OwnedTLSConfig {
    lapin::tcp::OwnedTLSConfig {
        identity: tls.client.as_ref().map(|client| lapin::tcp::OwnedIdentity::PKCS8 {
            pem: client.cert_pem.clone(),
            key: client.key_pem.clone(),
        }),
        cert_chain: tls.ca_pem.as_ref().map(|pem| String::from_utf8_lossy(pem).into_owned()),
    }
}

/// Header carrying the reason a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-dagmq-error";

/// Seconds between AMQP heartbeats.
const HEARTBEAT_SECS: u16 = 10;

/// The default of [`RabbitConfig::connect_timeout`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl RabbitQueue {
    /// Connects, declares the topology and checks that the broker answers. With several nodes,
    /// the first tried is chosen at random, so processes spread over the cluster.
    pub async fn connect(config: RabbitConfig) -> Result<RabbitQueue, BackendError> {
        let first = std::hash::RandomState::new().hash_one(std::process::id()) as usize;
        RabbitQueue::connect_from(config, first).await
    }

    /// Connects trying node `first` (modulo their number) first.
    pub(crate) async fn connect_from(config: RabbitConfig, first: usize) -> Result<RabbitQueue, BackendError> {
        let nodes = node_urls(&config.url).map_err(|e| BackendError::new(format!("rabbitmq: {e}")))?;
        let inner = Inner { config, nodes, next: AtomicUsize::new(first), live: tokio::sync::Mutex::new(None) };
        let queue = RabbitQueue { inner: Arc::new(inner) };
        queue.inner.live().await?;
        Ok(queue)
    }

    /// The URL (password masked) of the node connected to now, if any.
    pub async fn connected_node(&self) -> Option<String> {
        let guard = self.inner.live.lock().await;
        guard.as_ref().map(|live| mask_url(&self.inner.nodes[live.node]))
    }

    /// The full name of a topic's queue.
    pub fn queue_name(&self, topic: &Topic) -> String {
        self.inner.name(&topic.name())
    }

    /// Deletes this namespace's queues and exchange (for tests and uninstalling).
    pub async fn delete_topology(&self, pools: &[&str]) -> Result<(), BackendError> {
        let live = self.inner.live().await?;
        let channel = live.connection.create_channel().await.map_err(amqp_error)?;
        let mut names: Vec<String> =
            [Topic::Status, Topic::Triggers, Topic::Dead].iter().map(|t| self.queue_name(t)).collect();
        names.extend(pools.iter().map(|p| self.queue_name(&Topic::Tasks((*p).to_string()))));
        for name in names {
            channel
                .queue_delete(name.as_str().into(), lapin::options::QueueDeleteOptions::default())
                .await
                .map_err(amqp_error)?;
        }
        channel
            .exchange_delete(
                self.inner.name("dagmq.control").as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
            .map_err(amqp_error)?;
        Ok(())
    }
}

impl Inner {
    /// A name with the namespace prefix.
    pub(crate) fn name(&self, base: &str) -> String {
        if self.config.namespace.is_empty() { base.to_string() } else { format!("{}.{base}", self.config.namespace) }
    }

    /// The live connection, connecting (and declaring the topology) when there is none.
    pub(crate) async fn live(&self) -> Result<Live, BackendError> {
        let mut guard = self.live.lock().await;
        if let Some(live) = guard.as_ref()
            && live.connection.status().connected()
            && live.publisher.status().connected()
        {
            return Ok(live.clone());
        }
        *guard = None;
        let live = self.connect().await?;
        *guard = Some(live.clone());
        Ok(live)
    }

    /// Forgets `failed`, so the next call reconnects, and closes it. Another task may have
    /// replaced it with a fresh connection meanwhile: that one is left alone.
    pub(crate) async fn drop_live(&self, failed: &Live) {
        let mut guard = self.live.lock().await;
        if guard.as_ref().is_some_and(|current| Arc::ptr_eq(&current.connection, &failed.connection)) {
            *guard = None;
        }
        drop(guard);
        let _ = failed.connection.close(200, "reconnecting".into()).await;
    }

    /// Whether `live` is the connection in use now (for tests of reconnection).
    #[cfg(test)]
    pub(crate) async fn is_current(&self, live: &Live) -> bool {
        self.live.lock().await.as_ref().is_some_and(|current| Arc::ptr_eq(&current.connection, &live.connection))
    }

    /// Connects to the first node that answers, from the one after the last node connected to.
    async fn connect(&self) -> Result<Live, BackendError> {
        let count = self.nodes.len();
        let first = self.next.load(Ordering::Relaxed) % count;
        let mut failures = Vec::with_capacity(count);
        for i in (first..count).chain(0..first) {
            let attempt = tokio::time::timeout(self.config.connect_timeout, self.connect_node(i)).await;
            let failure = match attempt {
                Ok(Ok(live)) => {
                    self.next.store((i + 1) % count, Ordering::Relaxed);
                    return Ok(live);
                }
                Ok(Err(err)) => err,
                Err(_) => BackendError::new(format!(
                    "rabbitmq {}: cannot connect: no answer within {:?}",
                    mask_url(&self.nodes[i]),
                    self.config.connect_timeout
                )),
            };
            if count > 1 {
                tracing::warn!("{failure}; trying the next node");
            }
            failures.push(failure.to_string());
        }
        // One node: its error as it was; several: each node's.
        Err(BackendError::new(if count == 1 {
            failures.remove(0)
        } else {
            format!("rabbitmq: no node of the {count} answered: {}", failures.join("; "))
        }))
    }

    /// Connects to node `i` and declares the topology there.
    async fn connect_node(&self, i: usize) -> Result<Live, BackendError> {
        let given = &self.nodes[i];
        let url = with_heartbeat(given);
        // lapin's own messages may quote the URL (with the heartbeat added) or its password.
        let cannot = |e: &dyn std::fmt::Display| {
            let message = dagmq_core::scrub_url(&dagmq_core::scrub_url(&e.to_string(), &url), given);
            BackendError::new(format!("rabbitmq {}: cannot connect: {message}", mask_url(given)))
        };
        let connection = if self.config.tls.is_default() {
            Connection::connect(&url, ConnectionProperties::default()).await
        } else {
            let runtime = lapin::runtime::default_runtime().map_err(|e| cannot(&e))?;
            Connection::connect_with_config(
                &url,
                ConnectionProperties::default(),
                tls_config(&self.config.tls),
                runtime,
            )
            .await
        }
        .map_err(|e| cannot(&e))?;
        let declared = self.declare_topology(&connection).await;
        let channel = match declared {
            Ok(channel) => channel,
            Err(err) => {
                let _ = connection.close(200, "declaring failed".into()).await;
                return Err(err);
            }
        };
        tracing::info!(
            broker = %mask_url(given),
            node = format!("{} of {}", i + 1, self.nodes.len()),
            "connected to rabbitmq"
        );
        Ok(Live {
            connection: Arc::new(connection),
            publisher: channel,
            declared: Arc::new(Mutex::new(HashSet::new())),
            node: i,
        })
    }

    /// Declares the queues and the exchange; answers the publishing channel, in confirm mode.
    async fn declare_topology(&self, connection: &Connection) -> Result<Channel, BackendError> {
        let channel = connection.create_channel().await.map_err(amqp_error)?;
        self.declare_queue(&channel, &Topic::Dead).await?;
        self.declare_queue(&channel, &Topic::Status).await?;
        self.declare_queue(&channel, &Topic::Triggers).await?;
        channel
            .exchange_declare(
                self.name("dagmq.control").as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp_error)?;
        Ok(channel)
    }

    /// Declares a topic's quorum queue.
    async fn declare_queue(&self, channel: &Channel, topic: &Topic) -> Result<(), BackendError> {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
        if *topic != Topic::Dead {
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from("")));
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(LongString::from(self.name(&Topic::Dead.name()))),
            );
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(self.config.delivery_limit as i32));
        }
        if let Some(expires) = self.config.queue_expires {
            args.insert("x-expires".into(), AMQPValue::LongInt(expires.as_millis().min(i32::MAX as u128) as i32));
        }
        channel
            .queue_declare(
                self.name(&topic.name()).as_str().into(),
                QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() },
                args,
            )
            .await
            .map_err(|e| BackendError::new(format!("rabbitmq: declaring {}: {e}", self.name(&topic.name()))))?;
        Ok(())
    }

    /// Declares a task pool's queue once per connection.
    pub(crate) async fn ensure_declared(&self, live: &Live, topic: &Topic) -> Result<(), BackendError> {
        let Topic::Tasks(pool) = topic else { return Ok(()) };
        if live.declared.lock().unwrap_or_else(|p| p.into_inner()).contains(pool) {
            return Ok(());
        }
        self.declare_queue(&live.publisher, topic).await?;
        live.declared.lock().unwrap_or_else(|p| p.into_inner()).insert(pool.clone());
        Ok(())
    }

    /// Publishes to the default exchange with confirms; all or an error.
    pub(crate) async fn publish_batch(
        &self,
        messages: Vec<(Topic, Vec<u8>, Option<FieldTable>)>,
    ) -> Result<(), BackendError> {
        let live = self.live().await?;
        let result = self.publish_on(&live, messages).await;
        if result.is_err() && !live.connection.status().connected() {
            self.drop_live(&live).await;
        } else if matches!(result, Err(PublishError::Refused(_)))
            || (result.is_err() && !live.publisher.status().connected())
        {
            // A refusal, or a publishing channel that closed under a live connection (the
            // broker closed it, or another publish renewed it meanwhile): a new channel, unless
            // another publish gave the connection one already. The connection and its consumers
            // stay.
            self.renew_publisher(&live).await;
        }
        result.map_err(PublishError::into_inner)
    }

    /// Gives the connection `live` a new publishing channel. A quorum queue whose leader was
    /// lost refuses what a channel publishes to it until the channel learns the new leader,
    /// which RabbitMQ 3.10 channels opened before the election ends may never do (seen in
    /// `rabbit_cluster`: refusals for 30 s and more on a channel opened 40 ms after the leader's
    /// node died); a new channel finds the leader of the moment.
    async fn renew_publisher(&self, live: &Live) {
        let mut guard = self.live.lock().await;
        let Some(current) = guard.as_mut() else { return };
        if !Arc::ptr_eq(&current.connection, &live.connection) || current.publisher.id() != live.publisher.id() {
            return;
        }
        let channel = match current.connection.create_channel().await {
            Ok(channel) => channel,
            Err(_) => return,
        };
        if channel.confirm_select(ConfirmSelectOptions::default()).await.is_ok() {
            tracing::warn!("the broker refused a publish: publishing on a new channel");
            let old = std::mem::replace(&mut current.publisher, channel);
            drop(guard);
            let _ = old.close(200, "renewed".into()).await;
        }
    }

    async fn publish_on(
        &self,
        live: &Live,
        messages: Vec<(Topic, Vec<u8>, Option<FieldTable>)>,
    ) -> Result<(), PublishError> {
        let mut confirms = Vec::with_capacity(messages.len());
        for (topic, payload, headers) in messages {
            self.ensure_declared(live, &topic).await.map_err(PublishError::Other)?;
            let mut properties =
                BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
            if let Some(headers) = headers {
                properties = properties.with_headers(headers);
            }
            let name = self.name(&topic.name());
            let confirm = live
                .publisher
                .basic_publish(
                    ShortString::from(""),
                    name.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    &payload,
                    properties,
                )
                .await
                .map_err(|e| PublishError::Other(BackendError::new(format!("rabbitmq: publishing to {name}: {e}"))))?;
            confirms.push((name, confirm));
        }
        let mut refused = None;
        for (name, confirm) in confirms {
            let confirmation = confirm
                .await
                .map_err(|e| PublishError::Other(BackendError::new(format!("rabbitmq: confirm from {name}: {e}"))))?;
            match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(_)) => {
                    let message = format!("rabbitmq: {name}: message returned as unroutable");
                    return Err(PublishError::Other(BackendError::new(message)));
                }
                Confirmation::Nack(_) => {
                    // The rest of the confirms are awaited all the same, so that a refusal
                    // leaves none outstanding on the channel that is about to be replaced.
                    let message = format!("rabbitmq: {name}: the broker refused the message");
                    refused.get_or_insert(BackendError::new(message));
                }
            }
        }
        refused.map_or(Ok(()), |err| Err(PublishError::Refused(err)))
    }
}

/// Why a publish failed: refused by the broker (a nack), or anything else.
enum PublishError {
    /// The broker nacked a message.
    Refused(BackendError),
    /// No confirm, a returned message, a failed declaration or a lost connection.
    Other(BackendError),
}

impl PublishError {
    fn into_inner(self) -> BackendError {
        match self {
            PublishError::Refused(err) | PublishError::Other(err) => err,
        }
    }
}

#[async_trait]
impl Queue for RabbitQueue {
    async fn publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), BackendError> {
        self.inner.publish_batch(vec![(topic.clone(), payload, None)]).await
    }

    async fn publish_many(&self, messages: Vec<(Topic, Vec<u8>)>) -> Result<(), BackendError> {
        self.inner.publish_batch(messages.into_iter().map(|(t, p)| (t, p, None)).collect()).await
    }

    async fn publish_with_headers(&self, messages: Vec<(Topic, Vec<u8>, Headers)>) -> Result<(), BackendError> {
        let messages = messages
            .into_iter()
            .map(|(topic, payload, headers)| {
                let table = (!headers.is_empty()).then(|| {
                    let mut table = FieldTable::default();
                    for (name, value) in headers {
                        table.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
                    }
                    table
                });
                (topic, payload, table)
            })
            .collect();
        self.inner.publish_batch(messages).await
    }

    async fn consume(&self, topic: &Topic, prefetch: u16) -> Result<Box<dyn Consumer>, BackendError> {
        consumer::consume(self.inner.clone(), topic, prefetch).await
    }

    async fn broadcast(&self, payload: Vec<u8>) -> Result<(), BackendError> {
        let live = self.inner.live().await?;
        let exchange = self.inner.name("dagmq.control");
        let confirm = live
            .publisher
            .basic_publish(
                exchange.as_str().into(),
                ShortString::from(""),
                BasicPublishOptions::default(),
                &payload,
                BasicProperties::default(),
            )
            .await
            .map_err(amqp_error)?;
        confirm.await.map_err(amqp_error)?;
        Ok(())
    }

    async fn subscribe_broadcasts(&self) -> Result<Box<dyn Consumer>, BackendError> {
        consumer::subscribe(self.inner.clone()).await
    }

    async fn depth(&self, topic: &Topic) -> Result<u64, BackendError> {
        let live = self.inner.live().await?;
        // A passive declare of a missing queue closes its channel, so it gets one of its own.
        let channel = live.connection.create_channel().await.map_err(amqp_error)?;
        let result = channel
            .queue_declare(
                self.queue_name(topic).as_str().into(),
                QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            )
            .await;
        let depth = match result {
            Ok(queue) => u64::from(queue.message_count()),
            Err(_) => 0,
        };
        let _ = channel.close(200, "done".into()).await;
        Ok(depth)
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.inner.live().await.map(|_| ())
    }
}

pub(crate) fn amqp_error(err: lapin::Error) -> BackendError {
    BackendError::new(format!("rabbitmq: {err}"))
}

/// Adds `heartbeat=10` to a URL that sets none.
fn with_heartbeat(url: &str) -> String {
    if url.contains("heartbeat=") {
        url.to_string()
    } else if url.contains('?') {
        format!("{url}&heartbeat={HEARTBEAT_SECS}")
    } else {
        format!("{url}?heartbeat={HEARTBEAT_SECS}")
    }
}

pub use dagmq_core::mask_url;

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared broker of the tests (`DAGMQ_AMQP_URL`, by default the local one).
    fn broker_url() -> String {
        std::env::var("DAGMQ_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    /// Whether a test that cannot reach the broker must fail: with DAGMQ_REQUIRE_SERVICES (not
    /// 0) or in CI (CI not empty, false or 0).
    fn required() -> bool {
        let set = |name: &str, off: &[&str]| {
            std::env::var(name)
                .is_ok_and(|v| !v.trim().is_empty() && !off.contains(&v.trim().to_ascii_lowercase().as_str()))
        };
        set("DAGMQ_REQUIRE_SERVICES", &["0"]) || set("CI", &["false", "0"])
    }

    /// Connects with `config` from node `first`; `None` (the test skips) when the shared broker
    /// cannot be reached outside CI.
    async fn connect_or_skip(config: RabbitConfig, first: usize) -> Option<RabbitQueue> {
        match RabbitQueue::connect_from(config, first).await {
            Ok(queue) => Some(queue),
            Err(err) => {
                assert!(!required(), "rabbitmq unreachable: {err}");
                eprintln!("skipping: rabbitmq unreachable ({err})");
                None
            }
        }
    }

    /// A local port nothing listens on.
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Two tasks see one connection fail; the first reconnects. The second's late report must
    /// close the failed connection only, not the one the first just opened.
    #[tokio::test]
    async fn a_late_failure_report_closes_only_the_failed_connection() {
        let Some(queue) = connect_or_skip(RabbitConfig::new(broker_url()), 0).await else { return };
        let first = queue.inner.live().await.unwrap();
        queue.inner.drop_live(&first).await;
        let second = queue.inner.live().await.unwrap();
        assert!(!Arc::ptr_eq(&first.connection, &second.connection), "a new connection");
        queue.inner.drop_live(&first).await;
        assert!(queue.inner.is_current(&second).await, "the new connection is still the one in use");
        assert!(second.connection.status().connected(), "and still open");
        queue.ping().await.unwrap();
        assert!(queue.inner.is_current(&second).await);
    }

    #[test]
    fn a_list_of_urls_names_the_nodes_of_one_cluster() {
        assert_eq!(node_urls("amqp://h/%2f").unwrap(), ["amqp://h/%2f"]);
        assert_eq!(
            node_urls("amqp://u:p@h1:5672/%2f, amqp://u:p@h2:5673/%2f ,AMQP://u:p@h3/%2f").unwrap(),
            ["amqp://u:p@h1:5672/%2f", "amqp://u:p@h2:5673/%2f", "AMQP://u:p@h3/%2f"]
        );
        assert_eq!(node_urls("amqps://h1,amqps://h2").unwrap().len(), 2);
        // A comma in a password is percent-encoded; the URL stays one element.
        assert_eq!(node_urls("amqp://u:a%2Cb@h/%2f").unwrap(), ["amqp://u:a%2Cb@h/%2f"]);
    }

    #[test]
    fn a_bad_list_is_refused_with_its_passwords_masked() {
        for (list, expected) in [
            ("", "empty element (number 1 of 1)"),
            ("amqp://u:s3cret@h1,,amqp://u:s3cret@h2", "empty element (number 2 of 3)"),
            ("amqp://u:s3cret@h1,", "empty element (number 2 of 2)"),
            ("amqp://u:s3cret@h1,redis://u:s3cret@h2", "redis://u:***@h2 is not an amqp:// or amqps:// URL"),
            ("amqp://u:s3cret@h1,u:s3cret@h2", "is not an amqp:// or amqps:// URL"),
            ("amqp://u:s3cret@h1,amqps://u:s3cret@h2", "mix amqp:// and amqps://"),
        ] {
            let err = node_urls(list).unwrap_err();
            assert!(err.contains(expected), "{list:?}: {err}");
            assert!(!err.contains("s3cret"), "{list:?}: the password shows: {err}");
        }
    }

    /// A node that refuses connections is passed over for the next one; the next connection
    /// starts after the node connected to, so a lost node is tried last.
    #[tokio::test]
    async fn a_node_that_refuses_is_passed_over_for_the_next() {
        let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
        let mut config = RabbitConfig::new(format!("{dead},{}", broker_url()));
        // Queues of its own, gone a minute after the test even if it fails half way.
        config.namespace = format!("dagmq-rotation-{}", std::process::id());
        config.queue_expires = Some(Duration::from_secs(60));
        let Some(queue) = connect_or_skip(config, 0).await else { return };
        assert_eq!(queue.connected_node().await, Some(mask_url(&broker_url())));
        queue.ping().await.unwrap();
        // The connection is lost: the next call connects again, from the node after the one lost
        // (the refusing one), and ends on the broker again.
        let first = queue.inner.live().await.unwrap();
        assert_eq!(first.node, 1);
        assert_eq!(queue.inner.next.load(Ordering::Relaxed), 0, "the refusing node comes next");
        queue.inner.drop_live(&first).await;
        queue.publish(&Topic::Tasks("rotation-test".into()), b"x".to_vec()).await.unwrap();
        let second = queue.inner.live().await.unwrap();
        assert!(!Arc::ptr_eq(&first.connection, &second.connection));
        assert_eq!(second.node, 1);
        queue.delete_topology(&["rotation-test"]).await.ok();
    }

    /// A node that accepts TCP connections but never speaks AMQP (a hung node, a black hole)
    /// costs one connect timeout, then the next node is used.
    #[tokio::test]
    async fn a_node_that_never_answers_costs_one_connect_timeout() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let mut config = RabbitConfig::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f,{}", broker_url()));
        config.connect_timeout = Duration::from_millis(500);
        let started = std::time::Instant::now();
        let Some(queue) = connect_or_skip(config, 0).await else { return };
        assert!(started.elapsed() >= Duration::from_millis(500), "{:?}", started.elapsed());
        assert_eq!(queue.connected_node().await, Some(mask_url(&broker_url())));
        drop(silent);
    }

    #[tokio::test]
    async fn no_node_answering_is_an_error_naming_each_with_its_password_masked() {
        let (a, b) = (closed_port(), closed_port());
        let list = format!("amqp://u:pw-one@127.0.0.1:{a}/%2f,amqp://u:pw-two@127.0.0.1:{b}/%2f");
        let err = RabbitQueue::connect(RabbitConfig::new(list)).await.err().unwrap().to_string();
        assert!(err.contains("no node of the 2 answered"), "{err}");
        assert!(err.contains(&format!("amqp://u:***@127.0.0.1:{a}/%2f")), "{err}");
        assert!(err.contains(&format!("amqp://u:***@127.0.0.1:{b}/%2f")), "{err}");
        assert!(!err.contains("pw-one") && !err.contains("pw-two"), "{err}");
        // One node: its own error, as before lists.
        let err = RabbitQueue::connect(RabbitConfig::new(format!("amqp://u:pw-one@127.0.0.1:{a}/%2f")))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with(&format!("rabbitmq amqp://u:***@127.0.0.1:{a}/%2f: cannot connect")), "{err}");
    }

    #[test]
    fn urls() {
        assert_eq!(with_heartbeat("amqp://h/%2f"), "amqp://h/%2f?heartbeat=10");
        assert_eq!(with_heartbeat("amqp://h/%2f?x=1"), "amqp://h/%2f?x=1&heartbeat=10");
        assert_eq!(with_heartbeat("amqp://h?heartbeat=5"), "amqp://h?heartbeat=5");
    }
}
