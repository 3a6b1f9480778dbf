//! The validated intermediate representation of a spec: a tree of named layer nodes.
//!
//! Block templates (`quicknet`, `bireal`, `reactnet`) are already expanded here, every default is
//! resolved and every name is final. Both consumers walk this tree: the `zoo-macros` code
//! generator emits one struct field and one `forward` line per node, and the runtime builder in
//! `zoo` constructs the same layers from it. All fields are public so that generated code can
//! write these values as literals.

/// A whole network as described by one spec file.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// Registry name, for example `quicknet-lab`.
    pub name: String,
    /// One line for `zoo list`.
    pub description: String,
    /// Where the spec came from (a path or `<string>`), for error messages.
    pub source: String,
    /// Default input shape.
    pub input: InputShape,
    /// Default number of classes.
    pub classes: usize,
    /// The layers, in order.
    pub nodes: Vec<Node>,
    /// The training recipe the spec recommends (`train:`), if any.
    pub train: Option<TrainRecipe>,
}

/// A training recipe (the spec's `train:` section): the paper's settings for a backbone on
/// ImageNet-scale data. Command-line flags override each field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainRecipe {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per optimizer step.
    pub batch_size: usize,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Peak learning rate (reached after warm-up).
    pub learning_rate: f64,
    /// How the learning rate falls from its peak.
    pub schedule: Schedule,
    /// Epochs of linear warm-up from zero to the peak learning rate.
    pub warmup_epochs: f64,
    /// Decoupled weight decay (AdamW only).
    pub weight_decay: f64,
    /// Keras-style L2 penalty `l2 * sum(w^2)` on conv and dense kernels, added to the loss.
    pub kernel_l2: f64,
    /// Label smoothing of the cross-entropy targets (0 = none).
    pub label_smoothing: f64,
}

impl Default for TrainRecipe {
    /// Adam at 2.5e-3 with linear decay to 0: the paper's settings for most backbones.
    fn default() -> Self {
        TrainRecipe {
            epochs: 100,
            batch_size: 256,
            optimizer: Optimizer::Adam,
            learning_rate: 2.5e-3,
            schedule: Schedule::Linear { final_lr: 0.0 },
            warmup_epochs: 0.0,
            weight_decay: 0.0,
            kernel_l2: 0.0,
            label_smoothing: 0.0,
        }
    }
}

/// The optimizer of a recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimizer {
    /// Adam (Keras defaults: betas 0.9 / 0.999, epsilon 1e-7).
    Adam,
    /// Adam with decoupled weight decay.
    AdamW,
}

/// A learning-rate schedule after warm-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// The peak rate throughout.
    Constant,
    /// Linear decay (polynomial, power 1) from the peak to `final_lr` at the last step.
    Linear {
        /// The rate at the end of training.
        final_lr: f64,
    },
    /// Cosine decay from the peak to `final_lr` at the last step.
    Cosine {
        /// The rate at the end of training.
        final_lr: f64,
    },
    /// Multiply the rate by `factor` every `every_epochs` epochs.
    Step {
        /// Epochs between decays.
        every_epochs: usize,
        /// The multiplier applied at each decay.
        factor: f64,
    },
}

/// The largest whole number a spec field or an input dimension may give (2^24): far above any
/// real network, and small enough that products of a few such numbers cannot overflow.
pub const MAX_COUNT: usize = 1 << 24;

/// The most blocks one stage may repeat.
pub const MAX_BLOCKS: usize = 1024;

/// Height, width and channels of a network's input image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputShape {
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of channels (1 for grayscale, 3 for RGB).
    pub channels: usize,
}

impl std::fmt::Display for InputShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.height, self.width, self.channels)
    }
}

impl std::str::FromStr for InputShape {
    type Err = String;

    /// Parses `HxWxC`, for example `224x224x3`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.trim().split(['x', 'X']).collect();
        let numbers: Option<Vec<usize>> = parts.iter().map(|p| p.trim().parse().ok()).collect();
        match numbers.as_deref() {
            Some(&[height, width, channels])
                if [height, width, channels]
                    .iter()
                    .all(|d| (1..=MAX_COUNT).contains(d)) =>
            {
                Ok(InputShape {
                    height,
                    width,
                    channels,
                })
            }
            _ => Err(format!(
                "expected an input shape HxWxC of three positive integers of at most {MAX_COUNT} (like 224x224x3), found `{s}`"
            )),
        }
    }
}

/// Constructor parameters of a model: its input shape and class count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Input image shape.
    pub input: InputShape,
    /// Number of output classes.
    pub classes: usize,
}

/// A position in a spec file (1-based line and column).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Location {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// One layer of the network, with its weight path.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Dotted weight path prefix, for example `stage2.block1.conv`. Unique in a spec.
    pub name: String,
    /// What the layer computes.
    pub op: Op,
    /// Where the layer (or the block it was expanded from) is written in the spec.
    pub location: Location,
}

/// The layer kinds. Tensors are NCHW; each layer maps one tensor to one tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A 2D convolution, optionally with a binarized input and a quantized kernel.
    Conv(Conv),
    /// A depthwise 2D convolution (float).
    DepthwiseConv(DepthwiseConv),
    /// Batch normalisation with Keras semantics.
    BatchNorm(BatchNorm),
    /// `max(x, 0)`.
    Relu,
    /// Parametric ReLU with one slope per channel, shared over height and width.
    PRelu(PRelu),
    /// A learnable per-channel bias added to the input (ReActNet's "LB").
    Bias,
    /// A binarizer on its own, for a binarized map feeding several convolutions.
    Binarize(Activation),
    /// Max pooling (TensorFlow SAME or VALID).
    MaxPool(Pool),
    /// Average pooling (TensorFlow SAME or VALID; SAME averages over the valid pixels only).
    AvgPool(Pool),
    /// The fixed, non-trainable 3x3 `[1,2,1]x[1,2,1]/16` blur, SAME zero padding.
    BlurPool(BlurPool),
    /// Mean over height and width; the output is `N x C x 1 x 1`.
    GlobalAvgPool,
    /// Flattens `N x C x H x W` in Keras order (H, W, C) to `N x (H*W*C) x 1 x 1`.
    Flatten,
    /// A fully connected layer on `N x C x 1 x 1`.
    Dense(Dense),
    /// Concatenates the input with itself along channels (`C -> 2C`).
    Duplicate,
    /// `shortcut(x) + body(x)`; an empty shortcut is the identity.
    Residual(Residual),
    /// Runs each branch on the input and concatenates the results along channels.
    Concat(Vec<Vec<Node>>),
}

/// The two paths of a residual connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Residual {
    /// The main path.
    pub body: Vec<Node>,
    /// The shortcut; empty for the identity.
    pub shortcut: Vec<Node>,
}

/// TensorFlow padding modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Output size `ceil(in / stride)`; total padding `max((out-1)*stride + k - in, 0)`, the
    /// smaller half before.
    Same,
    /// No padding; output size `floor((in - k) / stride) + 1`.
    Valid,
}

/// Weight initialisers, as Keras defines them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Uniform in `±sqrt(6 / (fan_in + fan_out))`.
    GlorotUniform,
    /// Truncated normal (at 2 sigma) with stddev `sqrt(2 / (fan_in + fan_out))`.
    GlorotNormal,
    /// Truncated normal (at 2 sigma) with stddev `sqrt(2 / fan_in)`.
    HeNormal,
    /// Every element equal to this value.
    Constant(f64),
}

/// Activation binarizers (the input quantizer of a binarized convolution).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// No binarization: the layer sees full-precision input.
    None,
    /// `sign(x)` with the straight-through gradient `1{|x| <= clip}`.
    Sign {
        /// Gradient clip value.
        clip: f64,
    },
    /// `sign(x)` with gradient `2 - 2|x|` inside `[-1, 1]`.
    ApproxSign,
    /// `sign(x)` with the SwishSign surrogate gradient.
    SwishSign {
        /// Sharpness of the surrogate.
        beta: f64,
    },
    /// The Learnable Activation Binarizer.
    Lab(LabPairing),
}

impl Activation {
    /// True when the output is ±1.
    pub fn is_binary(&self) -> bool {
        !matches!(self, Activation::None)
    }
}

/// Which two depthwise outputs LAB compares for output channel `c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabPairing {
    /// The paper's form: the two kernels of input channel `c`.
    Channel,
    /// The official code's reshape: depthwise outputs `c` and `C + c` of the Keras-ordered
    /// `2C` outputs, that is input channels `c / 2` and `(C + c) / 2`.
    Official,
}

/// Kernel quantizers of a binarized convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelQuantizer {
    /// Full-precision kernel.
    None,
    /// `sign(w)` with the straight-through gradient `1{|w| <= clip}`.
    SteSign {
        /// Gradient clip value.
        clip: f64,
    },
    /// `mean(|w|)` per output channel (no gradient) times `ste_sign(w, clip)` (Bi-Real Net).
    MagnitudeAwareSign {
        /// Gradient clip value.
        clip: f64,
    },
    /// Clip `w` to `[-1, 1]`, then `mean(|w|)` per output channel (with gradient) times
    /// `ste_sign(w)` (XNOR-Net).
    XnorWeightScale,
}

impl KernelQuantizer {
    /// True when the effective kernel has one bit per weight (times a per-channel scale).
    pub fn is_binary(&self) -> bool {
        !matches!(self, KernelQuantizer::None)
    }
}

/// A (possibly binarized) 2D convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv {
    /// Output channels.
    pub filters: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// Padding mode.
    pub padding: Padding,
    /// The value SAME padding inserts around the (binarized) input: 0 or 1.
    pub pad_value: f64,
    /// Whether a per-channel bias is added.
    pub bias: bool,
    /// Kernel initialiser.
    pub init: Init,
    /// Input binarizer.
    pub input: Activation,
    /// Kernel quantizer.
    pub kernel_quantizer: KernelQuantizer,
    /// Latent weights are clipped to `[-c, c]` after every optimiser step.
    pub weight_clip: Option<f64>,
}

/// A depthwise convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct DepthwiseConv {
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// Padding mode (zeros).
    pub padding: Padding,
    /// Outputs per input channel; output channel `k * multiplier + q` reads input channel `k`.
    pub multiplier: usize,
    /// Whether a per-channel bias is added.
    pub bias: bool,
    /// Kernel initialiser.
    pub init: Init,
}

/// Batch normalisation with Keras semantics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm {
    /// `moving = moving * momentum + batch * (1 - momentum)`.
    pub momentum: f64,
    /// Added to the variance.
    pub epsilon: f64,
    /// Learnable shift (`bias`).
    pub center: bool,
    /// Learnable scale (`weight`).
    pub scale: bool,
}

/// Parametric ReLU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PRelu {
    /// Initial slope for negative inputs.
    pub alpha: f64,
}

/// Max or average pooling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pool {
    /// Window height and width.
    pub size: [usize; 2],
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// Padding mode.
    pub padding: Padding,
}

/// The fixed blur.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlurPool {
    /// Stride in both directions.
    pub stride: usize,
}

/// A fully connected layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// Output features.
    pub units: Units,
    /// Whether a bias is added.
    pub bias: bool,
    /// Kernel initialiser.
    pub init: Init,
}

/// How many outputs a dense layer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Units {
    /// The model's class count (a constructor parameter).
    Classes,
    /// A fixed number.
    Fixed(usize),
}

impl Units {
    /// The number of units for a model with `classes` classes.
    pub fn resolve(self, classes: usize) -> usize {
        match self {
            Units::Classes => classes,
            Units::Fixed(n) => n,
        }
    }
}

impl Spec {
    /// The spec's default input shape and class count.
    pub fn default_config(&self) -> ModelConfig {
        ModelConfig {
            input: self.input,
            classes: self.classes,
        }
    }

    /// Every node, depth first, in execution order (parents before their children).
    pub fn walk(&self) -> Vec<&Node> {
        fn visit<'a>(nodes: &'a [Node], out: &mut Vec<&'a Node>) {
            for node in nodes {
                out.push(node);
                match &node.op {
                    Op::Residual(r) => {
                        visit(&r.shortcut, out);
                        visit(&r.body, out);
                    }
                    Op::Concat(branches) => branches.iter().for_each(|b| visit(b, out)),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        visit(&self.nodes, &mut out);
        out
    }
}

impl Op {
    /// A short lowercase name of the layer kind, as written in specs.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Conv(c) if c.input.is_binary() || c.kernel_quantizer.is_binary() => "quant_conv",
            Op::Conv(_) => "conv",
            Op::DepthwiseConv(_) => "depthwise_conv",
            Op::BatchNorm(_) => "batch_norm",
            Op::Relu => "relu",
            Op::PRelu(_) => "prelu",
            Op::Bias => "bias",
            Op::Binarize(_) => "binarize",
            Op::MaxPool(_) => "max_pool",
            Op::AvgPool(_) => "avg_pool",
            Op::BlurPool(_) => "blur_pool",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Flatten => "flatten",
            Op::Dense(_) => "dense",
            Op::Duplicate => "duplicate",
            Op::Residual(_) => "residual",
            Op::Concat(_) => "concat",
        }
    }
}

impl std::fmt::Display for Schedule {
    /// The command-line form, which [`Schedule::from_str`](std::str::FromStr) reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Constant => write!(f, "constant"),
            Schedule::Linear { final_lr } => write!(f, "linear:{final_lr}"),
            Schedule::Cosine { final_lr } => write!(f, "cosine:{final_lr}"),
            Schedule::Step {
                every_epochs,
                factor,
            } => write!(f, "step:{every_epochs}:{factor}"),
        }
    }
}

impl std::str::FromStr for Schedule {
    type Err = String;

    /// `constant`, `linear[:FINAL_LR]`, `cosine[:FINAL_LR]` or `step[:EVERY_EPOCHS[:FACTOR]]`
    /// (defaults: final rate 0, a decay by 0.1 every 30 epochs).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.trim().split(':');
        let kind = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let number = |i: usize, default: f64| -> Result<f64, String> {
            match args.get(i) {
                None => Ok(default),
                Some(a) => match a.parse::<f64>() {
                    Ok(x) if x >= 0.0 && x.is_finite() => Ok(x),
                    _ => Err(format!(
                        "expected a number >= 0 in the schedule `{s}`, found `{a}`"
                    )),
                },
            }
        };
        let most = |n: usize| -> Result<(), String> {
            if args.len() > n {
                Err(format!("too many `:` arguments in the schedule `{s}`"))
            } else {
                Ok(())
            }
        };
        match kind {
            "constant" => most(0).map(|()| Schedule::Constant),
            "linear" => most(1).and_then(|()| Ok(Schedule::Linear { final_lr: number(0, 0.0)? })),
            "cosine" => most(1).and_then(|()| Ok(Schedule::Cosine { final_lr: number(0, 0.0)? })),
            "step" => {
                most(2)?;
                let every = number(0, 30.0)?;
                if every < 1.0 || every.fract() != 0.0 {
                    return Err(format!("expected a whole number of epochs >= 1 between decays in `{s}`"));
                }
                Ok(Schedule::Step {
                    every_epochs: every as usize,
                    factor: number(1, 0.1)?,
                })
            }
            _ => Err(format!(
                "expected a schedule `constant`, `linear[:FINAL_LR]`, `cosine[:FINAL_LR]` or `step[:EVERY_EPOCHS[:FACTOR]]`, found `{s}`"
            )),
        }
    }
}

impl std::fmt::Display for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Optimizer::Adam => "adam",
            Optimizer::AdamW => "adamw",
        })
    }
}

impl std::str::FromStr for Optimizer {
    type Err = String;

    /// `adam` or `adamw`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adam" => Ok(Optimizer::Adam),
            "adamw" => Ok(Optimizer::AdamW),
            _ => Err(format!(
                "expected an optimizer `adam` or `adamw`, found `{s}`"
            )),
        }
    }
}
