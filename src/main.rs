//! The `chatterbox` binary: settings, logging, then the server loop (or, with `--workers`
//! above 1, the supervisor of that many worker processes).

use std::process::ExitCode;

use chatterbox::config::{Cli, Config};
use chatterbox::server::Server;

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
    if cfg.workers > 1 {
        // The supervisor: it starts the workers and does not serve itself.
        if let Err(e) = chatterbox::supervise::check(&cfg) {
            eprintln!("chatterbox: {e}");
            return ExitCode::from(2);
        }
        chatterbox::logging::init(cfg.log_level, cfg.log_format);
        return chatterbox::supervise::run(&cfg);
    }
    chatterbox::logging::init(cfg.log_level, cfg.log_format);
    let result = Server::bind(cfg).and_then(|mut server| {
        server.handle_signals()?;
        server.run()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: through the logger (a JSON log stays all JSON), or on stderr when the log
            // level hides errors.
            if log::log_enabled!(log::Level::Error) {
                log::error!("chatterbox: {e}");
            } else {
                eprintln!("chatterbox: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
