//! dagmq-worker
