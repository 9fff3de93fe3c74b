//! Opening a model file: the weights, the config from its sources, the UNet.

use std::path::Path;

use crate::config::{resolve, PartialConfig, ResolvedConfig, Source};
use crate::error::{Error, Result};
use crate::weights::SafetensorsFile;

use super::unet::UNet;

/// A model file, its resolved config and the network built from it.
pub struct LoadedModel {
    pub file: SafetensorsFile,
    pub config: ResolvedConfig,
    pub unet: UNet,
}

/// Resolves the config of `file` from, in order, the explicit `config` path, `<stem>.json`
/// beside the weights and the `config` metadata entry: each field comes from the first of them
/// that holds it; fields none of them gives are inferred from the weights or take their
/// documented defaults.
pub fn resolve_config(file: &SafetensorsFile, config: Option<&Path>) -> Result<ResolvedConfig> {
    let read = |path: &Path| -> Result<(Source, PartialConfig)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let partial = PartialConfig::from_json(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok((Source::File(path.display().to_string()), partial))
    };
    let mut sources = Vec::new();
    if let Some(path) = config {
        sources.push(read(path)?);
    }
    let beside = file.path().with_extension("json");
    if beside.is_file() && config != Some(beside.as_path()) {
        sources.push(read(&beside)?);
    }
    if let Some(text) = file.metadata().get("config") {
        let partial = PartialConfig::from_json(text).map_err(|e| {
            Error::Config(format!("{} metadata `config`: {e}", file.path().display()))
        })?;
        sources.push((Source::Metadata, partial));
    }
    resolve(&sources, &file.shapes())
}

impl LoadedModel {
    /// A model with random weights for `config` (benchmarks); `label` names it in messages.
    pub fn random(config: ResolvedConfig, seed: u64, label: &str) -> Result<Self> {
        Ok(LoadedModel {
            file: SafetensorsFile::empty(label)?,
            unet: UNet::random(&config.unet, seed)?,
            config,
        })
    }
}

/// Opens `weights`, resolves its config and builds the UNet.
pub fn load_model(weights: &Path, config: Option<&Path>) -> Result<LoadedModel> {
    let file = SafetensorsFile::open(weights)?;
    let config = resolve_config(&file, config)?;
    let unet = UNet::load(&file, &config.unet)?;
    Ok(LoadedModel { file, config, unet })
}
