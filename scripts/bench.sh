#!/usr/bin/env bash
# Runs the whole benchmark matrix and prints one `bench=...` line per figure.
# Standalone needs nothing; distributed needs RabbitMQ and Redis (started here when down, as
# .ci/run does) at DAGMQ_AMQP_URL and DAGMQ_REDIS_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
amqp="${DAGMQ_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
redis="${DAGMQ_REDIS_URL:-redis://127.0.0.1:6379}"

redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 --port 6379
rabbitmq-diagnostics -q ping >/dev/null 2>&1 || { rabbitmq-server -detached; sleep 10; rabbitmqctl await_startup; }

cargo build --release -p dagmq
bench=./target/release/dagmq

# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
echo "# $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(date -u +%Y-%m-%dT%H:%MZ)"
# Each figure three times (the machine is shared with the broker: single runs vary), then the
# scale runs once: 100,000 tasks wide, and 10,000 in 100 layers of 100.
for workload in "fanout 10000" "fanout 10000" "fanout 10000" "chain 1000" "chain 1000" "chain 1000" \
  "runs 1000" "runs 1000" "runs 1000" "fanout 100000" "layers 100 100"; do
  settle
  env -u DAGMQ_AMQP_URL -u DAGMQ_REDIS_URL $bench bench $workload
done
for workload in "fanout 10000" "fanout 10000" "fanout 10000" "chain 1000" "chain 1000" "chain 1000" \
  "runs 1000" "fanout 100000" "layers 100 100"; do
  settle
  $bench bench $workload --amqp "$amqp" --redis "$redis"
done
