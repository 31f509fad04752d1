//! End-to-end tests: the `prefpipe` binary on real files (one test binary).

mod bad_input;
mod chat;
mod chat_models;
mod cli;
mod common;
mod hardening;
mod judge;
mod models;
mod objectives;
mod remote;
mod report;
mod resume;
mod score;
mod servers;
mod shard;
mod train;
