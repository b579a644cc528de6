//! The Aviary edge daemon: keeps one mTLS fleet stream to the control plane, applies the
//! weights it is sent (atomically, persisted, exposed locally), and keeps working when the
//! control plane is away; installs signed modules into crash-safe slots.

pub mod backoff;
pub mod config;
mod daemon;
pub mod enroll;
mod error;
mod local;
pub mod local_http;
pub mod modules;
mod renewal;
pub mod runtime;
mod runtime_config;
mod session;
pub mod weights;

pub use daemon::{run, Ready};
pub use error::EdgeError;
