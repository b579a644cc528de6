//! The Aviary edge daemon: keeps one mTLS fleet stream to the control plane, applies the
//! weights it is sent (atomically, persisted, exposed locally), and keeps working when the
//! control plane is away. Module runtime arrives with issue 3.

pub mod backoff;
pub mod config;
mod daemon;
mod error;
pub mod link;
pub mod local_http;
mod session;
pub mod weights;

pub use daemon::{run, Ready};
pub use error::EdgeError;
