//! The `chatterbox` binary: settings, logging, then the server loop.

use std::process::ExitCode;

use chatterbox::config::{Cli, Config};
use chatterbox::server::Server;
use simplelog::{ConfigBuilder, LevelFilter, WriteLogger};

fn main() -> ExitCode {
    let cfg = match Config::from_args(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(Cli::Run(cfg)) => *cfg,
        Ok(Cli::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("chatterbox: {e}");
            return ExitCode::from(2);
        }
    };
    let log_cfg = ConfigBuilder::new()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .build();
    let _ = WriteLogger::init(cfg.log_level, log_cfg, std::io::stderr());
    let result = Server::bind(cfg).and_then(|mut server| {
        server.handle_signals()?;
        server.run()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("chatterbox: {e}");
            eprintln!("chatterbox: {e}");
            ExitCode::FAILURE
        }
    }
}
