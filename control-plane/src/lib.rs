//! The Aviary control plane: holds release and fleet state in sled and streams desired
//! state to edge daemons over mTLS bidirectional gRPC streams. Its admin client, the
//! `aviary` CLI, is the `aviary-cli` crate beside it (`control-plane/cli`).
#![forbid(unsafe_code)]

mod admission;
mod analysis;
mod api;
#[cfg(test)]
mod arbitrary;
mod audit;
mod auth;
mod authority;
mod blobs;
mod catalog;
pub mod config;
mod connections;
pub mod deltas;
mod enrollment;
mod error;
mod filter;
mod finite;
mod fleet;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod hex;
mod inventory;
mod journal;
mod layers;
mod limits;
mod listener;
mod node;
mod registry;
mod release;
mod requests;
mod rollout;
mod selector;
mod server;
mod store;
pub mod telemetry;
mod wire;

pub use error::ControlPlaneError;
pub use server::run;
pub use store::maintenance;
