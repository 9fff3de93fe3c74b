//! Models: the UNet graph (written once over the backends) and loading from model files.

mod diffusers;
mod load;
pub mod unet;

pub use load::{load_model, resolve_config, LoadedModel, UNets, MAX_RANDOM_PARAMETERS};
pub use unet::{Conditioning, UNet};
