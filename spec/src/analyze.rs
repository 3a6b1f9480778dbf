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
        constant(prefix, "bias", 2 * channels, 0.0),
        constant(prefix, "beta", 1, 1.0),
    ]
}

/// A tensor of `len` values named `{layer}.{tensor}`, initialised to `value`.
fn constant(layer: &str, tensor: &str, len: usize, value: f64) -> Param {
    param(
        format!("{layer}.{tensor}"),
        vec![len],
        Init::Constant(value),
        (0, 0),
    )
}

/// Batch norm's tensors: the scale and offset it learns, then its moving statistics.
fn batch_norm_params(name: &str, channels: usize, bn: &BatchNorm) -> Vec<Param> {
    let mut params = Vec::new();
    if bn.scale {
        params.push(constant(name, "weight", channels, 1.0));
    }
    if bn.center {
        params.push(constant(name, "bias", channels, 0.0));
    }
    for (stat, value) in [("running_mean", 0.0), ("running_var", 1.0)] {
        params.push(Param {
            trainable: false,
            ..constant(name, stat, channels, value)
        });
    }
    params
}

/// LAB's depthwise convolution: two 3x3 kernels per channel.
fn lab_macs(input: FeatureShape) -> u64 {
    (9 * 2 * input.channels * input.height * input.width) as u64
}

/// What one node adds to the analysis.
struct Layer {
    output: FeatureShape,
    params: Vec<Param>,
    binary_macs: u64,
    float_macs: u64,
}

impl Layer {
    /// A layer without tensors or counted arithmetic.
    fn plain(output: FeatureShape) -> Self {
        Self::with_params(output, Vec::new())
    }

    /// A layer with tensors, its multiply-accumulates left for the caller to count.
    fn with_params(output: FeatureShape, params: Vec<Param>) -> Self {
        Layer {
            output,
            params,
            binary_macs: 0,
            float_macs: 0,
        }
    }
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
        // The node's entry comes before those of the sequences it nests.
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
        self.bounded(
            node,
            input,
            "its input",
            &[input.channels, input.height, input.width],
        )?;
        let layer = self.layer(node, input, depth)?;
        let output = layer.output;
        self.bounded(
            node,
            input,
            "its output",
            &[output.channels, output.height, output.width],
        )?;
        self.params += layer.params.iter().map(|p| p.len() as u128).sum::<u128>();
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
        info.params = layer.params;
        info.binary_macs = layer.binary_macs;
        info.float_macs = layer.float_macs;
        Ok(output)
    }

    /// What `node` computes from `input`: one function per kind of layer with tensors or
    /// checks of its own, the shape rules of the others inline.
    fn layer(
        &mut self,
        node: &Node,
        input: FeatureShape,
        depth: usize,
    ) -> Result<Layer, SpecError> {
        let (name, c) = (node.name.as_str(), input.channels);
        let float = FeatureShape {
            binary: false,
            ..input
        };
        Ok(match &node.op {
            Op::Conv(conv) => self.conv(node, input, conv)?,
            Op::DepthwiseConv(dw) => self.depthwise_conv(node, input, dw)?,
            Op::BatchNorm(bn) => Layer::with_params(float, batch_norm_params(name, c, bn)),
            Op::Relu => Layer::plain(float),
            Op::PRelu(p) => Layer::with_params(float, vec![constant(name, "weight", c, p.alpha)]),
            Op::Bias => Layer::with_params(float, vec![constant(name, "bias", c, 0.0)]),
            Op::Binarize(act) => {
                let output = FeatureShape {
                    binary: act.is_binary() || input.binary,
                    ..input
                };
                match act {
                    Activation::Lab(_) => Layer {
                        params: lab_params(name, c),
                        float_macs: lab_macs(input),
                        ..Layer::plain(output)
                    },
                    _ => Layer::plain(output),
                }
            }
            Op::MaxPool(pool) | Op::AvgPool(pool) => {
                let (h, w) = self.spatial(node, input, pool.size, pool.stride, pool.padding)?;
                Layer::plain(FeatureShape {
                    channels: c,
                    height: h,
                    width: w,
                    // Max pooling keeps ±1 values; averaging does not.
                    binary: input.binary && matches!(node.op, Op::MaxPool(_)),
                })
            }
            Op::BlurPool(blur) => {
                let stride = [blur.stride, blur.stride];
                let (h, w) = self.spatial(node, input, [3, 3], stride, Padding::Same)?;
                Layer {
                    float_macs: (9 * c * h * w) as u64,
                    ..Layer::plain(FeatureShape {
                        channels: c,
                        height: h,
                        width: w,
                        binary: false,
                    })
                }
            }
            Op::GlobalAvgPool => Layer::plain(FeatureShape {
                channels: c,
                height: 1,
                width: 1,
                binary: false,
            }),
            Op::Flatten => Layer::plain(FeatureShape {
                channels: c * input.height * input.width,
                height: 1,
                width: 1,
                binary: input.binary,
            }),
            Op::Dense(dense) => self.dense(node, input, dense)?,
            Op::Duplicate => Layer::plain(FeatureShape {
                channels: 2 * c,
                ..input
            }),
            Op::Residual(r) => self.residual(node, input, depth, r)?,
            Op::Concat(branches) => self.concat(node, input, depth, branches)?,
        })
    }

    fn conv(&self, node: &Node, input: FeatureShape, conv: &Conv) -> Result<Layer, SpecError> {
        let (name, c) = (node.name.as_str(), input.channels);
        let kernel = [conv.filters, c, conv.kernel[0], conv.kernel[1]];
        self.bounded(node, input, "the kernel", &kernel)?;
        let (h, w) = self.spatial(node, input, conv.kernel, conv.stride, conv.padding)?;
        let mut weight = param(
            format!("{name}.weight"),
            kernel.to_vec(),
            conv.init,
            fans(conv.kernel, c, conv.filters),
        );
        weight.binary = conv.kernel_quantizer.is_binary();
        weight.weight_clip = conv.weight_clip;
        let mut layer = Layer::with_params(
            FeatureShape {
                channels: conv.filters,
                height: h,
                width: w,
                binary: false,
            },
            vec![weight],
        );
        if conv.bias {
            layer.params.push(constant(name, "bias", conv.filters, 0.0));
        }
        if let Activation::Lab(_) = conv.input {
            layer.params.extend(lab_params(&format!("{name}.lab"), c));
            layer.float_macs += lab_macs(input);
        }
        let macs = (h * w * conv.kernel[0] * conv.kernel[1] * c * conv.filters) as u64;
        if (input.binary || conv.input.is_binary()) && conv.kernel_quantizer.is_binary() {
            layer.binary_macs += macs;
        } else {
            layer.float_macs += macs;
        }
        Ok(layer)
    }

    fn depthwise_conv(
        &self,
        node: &Node,
        input: FeatureShape,
        dw: &DepthwiseConv,
    ) -> Result<Layer, SpecError> {
        let (name, c) = (node.name.as_str(), input.channels);
        let (h, w) = self.spatial(node, input, dw.kernel, dw.stride, dw.padding)?;
        let out = c * dw.multiplier;
        let kernel = [out, 1, dw.kernel[0], dw.kernel[1]];
        self.bounded(node, input, "the kernel", &kernel)?;
        let mut params = vec![param(
            format!("{name}.weight"),
            kernel.to_vec(),
            dw.init,
            fans(dw.kernel, c, dw.multiplier),
        )];
        if dw.bias {
            params.push(constant(name, "bias", out, 0.0));
        }
        Ok(Layer {
            float_macs: (h * w * dw.kernel[0] * dw.kernel[1] * out) as u64,
            ..Layer::with_params(
                FeatureShape {
                    channels: out,
                    height: h,
                    width: w,
                    binary: false,
                },
                params,
            )
        })
    }

    fn dense(&self, node: &Node, input: FeatureShape, dense: &Dense) -> Result<Layer, SpecError> {
        let (name, c) = (node.name.as_str(), input.channels);
        if input.height != 1 || input.width != 1 {
            return Err(self.error(
                node,
                input,
                "a dense layer needs a flat input (1x1 spatial); put `flatten` or `global_avg_pool` before it".into(),
            ));
        }
        let units = dense.units.resolve(self.classes);
        self.bounded(node, input, "the weight matrix", &[units, c])?;
        let mut params = vec![param(
            format!("{name}.weight"),
            vec![units, c],
            dense.init,
            (c, units),
        )];
        if dense.bias {
            params.push(constant(name, "bias", units, 0.0));
        }
        Ok(Layer {
            float_macs: (units * c) as u64,
            ..Layer::with_params(
                FeatureShape {
                    channels: units,
                    height: 1,
                    width: 1,
                    binary: false,
                },
                params,
            )
        })
    }

    /// A residual block: the sum of its shortcut and body, which must give the same shape.
    fn residual(
        &mut self,
        node: &Node,
        input: FeatureShape,
        depth: usize,
        r: &Residual,
    ) -> Result<Layer, SpecError> {
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
        Ok(Layer::plain(FeatureShape {
            binary: false,
            ..body
        }))
    }

    /// Branches concatenated along the channels: they must give the same height and width.
    fn concat(
        &mut self,
        node: &Node,
        input: FeatureShape,
        depth: usize,
        branches: &[Vec<Node>],
    ) -> Result<Layer, SpecError> {
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
        Ok(Layer::plain(
            out.expect("decode rejects a concat without branches"),
        ))
    }
}
