use clap::Parser;

use llmservice::cli::{Cli, Command, ServeArgs};
use llmservice::settings::{ProcessEnv, Settings};
use llmservice::{bench, models, pull, server};

fn main() -> std::process::ExitCode {
    // `.env` fills in what the environment does not set; flags override both.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs::default()));
    let args = match &command {
        Command::Serve(a) | Command::Models(a) => a.clone(),
        Command::Bench(b) => b.serve_args(),
        Command::Pull(p) => p.serve_args(),
        Command::ExtractText(e) => return llmservice::extract::child_main(&e.kind),
    };
    let settings = match Settings::resolve(&args, &ProcessEnv) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llmservice: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(&settings.log_level);
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    // The bench client is light and must not compete with the server it measures.
    let runtime = match &command {
        Command::Bench(_) | Command::Pull(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("llmservice: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match command {
        Command::Serve(_) => runtime.block_on(server::serve(settings)),
        Command::Models(_) => {
            list_models(settings);
            Ok(())
        }
        Command::Bench(args) => runtime.block_on(bench::run(args, settings)),
        Command::Pull(args) => runtime.block_on(pull::run(args, settings)),
        Command::ExtractText(_) => unreachable!("answered before the settings"),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmservice: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(level: &str) {
    // llama.cpp's own log is chatty at info: keep it to errors unless RUST_LOG asks.
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},llama_cpp_2=error"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn list_models(settings: Settings) {
    let registry = models::Registry::new(std::sync::Arc::new(settings));
    for entry in registry.list() {
        println!(
            "{}\t{}\t{}",
            entry.id,
            entry.kind.as_str(),
            entry.path.display()
        );
    }
}
