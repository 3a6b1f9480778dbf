//! `zoo export`: a trained model's tensors folded and packed into a [`ZooModel`].
//!
//! Batch norm becomes a per-channel multiplier and offset; binary kernels become bits (plus the
//! per-channel scale of scaled quantizers); LAB's two kernels, two biases and `beta` become one
//! kernel and one threshold per channel; everything else stays f32, in the engine's layouts.
//! All folding is computed in f64 and rounded once.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::spec::{
    self, Activation, Conv, KernelQuantizer, LabPairing, ModelConfig, Node, Op, Spec,
};
use crate::Error;

use super::format::{Stored, ZooModel};

/// Folds and packs `weights` (the tensors of `spec`, by name, as training saves them) for
/// `config`. `spec_text` is the spec's YAML, stored in the model.
pub fn export(
    spec_text: &str,
    spec: &Spec,
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<ZooModel, Error> {
    let analysis = spec::analyze(spec, config)?;
    let mut out = Exporter {
        weights,
        analysis: &analysis,
        tensors: HashMap::new(),
        model: &spec.name,
        classes: config.classes,
    };
    for node in spec.walk() {
        out.node(node)?;
    }
    Ok(ZooModel {
        spec_text: spec_text.to_string(),
        spec: spec.clone(),
        config: *config,
        tensors: out.tensors,
        labels: None,
    })
}

struct Exporter<'a> {
    weights: &'a HashMap<String, Tensor>,
    analysis: &'a spec::Analysis,
    tensors: HashMap<String, Stored>,
    model: &'a str,
    classes: usize,
}

/// True when the engine runs this convolution as XNOR-popcount on packed bits.
pub(crate) fn runs_binary(conv: &Conv, input: spec::FeatureShape) -> bool {
    conv.kernel_quantizer.is_binary() && (conv.input.is_binary() || input.binary)
}

impl Exporter<'_> {
    /// The tensor `name` as f64 values, checked against `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f64>, Error> {
        let mismatch = |message: String| Error::WeightMismatch {
            path: "weights".into(),
            model: self.model.to_string(),
            message,
        };
        let t = self
            .weights
            .get(name)
            .ok_or_else(|| mismatch(format!("the tensor `{name}` is missing")))?;
        if t.dims() != shape {
            return Err(mismatch(format!(
                "`{name}` has shape {:?}; expected {shape:?}",
                t.dims()
            )));
        }
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    }

    fn put_f32(&mut self, name: String, shape: Vec<usize>, values: &[f64]) {
        let data = values.iter().map(|&v| v as f32).collect();
        self.tensors.insert(name, Stored::F32(shape, data));
    }

    fn node(&mut self, node: &Node) -> Result<(), Error> {
        let input = self.analysis.input_of(&node.name);
        let c = input.channels;
        let name = &node.name;
        match &node.op {
            Op::Conv(conv) => self.conv(name, conv, input)?,
            Op::DepthwiseConv(dw) => {
                let [kh, kw] = dw.kernel;
                let out = c * dw.multiplier;
                let w = self.get(&format!("{name}.weight"), &[out, 1, kh, kw])?;
                // (out, kh, kw) -> (kh, kw, out)
                let hwc = transpose(&w, &[out, kh * kw], &[1, 0]);
                self.put_f32(format!("{name}.weight"), vec![kh, kw, out], &hwc);
                if dw.bias {
                    let b = self.get(&format!("{name}.bias"), &[out])?;
                    self.put_f32(format!("{name}.bias"), vec![out], &b);
                }
            }
            Op::BatchNorm(bn) => {
                let ones = vec![1.0; c];
                let zeros = vec![0.0; c];
                let gamma = match bn.scale {
                    true => self.get(&format!("{name}.weight"), &[c])?,
                    false => ones,
                };
                let beta = match bn.center {
                    true => self.get(&format!("{name}.bias"), &[c])?,
                    false => zeros,
                };
                let mean = self.get(&format!("{name}.running_mean"), &[c])?;
                let var = self.get(&format!("{name}.running_var"), &[c])?;
                let eps = bn.epsilon.max(crate::layers::MIN_EPSILON);
                let mul: Vec<f64> = (0..c).map(|i| gamma[i] / (var[i] + eps).sqrt()).collect();
                let add: Vec<f64> = (0..c).map(|i| beta[i] - mean[i] * mul[i]).collect();
                self.put_f32(format!("{name}.mul"), vec![c], &mul);
                self.put_f32(format!("{name}.add"), vec![c], &add);
            }
            Op::Bias => {
                let b = self.get(&format!("{name}.bias"), &[c])?;
                self.put_f32(format!("{name}.add"), vec![c], &b);
            }
            Op::PRelu(_) => {
                let a = self.get(&format!("{name}.weight"), &[c])?;
                self.put_f32(format!("{name}.alpha"), vec![c], &a);
            }
            Op::Binarize(Activation::Lab(pairing)) => self.lab(name, *pairing, c)?,
            Op::Dense(d) => {
                let units = d.units.resolve(self.classes);
                let w = self.get(&format!("{name}.weight"), &[units, c])?;
                let t = transpose(&w, &[units, c], &[1, 0]);
                self.put_f32(format!("{name}.weight"), vec![c, units], &t);
                if d.bias {
                    let b = self.get(&format!("{name}.bias"), &[units])?;
                    self.put_f32(format!("{name}.bias"), vec![units], &b);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn conv(&mut self, name: &str, conv: &Conv, input: spec::FeatureShape) -> Result<(), Error> {
        let (o, c, [kh, kw]) = (conv.filters, input.channels, conv.kernel);
        let w = self.get(&format!("{name}.weight"), &[o, c, kh, kw])?;
        if let Activation::Lab(pairing) = conv.input {
            self.lab(&format!("{name}.lab"), pairing, c)?;
        }
        if conv.bias {
            let b = self.get(&format!("{name}.bias"), &[o])?;
            self.put_f32(format!("{name}.bias"), vec![o], &b);
        }
        let per_out = c * kh * kw;
        let (signs, scale) = quantize(&w, per_out, &conv.kernel_quantizer);
        if runs_binary(conv, input) {
            let signs: Vec<f32> = signs.iter().map(|&s| s as f32).collect();
            let packed = zoo_kernels::packed::PackedConvWeights::from_signs(&signs, o, c, [kh, kw]);
            let words = packed.words;
            self.tensors.insert(
                format!("{name}.bits"),
                Stored::U64(vec![o, kh, kw, words], packed.data),
            );
            if let Some(scale) = scale {
                self.put_f32(format!("{name}.scale"), vec![o], &scale);
            }
        } else {
            // The effective kernel, (out, in, kh, kw) -> (kh, kw, in, out).
            let kernel: Vec<f64> = signs
                .iter()
                .enumerate()
                .map(|(i, &s)| s * scale.as_ref().map_or(1.0, |sc| sc[i / per_out]))
                .collect();
            let hwio = transpose(&kernel, &[o, c, kh, kw], &[2, 3, 1, 0]);
            self.put_f32(format!("{name}.weight"), vec![kh, kw, c, o], &hwio);
        }
        Ok(())
    }

    /// LAB's tensors under `prefix` folded into one threshold test per channel.
    fn lab(&mut self, prefix: &str, pairing: LabPairing, c: usize) -> Result<(), Error> {
        let w = self.get(&format!("{prefix}.weight"), &[2 * c, 1, 3, 3])?;
        let b = self.get(&format!("{prefix}.bias"), &[2 * c])?;
        let beta = self.get(&format!("{prefix}.beta"), &[1])?[0];
        // Output channel k compares depthwise outputs a0(k) and a1(k); output a reads input a / 2.
        let pair = |k: usize| match pairing {
            LabPairing::Channel => (2 * k, 2 * k + 1),
            LabPairing::Official => (k, c + k),
        };
        let taps = |a: usize, t: usize| beta * w[a * 9 + t];
        let bias: Vec<f64> = (0..c)
            .map(|k| {
                let (a0, a1) = pair(k);
                beta * b[a1] - beta * b[a0]
            })
            .collect();
        self.put_f32(format!("{prefix}.bias"), vec![c], &bias);
        match pairing {
            LabPairing::Channel => {
                let kernel: Vec<f64> = (0..9 * c)
                    .map(|i| {
                        let (t, k) = (i / c, i % c);
                        let (a0, a1) = pair(k);
                        taps(a1, t) - taps(a0, t)
                    })
                    .collect();
                self.put_f32(format!("{prefix}.kernel"), vec![3, 3, c], &kernel);
            }
            LabPairing::Official => {
                for (side, pick) in [("pos", 1), ("neg", 0)] {
                    let select = |k: usize| if pick == 1 { pair(k).1 } else { pair(k).0 };
                    let kernel: Vec<f64> = (0..9 * c).map(|i| taps(select(i % c), i / c)).collect();
                    self.put_f32(format!("{prefix}.{side}"), vec![3, 3, c], &kernel);
                    let source = (0..c).map(|k| (select(k) / 2) as u32).collect();
                    self.tensors.insert(
                        format!("{prefix}.{side}_source"),
                        Stored::U32(vec![c], source),
                    );
                }
            }
        }
        Ok(())
    }
}

/// The signs (±1, `sign(0) = +1`) of a kernel and its per-output-channel scale, if the
/// quantizer has one (`per_out` weights per output channel). Full-precision kernels come back
/// unchanged with no scale.
fn quantize(
    w: &[f64],
    per_out: usize,
    quantizer: &KernelQuantizer,
) -> (Vec<f64>, Option<Vec<f64>>) {
    let sign = |v: f64| if v >= 0.0 { 1.0 } else { -1.0 };
    let mean_abs = |w: &[f64]| -> Vec<f64> {
        w.chunks(per_out)
            .map(|c| c.iter().map(|v| v.abs()).sum::<f64>() / per_out as f64)
            .collect()
    };
    match quantizer {
        KernelQuantizer::None => (w.to_vec(), None),
        KernelQuantizer::SteSign { .. } => (w.iter().map(|&v| sign(v)).collect(), None),
        KernelQuantizer::MagnitudeAwareSign { .. } => {
            (w.iter().map(|&v| sign(v)).collect(), Some(mean_abs(w)))
        }
        KernelQuantizer::XnorWeightScale => {
            let clipped: Vec<f64> = w.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
            (
                clipped.iter().map(|&v| sign(v)).collect(),
                Some(mean_abs(&clipped)),
            )
        }
    }
}

/// Permutes a dense row-major tensor of shape `dims` so that output axis `i` is input axis
/// `order[i]`.
fn transpose(data: &[f64], dims: &[usize], order: &[usize]) -> Vec<f64> {
    let out_dims: Vec<usize> = order.iter().map(|&a| dims[a]).collect();
    let mut in_strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * dims[i + 1];
    }
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; dims.len()];
    for _ in 0..data.len() {
        let offset: usize = index
            .iter()
            .zip(order)
            .map(|(&i, &a)| i * in_strides[a])
            .sum();
        out.push(data[offset]);
        for axis in (0..index.len()).rev() {
            index[axis] += 1;
            if index[axis] < out_dims[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transpose_moves_axes() {
        let data: Vec<f64> = (0..6).map(f64::from).collect();
        // 2x3 -> 3x2
        assert_eq!(
            transpose(&data, &[2, 3], &[1, 0]),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
        // (o, i, h, w) = (2, 1, 1, 3) -> (h, w, i, o)
        assert_eq!(
            transpose(&data, &[2, 1, 1, 3], &[2, 3, 1, 0]),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
    }
}
