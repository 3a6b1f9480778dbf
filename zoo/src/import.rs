//! Importing Keras / Larq weights into the zoo's tensor names and layouts.
//!
//! [`read_keras_h5`] reads an HDF5 weights file as tf-keras writes it with
//! `model.save_weights("weights.h5")` (also the `model_weights` group of a whole-model `.h5`):
//! the root attribute `layer_names` lists the layers in the model's order, each layer's group
//! has a `weight_names` attribute (`quant_conv2d_3/kernel:0`, ...) and stores each weight at that
//! path under the group. The file records no architecture, so the importer walks the Keras
//! layers that have weights and the spec's layers in step and checks every shape on the way.
//!
//! [`read_keras_h5_values`] reads a file of the same layout that holds other values of the same
//! shapes, such as the gradient of every weight. [`write_safetensors_atomically`] writes the
//! result (what `zoo import-larq` does).
//!
//! Keras weights are identified by their names (`kernel`, `depthwise_kernel`, `bias`, `gamma`,
//! `beta`, `moving_mean`, `moving_variance`, `alpha`, and LAB's `depthwise_kernel`, `bias`,
//! `beta`), then converted to the zoo's layouts:
//!
//! | Keras | shape | zoo | shape |
//! |---|---|---|---|
//! | `Conv2D` / `QuantConv2D` `kernel` | `kh x kw x in x out` | `<conv>.weight` | `out x in x kh x kw` |
//! | `DepthwiseConv2D` `depthwise_kernel` | `kh x kw x C x m` | `<dw>.weight` | `C*m x 1 x kh x kw` (output `k*m+q` reads input `k`) |
//! | `Dense` `kernel` | `in x units` | `<dense>.weight` | `units x in` |
//! | `BatchNormalization` `gamma`, `beta`, `moving_mean`, `moving_variance` | `C` | `weight`, `bias`, `running_mean`, `running_var` | `C` |
//! | `PReLU` `alpha` (shared over H and W) | `1 x 1 x C` | `<prelu>.weight` | `C` |
//! | learnable bias `bias` | `1 x 1 x 1 x C` or `C` | `<bias>.bias` | `C` |
//! | LAB `depthwise_kernel`, `bias`, `beta` | `3 x 3 x C x 2`, `2C`, scalar | `<conv>.lab.{weight, bias, beta}` | `2C x 1 x 3 x 3`, `2C`, `1` |
//!
//! A LAB may be stored inside its `QuantConv2D` (a quantizer with weights, under a sub-scope
//! such as `quant_conv2d_3/lab/...`) or as a layer of its own before the convolution; both map
//! to the convolution's `lab.*` tensors (or to a `binarize: lab` layer's tensors). QuickNet's
//! fixed blur (a non-trainable `DepthwiseConv2D` whose kernel is `[1,2,1]x[1,2,1]/16` on every
//! channel) matches a `blur_pool` layer of the spec, which stores nothing; its values are checked.
//!
//! Keras orders `layer_names` topologically (by distance to the output, then by the order the
//! graph was discovered from the output), not in the order the model's code runs: in a residual
//! block with a convolution on both paths, the two convolutions come before the two batch norms.
//! The importer predicts that order from the spec's tree (a residual adds `[body, shortcut]`,
//! a concat joins its branches in order) and also accepts the opposite branch order and the
//! plain execution order (subclassed models); the first one that fits every layer wins.
//!
//! ```no_run
//! use std::path::Path;
//!
//! let spec = zoo::spec("quicknet")?;
//! let config = zoo::ModelConfig { input: "224x224x3".parse()?, classes: 1000 };
//! let tensors = zoo::import::read_keras_h5(Path::new("quicknet.h5"), &spec, &config)?;
//! zoo::import::write_safetensors_atomically(&tensors, Path::new("quicknet.safetensors"))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use candle_core::{Device, Tensor};
use hdf5_pure::AttrValue;

use crate::spec::{self, Activation, Analysis, ModelConfig, Node, Op, Param, Spec};
use crate::Error;

/// Reads the Keras HDF5 weights file `path` and maps it onto the tensors of `spec` at `config`.
///
/// Returns every tensor of [`spec::analyze`]`(spec, config).params()` exactly once, in that order,
/// under the zoo's names, as `f32` tensors on the CPU in the zoo's layouts (see the
/// [module documentation](self)).
///
/// # Errors
/// [`Error::KerasFile`] when the file cannot be read or is not a Keras weights file;
/// [`Error::WeightMismatch`] when its layers do not fit the spec (the message names the first
/// Keras layer and the zoo tensor that disagree, with their shapes, or the tensors that are
/// missing or extra); [`Error::Spec`] when the spec does not fit `config`.
pub fn read_keras_h5(
    path: &Path,
    spec: &Spec,
    config: &ModelConfig,
) -> Result<Vec<(String, Tensor)>, Error> {
    read(
        &path.display().to_string(),
        open(path),
        spec,
        config,
        Values::Weights,
    )
}

/// Like [`read_keras_h5`], for a file in the layout of a weights file that holds other values
/// of the same shapes, such as the gradients of every weight (zeros for non-trainable ones):
/// the fixed blur is then recognised by its shape alone, not by its values.
///
/// # Errors
/// As [`read_keras_h5`].
pub fn read_keras_h5_values(
    path: &Path,
    spec: &Spec,
    config: &ModelConfig,
) -> Result<Vec<(String, Tensor)>, Error> {
    read(
        &path.display().to_string(),
        open(path),
        spec,
        config,
        Values::Other,
    )
}

/// What a file in the weights layout holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Values {
    /// The weights: a blur must hold the blur kernel.
    Weights,
    /// Anything else of the same shapes (gradients).
    Other,
}

/// `file`, opened from the file `path` names (or the error that opening it gave).
fn read(
    path: &str,
    file: Result<hdf5_pure::File, String>,
    spec: &Spec,
    config: &ModelConfig,
    values: Values,
) -> Result<Vec<(String, Tensor)>, Error> {
    let analysis = spec::analyze(spec, config)?;
    let file_error = |message: String| Error::KerasFile {
        path: path.to_string(),
        message,
    };
    let layers = file.and_then(|f| read_layers(&f)).map_err(file_error)?;
    let katoms = keras_atoms(&layers).map_err(file_error)?;
    let expects = expectations(spec, &analysis);
    let mismatch = |message: String| Error::WeightMismatch {
        path: path.to_string(),
        model: spec.name.clone(),
        message,
    };

    // Try the candidate orders of our layers; keep the failure that got furthest.
    let mut best: Option<Failure> = None;
    let mut pairs = None;
    for order in candidate_orders(spec, &expects) {
        match lockstep(&order, &expects, &katoms, values) {
            Ok(p) => {
                pairs = Some(p);
                break;
            }
            Err(f) => {
                if best.as_ref().is_none_or(|b| f.matched > b.matched) {
                    best = Some(f);
                }
            }
        }
    }
    let Some(pairs) = pairs else {
        let failure = best.expect("there is always at least one candidate order");
        return Err(mismatch(failure.message));
    };

    let mut converted: HashMap<String, Tensor> = HashMap::new();
    for (e, k) in pairs {
        for (name, tensor) in convert(&katoms[k], &expects[e]).map_err(mismatch)? {
            converted.insert(name, tensor);
        }
    }
    analysis
        .params()
        .map(|p| match converted.remove(&p.name) {
            Some(t) => Ok((p.name.clone(), t)),
            None => Err(mismatch(format!(
                "no Keras weight was mapped to `{}` {:?}",
                p.name, p.shape
            ))),
        })
        .collect()
}

/// Writes `tensors` as a safetensors file at `path`, atomically: the data goes to a temporary
/// file in the same directory, which is then renamed to `path`. On error nothing is left behind
/// and an existing file at `path` is untouched.
///
/// # Errors
/// [`Error::Write`] when a name is repeated or the file cannot be written.
pub fn write_safetensors_atomically(
    tensors: &[(String, Tensor)],
    path: &Path,
) -> Result<(), Error> {
    crate::io::save_safetensors(tensors, None, path)
}

// ---------------------------------------------------------------------------------------------
// Reading the Keras file.

/// One stored weight of a Keras layer.
struct Weight {
    /// The Keras name without the `:0` suffix, for example `quant_conv2d_3/lab/bias`.
    name: String,
    /// The stored shape (empty for a scalar).
    shape: Vec<usize>,
    /// The values, row-major.
    data: Vec<f32>,
}

impl Weight {
    /// The last path component: `kernel`, `bias`, ...
    fn leaf(&self) -> &str {
        self.name.rsplit('/').next().unwrap_or(&self.name)
    }

    /// Everything before the leaf: the (nested) layer that owns the weight.
    fn scope(&self) -> &str {
        self.name.rsplit_once('/').map_or("", |(s, _)| s)
    }
}

/// A Keras layer and its weights, in `weight_names` order.
struct KerasLayer {
    name: String,
    weights: Vec<Weight>,
}

/// The strings of a string (or string array) attribute; an empty numeric array (what Keras
/// writes for a layer without weights) is an empty list.
fn strings(value: &AttrValue) -> Option<Vec<String>> {
    Some(match value {
        AttrValue::StringArray(v)
        | AttrValue::AsciiStringArray(v)
        | AttrValue::VarLenAsciiCharArray(v)
        | AttrValue::VarLenStringArray(v)
        | AttrValue::VarLenAsciiStringArray(v) => v.clone(),
        AttrValue::StringArraySized { values, .. }
        | AttrValue::AsciiStringArraySized { values, .. } => values.clone(),
        AttrValue::String(s)
        | AttrValue::AsciiString(s)
        | AttrValue::VarLenString(s)
        | AttrValue::VarLenAsciiString(s) => vec![s.clone()],
        AttrValue::StringSized { value, .. } | AttrValue::AsciiStringSized { value, .. } => {
            vec![value.clone()]
        }
        AttrValue::F64Array(v) if v.is_empty() => Vec::new(),
        AttrValue::F32Array(v) if v.is_empty() => Vec::new(),
        AttrValue::I64Array(v) if v.is_empty() => Vec::new(),
        AttrValue::U8Array(v) if v.is_empty() => Vec::new(),
        _ => return None,
    })
}

/// A list attribute as Keras writes it: `name`, or, when too large for one object header,
/// `name0`, `name1`, ...
fn string_list(
    attrs: &HashMap<String, AttrValue>,
    name: &str,
    owner: &str,
) -> Result<Option<Vec<String>>, String> {
    let parse = |key: &str, v: &AttrValue| {
        strings(v)
            .ok_or_else(|| format!("the attribute `{key}` of {owner} is not a list of strings"))
    };
    if let Some(v) = attrs.get(name) {
        return parse(name, v).map(Some);
    }
    let mut out = Vec::new();
    let mut chunk = 0;
    while let Some(v) = attrs.get(&format!("{name}{chunk}")) {
        out.extend(parse(&format!("{name}{chunk}"), v)?);
        chunk += 1;
    }
    Ok((chunk > 0).then_some(out))
}

/// The most values one weight may have (as the spec language allows).
const MAX_VALUES: usize = spec::MAX_TENSOR_VALUES as usize;

/// The message for a read that failed inside a file that opened.
fn damaged(what: String, e: hdf5_pure::Error) -> String {
    format!("{what}: the file is truncated or corrupt ({e})")
}

fn not_hdf5(e: hdf5_pure::Error) -> String {
    format!("not an HDF5 file, or a truncated or corrupt one: {e}")
}

fn open(path: &Path) -> Result<hdf5_pure::File, String> {
    if !path.is_file() {
        return Err(if path.exists() {
            "not a file".into()
        } else {
            "no such file".into()
        });
    }
    hdf5_pure::File::open(path).map_err(not_hdf5)
}

fn read_layers(file: &hdf5_pure::File) -> Result<Vec<KerasLayer>, String> {
    check_complete(file)?;
    let (prefix, names) = layer_names(file)?;
    let mut layers = Vec::with_capacity(names.len());
    for name in names {
        let group_path = format!("{prefix}{name}");
        let group = file.group(&group_path).map_err(|e| {
            damaged(
                format!("the layer `{name}` listed in `layer_names` has no group"),
                e,
            )
        })?;
        let attrs = group
            .attrs()
            .map_err(|e| damaged(format!("cannot read the attributes of layer `{name}`"), e))?;
        let owner = format!("layer `{name}`");
        let weight_names = string_list(&attrs, "weight_names", &owner)?.ok_or_else(|| {
            format!("not a Keras weights file: layer `{name}` has no `weight_names` attribute")
        })?;
        let weights = weight_names
            .into_iter()
            .map(|weight_name| read_weight(file, &group_path, &name, weight_name))
            .collect::<Result<_, _>>()?;
        layers.push(KerasLayer { name, weights });
    }
    refuse_model_weights(file, &prefix)?;
    Ok(layers)
}

/// HDF5 records the file's size; a shorter file lost its end (libhdf5 refuses it too).
fn check_complete(file: &hdf5_pure::File) -> Result<(), String> {
    let superblock = file.superblock();
    let recorded = superblock
        .base_address
        .get()
        .saturating_add(superblock.eof_address);
    if file.file_size() < recorded {
        return Err(format!(
            "the file is truncated: it has {} bytes but its header records {recorded}",
            file.file_size()
        ));
    }
    Ok(())
}

/// The layers a Keras weights file lists, with the path prefix of their groups.
fn layer_names(file: &hdf5_pure::File) -> Result<(String, Vec<String>), String> {
    let root_attrs = file
        .root()
        .attrs()
        .map_err(|e| damaged("cannot read the root attributes".into(), e))?;
    if let Some(names) = string_list(&root_attrs, "layer_names", "the root")? {
        return Ok((String::new(), names));
    }
    // A whole model saved with `model.save("x.h5")` keeps its weights in `model_weights`.
    let nested = file
        .group("model_weights")
        .and_then(|g| g.attrs())
        .ok()
        .map(|attrs| string_list(&attrs, "layer_names", "`model_weights`"))
        .transpose()?
        .flatten();
    match nested {
        Some(names) => Ok(("model_weights/".to_string(), names)),
        None => Err("not a Keras weights file: there is no `layer_names` attribute at the root (write the file with tf-keras `model.save_weights(\"weights.h5\")`; the Keras 3 `.weights.h5` layout is not supported)".into()),
    }
}

/// The weight `weight_name` of layer `layer` (group `group_path`): its shape checked against
/// what the file can hold before anything is read, stored as floats.
fn read_weight(
    file: &hdf5_pure::File,
    group_path: &str,
    layer: &str,
    weight_name: String,
) -> Result<Weight, String> {
    let ds = file
        .dataset(&format!("{group_path}/{weight_name}"))
        .map_err(|e| {
            damaged(
                format!("the weight `{weight_name}` of layer `{layer}` cannot be opened"),
                e,
            )
        })?;
    let shape: Vec<usize> = ds
        .shape()
        .map_err(|e| {
            damaged(
                format!("the weight `{weight_name}` has no readable shape"),
                e,
            )
        })?
        .into_iter()
        .map(|d| d as usize)
        .collect();
    // Values a file cannot hold are refused before anything is read or allocated: Keras stores
    // weights uncompressed, at least 4 bytes a value.
    let len = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_VALUES && n.saturating_mul(4) <= file.file_size() as usize)
        .ok_or_else(|| {
            format!(
                "the weight `{weight_name}` has the shape {shape:?}, more values than the file's {} bytes can hold",
                file.file_size()
            )
        })?;
    match ds.dtype() {
        Ok(hdf5_pure::DType::F32 | hdf5_pure::DType::F64) => {}
        Ok(other) => {
            return Err(format!(
                "the weight `{weight_name}` is stored as {other:?}, not as floats"
            ))
        }
        Err(e) => {
            return Err(format!(
                "the weight `{weight_name}` has no readable type: {e}"
            ))
        }
    }
    let data = ds
        .read_f32()
        .map_err(|e| damaged(format!("the weight `{weight_name}` cannot be read"), e))?;
    if data.len() != len {
        return Err(format!(
            "the weight `{weight_name}` has {} values for its shape {shape:?}",
            data.len()
        ));
    }
    Ok(Weight {
        name: weight_name
            .strip_suffix(":0")
            .unwrap_or(&weight_name)
            .to_string(),
        shape,
        data,
    })
}

/// tf-keras also saves weights that belong to the model itself (not to a layer); no layer of a
/// spec can hold them.
fn refuse_model_weights(file: &hdf5_pure::File, prefix: &str) -> Result<(), String> {
    let Ok(group) = file.group(&format!("{prefix}top_level_model_weights")) else {
        return Ok(());
    };
    if let Ok(Some(names)) = group
        .attrs()
        .map_err(|e| e.to_string())
        .and_then(|a| string_list(&a, "weight_names", "`top_level_model_weights`"))
    {
        if !names.is_empty() {
            return Err(format!(
                "the model has weights of its own (`top_level_model_weights`: {}), which no layer of a spec can hold",
                names.join(", ")
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Atoms: the units both sides are matched in.

/// What a unit of weights is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Conv,
    Dense,
    Depthwise,
    Blur,
    BatchNorm,
    PRelu,
    Bias,
    Lab,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Conv => "convolution",
            Kind::Dense => "dense",
            Kind::Depthwise => "depthwise convolution",
            Kind::Blur => "fixed blur",
            Kind::BatchNorm => "batch norm",
            Kind::PRelu => "PReLU",
            Kind::Bias => "learnable bias",
            Kind::Lab => "LAB",
        }
    }
}

/// One unit of a Keras layer: the layer itself, or a LAB nested in it.
struct KAtom<'a> {
    layer: &'a str,
    kind: Kind,
    /// Weights by their leaf name.
    weights: Vec<(&'a str, &'a Weight)>,
}

impl KAtom<'_> {
    fn weight(&self, leaf: &str) -> Option<&Weight> {
        self.weights
            .iter()
            .find(|(l, _)| *l == leaf)
            .map(|(_, w)| *w)
    }

    fn describe(&self) -> String {
        let weights: Vec<String> = self
            .weights
            .iter()
            .map(|(leaf, w)| format!("{leaf} {}", keras_shape(&w.shape)))
            .collect();
        format!(
            "Keras layer `{}` ({}: {})",
            self.layer,
            self.kind.describe(),
            weights.join(", ")
        )
    }
}

fn keras_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("({})", dims.join(", "))
}

/// True when a `3 x 3 x C x 1` kernel is `[1,2,1]x[1,2,1]/16` on every channel.
fn is_blur(w: &Weight) -> bool {
    let [3, 3, c, 1] = w.shape[..] else {
        return false;
    };
    let taps = [1.0f32, 2.0, 1.0];
    (0..3).all(|i| {
        (0..3).all(|j| {
            let expected = taps[i] * taps[j] / 16.0;
            (0..c).all(|k| (w.data[(i * 3 + j) * c + k] - expected).abs() <= 1e-6)
        })
    })
}

/// Splits every Keras layer with weights into atoms, by the names of its weights.
fn keras_atoms(layers: &[KerasLayer]) -> Result<Vec<KAtom<'_>>, String> {
    let mut atoms = Vec::new();
    for layer in layers {
        // Group the weights by the (nested) layer that owns them.
        let mut scopes: Vec<(&str, Vec<&Weight>)> = Vec::new();
        for w in &layer.weights {
            match scopes.iter_mut().find(|(s, _)| *s == w.scope()) {
                Some((_, ws)) => ws.push(w),
                None => scopes.push((w.scope(), vec![w])),
            }
        }
        let mut layer_atoms: Vec<KAtom> = Vec::new();
        for (_, ws) in scopes {
            layer_atoms.push(classify(&layer.name, ws)?);
        }
        // A LAB inside a QuantConv2D binarizes the convolution's input: it comes first.
        layer_atoms.sort_by_key(|a| a.kind != Kind::Lab);
        atoms.extend(layer_atoms);
    }
    Ok(atoms)
}

fn classify<'a>(layer: &'a str, ws: Vec<&'a Weight>) -> Result<KAtom<'a>, String> {
    let mut weights: Vec<(&str, &Weight)> = Vec::new();
    for w in ws {
        if weights.iter().any(|(l, _)| *l == w.leaf()) {
            return Err(format!(
                "layer `{layer}` stores two weights named `{}`",
                w.leaf()
            ));
        }
        weights.push((w.leaf(), w));
    }
    let has = |leaf: &str| weights.iter().any(|(l, _)| *l == leaf);
    let rank = |leaf: &str| {
        weights
            .iter()
            .find(|(l, _)| *l == leaf)
            .map_or(0, |(_, w)| w.shape.len())
    };
    let (kind, allowed): (Kind, &[&str]) = if has("moving_mean") || has("moving_variance") {
        (
            Kind::BatchNorm,
            &["gamma", "beta", "moving_mean", "moving_variance"],
        )
    } else if has("kernel") && rank("kernel") == 4 {
        (Kind::Conv, &["kernel", "bias"])
    } else if has("kernel") && rank("kernel") == 2 {
        (Kind::Dense, &["kernel", "bias"])
    } else if has("depthwise_kernel") && has("beta") {
        (Kind::Lab, &["depthwise_kernel", "bias", "beta"])
    } else if has("depthwise_kernel") {
        (Kind::Depthwise, &["depthwise_kernel", "bias"])
    } else if has("alpha") {
        (Kind::PRelu, &["alpha"])
    } else if has("bias") {
        (Kind::Bias, &["bias"])
    } else {
        let names: Vec<&str> = weights.iter().map(|(_, w)| w.name.as_str()).collect();
        return Err(format!(
            "layer `{layer}` has weights this importer does not know: {}",
            names.join(", ")
        ));
    };
    if let Some((_, w)) = weights.iter().find(|(l, _)| !allowed.contains(l)) {
        return Err(format!(
            "layer `{layer}` ({}) has an unexpected weight `{}` {}",
            kind.describe(),
            w.name,
            keras_shape(&w.shape)
        ));
    }
    if kind == Kind::BatchNorm && !(has("moving_mean") && has("moving_variance")) {
        return Err(format!(
            "layer `{layer}` (batch norm) needs both `moving_mean` and `moving_variance`"
        ));
    }
    let kind = match weights.as_slice() {
        [(_, w)] if kind == Kind::Depthwise && is_blur(w) => Kind::Blur,
        _ => kind,
    };
    Ok(KAtom {
        layer,
        kind,
        weights,
    })
}

/// One unit of our model: the tensors of one node (a convolution with LAB gives two units).
struct Expect<'a> {
    node: &'a str,
    kind: Kind,
    params: Vec<&'a Param>,
    /// Channels of a blur (which stores nothing).
    channels: usize,
    /// Position inside the node: a convolution's LAB (0) before its kernel (1).
    sub: usize,
    /// Index in execution order.
    index: usize,
}

impl Expect<'_> {
    fn describe(&self) -> String {
        if self.kind == Kind::Blur {
            return format!(
                "our `{}` (fixed blur: {} channels)",
                self.node, self.channels
            );
        }
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| format!("`{}` {:?}", p.name, p.shape))
            .collect();
        format!(
            "our `{}` ({}: {})",
            self.node,
            self.kind.describe(),
            params.join(", ")
        )
    }
}

/// Our units in execution order.
fn expectations<'a>(spec: &'a Spec, analysis: &'a Analysis) -> Vec<Expect<'a>> {
    let nodes: HashMap<&str, &Node> = spec
        .walk()
        .into_iter()
        .map(|n| (n.name.as_str(), n))
        .collect();
    let mut out: Vec<Expect> = Vec::new();
    for layer in &analysis.layers {
        let Some(node) = nodes.get(layer.name.as_str()) else {
            continue;
        };
        let mut push = |kind: Kind, params: Vec<&'a Param>, sub: usize| {
            let index = out.len();
            out.push(Expect {
                node: &node.name,
                kind,
                params,
                channels: layer.input.channels,
                sub,
                index,
            })
        };
        let all: Vec<&Param> = layer.params.iter().collect();
        match &node.op {
            Op::Conv(_) => {
                let lab_prefix = format!("{}.lab.", node.name);
                let (lab, conv): (Vec<&Param>, Vec<&Param>) = all
                    .into_iter()
                    .partition(|p| p.name.starts_with(&lab_prefix));
                if !lab.is_empty() {
                    push(Kind::Lab, lab, 0);
                }
                push(Kind::Conv, conv, 1);
            }
            Op::Binarize(_) if !all.is_empty() => push(Kind::Lab, all, 0),
            Op::DepthwiseConv(_) => push(Kind::Depthwise, all, 0),
            Op::BatchNorm(_) => push(Kind::BatchNorm, all, 0),
            Op::PRelu(_) => push(Kind::PRelu, all, 0),
            Op::Bias => push(Kind::Bias, all, 0),
            Op::Dense(_) => push(Kind::Dense, all, 0),
            Op::BlurPool(_) => push(Kind::Blur, all, 0),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The order Keras lists layers in.

/// Depth (longest path to the network's end) of every node, as Keras computes it for a
/// functional model; returns the depth of the sequence's first vertex. With `lab_layers`, the
/// LAB of a convolution counts as a layer of its own before it (depth stored under
/// `<conv>#lab`); otherwise it is part of the convolution's layer.
fn depths(
    nodes: &[Node],
    tail: usize,
    lab_layers: bool,
    out: &mut HashMap<String, usize>,
) -> usize {
    let mut d = tail;
    for node in nodes.iter().rev() {
        d = match &node.op {
            Op::Residual(r) => {
                let join = d + 1;
                out.insert(node.name.clone(), join);
                depths(&r.body, join, lab_layers, out).max(depths(
                    &r.shortcut,
                    join,
                    lab_layers,
                    out,
                ))
            }
            Op::Concat(branches) => {
                let join = d + 1;
                out.insert(node.name.clone(), join);
                branches
                    .iter()
                    .map(|b| depths(b, join, lab_layers, out))
                    .max()
                    .unwrap_or(join)
            }
            Op::Conv(conv) if lab_layers && matches!(conv.input, Activation::Lab(_)) => {
                out.insert(node.name.clone(), d + 1);
                out.insert(format!("{}#lab", node.name), d + 2);
                d + 2
            }
            _ => {
                out.insert(node.name.clone(), d + 1);
                d + 1
            }
        };
    }
    d
}

/// The order in which Keras' depth-first search from the output first meets each node, when a
/// residual's inputs are `[body, shortcut]` (or `[shortcut, body]`) and a concat's are its
/// branches in order (or reversed). Only the relative order of parallel branches matters.
fn discovery(nodes: &[Node], body_first: bool, out: &mut HashMap<String, usize>) {
    for node in nodes.iter().rev() {
        let n = out.len();
        out.insert(node.name.clone(), n);
        match &node.op {
            Op::Residual(r) => {
                let (a, b) = if body_first {
                    (&r.body, &r.shortcut)
                } else {
                    (&r.shortcut, &r.body)
                };
                discovery(a, body_first, out);
                discovery(b, body_first, out);
            }
            Op::Concat(branches) => {
                if body_first {
                    branches.iter().for_each(|b| discovery(b, body_first, out));
                } else {
                    branches
                        .iter()
                        .rev()
                        .for_each(|b| discovery(b, body_first, out));
                }
            }
            _ => {}
        }
    }
}

/// Orders of our units to try against the Keras layers: Keras' topological order with the
/// body first or the shortcut first, each with LABs inside their convolutions or as layers of
/// their own, and the execution order.
fn candidate_orders(spec: &Spec, expects: &[Expect]) -> Vec<Vec<usize>> {
    let mut orders: Vec<Vec<usize>> = Vec::new();
    for body_first in [true, false] {
        let mut disc = HashMap::new();
        discovery(&spec.nodes, body_first, &mut disc);
        for lab_layers in [false, true] {
            let mut depth = HashMap::new();
            depths(&spec.nodes, 0, lab_layers, &mut depth);
            let mut order: Vec<usize> = (0..expects.len()).collect();
            order.sort_by_key(|&i| {
                let e = &expects[i];
                let d = match e.kind {
                    Kind::Lab => depth.get(&format!("{}#lab", e.node)),
                    _ => None,
                }
                .unwrap_or(&depth[e.node]);
                (std::cmp::Reverse(*d), disc[e.node], e.sub)
            });
            orders.push(order);
        }
    }
    orders.push(expects.iter().map(|e| e.index).collect());
    let mut unique: Vec<Vec<usize>> = Vec::new();
    for o in orders {
        if !unique.contains(&o) {
            unique.push(o);
        }
    }
    unique
}

// ---------------------------------------------------------------------------------------------
// Matching.

struct Failure {
    /// Units matched before the failure.
    matched: usize,
    message: String,
}

/// Matches our units (in `order`) with the Keras atoms one by one. A blur of ours may have no
/// Keras layer (a blur without weights). Returns (our unit, Keras atom) pairs.
fn lockstep(
    order: &[usize],
    expects: &[Expect],
    katoms: &[KAtom],
    values: Values,
) -> Result<Vec<(usize, usize)>, Failure> {
    let mut pairs = Vec::new();
    let (mut i, mut j) = (0, 0);
    let tensors_left = |from: usize| -> Vec<String> {
        order[from..]
            .iter()
            .flat_map(|&e| {
                expects[e]
                    .params
                    .iter()
                    .map(|p| format!("`{}` {:?}", p.name, p.shape))
            })
            .collect()
    };
    loop {
        match (order.get(i).map(|&e| &expects[e]), katoms.get(j)) {
            (None, None) => return Ok(pairs),
            (Some(e), k) if e.kind == Kind::Blur => {
                if k.is_some_and(|k| fits(k, e, values).is_ok()) {
                    pairs.push((order[i], j));
                    j += 1;
                }
                i += 1;
            }
            (None, Some(_)) => {
                let extra: Vec<String> = katoms[j..].iter().map(|k| k.describe()).collect();
                return Err(Failure {
                    matched: i,
                    message: format!(
                        "the file has more layers with weights than the model has tensors: {} extra, from {}",
                        extra.len(),
                        extra.join("; ")
                    ),
                });
            }
            (Some(_), None) => {
                let missing = tensors_left(i);
                let shown = missing
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Failure {
                    matched: i,
                    message: format!(
                        "the file has fewer layers with weights than the model: after its last layer `{}` the model still needs {} tensors: {shown}{}",
                        katoms.last().map_or("(none)", |k| k.layer),
                        missing.len(),
                        if missing.len() > 8 { ", ..." } else { "" }
                    ),
                });
            }
            (Some(e), Some(k)) => match fits(k, e, values) {
                Ok(()) => {
                    pairs.push((order[i], j));
                    i += 1;
                    j += 1;
                }
                Err(why) => {
                    let mut message =
                        format!("{} does not match {}: {why}", k.describe(), e.describe());
                    let _ = write!(
                        message,
                        " ({i} of {} layers with weights matched before it)",
                        order.len()
                    );
                    return Err(Failure {
                        matched: i,
                        message,
                    });
                }
            },
        }
    }
}

/// The Keras weight that holds a tensor of ours.
fn keras_leaf(kind: Kind, param: &str) -> &'static str {
    let suffix = param.rsplit('.').next().unwrap_or(param);
    match (kind, suffix) {
        (Kind::Conv | Kind::Dense, "weight") => "kernel",
        (Kind::Depthwise | Kind::Lab, "weight") => "depthwise_kernel",
        (Kind::BatchNorm, "weight") => "gamma",
        (Kind::BatchNorm, "bias") => "beta",
        (Kind::BatchNorm, "running_mean") => "moving_mean",
        (Kind::BatchNorm, "running_var") => "moving_variance",
        (Kind::PRelu, "weight") => "alpha",
        (Kind::Lab, "beta") => "beta",
        (_, "bias") => "bias",
        _ => "(none)",
    }
}

/// Our shape of a Keras weight, or `None` when it has no such layout.
fn our_shape(kind: Kind, leaf: &str, shape: &[usize]) -> Option<Vec<usize>> {
    match (kind, leaf, shape) {
        (Kind::Conv, "kernel", &[kh, kw, i, o]) => Some(vec![o, i, kh, kw]),
        (Kind::Dense, "kernel", &[i, o]) => Some(vec![o, i]),
        (Kind::Depthwise | Kind::Lab | Kind::Blur, "depthwise_kernel", &[kh, kw, c, m]) => {
            Some(vec![c * m, 1, kh, kw])
        }
        (_, "kernel" | "depthwise_kernel", _) => None,
        // Per-channel vectors: (C), (1, 1, C), (1, 1, 1, C); a scalar is one value.
        (_, _, []) => Some(vec![1]),
        (_, _, [init @ .., last]) if init.iter().all(|&d| d == 1) => Some(vec![*last]),
        _ => None,
    }
}

/// Whether Keras atom `k` holds exactly the tensors of our unit `e`, with the right shapes
/// (a blur of ours matches a Keras blur: with `Values::Weights` its kernel must hold the blur).
fn fits(k: &KAtom, e: &Expect, values: Values) -> Result<(), String> {
    let kinds_agree = match e.kind {
        Kind::Depthwise => matches!(k.kind, Kind::Depthwise | Kind::Blur),
        // Without the weights' values a blur is a bias-free 3x3 depthwise kernel, multiplier 1.
        Kind::Blur if values == Values::Other => {
            k.kind == Kind::Blur
                || (k.kind == Kind::Depthwise
                    && matches!(k.weights.as_slice(), [(_, w)] if matches!(w.shape[..], [3, 3, _, 1])))
        }
        kind => k.kind == kind,
    };
    if !kinds_agree {
        return Err(format!(
            "a {} where the model has a {}",
            k.kind.describe(),
            e.kind.describe()
        ));
    }
    if e.kind == Kind::Blur {
        let c = k.weight("depthwise_kernel").map_or(0, |w| w.shape[2]);
        return if c == e.channels {
            Ok(())
        } else {
            Err(format!(
                "the blur has {c} channels, the model's {}",
                e.channels
            ))
        };
    }
    for p in &e.params {
        let leaf = keras_leaf(e.kind, &p.name);
        let Some(w) = k.weight(leaf) else {
            return Err(format!(
                "the Keras layer has no `{leaf}` for `{}` {:?}",
                p.name, p.shape
            ));
        };
        let ours = our_shape(e.kind, leaf, &w.shape);
        if ours.as_deref() != Some(p.shape.as_slice()) {
            let mut why = format!(
                "`{}` {} is {} in our layout, but `{}` is {:?}",
                w.name,
                keras_shape(&w.shape),
                ours.map_or("impossible".to_string(), |s| format!("{s:?}")),
                p.name,
                p.shape
            );
            if e.kind == Kind::Dense && leaf == "kernel" && w.shape.len() == 2 {
                if w.shape[1] != p.shape[0] {
                    let _ = write!(
                        why,
                        "; the file's dense layer has {} outputs (if that is its class count, import with {} classes: `--classes {}`)",
                        w.shape[1], w.shape[1], w.shape[1]
                    );
                } else if w.shape[0] != p.shape[1] {
                    let _ = write!(
                        why,
                        "; the file's dense layer has {} inputs (after `flatten` that depends on the input size: check `--input`)",
                        w.shape[0]
                    );
                }
            }
            return Err(why);
        }
    }
    for (leaf, w) in &k.weights {
        if !e
            .params
            .iter()
            .any(|p| keras_leaf(e.kind, &p.name) == *leaf)
        {
            return Err(format!(
                "the Keras layer has `{}` {}, for which the model has no tensor",
                w.name,
                keras_shape(&w.shape)
            ));
        }
    }
    Ok(())
}

/// Converts the weights of Keras atom `k` into the tensors of our unit `e` (which [`fits`]).
fn convert(k: &KAtom, e: &Expect) -> Result<Vec<(String, Tensor)>, String> {
    let candle = |e: candle_core::Error| e.to_string();
    let mut out = Vec::new();
    for p in &e.params {
        let leaf = keras_leaf(e.kind, &p.name);
        let w = k
            .weight(leaf)
            .ok_or_else(|| format!("no `{leaf}` for `{}`", p.name))?;
        let t =
            Tensor::from_vec(w.data.clone(), w.shape.as_slice(), &Device::Cpu).map_err(candle)?;
        let t = match (e.kind, leaf) {
            (Kind::Conv, "kernel") => t.permute((3, 2, 0, 1)),
            (Kind::Dense, "kernel") => t.t(),
            (_, "depthwise_kernel") => {
                let (kh, kw, c, m) = t.dims4().map_err(candle)?;
                t.reshape((kh, kw, c * m))
                    .and_then(|t| t.permute((2, 0, 1)))
                    .and_then(|t| t.reshape((c * m, 1, kh, kw)))
            }
            _ => t.reshape(p.shape.as_slice()),
        }
        .and_then(|t| t.contiguous())
        .map_err(candle)?;
        if t.dims() != p.shape.as_slice() {
            return Err(format!(
                "`{}` converts to {:?}, not {:?}",
                w.name,
                t.dims(),
                p.shape
            ));
        }
        out.push((p.name.clone(), t));
    }
    Ok(out)
}
