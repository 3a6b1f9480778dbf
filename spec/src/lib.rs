//! Architecture specs for the zoo.
//!
//! A spec is a YAML file (the language is documented in `specs/README.md`). This crate parses
//! it, checks every key and value, expands block templates into a tree of named layers (the
//! [`Spec`] IR), and infers shapes, parameters and costs for any input size ([`analyze`]).
//! The `zoo-macros` code generator and the `zoo` runtime builder both consume the same IR.
//!
//! ```
//! let yaml = "
//! name: tiny
//! input: 28x28x1
//! classes: 10
//! stem: [{conv: {filters: 8, kernel: 3}}, batch_norm]
//! stages: [{block: quicknet, filters: 8, blocks: 2, activation: lab}]
//! head: [relu, global_avg_pool, dense]
//! ";
//! let spec = zoo_spec::parse_str(yaml, "tiny.yaml").unwrap();
//! let analysis = zoo_spec::analyze(&spec, &spec.default_config()).unwrap();
//! assert_eq!(analysis.output.channels, 10);
//! ```

mod analyze;
mod decode;
mod error;
mod ir;
mod yaml;

pub use analyze::{
    analyze, output_size, same_padding, Analysis, FeatureShape, LayerInfo, Param, Totals,
    MAX_PARAMS, MAX_TENSOR_VALUES,
};
pub use error::SpecError;
pub use ir::*;

/// Parses and validates a spec from YAML text; `file` names it in error messages.
///
/// Besides the language itself this checks that the spec's layers fit its default input.
pub fn parse_str(text: &str, file: &str) -> Result<Spec, SpecError> {
    let root = yaml::parse(file, text)?;
    let spec = decode::decode(&yaml::Value::root(file, &root))?;
    analyze(&spec, &spec.default_config())?;
    Ok(spec)
}

/// Reads, parses and validates a spec file.
pub fn load_file(path: impl AsRef<std::path::Path>) -> Result<Spec, SpecError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SpecError {
        file: file.clone(),
        location: None,
        field: String::new(),
        message: format!("cannot read the spec: {e}"),
    })?;
    parse_str(&text, &file)
}
