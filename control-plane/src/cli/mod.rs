//! The `aviary` CLI.
