//! The `driftless` binary: parse the command line, start telemetry, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = driftless::cli::Cli::parse();
    let runtime = match driftless::cli::runtime_for(&cli.command)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("driftless: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(driftless::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("driftless: {e:#}");
            ExitCode::FAILURE
        }
    }
}
