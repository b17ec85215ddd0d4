//! `llmservice pull`: a GGUF model from the Hub into the models directory,
//! with a progress bar; and seed 003's `MODEL_REPO_ID` + `MODEL_FILENAME`,
//! fetched before the server starts when the file is missing.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::cli::PullArgs;
use crate::hub::{Hub, ModelRef, Progress, Pulled};
use crate::settings::Settings;

pub async fn run(args: PullArgs, settings: Settings) -> Result<(), String> {
    let mut reference = ModelRef::parse(&args.model).map_err(|e| e.to_string())?;
    if let Some(quant) = args.quant {
        if reference.file.is_some() {
            return Err("name either a file or --quant, not both".to_owned());
        }
        reference.quant = Some(quant);
    }
    if args.revision.is_some() {
        reference.revision = args.revision;
    }
    let pulled = pull_with_bar(&settings, &reference).await?;
    let model = pulled.model_name();
    if pulled.downloaded == 0 {
        println!("{model} is already in {}", settings.models_dir.display());
    } else {
        println!(
            "{model}: {} in {}",
            human_bytes(pulled.downloaded),
            settings.models_dir.display()
        );
    }
    println!("serve it as \"model\": \"{model}\"");
    Ok(())
}

/// Downloads what `reference` names into the models directory, drawing a
/// progress bar on the terminal (plain log lines when it is not one).
async fn pull_with_bar(settings: &Settings, reference: &ModelRef) -> Result<Pulled, String> {
    let hub = Hub::new(settings.hub.clone()).map_err(|e| e.to_string())?;
    let (listing, files) = hub.plan(reference).await.map_err(|e| e.to_string())?;
    let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    eprintln!(
        "{}@{}: {}",
        listing.repo,
        listing.commit.as_deref().unwrap_or(&listing.revision),
        names.join(", ")
    );
    let bar = ProgressBar::new(files.iter().filter_map(|f| f.size).sum());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let mut show = |p: Progress| {
        bar.set_message(p.file.rsplit('/').next().unwrap_or(&p.file).to_owned());
        if let Some(total) = p.total {
            bar.set_length(total);
        }
        bar.set_position(p.done);
    };
    let result = hub
        .pull(&listing, &files, &settings.models_dir, &mut show, &cancel)
        .await;
    bar.finish_and_clear();
    result.map_err(|e| e.to_string())
}

/// Seed 003's start-up download: `MODEL_REPO_ID` + `MODEL_FILENAME` into the
/// models directory unless the file is already there. Answers the file.
pub async fn startup_model(settings: &Settings, reference: &ModelRef) -> Result<PathBuf, String> {
    if let Some(file) = &reference.file {
        let name = file.rsplit('/').next().unwrap_or(file);
        let path = settings.models_dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    tracing::info!(repo = %reference.repo, file = ?reference.file, endpoint = settings.hub.endpoint, "MODEL_REPO_ID: downloading the model before serving");
    let pulled = pull_with_bar(settings, reference).await?;
    pulled
        .paths
        .into_iter()
        .next()
        .ok_or_else(|| format!("{} gave no file", reference.repo))
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
