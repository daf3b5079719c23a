//! Task messages from anyone with access to the broker, with headers a worker did not expect:
//! every type RabbitMQ carries, large values, a thousand headers, values that are not UTF-8.
//! Each is delivered to dagmq's consumer with its body intact (the trace parent falls back to the
//! run's), and the consumer goes on with the next message: nothing poisons it.

use dagmq_core::trace::{TRACEPARENT_HEADER, TraceParent};
use dagmq_core::{Queue, Topic};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::queue_contract::next;
use crate::services::{amqp_url, rabbit_queue};

/// Header tables no dagmq producer writes (a content header must fit in one frame, 128 KiB by
/// default: the broker refuses a larger one).
fn hostile_tables() -> Vec<(&'static str, FieldTable)> {
    let mut tables = Vec::new();
    let one = |name: &str, value: AMQPValue| {
        let mut table = FieldTable::default();
        table.insert(ShortString::from(name), value);
        table
    };
    let bytes = |b: &[u8]| LongString::from(b.to_vec());
    tables.push(("non-utf8 value", one(TRACEPARENT_HEADER, AMQPValue::LongString(bytes(b"00-\xff\xfe-\xc3\x28-01")))));
    tables.push(("byte array", one(TRACEPARENT_HEADER, AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255])))));
    tables.push(("integer", one(TRACEPARENT_HEADER, AMQPValue::LongLongInt(-1))));
    tables.push(("void", one(TRACEPARENT_HEADER, AMQPValue::Void)));
    tables.push(("decimal", one(TRACEPARENT_HEADER, AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 7 }))));
    tables.push(("nested table", one(TRACEPARENT_HEADER, AMQPValue::FieldTable(one("a", AMQPValue::Boolean(true))))));
    let mut array = FieldArray::default();
    array.push(AMQPValue::LongString(LongString::from("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")));
    tables.push(("array", one(TRACEPARENT_HEADER, AMQPValue::FieldArray(array))));
    tables.push(("huge value", one(TRACEPARENT_HEADER, AMQPValue::LongString(bytes(&vec![b'a'; 100_000])))));
    let mut many = FieldTable::default();
    for i in 0..1_000 {
        many.insert(ShortString::from(format!("h{i}")), AMQPValue::LongString(LongString::from("x".repeat(64))));
    }
    tables.push(("1,000 headers", many));
    tables.push(("a spoofed dead-letter reason", one("x-dagmq-error", AMQPValue::LongString(bytes(b"spoofed")))));
    tables
}

#[tokio::test(flavor = "multi_thread")]
async fn task_messages_with_hostile_headers_are_delivered_and_do_not_stop_the_consumer() {
    let Some(rabbit) = rabbit_queue(10).await else { return };
    let topic = Topic::Tasks("hostile".into());
    let mut consumer = rabbit.consume(&topic, 10).await.unwrap();
    let queue_name = rabbit.queue_name(&topic);
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let tables = hostile_tables();
    for (i, (_, table)) in tables.iter().enumerate() {
        let properties = BasicProperties::default().with_headers(table.clone());
        let body = format!("m{i}");
        channel
            .basic_publish(
                "".into(),
                queue_name.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    rabbit.publish(&topic, b"after".to_vec()).await.unwrap();
    for (i, (what, _)) in tables.iter().enumerate() {
        let delivery = next(&mut consumer).await;
        assert_eq!(delivery.payload, format!("m{i}").into_bytes(), "{what}");
        assert!(!delivery.redelivered, "{what}: delivered before and lost");
        assert_eq!(
            TraceParent::of_message(delivery.header(TRACEPARENT_HEADER), "r"),
            TraceParent::of_run("r"),
            "{what}: the run's parent"
        );
        delivery.ack().await.unwrap();
    }
    let after = next(&mut consumer).await;
    assert_eq!(after.payload, b"after");
    after.ack().await.unwrap();
    let _ = rabbit.delete_topology(&["hostile"]).await;
}
