//! The Aviary control plane: holds release and fleet state in sled and streams desired
//! state to edge daemons over mTLS bidirectional gRPC streams. Also home of the `aviary`
//! CLI (`cli`), which talks to it as an admin.

mod admission;
mod analysis;
mod api;
#[cfg(test)]
mod arbitrary;
mod audit;
mod auth;
mod blobs;
mod catalog;
pub mod cli;
pub mod config;
mod connections;
pub mod deltas;
mod deploy;
mod error;
mod finite;
mod fleet;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod journal;
mod layers;
mod limits;
mod listener;
mod node;
mod registry;
mod release;
mod rollout;
mod selector;
mod server;
mod store;
pub mod telemetry;
mod wire;

pub use error::ControlPlaneError;
pub use server::run;
pub use store::maintenance;
