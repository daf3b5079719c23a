#!/usr/bin/env bash
# Runs two dagmq binaries side by side: each figure (fanout 10000, chain 1000, runs 1000, in
# standalone and distributed mode) with one binary then the other, alternating which goes first
# from round to round, each after the machine is at least 90 % idle. Prints the `bench=` lines,
# each prefixed with `before` or `after`.
#   cargo build --release -p dagmq && cp target/release/dagmq /tmp/dagmq-after
#   git worktree add /tmp/old OLD && (cd /tmp/old && cargo build --release -p dagmq)
#   scripts/bench-compare.sh /tmp/old/target/release/dagmq /tmp/dagmq-after 3
set -uo pipefail
before="${1:?usage: scripts/bench-compare.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]}"
after="${2:?usage: scripts/bench-compare.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]}"
rounds="${3:-3}"
amqp="${DAGMQ_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
redis="${DAGMQ_REDIS_URL:-redis://127.0.0.1:6379}"

# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"

# Runs one figure with the binary named by $1 (before or after); the rest are its arguments.
figure() {
  local name=$1 binary
  shift
  if [ "$name" = before ]; then binary=$before; else binary=$after; fi
  settle
  env -u DAGMQ_AMQP_URL -u DAGMQ_REDIS_URL "$binary" bench "$@" 2>/dev/null | grep '^bench=' | sed "s/^/$name /"
}

echo "# $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)"
for round in $(seq "$rounds"); do
  if [ $((round % 2)) = 1 ]; then order="before after"; else order="after before"; fi
  for workload in "fanout 10000" "chain 1000" "runs 1000"; do
    for name in $order; do
      # shellcheck disable=SC2086
      figure "$name" $workload
    done
    for name in $order; do
      # shellcheck disable=SC2086
      figure "$name" $workload --amqp "$amqp" --redis "$redis"
    done
  done
done
