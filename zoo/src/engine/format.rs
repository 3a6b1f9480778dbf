//! The `.zoo` model format: one safetensors file holding an inference-ready model.
//!
//! - metadata `zoo.format` = [`FORMAT`], `zoo.spec` (the spec's YAML text), `zoo.input`
//!   (`HxWxC`), `zoo.classes` and, when known, `zoo.labels` (a JSON array of class names);
//! - per node (names are the spec's node paths), only what inference needs:
//!   - binary convolution: `{node}.bits` (U64, `out x kh x kw x words`, bit 1 = -1, channel
//!     `c` in word `c / 64` bit `c % 64`) and `{node}.scale` (F32, `out`, the kernel scale, only
//!     for scaled quantizers), `{node}.bias` (F32) when the spec has one;
//!   - float convolution: `{node}.weight` (F32, `kh x kw x in x out`), `{node}.bias`;
//!   - depthwise convolution: `{node}.weight` (F32, `kh x kw x C*multiplier`), `{node}.bias`;
//!   - batch norm: `{node}.mul`, `{node}.add` (F32, `C`): `y = x * mul + add`;
//!   - bias: `{node}.add`; PReLU: `{node}.alpha`; dense: `{node}.weight` (F32, `in x out`),
//!     `{node}.bias`;
//!   - LAB (under `{node}.lab` for a convolution's input binarizer, under `{node}` for a
//!     `binarize` node), channel pairing: `kernel` (F32, `3 x 3 x C`, beta folded in) and
//!     `bias` (F32, `C`): the output is +1 where `conv(x, kernel) + bias > 0`; official
//!     pairing: `pos` / `neg` (F32, `3 x 3 x C`), `pos_source` / `neg_source` (U32, `C`: the
//!     input channel each reads) and `bias`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::spec::{InputShape, ModelConfig, Spec};
use crate::Error;

/// The value of the `zoo.format` metadata key.
pub const FORMAT: &str = "zoo-engine/1";

/// One stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Stored {
    /// 32-bit floats.
    F32(Vec<usize>, Vec<f32>),
    /// Packed bits.
    U64(Vec<usize>, Vec<u64>),
    /// Channel indices.
    U32(Vec<usize>, Vec<u32>),
}

impl Stored {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Stored::F32(s, _) | Stored::U64(s, _) | Stored::U32(s, _) => s,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Stored::F32(_, d) => d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Stored::U64(_, d) => d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Stored::U32(_, d) => d.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn dtype(&self) -> Dtype {
        match self {
            Stored::F32(..) => Dtype::F32,
            Stored::U64(..) => Dtype::U64,
            Stored::U32(..) => Dtype::U32,
        }
    }
}

/// An inference-ready model: the spec it was built from and its folded, packed tensors.
#[derive(Clone, Debug)]
pub struct ZooModel {
    /// The spec's YAML text, stored verbatim.
    pub spec_text: String,
    /// The parsed spec.
    pub spec: Spec,
    /// Input shape and class count the tensors were made for.
    pub config: ModelConfig,
    /// The tensors by name.
    pub tensors: HashMap<String, Stored>,
    /// Class names, when known (index = class).
    pub labels: Option<Vec<String>>,
}

impl ZooModel {
    /// Writes the model to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.dtype(), t.shape().to_vec(), t.bytes()))
            .collect();
        let views = bytes
            .iter()
            .map(|(name, dtype, shape, data)| {
                TensorView::new(*dtype, shape.clone(), data).map(|v| (name.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Write {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let mut metadata = HashMap::from([
            ("zoo.format".to_string(), FORMAT.to_string()),
            ("zoo.spec".to_string(), self.spec_text.clone()),
            ("zoo.input".to_string(), self.config.input.to_string()),
            ("zoo.classes".to_string(), self.config.classes.to_string()),
        ]);
        if let Some(labels) = &self.labels {
            let json = serde_json::to_string(labels).expect("strings serialise");
            metadata.insert("zoo.labels".to_string(), json);
        }
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Write {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        crate::io::write_bytes_atomically(path, &bytes)
    }

    /// Reads a model written by [`ZooModel::save`].
    pub fn load(path: &Path) -> Result<ZooModel, Error> {
        let fail = |message: String| Error::Run {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let not_zoo = |why: String| {
            fail(format!(
                "not a .zoo model ({why}); make one with `zoo export <weights> --spec <model> -o <file>.zoo`"
            ))
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| not_zoo(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get("zoo.format") {
            Some(f) if f == FORMAT => {}
            Some(f) => {
                return Err(fail(format!(
                    "written in format `{f}`; this zoo reads `{FORMAT}`"
                )))
            }
            None => return Err(not_zoo(format!("no metadata zoo.format = {FORMAT}"))),
        }
        let get = |key: &str| {
            meta.get(key)
                .ok_or_else(|| fail(format!("the metadata lacks `{key}`")))
        };
        let spec_text = get("zoo.spec")?.clone();
        let spec = zoo_spec::parse_str(&spec_text, &format!("{}:zoo.spec", path.display()))?;
        let input: InputShape = get("zoo.input")?
            .parse()
            .map_err(|e| fail(format!("zoo.input: {e}")))?;
        let classes: usize = get("zoo.classes")?
            .parse()
            .map_err(|_| fail("zoo.classes is not a whole number".into()))?;
        let labels = match meta.get("zoo.labels") {
            None => None,
            Some(json) => Some(
                serde_json::from_str::<Vec<String>>(json)
                    .map_err(|e| fail(format!("zoo.labels is not a JSON list of names: {e}")))?,
            ),
        };
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| not_zoo(format!("not a safetensors file: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let stored = match view.dtype() {
                Dtype::F32 => Stored::F32(shape, le_words(data, f32::from_le_bytes)),
                Dtype::U64 => Stored::U64(shape, le_words(data, u64::from_le_bytes)),
                Dtype::U32 => Stored::U32(shape, le_words(data, u32::from_le_bytes)),
                other => {
                    return Err(fail(format!(
                        "tensor `{name}` has dtype {other:?}; expected F32, U64 or U32"
                    )))
                }
            };
            tensors.insert(name, stored);
        }
        Ok(ZooModel {
            spec_text,
            spec,
            config: ModelConfig { input, classes },
            tensors,
            labels,
        })
    }
}

fn le_words<T, const N: usize>(data: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| from(c.try_into().expect("chunks of N bytes")))
        .collect()
}
