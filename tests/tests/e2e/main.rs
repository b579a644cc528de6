//! End-to-end scenarios over real processes, real mTLS and real sled. One test binary
//! (rust-analyzer style); one scenario per test, named for the behaviour it shows.
#![forbid(unsafe_code)]

mod auth;
mod bundles;
mod canary;
mod compromised;
mod configs;
mod contract;
mod deploy;
mod durability;
mod enrollment;
mod foreign;
mod inventory;
mod lifecycle;
mod packages;
mod protocol;
mod releases;
mod renewal;
mod runtime;
mod sandbox;
mod sensors;
mod tools;
mod weights;
