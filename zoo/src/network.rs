//! The runtime builder: a model built from any spec by walking its layer tree.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{self, BatchNorm, Bias, Binarizer, Dense, DepthwiseConv2d, PRelu, QuantConv2d};
use crate::spec::{self, Analysis, ModelConfig, Node, Op, Spec};
use crate::{Error, Model};

/// A model built at run time from a spec (for spec files that are not compiled in).
///
/// It computes exactly what the generated struct of the same spec computes: both construct the
/// same layers with the same weight names and apply them in the same order.
pub struct Network {
    spec: Spec,
    config: ModelConfig,
    layers: Vec<Layer>,
}

enum Layer {
    Conv(String, QuantConv2d),
    DepthwiseConv(DepthwiseConv2d),
    BatchNorm(BatchNorm),
    PRelu(PRelu),
    Bias(Bias),
    Binarize(String, Binarizer),
    Dense(Dense),
    Stateless(Op),
    Residual {
        body: Vec<Layer>,
        shortcut: Vec<Layer>,
    },
    Concat(Vec<Vec<Layer>>),
}

impl Network {
    /// Builds `spec` for `config`, creating or loading its tensors through `vb`.
    pub fn new(
        spec: Spec,
        vb: VarBuilder,
        config: &ModelConfig,
    ) -> std::result::Result<Self, Error> {
        let analysis = spec::analyze(&spec, config)?;
        let layers = build_all(&spec.nodes, &vb, &analysis, config)?;
        Ok(Network {
            spec,
            config: *config,
            layers,
        })
    }
}

fn build_all(
    nodes: &[Node],
    vb: &VarBuilder,
    analysis: &Analysis,
    config: &ModelConfig,
) -> Result<Vec<Layer>> {
    nodes
        .iter()
        .map(|n| build(n, vb, analysis, config))
        .collect()
}

fn build(node: &Node, vb: &VarBuilder, analysis: &Analysis, config: &ModelConfig) -> Result<Layer> {
    let input = analysis.input_of(&node.name);
    // Node names are full paths: containers hand their children the model's own prefix.
    let parent = vb;
    let vb = vb.pp(&node.name);
    Ok(match &node.op {
        Op::Conv(c) => Layer::Conv(node.name.clone(), QuantConv2d::new(vb, input, c)?),
        Op::DepthwiseConv(c) => Layer::DepthwiseConv(DepthwiseConv2d::new(vb, input, c)?),
        Op::BatchNorm(c) => Layer::BatchNorm(BatchNorm::new(vb, input, c)?),
        Op::PRelu(c) => Layer::PRelu(PRelu::new(vb, input, c)?),
        Op::Bias => Layer::Bias(Bias::new(vb, input)?),
        Op::Binarize(a) => Layer::Binarize(node.name.clone(), Binarizer::new(vb, input, a)?),
        Op::Dense(c) => Layer::Dense(Dense::new(vb, input, c, config.classes)?),
        Op::Residual(r) => Layer::Residual {
            body: build_all(&r.body, parent, analysis, config)?,
            shortcut: build_all(&r.shortcut, parent, analysis, config)?,
        },
        Op::Concat(branches) => Layer::Concat(
            branches
                .iter()
                .map(|b| build_all(b, parent, analysis, config))
                .collect::<Result<_>>()?,
        ),
        op => Layer::Stateless(op.clone()),
    })
}

/// Sees every binarized activation of a forward pass: the layer's name, its binarizer, the
/// real-valued input and the ±1 output.
pub type Observer<'a> = dyn FnMut(&str, &Binarizer, &Tensor, &Tensor) -> Result<()> + 'a;

impl Network {
    /// [`Model::forward`], calling `observe` with each binarizer's input and output (of binary
    /// convolutions and `binarize` layers, in the order they run).
    pub fn forward_observed(
        &self,
        xs: &Tensor,
        train: bool,
        observe: &mut Observer<'_>,
    ) -> Result<Tensor> {
        forward_all(&self.layers, xs, train, observe)?.flatten_from(1)
    }
}

fn forward_all(
    layers: &[Layer],
    xs: &Tensor,
    train: bool,
    observe: &mut Observer<'_>,
) -> Result<Tensor> {
    let mut xs = xs.clone();
    for layer in layers {
        xs = forward(layer, &xs, train, observe)?;
    }
    Ok(xs)
}

fn forward(layer: &Layer, xs: &Tensor, train: bool, observe: &mut Observer<'_>) -> Result<Tensor> {
    match layer {
        Layer::Conv(name, l) => {
            if !matches!(l.binarizer(), Binarizer::None) {
                observe(name, l.binarizer(), xs, &l.binarizer().forward(xs)?)?;
            }
            l.forward(xs)
        }
        Layer::DepthwiseConv(l) => l.forward(xs),
        Layer::BatchNorm(l) => l.forward(xs, train),
        Layer::PRelu(l) => l.forward(xs),
        Layer::Bias(l) => l.forward(xs),
        Layer::Binarize(name, l) => {
            let ys = l.forward(xs)?;
            if !matches!(l, Binarizer::None) {
                observe(name, l, xs, &ys)?;
            }
            Ok(ys)
        }
        Layer::Dense(l) => l.forward(xs),
        Layer::Residual { body, shortcut } => {
            let shortcut = forward_all(shortcut, xs, train, observe)?;
            forward_all(body, xs, train, observe)? + shortcut
        }
        Layer::Concat(branches) => {
            let outs = branches
                .iter()
                .map(|b| forward_all(b, xs, train, observe))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&outs, 1)
        }
        Layer::Stateless(op) => match op {
            Op::Relu => layers::relu(xs),
            Op::MaxPool(p) => layers::max_pool2d(xs, p),
            Op::AvgPool(p) => layers::avg_pool2d(xs, p),
            Op::BlurPool(b) => layers::blur_pool(xs, b),
            Op::GlobalAvgPool => layers::global_avg_pool(xs),
            Op::Flatten => layers::flatten(xs),
            Op::Duplicate => layers::duplicate(xs),
            other => candle_core::bail!(
                "layer kind `{}` has parameters and is built above",
                other.kind()
            ),
        },
    }
}

impl Model for Network {
    fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        forward_all(&self.layers, xs, train, &mut |_, _, _, _| Ok(()))?.flatten_from(1)
    }

    fn spec(&self) -> &Spec {
        &self.spec
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }
}
