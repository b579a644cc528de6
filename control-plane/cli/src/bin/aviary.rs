//! `aviary`: the operator's CLI (see `aviary --help`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use aviary_cli::{self as cli, Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo hosts a whole fleet in this process: keep its logs to warnings.
    let default = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aviary: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the outermost context and its causes.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                line.push_str(": ");
                line.push_str(&cause.to_string());
            }
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                line = cli::describe_status(status);
            }
            eprintln!("aviary: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
