#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]
//! dagmq's integration and end-to-end tests, in one binary to keep link time down.
//! - `scheduling`: scheduler and worker over the in-memory backends, on tokio's paused clock.
//! - `cli_standalone`: the `dagmq` binary in standalone mode, driven through its CLI.

mod api;
mod control_flow;
mod dag_versions;
mod eager;
mod faults;
mod hostile_headers;
mod operations;
mod outputs;
mod partial_failure;
mod pools;
mod queue_contract;
mod races;
mod redis_ambiguity;
mod redis_liveness;
mod scheduling;
mod services;
mod shell_params;
mod store_contract;
mod store_failover;
mod support;
mod suspend;
mod trigger_ids;
