//! The layers every zoo model is built from, shared by generated models and the runtime builder.
//!
//! Tensors are NCHW. Each parameterised layer is built with `X::new(vb, input_shape, &config)`
//! from its spec config (see [`crate::spec`]) and stores its tensors under the `vb` prefix with
//! the names listed by [`crate::spec::analyze`]. Layers without parameters are plain functions.

mod binarize;
mod conv;
mod dense;
mod functional;
mod norm;

pub use binarize::{approx_sign, ste_sign, straight_through, swish_sign, Binarizer, Lab};
pub use conv::{depthwise_conv2d, quantize_kernel, DepthwiseConv2d, QuantConv2d};
pub use dense::{Bias, Dense, PRelu};
pub use functional::{
    avg_pool2d, blur_pool, duplicate, flatten, global_avg_pool, max_pool2d, pad2d, relu,
};
pub use norm::BatchNorm;
pub(crate) use norm::MIN_EPSILON;

use crate::spec::Init;

/// The candle initialiser used when a tensor is created on first use (for example in a fresh
/// `VarMap`). Truncated normals are approximated by plain normals of the same scale here;
/// [`crate::init::initialize`] draws the exact Keras distributions.
pub(crate) fn init_hint(init: Init, (fan_in, fan_out): (usize, usize)) -> candle_nn::Init {
    match init {
        Init::GlorotUniform => {
            let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
            candle_nn::Init::Uniform {
                lo: -limit,
                up: limit,
            }
        }
        Init::GlorotNormal => candle_nn::Init::Randn {
            mean: 0.0,
            stdev: (2.0 / (fan_in + fan_out) as f64).sqrt(),
        },
        Init::HeNormal => candle_nn::Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_in as f64).sqrt(),
        },
        Init::Constant(c) => candle_nn::Init::Const(c),
    }
}
