//! Models: the UNet graph, its activation workspace, and loading from model files.

mod load;
pub mod unet;
pub mod unet_gpu;
pub mod workspace;

pub use load::{load_model, LoadedModel};
pub use unet::{Conditioning, UNet};
pub use unet_gpu::{GpuConditioning, GpuUNet, GpuWorkspace};
pub use workspace::Workspace;
