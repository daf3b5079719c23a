//! dagmq-scheduler
