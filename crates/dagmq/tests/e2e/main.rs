#![allow(clippy::unwrap_used, missing_docs, unreachable_pub)]
//! End-to-end tests of the `dagmq` binary: real processes, driven through the CLI.

mod app;
mod bench;
mod browser;
mod chaos;
mod cli;
mod cluster;
mod control_flow;
mod distributed;
mod failpoints;
mod history;
mod operations;
mod params;
mod rabbit_cluster;
mod redis_sentinel;
mod reload;
mod security;
mod standalone;
mod support;
mod tls;
mod traces;
mod validate;
