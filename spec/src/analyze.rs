//! Shape inference, the parameter list and the cost of every layer, for one input size and class
//! count. The runtime builder, the generated models and `zoo summary` all read this.

use crate::error::SpecError;
use crate::ir::*;

/// The shape of a feature map (per image) flowing between layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureShape {
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// True when every value is ±1 (the output of a binarizer).
    pub binary: bool,
}

impl std::fmt::Display for FeatureShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.height, self.width, self.channels)
    }
}

/// One stored tensor of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// Full weight name, for example `stage1.block1.conv.weight`.
    pub name: String,
    /// Shape (convolution kernels are `out x in x kh x kw`, dense `out x in`).
    pub shape: Vec<usize>,
    /// Initialiser.
    pub init: Init,
    /// Fan-in and fan-out as Keras computes them, for the Glorot and He initialisers.
    pub fans: (usize, usize),
    /// False for batch-norm moving statistics.
    pub trainable: bool,
    /// True for binarized kernels, stored with one bit per weight in a deployed model.
    pub binary: bool,
    /// The weight clip applied after every optimiser step, if any.
    pub weight_clip: Option<f64>,
}

impl Param {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one node takes, produces, stores and costs.
#[derive(Clone, Debug)]
pub struct LayerInfo {
    /// The node's name.
    pub name: String,
    /// The layer kind (`quant_conv`, `batch_norm`, ...).
    pub kind: &'static str,
    /// Nesting depth (0 at the top level).
    pub depth: usize,
    /// Input shape.
    pub input: FeatureShape,
    /// Output shape.
    pub output: FeatureShape,
    /// Tensors the node stores.
    pub params: Vec<Param>,
    /// Multiply-accumulates with both operands binary (XNOR-popcount).
    pub binary_macs: u64,
    /// Other multiply-accumulates.
    pub float_macs: u64,
}

/// Shapes and costs of every node for one configuration.
#[derive(Clone, Debug)]
pub struct Analysis {
    /// Every node in execution order (containers before their children).
    pub layers: Vec<LayerInfo>,
    /// The network's output shape.
    pub output: FeatureShape,
}

impl Analysis {
    /// The input shape of the node called `name`.
    ///
    /// # Panics
    /// If there is no such node; generated code only asks for names it was generated from.
    pub fn input_of(&self, name: &str) -> FeatureShape {
        match self.layers.iter().find(|l| l.name == name) {
            Some(layer) => layer.input,
            None => panic!("no layer named `{name}` in this spec"),
        }
    }

    /// Every stored tensor, in execution order.
    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.layers.iter().flat_map(|l| l.params.iter())
    }

    /// Totals over all layers.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for p in self.params() {
            t.params += p.len() as u64;
            if p.trainable {
                t.trainable_params += p.len() as u64;
            }
            if p.binary {
                t.binary_params += p.len() as u64;
            }
        }
        for l in &self.layers {
            t.binary_macs += l.binary_macs;
            t.float_macs += l.float_macs;
        }
        t
    }
}

/// Whole-model totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Stored values, moving statistics included (as Keras counts them).
    pub params: u64,
    /// Values the optimiser updates.
    pub trainable_params: u64,
    /// Values of binarized kernels.
    pub binary_params: u64,
    /// Binary multiply-accumulates per image.
    pub binary_macs: u64,
    /// Other multiply-accumulates per image.
    pub float_macs: u64,
}

impl Totals {
    /// Bytes of a deployed model with 1-bit binary kernels and 32-bit everything else.
    pub fn model_size_bytes(&self) -> f64 {
        (self.binary_params as f64) / 8.0 + 4.0 * (self.params - self.binary_params) as f64
    }
}

/// TensorFlow's output size for one dimension, or `None` when the window does not fit (VALID).
pub fn output_size(input: usize, kernel: usize, stride: usize, padding: Padding) -> Option<usize> {
    match padding {
        Padding::Same => Some(input.div_ceil(stride)),
        Padding::Valid => (input >= kernel).then(|| (input - kernel) / stride + 1),
    }
}

/// TensorFlow SAME padding for one dimension: `(before, after)`, the smaller half before.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

/// The most values one feature map (per image) or one weight tensor may hold: 2^28, 1 GiB as
/// f32, far above any real network.
pub const MAX_TENSOR_VALUES: u128 = 1 << 28;

/// The most parameters a model may have: 2^30, 4 GiB as f32.
pub const MAX_PARAMS: u128 = 1 << 30;

/// Keras' fans for a kernel of `kh x kw` with `inputs` and `outputs` channels.
fn fans(kernel: [usize; 2], inputs: usize, outputs: usize) -> (usize, usize) {
    let rf = kernel[0] * kernel[1];
    (rf * inputs, rf * outputs)
}

fn param(name: String, shape: Vec<usize>, init: Init, fans: (usize, usize)) -> Param {
    Param {
        name,
        shape,
        init,
        fans,
        trainable: true,
        binary: false,
        weight_clip: None,
    }
}

/// The three tensors of a LAB binarizer on `channels` channels, under `prefix`.
fn lab_params(prefix: &str, channels: usize) -> Vec<Param> {
    vec![
        param(
            format!("{prefix}.weight"),
            vec![2 * channels, 1, 3, 3],
            Init::GlorotUniform,
            fans([3, 3], channels, 2),
        ),
        param(
            format!("{prefix}.bias"),
            vec![2 * channels],
            Init::Constant(0.0),
            (0, 0),
        ),
        param(
            format!("{prefix}.beta"),
            vec![1],
            Init::Constant(1.0),
            (0, 0),
        ),
    ]
}

/// Works out shapes, parameters and costs of `spec` at `config`.
pub fn analyze(spec: &Spec, config: &ModelConfig) -> Result<Analysis, SpecError> {
    let input = FeatureShape {
        channels: config.input.channels,
        height: config.input.height,
        width: config.input.width,
        binary: false,
    };
    let mut walker = Walker {
        spec,
        classes: config.classes,
        layers: Vec::new(),
        params: 0,
    };
    let output = walker.sequence(&spec.nodes, input, 0)?;
    if (output.height, output.width, output.channels) != (1, 1, config.classes) {
        let last = spec
            .nodes
            .last()
            .expect("decode rejects a spec without layers");
        return Err(SpecError::at(
            &spec.source,
            last.location,
            &last.name,
            format!(
                "the network ends with {output} but must give one logit per class (1x1x{}); end the head with `global_avg_pool` (or `flatten`) and `dense` (units: classes)",
                config.classes
            ),
        ));
    }
    Ok(Analysis {
        layers: walker.layers,
        output,
    })
}

struct Walker<'a> {
    spec: &'a Spec,
    classes: usize,
    layers: Vec<LayerInfo>,
    /// Parameters so far.
    params: u128,
}

impl Walker<'_> {
    fn sequence(
        &mut self,
        nodes: &[Node],
        mut shape: FeatureShape,
        depth: usize,
    ) -> Result<FeatureShape, SpecError> {
        for node in nodes {
            shape = self.node(node, shape, depth)?;
        }
        Ok(shape)
    }

    fn error(&self, node: &Node, input: FeatureShape, message: String) -> SpecError {
        SpecError::at(
            &self.spec.source,
            node.location,
            &node.name,
            format!("{message} (input to this layer: {input})"),
        )
    }

    /// Refuses a tensor of `dims` (`what` names it) larger than [`MAX_TENSOR_VALUES`], before
    /// anything is computed from its size.
    fn bounded(
        &self,
        node: &Node,
        input: FeatureShape,
        what: &str,
        dims: &[usize],
    ) -> Result<(), SpecError> {
        let values = dims.iter().fold(1u128, |n, &d| n.saturating_mul(d as u128));
        if values > MAX_TENSOR_VALUES {
            return Err(self.error(
                node,
                input,
                format!("{what} would hold {values} values, more than the limit of {MAX_TENSOR_VALUES} (1 GiB as f32)"),
            ));
        }
        Ok(())
    }

    fn spatial(
        &self,
        node: &Node,
        input: FeatureShape,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Result<(usize, usize), SpecError> {
        match (
            output_size(input.height, kernel[0], stride[0], padding),
            output_size(input.width, kernel[1], stride[1], padding),
        ) {
            (Some(h), Some(w)) => Ok((h, w)),
            _ => Err(self.error(
                node,
                input,
                format!(
                    "a {}x{} window with VALID padding does not fit in {}x{}",
                    kernel[0], kernel[1], input.height, input.width
                ),
            )),
        }
    }

    fn node(
        &mut self,
        node: &Node,
        input: FeatureShape,
        depth: usize,
    ) -> Result<FeatureShape, SpecError> {
        let index = self.layers.len();
        self.layers.push(LayerInfo {
            name: node.name.clone(),
            kind: node.op.kind(),
            depth,
            input,
            output: input,
            params: Vec::new(),
            binary_macs: 0,
            float_macs: 0,
        });
        let c = input.channels;
        self.bounded(node, input, "its input", &[c, input.height, input.width])?;
        let name = &node.name;
        let mut params = Vec::new();
        let (mut binary_macs, mut float_macs) = (0u64, 0u64);
        let output = match &node.op {
            Op::Conv(conv) => {
                let kernel = [conv.filters, c, conv.kernel[0], conv.kernel[1]];
                self.bounded(node, input, "the kernel", &kernel)?;
                let (h, w) = self.spatial(node, input, conv.kernel, conv.stride, conv.padding)?;
                let mut weight = param(
                    format!("{name}.weight"),
                    vec![conv.filters, c, conv.kernel[0], conv.kernel[1]],
                    conv.init,
                    fans(conv.kernel, c, conv.filters),
                );
                weight.binary = conv.kernel_quantizer.is_binary();
                weight.weight_clip = conv.weight_clip;
                params.push(weight);
                if conv.bias {
                    params.push(param(
                        format!("{name}.bias"),
                        vec![conv.filters],
                        Init::Constant(0.0),
                        (0, 0),
                    ));
                }
                if let Activation::Lab(_) = conv.input {
                    params.extend(lab_params(&format!("{name}.lab"), c));
                    float_macs += (9 * 2 * c * input.height * input.width) as u64;
                }
                let macs = (h * w * conv.kernel[0] * conv.kernel[1] * c * conv.filters) as u64;
                if (input.binary || conv.input.is_binary()) && conv.kernel_quantizer.is_binary() {
                    binary_macs += macs;
                } else {
                    float_macs += macs;
                }
                FeatureShape {
                    channels: conv.filters,
                    height: h,
                    width: w,
                    binary: false,
                }
            }
            Op::DepthwiseConv(dw) => {
                let (h, w) = self.spatial(node, input, dw.kernel, dw.stride, dw.padding)?;
                let out = c * dw.multiplier;
                self.bounded(
                    node,
                    input,
                    "the kernel",
                    &[out, dw.kernel[0], dw.kernel[1]],
                )?;
                params.push(param(
                    format!("{name}.weight"),
                    vec![out, 1, dw.kernel[0], dw.kernel[1]],
                    dw.init,
                    fans(dw.kernel, c, dw.multiplier),
                ));
                if dw.bias {
                    params.push(param(
                        format!("{name}.bias"),
                        vec![out],
                        Init::Constant(0.0),
                        (0, 0),
                    ));
                }
                float_macs += (h * w * dw.kernel[0] * dw.kernel[1] * out) as u64;
                FeatureShape {
                    channels: out,
                    height: h,
                    width: w,
                    binary: false,
                }
            }
            Op::BatchNorm(bn) => {
                if bn.scale {
                    params.push(param(
                        format!("{name}.weight"),
                        vec![c],
                        Init::Constant(1.0),
                        (0, 0),
                    ));
                }
                if bn.center {
                    params.push(param(
                        format!("{name}.bias"),
                        vec![c],
                        Init::Constant(0.0),
                        (0, 0),
                    ));
                }
                for (stat, value) in [("running_mean", 0.0), ("running_var", 1.0)] {
                    let mut p = param(
                        format!("{name}.{stat}"),
                        vec![c],
                        Init::Constant(value),
                        (0, 0),
                    );
                    p.trainable = false;
                    params.push(p);
                }
                FeatureShape {
                    binary: false,
                    ..input
                }
            }
            Op::Relu => FeatureShape {
                binary: false,
                ..input
            },
            Op::PRelu(p) => {
                params.push(param(
                    format!("{name}.weight"),
                    vec![c],
                    Init::Constant(p.alpha),
                    (0, 0),
                ));
                FeatureShape {
                    binary: false,
                    ..input
                }
            }
            Op::Bias => {
                params.push(param(
                    format!("{name}.bias"),
                    vec![c],
                    Init::Constant(0.0),
                    (0, 0),
                ));
                FeatureShape {
                    binary: false,
                    ..input
                }
            }
            Op::Binarize(act) => {
                if let Activation::Lab(_) = act {
                    params.extend(lab_params(name, c));
                    float_macs += (9 * 2 * c * input.height * input.width) as u64;
                }
                FeatureShape {
                    binary: act.is_binary() || input.binary,
                    ..input
                }
            }
            Op::MaxPool(pool) | Op::AvgPool(pool) => {
                let (h, w) = self.spatial(node, input, pool.size, pool.stride, pool.padding)?;
                let binary = input.binary && matches!(node.op, Op::MaxPool(_));
                FeatureShape {
                    channels: c,
                    height: h,
                    width: w,
                    binary,
                }
            }
            Op::BlurPool(blur) => {
                let (h, w) = self.spatial(
                    node,
                    input,
                    [3, 3],
                    [blur.stride, blur.stride],
                    Padding::Same,
                )?;
                float_macs += (9 * c * h * w) as u64;
                FeatureShape {
                    channels: c,
                    height: h,
                    width: w,
                    binary: false,
                }
            }
            Op::GlobalAvgPool => FeatureShape {
                channels: c,
                height: 1,
                width: 1,
                binary: false,
            },
            Op::Flatten => FeatureShape {
                channels: c * input.height * input.width,
                height: 1,
                width: 1,
                binary: input.binary,
            },
            Op::Dense(dense) => {
                if input.height != 1 || input.width != 1 {
                    return Err(self.error(
                        node,
                        input,
                        "a dense layer needs a flat input (1x1 spatial); put `flatten` or `global_avg_pool` before it".into(),
                    ));
                }
                let units = dense.units.resolve(self.classes);
                self.bounded(node, input, "the weight matrix", &[units, c])?;
                params.push(param(
                    format!("{name}.weight"),
                    vec![units, c],
                    dense.init,
                    (c, units),
                ));
                if dense.bias {
                    params.push(param(
                        format!("{name}.bias"),
                        vec![units],
                        Init::Constant(0.0),
                        (0, 0),
                    ));
                }
                float_macs += (units * c) as u64;
                FeatureShape {
                    channels: units,
                    height: 1,
                    width: 1,
                    binary: false,
                }
            }
            Op::Duplicate => FeatureShape {
                channels: 2 * c,
                ..input
            },
            Op::Residual(r) => {
                let shortcut = self.sequence(&r.shortcut, input, depth + 1)?;
                let body = self.sequence(&r.body, input, depth + 1)?;
                if (shortcut.channels, shortcut.height, shortcut.width)
                    != (body.channels, body.height, body.width)
                {
                    return Err(self.error(
                        node,
                        input,
                        format!("the residual's shortcut gives {shortcut} but its body gives {body}; they must match to be added"),
                    ));
                }
                FeatureShape {
                    binary: false,
                    ..body
                }
            }
            Op::Concat(branches) => {
                let mut out: Option<FeatureShape> = None;
                for branch in branches {
                    let s = self.sequence(branch, input, depth + 1)?;
                    out = Some(match out {
                        None => s,
                        Some(o) if (o.height, o.width) == (s.height, s.width) => FeatureShape {
                            channels: o.channels + s.channels,
                            binary: o.binary && s.binary,
                            ..o
                        },
                        Some(o) => {
                            return Err(self.error(
                                node,
                                input,
                                format!("concat branches give different sizes: {o} and {s}"),
                            ))
                        }
                    });
                }
                out.expect("decode rejects a concat without branches")
            }
        };
        self.bounded(
            node,
            input,
            "its output",
            &[output.channels, output.height, output.width],
        )?;
        self.params += params.iter().map(|p| p.len() as u128).sum::<u128>();
        if self.params > MAX_PARAMS {
            return Err(self.error(
                node,
                input,
                format!(
                    "the model reaches {} parameters here, more than the limit of {MAX_PARAMS} (4 GiB as f32)",
                    self.params
                ),
            ));
        }
        let info = &mut self.layers[index];
        info.output = output;
        info.params = params;
        info.binary_macs = binary_macs;
        info.float_macs = float_macs;
        Ok(output)
    }
}
