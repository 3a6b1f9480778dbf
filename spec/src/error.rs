//! Spec errors that point at the file, line, column and field.

use crate::ir::Location;

/// A problem with a spec: where it is and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// The spec file (or `<string>`).
    pub file: String,
    /// Where in the file, when known.
    pub location: Option<Location>,
    /// The field path, for example `stages[1].activation[2]`, or a layer name.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl SpecError {
    /// An error at a known place.
    pub fn at(file: &str, location: Location, field: &str, message: impl Into<String>) -> Self {
        SpecError {
            file: file.to_string(),
            location: Some(location),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(loc) = self.location {
            write!(f, ":{}:{}", loc.line, loc.column)?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for SpecError {}
