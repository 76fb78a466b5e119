//! The `knowbe4-source` binary: an AWS Lambda function when `AWS_LAMBDA_RUNTIME_API` is
//! set, a command-line tool otherwise, through the same code path.

use std::process::ExitCode;

use clap::Parser;
use knowbe4_source::app::App;
use knowbe4_source::cli::{Cli, Command};
use knowbe4_source::lambda;

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async_main())
}

async fn async_main() -> ExitCode {
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        return match lambda::run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("{}", knowbe4_source::error::Chain(&*err));
                ExitCode::FAILURE
            }
        };
    }
    knowbe4_source::logging::init_cli();
    let cli = Cli::parse();
    if let Command::Demo { events } = cli.command {
        return demo(events).await;
    }
    let app = match App::from_env().await {
        Ok(app) => app,
        Err(err) => {
            eprintln!("error: {}", err.chain());
            return ExitCode::from(2);
        }
    };
    match knowbe4_source::cli::run_command(&app, &cli.command).await {
        Ok(code) => ExitCode::from(code as u8),
        Err(err) => {
            eprintln!("error: {}", err.chain());
            ExitCode::from(2)
        }
    }
}

/// The demo needs the simulator, which only a build with the `testkit` feature holds
/// (the Lambda build leaves it out).
#[cfg(feature = "testkit")]
async fn demo(events: usize) -> ExitCode {
    knowbe4_source::demo::run(events).await
}

/// Without the simulator: says how to build a binary that has it.
#[cfg(not(feature = "testkit"))]
async fn demo(_events: usize) -> ExitCode {
    eprintln!(
        "error: this build has no KnowBe4 simulator; run the demo with `cargo run --release --features testkit -- demo`"
    );
    ExitCode::from(2)
}
