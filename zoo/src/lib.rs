//! # zoo: binary neural networks with LAB, on candle
//!
//! Every architecture is a YAML spec (`specs/*.yaml`); the specs shipped with the crate are
//! compiled into Rust structs by [`zoo_macros::model!`] (see [`models`]), and any other spec
//! file is built at run time by [`Network`]. Both use the same [`layers`].
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let spec = zoo::spec("quicknet-lab")?;
//! let config = zoo::ModelConfig { input: "32x32x1".parse()?, classes: 10 };
//! zoo::init::initialize(&varmap, &spec, &config, 42, DType::F32, &Device::Cpu)?;
//! let model = zoo::build("quicknet-lab", vb, &config)?;
//! let logits = model.forward(&Tensor::zeros((8, 1, 32, 32), DType::F32, &Device::Cpu)?, false)?;
//! assert_eq!(logits.dims(), &[8, 10]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Generated code names this crate `::zoo`, also from inside it.
extern crate self as zoo;

pub mod data;
pub mod device;
pub mod engine;
pub mod hub;
pub mod import;
pub mod init;
pub mod inspect;
pub mod io;
pub mod layers;
pub mod models;
mod network;
pub mod plot;
mod registry;
pub mod show;
pub mod summary;
pub mod train;

pub use candle_core;
pub use candle_nn;
pub use network::{Network, Observer};
pub use registry::{build, list, spec, spec_text, Entry};
pub use zoo_spec as spec;
pub use zoo_spec::{ModelConfig, Spec};

/// Errors of the zoo library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec is invalid or does not fit the requested input.
    #[error(transparent)]
    Spec(#[from] zoo_spec::SpecError),
    /// A tensor operation failed (for example a missing or misshapen weight).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// No registered model has this name and no spec file has this path.
    #[error("unknown model `{name}`: not a registered name ({known}) and not a spec file")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: String,
    },
    /// A Keras weights file cannot be read, or is not one (see [`import`]).
    #[error("cannot import `{path}`: {message}")]
    KerasFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A Keras weights file does not fit the architecture it is imported into.
    #[error("the weights in `{path}` do not fit `{model}`: {message}")]
    WeightMismatch {
        /// The file.
        path: String,
        /// The spec's name.
        model: String,
        /// The first difference found, or the missing or extra tensors.
        message: String,
    },
    /// A dataset cannot be read or does not fit.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// Training settings that do not fit together or a failed training run.
    #[error("{0}")]
    Train(String),
    /// A run directory, checkpoint or weights file is missing or does not fit.
    #[error("`{path}`: {message}")]
    Run {
        /// The directory or file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The hub or a pretrained download failed, or a name is unknown.
    #[error("{0}")]
    Hub(String),
    /// A file cannot be written.
    #[error("cannot write `{path}`: {message}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

/// Loads a pretrained model, ready for inference: a pretrained name (`reactnet-lab`,
/// `quicknet.larq_in1k`, see `zoo::hub::PRETRAINED`), a hub repo `org/name` in the zoo's
/// layout, or a local directory in that layout. Downloads go to the Hugging Face cache;
/// settings come from the environment as for Python's `huggingface_hub` (`HF_ENDPOINT`,
/// `HF_TOKEN`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`). [`hub::Hub`] sets them in code.
///
/// ```no_run
/// let pretrained = zoo::load("reactnet-lab")?;
/// let [c, h, w] = [1, 32, 32];
/// let images = candle_core::Tensor::zeros((1, c, h, w), candle_core::DType::F32, &candle_core::Device::Cpu)?;
/// let logits = pretrained.model.forward(&images, false)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn load(name: &str) -> Result<hub::Pretrained, Error> {
    hub::Hub::from_env().load(name)
}

/// A network built from a spec: generated or built at run time.
pub trait Model: Send + Sync {
    /// Logits (`N x classes`) for a batch of `N x C x H x W` images. With `train`, batch norm
    /// uses and updates batch statistics.
    fn forward(
        &self,
        xs: &candle_core::Tensor,
        train: bool,
    ) -> candle_core::Result<candle_core::Tensor>;

    /// The spec the model was built from.
    fn spec(&self) -> &Spec;

    /// The input shape and class count the model was built for.
    fn config(&self) -> &ModelConfig;
}
