//! From a YAML document to the validated [`Spec`]: every key checked, defaults filled in, block
//! templates expanded and every layer named. The language is documented in `specs/README.md`.

use crate::error::SpecError;
use crate::ir::*;
use crate::yaml::{Map, Value};

/// Settings shared by every binarized convolution unless a stage or layer overrides them.
#[derive(Clone, Copy, Debug)]
struct Binary {
    activation: Activation,
    kernel: KernelQuantizer,
    weight_clip: Option<f64>,
    pad_value: f64,
    init: Init,
}

impl Binary {
    /// A float convolution's settings: no binarizer or quantizer, zero padding.
    const FLOAT: Binary = Binary {
        activation: Activation::None,
        kernel: KernelQuantizer::None,
        weight_clip: None,
        pad_value: 0.0,
        init: Init::GlorotUniform,
    };
}

impl Default for Binary {
    fn default() -> Self {
        Binary {
            activation: Activation::Sign { clip: 1.0 },
            kernel: KernelQuantizer::SteSign { clip: 1.0 },
            weight_clip: None,
            pad_value: 0.0,
            init: Init::GlorotUniform,
        }
    }
}

/// Decodes a parsed document.
pub fn decode(root: &Value<'_>) -> Result<Spec, SpecError> {
    let mut top = root.map()?;
    let name_value = top.require("name", "the registry name, like quicknet-lab")?;
    let name = name_value.str()?.to_string();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
    {
        return Err(name_value.error(format!(
            "expected a name of lowercase letters, digits and dashes starting with a letter, found `{name}`"
        )));
    }
    let description = match top.get("description") {
        Some(v) => v.str()?.to_string(),
        None => String::new(),
    };
    let input = input_shape(&top.require("input", "the default input shape, like 224x224x3")?)?;
    let classes = top
        .require("classes", "the default number of classes")?
        .positive()?;
    let binary = match top.get("binary") {
        Some(v) => binary_defaults(&v)?,
        None => Binary::default(),
    };

    let mut ctx = Expander {
        binary,
        channels: Some(input.channels),
        dynamic_channels: true,
    };
    let mut nodes = Vec::new();
    if let Some(stem) = top.get("stem") {
        nodes.extend(ctx.layers(&stem, "stem", binary.activation)?);
    }
    if let Some(stages) = top.get("stages") {
        for (i, stage) in stages.seq()?.iter().enumerate() {
            nodes.extend(ctx.stage(stage, &format!("stage{}", i + 1))?);
        }
    }
    if let Some(head) = top.get("head") {
        nodes.extend(ctx.layers(&head, "head", binary.activation)?);
    }
    let train = top.get("train").map(|v| train_recipe(&v)).transpose()?;
    top.finish()?;
    if nodes.is_empty() {
        return Err(root.error("the spec has no layers: expected `stem`, `stages` or `head`"));
    }
    let spec = Spec {
        name,
        description,
        source: root.file().to_string(),
        input,
        classes,
        nodes,
        train,
    };
    check_unique_names(&spec)?;
    Ok(spec)
}

fn train_recipe(v: &Value<'_>) -> Result<TrainRecipe, SpecError> {
    let mut m = v.map()?;
    let mut r = TrainRecipe::default();
    if let Some(e) = m.get("epochs") {
        r.epochs = e.positive()?;
    }
    if let Some(b) = m.get("batch_size") {
        r.batch_size = b.positive()?;
    }
    if let Some(o) = m.get("optimizer") {
        r.optimizer = match o.str()? {
            "adam" => Optimizer::Adam,
            "adamw" => Optimizer::AdamW,
            other => {
                return Err(o.error(format!("expected `adam` or `adamw`, found `{other}`")));
            }
        };
    }
    if let Some(lr) = m.get("learning_rate") {
        r.learning_rate = lr.positive_f64()?;
    }
    if let Some(s) = m.get("schedule") {
        r.schedule = schedule(&s)?;
    }
    r.warmup_epochs = non_negative(&mut m, "warmup_epochs")?.unwrap_or(0.0);
    r.weight_decay = non_negative(&mut m, "weight_decay")?.unwrap_or(0.0);
    r.kernel_l2 = non_negative(&mut m, "kernel_l2")?.unwrap_or(0.0);
    if let Some(v) = m.get("label_smoothing") {
        r.label_smoothing = match v.f64() {
            Ok(x) if (0.0..1.0).contains(&x) => x,
            _ => return Err(v.error("expected a label smoothing in [0, 1)")),
        };
    }
    m.finish()?;
    if r.weight_decay > 0.0 && r.optimizer != Optimizer::AdamW {
        return Err(v.error("`weight_decay` needs `optimizer: adamw` (Adam takes `kernel_l2`)"));
    }
    Ok(r)
}

fn non_negative(m: &mut Map<'_>, key: &'static str) -> Result<Option<f64>, SpecError> {
    m.get(key)
        .map(|v| match v.f64() {
            Ok(x) if x >= 0.0 => Ok(x),
            _ => Err(v.error("expected a number >= 0")),
        })
        .transpose()
}

/// `constant`, `{linear: {final_lr}}`, `{cosine: {final_lr}}` or `{step: {every_epochs, factor}}`.
fn schedule(v: &Value<'_>) -> Result<Schedule, SpecError> {
    let (name, mut m) = variant(v, "a schedule: constant, linear, cosine or step")?;
    let schedule = match name {
        "constant" => Schedule::Constant,
        "linear" => Schedule::Linear {
            final_lr: non_negative(&mut m, "final_lr")?.unwrap_or(0.0),
        },
        "cosine" => Schedule::Cosine {
            final_lr: non_negative(&mut m, "final_lr")?.unwrap_or(0.0),
        },
        "step" => Schedule::Step {
            every_epochs: m
                .require("every_epochs", "epochs between decays")?
                .positive()?,
            factor: m
                .require("factor", "the multiplier at each decay, like 0.1")?
                .positive_f64()?,
        },
        other => {
            return Err(v.error(format!(
                "expected a schedule `constant`, `linear`, `cosine` or `step`, found `{other}`"
            )))
        }
    };
    m.finish()?;
    Ok(schedule)
}

fn input_shape(v: &Value<'_>) -> Result<InputShape, SpecError> {
    if let Some(s) = v.as_plain_str() {
        return s.parse().map_err(|e: String| v.error(e));
    }
    let mut m = v.map().map_err(|_| {
        v.error("expected HxWxC (like 224x224x3) or a mapping with height, width and channels")
    })?;
    let shape = InputShape {
        height: m.require("height", "a positive integer")?.positive()?,
        width: m.require("width", "a positive integer")?.positive()?,
        channels: m.require("channels", "a positive integer")?.positive()?,
    };
    m.finish()?;
    Ok(shape)
}

fn binary_defaults(v: &Value<'_>) -> Result<Binary, SpecError> {
    let mut m = v.map()?;
    let mut b = Binary::default();
    if let Some(a) = m.get("activation") {
        b.activation = activation(&a)?;
    }
    if let Some(k) = m.get("kernel") {
        b.kernel = kernel_quantizer(&k)?;
    }
    if let Some(c) = m.get("weight_clip") {
        b.weight_clip = weight_clip(&c)?;
    }
    if let Some(p) = m.get("pad_value") {
        b.pad_value = pad_value(&p)?;
    }
    if let Some(i) = m.get("init") {
        b.init = init(&i)?;
    }
    m.finish()?;
    Ok(b)
}

/// A variant written either as a bare name (`sign`) or as a one-key mapping with options
/// (`{sign: {clip: 1.25}}`). Returns the name and the options (an empty mapping if bare).
fn variant<'a>(v: &Value<'a>, what: &str) -> Result<(&'a str, Map<'a>), SpecError> {
    if let Some(name) = v.as_plain_str() {
        return Ok((name, v.map_of_nothing()));
    }
    let m = v.map().map_err(|_| v.error(format!("expected {what}")))?;
    let mut keys = m.keys();
    match (keys.next(), keys.next()) {
        (Some((name, value)), None) => Ok((name, value.map()?)),
        _ => Err(v.error(format!(
            "expected {what}, written as a name or as a mapping with exactly one key"
        ))),
    }
}

const ACTIVATIONS: &str = "one of `none`, `sign`, `approx_sign`, `swish_sign`, `lab`";

fn activation(v: &Value<'_>) -> Result<Activation, SpecError> {
    let (name, mut opts) = variant(v, &format!("an activation binarizer: {ACTIVATIONS}"))?;
    let a = match name {
        "none" => Activation::None,
        "sign" | "ste_sign" => Activation::Sign {
            clip: field_or(&mut opts, "clip", |c| c.positive_f64(), 1.0)?,
        },
        "approx_sign" => Activation::ApproxSign,
        "swish_sign" => Activation::SwishSign {
            beta: field_or(&mut opts, "beta", |c| c.positive_f64(), 5.0)?,
        },
        "lab" => Activation::Lab(match opts.get("pairing") {
            None => LabPairing::Channel,
            Some(p) => match p.str()? {
                "channel" => LabPairing::Channel,
                "official" => LabPairing::Official,
                other => {
                    return Err(p.error(format!(
                        "expected `channel` (the paper's pairing) or `official` (the official code's reshape), found `{other}`"
                    )))
                }
            },
        }),
        other => {
            return Err(v.error(format!(
                "unknown activation binarizer `{other}`; expected {ACTIVATIONS}"
            )))
        }
    };
    opts.finish()?;
    Ok(a)
}

fn kernel_quantizer(v: &Value<'_>) -> Result<KernelQuantizer, SpecError> {
    const KINDS: &str = "one of `none`, `ste_sign`, `magnitude_aware_sign`, `xnor_weight_scale`";
    let (name, mut opts) = variant(v, &format!("a kernel quantizer: {KINDS}"))?;
    let clip = |opts: &mut Map<'_>| field_or(opts, "clip", |c| c.positive_f64(), 1.0);
    let k = match name {
        "none" => KernelQuantizer::None,
        "ste_sign" | "sign" => KernelQuantizer::SteSign {
            clip: clip(&mut opts)?,
        },
        "magnitude_aware_sign" => KernelQuantizer::MagnitudeAwareSign {
            clip: clip(&mut opts)?,
        },
        "xnor_weight_scale" => KernelQuantizer::XnorWeightScale,
        other => {
            return Err(v.error(format!(
                "unknown kernel quantizer `{other}`; expected {KINDS}"
            )))
        }
    };
    opts.finish()?;
    Ok(k)
}

fn init(v: &Value<'_>) -> Result<Init, SpecError> {
    if let Ok(x) = v.f64() {
        return Ok(Init::Constant(x));
    }
    match v.str()? {
        "glorot_uniform" => Ok(Init::GlorotUniform),
        "glorot_normal" => Ok(Init::GlorotNormal),
        "he_normal" => Ok(Init::HeNormal),
        "zeros" => Ok(Init::Constant(0.0)),
        "ones" => Ok(Init::Constant(1.0)),
        other => Err(v.error(format!(
            "unknown initialiser `{other}`; expected one of `glorot_uniform`, `glorot_normal`, `he_normal`, `zeros`, `ones` or a number"
        ))),
    }
}

fn weight_clip(v: &Value<'_>) -> Result<Option<f64>, SpecError> {
    if v.is_null() {
        return Ok(None);
    }
    v.positive_f64()
        .map(Some)
        .map_err(|_| v.error("expected a positive clip value or null for no clipping"))
}

fn pad_value(v: &Value<'_>) -> Result<f64, SpecError> {
    match v.f64() {
        Ok(x) if x == 0.0 || x == 1.0 => Ok(x),
        _ => {
            Err(v.error("expected 0 or 1 (the value SAME padding puts around the binarized input)"))
        }
    }
}

fn padding(v: &Value<'_>) -> Result<Padding, SpecError> {
    match v.str()? {
        "same" => Ok(Padding::Same),
        "valid" => Ok(Padding::Valid),
        other => Err(v.error(format!("expected `same` or `valid`, found `{other}`"))),
    }
}

/// The field `key` read with `parse`, else `default`.
fn field_or<T>(
    m: &mut Map<'_>,
    key: &'static str,
    parse: impl Fn(&Value<'_>) -> Result<T, SpecError>,
    default: T,
) -> Result<T, SpecError> {
    Ok(m.get(key)
        .map(|v| parse(&v))
        .transpose()?
        .unwrap_or(default))
}

fn bool_or(m: &mut Map<'_>, key: &'static str, default: bool) -> Result<bool, SpecError> {
    field_or(m, key, |v| v.bool(), default)
}

fn f64_or(m: &mut Map<'_>, key: &'static str, default: f64) -> Result<f64, SpecError> {
    field_or(m, key, |v| v.f64(), default)
}

/// Batch-norm momentum and epsilon, with the given defaults.
fn batch_norm_settings(
    m: &mut Map<'_>,
    momentum: f64,
    epsilon: f64,
) -> Result<BatchNorm, SpecError> {
    let momentum = match m.get("momentum") {
        None => momentum,
        Some(v) => match v.f64()? {
            x if (0.0..1.0).contains(&x) => x,
            x => {
                return Err(v.error(format!(
                    "expected a momentum in [0, 1) (Keras semantics: moving = moving * momentum + batch * (1 - momentum)), found {x}"
                )))
            }
        },
    };
    Ok(BatchNorm {
        momentum,
        epsilon: field_or(m, "epsilon", |v| v.positive_f64(), epsilon)?,
        center: bool_or(m, "center", true)?,
        scale: bool_or(m, "scale", true)?,
    })
}

/// The short name a layer kind gives its unnamed nodes (`qconv3`), or `None` for an unknown kind.
fn short_name(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "conv" => "conv",
        "quant_conv" => "qconv",
        "depthwise_conv" => "dwconv",
        "batch_norm" => "bn",
        "relu" => "relu",
        "prelu" => "prelu",
        "bias" => "bias",
        "binarize" => "binarize",
        "max_pool" => "maxpool",
        "avg_pool" => "avgpool",
        "blur_pool" => "blur",
        "global_avg_pool" => "gap",
        "flatten" => "flatten",
        "dense" => "dense",
        "duplicate" => "duplicate",
        "residual" => "res",
        "concat" => "concat",
        _ => return None,
    })
}

/// A layer's full name under `prefix`: its `name` field, else its short name numbered by
/// `counters` (the layers of that kind so far in this list).
fn layer_name(
    m: &mut Map<'_>,
    prefix: &str,
    short: &'static str,
    counters: &mut Vec<(&'static str, usize)>,
) -> Result<String, SpecError> {
    if let Some(n) = m.get("name") {
        let s = n.str()?;
        if s.is_empty()
            || !s.starts_with(|c: char| c.is_ascii_lowercase())
            || !s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(n.error(format!(
                "expected a layer name of lowercase letters, digits and underscores starting with a letter, found `{s}`"
            )));
        }
        return Ok(format!("{prefix}.{s}"));
    }
    let count = match counters.iter_mut().find(|(k, _)| *k == short) {
        Some((_, n)) => {
            *n += 1;
            *n
        }
        None => {
            counters.push((short, 1));
            1
        }
    };
    Ok(format!("{prefix}.{short}{count}"))
}

/// `stride` (one positive integer for both axes), else `default`.
fn stride_or(m: &mut Map<'_>, default: [usize; 2]) -> Result<[usize; 2], SpecError> {
    Ok(m.get("stride")
        .map(|s| s.positive())
        .transpose()?
        .map_or(default, |s| [s, s]))
}

/// A pooling window: `size`, `stride` (the size by default) and `padding` (`valid`).
fn pool(m: &mut Map<'_>) -> Result<Pool, SpecError> {
    let size = m.require("size", "the pooling window size")?.pair()?;
    Ok(Pool {
        size,
        stride: stride_or(m, size)?,
        padding: field_or(m, "padding", padding, Padding::Valid)?,
    })
}

/// Walks the layer lists, tracking the number of channels where it is known statically.
struct Expander {
    binary: Binary,
    /// Channels flowing at this point; `None` when they depend on the input or cannot be known.
    channels: Option<usize>,
    /// True while `channels` still equals the input's, which a constructor may change.
    dynamic_channels: bool,
}

impl Expander {
    fn static_channels(&self, v: &Value<'_>, what: &str) -> Result<usize, SpecError> {
        match (self.channels, self.dynamic_channels) {
            (Some(c), false) => Ok(c),
            _ => Err(v.error(format!(
                "{what} needs a fixed number of input channels here; put a convolution (a stem) before it"
            ))),
        }
    }

    fn set_channels(&mut self, c: usize) {
        self.channels = Some(c);
        self.dynamic_channels = false;
    }

    fn layers(
        &mut self,
        v: &Value<'_>,
        prefix: &str,
        activation: Activation,
    ) -> Result<Vec<Node>, SpecError> {
        let mut counters: Vec<(&'static str, usize)> = Vec::new();
        let mut nodes = Vec::new();
        for item in v.seq()? {
            nodes.push(self.layer(&item, prefix, activation, &mut counters)?);
        }
        Ok(nodes)
    }

    fn layer(
        &mut self,
        v: &Value<'_>,
        prefix: &str,
        default_activation: Activation,
        counters: &mut Vec<(&'static str, usize)>,
    ) -> Result<Node, SpecError> {
        let (kind, mut m) = variant(
            v,
            "a layer: a name like `relu` or a mapping like `{conv: {filters: 64, kernel: 3}}`",
        )?;
        let Some(short) = short_name(kind) else {
            return Err(v.error(format!(
                "unknown layer `{kind}`; expected one of conv, quant_conv, depthwise_conv, batch_norm, relu, prelu, bias, binarize, max_pool, avg_pool, blur_pool, global_avg_pool, flatten, dense, duplicate, residual, concat"
            )));
        };
        let name = layer_name(&mut m, prefix, short, counters)?;
        let location = v.location();
        let op = match kind {
            "conv" => self.conv(&mut m, false, default_activation)?,
            "quant_conv" => self.conv(&mut m, true, default_activation)?,
            "depthwise_conv" => self.depthwise_conv(&mut m)?,
            "batch_norm" => Op::BatchNorm(batch_norm_settings(&mut m, 0.99, 1e-3)?),
            "relu" => Op::Relu,
            "prelu" => Op::PRelu(PRelu {
                alpha: f64_or(&mut m, "alpha", 0.0)?,
            }),
            "bias" => Op::Bias,
            "binarize" => Op::Binarize(match m.get("activation") {
                Some(a) => activation(&a)?,
                None => default_activation,
            }),
            "max_pool" => Op::MaxPool(pool(&mut m)?),
            "avg_pool" => Op::AvgPool(pool(&mut m)?),
            "blur_pool" => Op::BlurPool(BlurPool {
                stride: field_or(&mut m, "stride", |s| s.positive(), 2)?,
            }),
            "global_avg_pool" => Op::GlobalAvgPool,
            "flatten" => {
                self.channels = None;
                Op::Flatten
            }
            "dense" => self.dense(&mut m)?,
            "duplicate" => {
                self.channels = self.channels.map(|c| 2 * c);
                Op::Duplicate
            }
            "residual" => self.residual(&mut m, &name, default_activation)?,
            "concat" => self.concat(&mut m, &name, default_activation)?,
            _ => unreachable!("short_name knows every layer kind matched here"),
        };
        m.finish()?;
        Ok(Node { name, op, location })
    }

    /// `conv` (float by default) or `quant_conv` (the spec's `binary` defaults).
    fn conv(
        &mut self,
        m: &mut Map<'_>,
        quant: bool,
        default_activation: Activation,
    ) -> Result<Op, SpecError> {
        // Unset fields take the spec's `binary` settings in a `quant_conv`, Keras' in a `conv`.
        let b = match quant {
            true => Binary {
                activation: default_activation,
                ..self.binary
            },
            false => Binary::FLOAT,
        };
        let conv = Conv {
            filters: m
                .require("filters", "the number of output channels")?
                .positive()?,
            kernel: m.require("kernel", "the kernel size")?.pair()?,
            stride: stride_or(m, [1, 1])?,
            padding: field_or(m, "padding", padding, Padding::Same)?,
            pad_value: field_or(m, "pad_value", pad_value, b.pad_value)?,
            bias: bool_or(m, "bias", false)?,
            init: field_or(m, "init", init, b.init)?,
            input: field_or(m, "activation", activation, b.activation)?,
            kernel_quantizer: field_or(m, "kernel_quantizer", kernel_quantizer, b.kernel)?,
            weight_clip: field_or(m, "weight_clip", weight_clip, b.weight_clip)?,
        };
        self.set_channels(conv.filters);
        Ok(Op::Conv(conv))
    }

    fn depthwise_conv(&mut self, m: &mut Map<'_>) -> Result<Op, SpecError> {
        let dw = DepthwiseConv {
            kernel: m.require("kernel", "the kernel size")?.pair()?,
            stride: stride_or(m, [1, 1])?,
            padding: field_or(m, "padding", padding, Padding::Same)?,
            multiplier: field_or(m, "multiplier", |x| x.positive(), 1)?,
            bias: bool_or(m, "bias", false)?,
            init: field_or(m, "init", init, Init::GlorotUniform)?,
        };
        if dw.multiplier != 1 {
            self.channels = self.channels.map(|c| c * dw.multiplier);
        }
        Ok(Op::DepthwiseConv(dw))
    }

    fn dense(&mut self, m: &mut Map<'_>) -> Result<Op, SpecError> {
        let units = match m.get("units") {
            None => Units::Classes,
            Some(u) if u.as_plain_str() == Some("classes") => Units::Classes,
            Some(u) => Units::Fixed(
                u.positive()
                    .map_err(|_| u.error("expected a positive integer or `classes`"))?,
            ),
        };
        match units {
            Units::Fixed(n) => self.set_channels(n),
            Units::Classes => self.channels = None,
        }
        Ok(Op::Dense(Dense {
            units,
            bias: bool_or(m, "bias", true)?,
            init: field_or(m, "init", init, Init::GlorotUniform)?,
        }))
    }

    /// A body and an optional shortcut, both starting from the block's input channels.
    fn residual(
        &mut self,
        m: &mut Map<'_>,
        name: &str,
        default_activation: Activation,
    ) -> Result<Op, SpecError> {
        let before = (self.channels, self.dynamic_channels);
        let shortcut = match m.get("shortcut") {
            Some(s) => self.layers(&s, &format!("{name}.shortcut"), default_activation)?,
            None => Vec::new(),
        };
        (self.channels, self.dynamic_channels) = before;
        let body = self.layers(
            &m.require("body", "the list of layers of the main path")?,
            name,
            default_activation,
        )?;
        Ok(Op::Residual(Residual { body, shortcut }))
    }

    /// Branches from the same input, whose channels add up.
    fn concat(
        &mut self,
        m: &mut Map<'_>,
        name: &str,
        default_activation: Activation,
    ) -> Result<Op, SpecError> {
        let before = (self.channels, self.dynamic_channels);
        let mut total = Some(0);
        let mut dynamic = false;
        let mut branches = Vec::new();
        for (i, branch) in m
            .require("branches", "a list of layer lists")?
            .seq()?
            .iter()
            .enumerate()
        {
            (self.channels, self.dynamic_channels) = before;
            branches.push(self.layers(
                branch,
                &format!("{name}.branch{}", i + 1),
                default_activation,
            )?);
            total = total.zip(self.channels).map(|(a, b)| a + b);
            dynamic |= self.dynamic_channels;
        }
        if branches.is_empty() {
            return Err(m.value().error("`concat` needs at least one branch"));
        }
        (self.channels, self.dynamic_channels) = (total, dynamic);
        Ok(Op::Concat(branches))
    }

    fn stage(&mut self, v: &Value<'_>, prefix: &str) -> Result<Vec<Node>, SpecError> {
        let mut m = v.map()?;
        let block = m.get("block");
        let layers = m.get("layers");
        let activations = m.get("activation");
        let nodes = match (block, layers) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(v.error(
                    "a stage has either `block` (a block template and its settings) or `layers` (a list of layers)",
                ))
            }
            (None, Some(layers)) => {
                let activation = match &activations {
                    Some(a) => activation(a)?,
                    None => self.binary.activation,
                };
                self.layers(&layers, prefix, activation)?
            }
            (Some(block), None) => {
                self.block_stage(&mut m, &block, activations.as_ref(), prefix, v.location())?
            }
        };
        m.finish()?;
        Ok(nodes)
    }

    /// A stage written as a block template (`block`, `filters`, `blocks` and the template's
    /// settings in `m`): the template's nodes, one activation binarizer per block.
    fn block_stage(
        &mut self,
        m: &mut Map<'_>,
        block: &Value<'_>,
        activations: Option<&Value<'_>>,
        prefix: &str,
        location: Location,
    ) -> Result<Vec<Node>, SpecError> {
        let kind = block.str()?;
        let filters = m
            .require("filters", "the stage's number of channels")?
            .positive()?;
        let blocks_value = m.require("blocks", "the number of blocks")?;
        let blocks = blocks_value.positive()?;
        if blocks > MAX_BLOCKS {
            return Err(blocks_value.error(format!(
                "expected at most {MAX_BLOCKS} blocks in a stage, found {blocks}"
            )));
        }
        let acts = match activations {
            None => vec![self.binary.activation; blocks],
            Some(a) => per_block_activations(a, blocks)?,
        };
        let incoming = self.static_channels(block, &format!("a `{kind}` stage"))?;
        let nodes = match kind {
            "quicknet" => {
                let bn = template_batch_norm(m, 0.9, 1e-5)?;
                templates::quicknet(self.binary, prefix, location, incoming, filters, &acts, bn)
            }
            "bireal" => {
                let bn = template_batch_norm(m, 0.8, 1e-3)?;
                let prelu = post_activation(m)?;
                templates::bireal(self.binary, prefix, location, incoming, filters, &acts, bn, prelu)
            }
            "reactnet" => {
                let bn = template_batch_norm(m, 0.8, 1e-3)?;
                let stride = reactnet_stride(m, incoming, filters)?;
                let alpha = f64_or(m, "prelu_alpha", 0.25)?;
                templates::reactnet(self.binary, prefix, location, incoming, filters, stride, &acts, bn, PRelu { alpha })
            }
            other => {
                return Err(block.error(format!(
                    "unknown block template `{other}`; expected `quicknet`, `bireal` or `reactnet` (or write the stage as `layers`)"
                )))
            }
        };
        self.set_channels(filters);
        Ok(nodes)
    }
}

/// A block stage's `activation`: one binarizer for every block, or a list of one per block.
fn per_block_activations(a: &Value<'_>, blocks: usize) -> Result<Vec<Activation>, SpecError> {
    let items = a.seq_or_one()?;
    if items.len() == 1 {
        Ok(vec![activation(&items[0])?; blocks])
    } else if items.len() == blocks {
        items.iter().map(activation).collect()
    } else {
        Err(a.error(format!(
            "expected one activation binarizer or a list of {blocks} (one per block), found a list of {}",
            items.len()
        )))
    }
}

/// A template's batch norm: its defaults, overridden by the stage's `batch_norm` mapping.
fn template_batch_norm(
    m: &mut Map<'_>,
    momentum: f64,
    epsilon: f64,
) -> Result<BatchNorm, SpecError> {
    let mut bn_map = bn_override(m)?;
    let bn = batch_norm_settings(&mut bn_map, momentum, epsilon)?;
    bn_map.finish()?;
    Ok(bn)
}

/// A `bireal` stage's `post_activation`: `none` (the default) or `prelu` with its `alpha`.
fn post_activation(m: &mut Map<'_>) -> Result<Option<PRelu>, SpecError> {
    let Some(p) = m.get("post_activation") else {
        return Ok(None);
    };
    match variant(&p, "`none` or `prelu`")? {
        ("none", opts) => {
            opts.finish()?;
            Ok(None)
        }
        ("prelu", mut opts) => {
            let alpha = f64_or(&mut opts, "alpha", 0.0)?;
            opts.finish()?;
            Ok(Some(PRelu { alpha }))
        }
        (other, _) => Err(p.error(format!("expected `none` or `prelu`, found `{other}`"))),
    }
}

/// A `reactnet` stage's stride (2 by default where the width doubles, else 1), with the
/// width it may have: `incoming` kept or doubled.
fn reactnet_stride(m: &mut Map<'_>, incoming: usize, filters: usize) -> Result<usize, SpecError> {
    let stride_value = m.get("stride");
    let stride = match &stride_value {
        Some(s) => s.positive()?,
        None if filters != incoming => 2,
        None => 1,
    };
    if filters != incoming && filters != 2 * incoming {
        return Err(m.value().error(format!(
            "a `reactnet` stage keeps or doubles its {incoming} input channels, so `filters` must be {incoming} or {}, found {filters}",
            2 * incoming
        )));
    }
    if stride > 2 {
        let s = stride_value.expect("a stride above 2 was written");
        return Err(s.error(format!("expected 1 or 2, found {stride}")));
    }
    Ok(stride)
}

fn bn_override<'a>(m: &mut Map<'a>) -> Result<Map<'a>, SpecError> {
    match m.get("batch_norm") {
        Some(v) => v.map(),
        None => Ok(m.value().map_of_nothing()),
    }
}

fn check_unique_names(spec: &Spec) -> Result<(), SpecError> {
    let mut seen: std::collections::HashMap<String, &Node> = std::collections::HashMap::new();
    for node in spec.walk() {
        let ident = node.name.replace('.', "_");
        if let Some(first) = seen.insert(ident, node) {
            return Err(SpecError::at(
                &spec.source,
                node.location,
                &node.name,
                format!(
                    "layer name `{}` clashes with `{}` at line {} (names must stay distinct with dots read as underscores)",
                    node.name, first.name, first.location.line
                ),
            ));
        }
    }
    Ok(())
}

/// The block templates: the building blocks of the paper's backbones.
mod templates {
    use crate::ir::*;

    use super::Binary;

    fn node(name: String, op: Op, location: Location) -> Node {
        Node { name, op, location }
    }

    fn binary_conv(
        b: Binary,
        filters: usize,
        kernel: usize,
        stride: usize,
        input: Activation,
    ) -> Op {
        Op::Conv(Conv {
            filters,
            kernel: [kernel, kernel],
            stride: [stride, stride],
            padding: Padding::Same,
            pad_value: b.pad_value,
            bias: false,
            init: b.init,
            input,
            kernel_quantizer: b.kernel,
            weight_clip: b.weight_clip,
        })
    }

    fn float_conv_1x1(filters: usize, init: Init) -> Op {
        Op::Conv(Conv {
            filters,
            kernel: [1, 1],
            stride: [1, 1],
            padding: Padding::Same,
            pad_value: 0.0,
            bias: false,
            init,
            input: Activation::None,
            kernel_quantizer: KernelQuantizer::None,
            weight_clip: None,
        })
    }

    /// QuickNet (Larq Zoo): a transition when the width changes, then residual blocks
    /// `x + BN(ReLU(QuantConv3x3(x)))`.
    pub fn quicknet(
        b: Binary,
        prefix: &str,
        at: Location,
        incoming: usize,
        filters: usize,
        acts: &[Activation],
        bn: BatchNorm,
    ) -> Vec<Node> {
        let mut nodes = Vec::new();
        if incoming != filters {
            let t = format!("{prefix}.transition");
            nodes.push(node(format!("{t}.relu"), Op::Relu, at));
            nodes.push(node(
                format!("{t}.maxpool"),
                Op::MaxPool(Pool {
                    size: [2, 2],
                    stride: [1, 1],
                    padding: Padding::Valid,
                }),
                at,
            ));
            nodes.push(node(
                format!("{t}.blur"),
                Op::BlurPool(BlurPool { stride: 2 }),
                at,
            ));
            nodes.push(node(
                format!("{t}.conv"),
                float_conv_1x1(filters, Init::GlorotNormal),
                at,
            ));
            nodes.push(node(format!("{t}.bn"), Op::BatchNorm(bn), at));
        }
        for (i, &act) in acts.iter().enumerate() {
            let p = format!("{prefix}.block{}", i + 1);
            let body = vec![
                node(format!("{p}.conv"), binary_conv(b, filters, 3, 1, act), at),
                node(format!("{p}.relu"), Op::Relu, at),
                node(format!("{p}.bn"), Op::BatchNorm(bn), at),
            ];
            nodes.push(node(
                p,
                Op::Residual(Residual {
                    body,
                    shortcut: Vec::new(),
                }),
                at,
            ));
        }
        nodes
    }

    /// Bi-Real Net: `shortcut(x) + BN(QuantConv3x3(x))`, the first block of a wider stage with
    /// stride 2 and an `AvgPool -> Conv1x1 -> BN` shortcut; optionally a PReLU after each add
    /// (LAB-BNN).
    #[allow(clippy::too_many_arguments)]
    pub fn bireal(
        b: Binary,
        prefix: &str,
        at: Location,
        incoming: usize,
        filters: usize,
        acts: &[Activation],
        bn: BatchNorm,
        prelu: Option<PRelu>,
    ) -> Vec<Node> {
        let mut nodes = Vec::new();
        for (i, &act) in acts.iter().enumerate() {
            let p = format!("{prefix}.block{}", i + 1);
            let downsample = i == 0 && incoming != filters;
            let shortcut = if downsample {
                vec![
                    node(
                        format!("{p}.shortcut.pool"),
                        Op::AvgPool(Pool {
                            size: [2, 2],
                            stride: [2, 2],
                            padding: Padding::Same,
                        }),
                        at,
                    ),
                    node(
                        format!("{p}.shortcut.conv"),
                        float_conv_1x1(filters, Init::GlorotNormal),
                        at,
                    ),
                    node(format!("{p}.shortcut.bn"), Op::BatchNorm(bn), at),
                ]
            } else {
                Vec::new()
            };
            let stride = if downsample { 2 } else { 1 };
            let body = vec![
                node(
                    format!("{p}.conv"),
                    binary_conv(b, filters, 3, stride, act),
                    at,
                ),
                node(format!("{p}.bn"), Op::BatchNorm(bn), at),
            ];
            nodes.push(node(
                p.clone(),
                Op::Residual(Residual { body, shortcut }),
                at,
            ));
            if let Some(prelu) = prelu {
                nodes.push(node(format!("{p}.prelu"), Op::PRelu(prelu), at));
            }
        }
        nodes
    }

    /// ReActNet (MobileNetV1 layout with learnable biases and PReLU); the first block may
    /// double the width, with stride `stride`.
    #[allow(clippy::too_many_arguments)]
    pub fn reactnet(
        b: Binary,
        prefix: &str,
        at: Location,
        incoming: usize,
        filters: usize,
        stride: usize,
        acts: &[Activation],
        bn: BatchNorm,
        prelu: PRelu,
    ) -> Vec<Node> {
        let mut nodes = Vec::new();
        let mut channels = incoming;
        for (i, &act) in acts.iter().enumerate() {
            let p = format!("{prefix}.block{}", i + 1);
            let stride = if i == 0 { stride } else { 1 };
            let shortcut = if stride > 1 {
                vec![node(
                    format!("{p}.res1.shortcut.pool"),
                    Op::AvgPool(Pool {
                        size: [2, 2],
                        stride: [2, 2],
                        padding: Padding::Valid,
                    }),
                    at,
                )]
            } else {
                Vec::new()
            };
            let body = vec![
                node(format!("{p}.bias1"), Op::Bias, at),
                node(
                    format!("{p}.conv1"),
                    binary_conv(b, channels, 3, stride, act),
                    at,
                ),
                node(format!("{p}.bn1"), Op::BatchNorm(bn), at),
            ];
            nodes.push(node(
                format!("{p}.res1"),
                Op::Residual(Residual { body, shortcut }),
                at,
            ));
            nodes.push(node(format!("{p}.bias2"), Op::Bias, at));
            nodes.push(node(format!("{p}.prelu1"), Op::PRelu(prelu), at));
            nodes.push(node(format!("{p}.bias3"), Op::Bias, at));
            let out = if i == 0 { filters } else { channels };
            let (body, shortcut) = if out == channels {
                let body = vec![
                    node(format!("{p}.bias4"), Op::Bias, at),
                    node(
                        format!("{p}.conv2"),
                        binary_conv(b, channels, 1, 1, act),
                        at,
                    ),
                    node(format!("{p}.bn2"), Op::BatchNorm(bn), at),
                ];
                (body, Vec::new())
            } else {
                let branch = |suffix: &str| {
                    vec![
                        node(
                            format!("{p}.conv2{suffix}"),
                            binary_conv(b, channels, 1, 1, Activation::None),
                            at,
                        ),
                        node(format!("{p}.bn2{suffix}"), Op::BatchNorm(bn), at),
                    ]
                };
                let body = vec![
                    node(format!("{p}.bias4"), Op::Bias, at),
                    node(format!("{p}.binarize"), Op::Binarize(act), at),
                    node(
                        format!("{p}.concat"),
                        Op::Concat(vec![branch("a"), branch("b")]),
                        at,
                    ),
                ];
                let shortcut = vec![node(
                    format!("{p}.res2.shortcut.duplicate"),
                    Op::Duplicate,
                    at,
                )];
                (body, shortcut)
            };
            nodes.push(node(
                format!("{p}.res2"),
                Op::Residual(Residual { body, shortcut }),
                at,
            ));
            nodes.push(node(format!("{p}.bias5"), Op::Bias, at));
            nodes.push(node(format!("{p}.prelu2"), Op::PRelu(prelu), at));
            nodes.push(node(format!("{p}.bias6"), Op::Bias, at));
            channels = out;
        }
        nodes
    }
}
