//! Typed access to a YAML tree that remembers where every value is written.
//!
//! Each accessor checks the type it expects and reports the file, line, column and field path
//! when the value is missing, of the wrong type or out of range.

use saphyr::{LoadableYamlNode, MarkedYamlOwned, ScalarOwned, YamlDataOwned};

use crate::error::SpecError;
use crate::ir::{Location, MAX_COUNT};

/// A YAML value with its position and field path.
#[derive(Clone)]
pub struct Value<'a> {
    file: &'a str,
    node: &'a MarkedYamlOwned,
    path: String,
}

/// Parses a YAML document, returning its root node.
pub fn parse(file: &str, text: &str) -> Result<MarkedYamlOwned, SpecError> {
    let mut docs = MarkedYamlOwned::load_from_str(text).map_err(|e| SpecError {
        file: file.to_string(),
        location: Some(Location {
            line: e.marker().line(),
            column: e.marker().col() + 1,
        }),
        field: String::new(),
        message: format!("invalid YAML: {}", e.info()),
    })?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        0 => Err(SpecError {
            file: file.to_string(),
            location: None,
            field: String::new(),
            message:
                "the spec is empty: expected a mapping with `name`, `input`, `classes` and layers"
                    .into(),
        }),
        n => Err(SpecError {
            file: file.to_string(),
            location: None,
            field: String::new(),
            message: format!("expected one YAML document, found {n}"),
        }),
    }
}

fn describe(node: &MarkedYamlOwned) -> String {
    match &node.data {
        YamlDataOwned::Value(ScalarOwned::Null) => "nothing (null)".into(),
        YamlDataOwned::Value(ScalarOwned::Boolean(b)) => format!("the boolean {b}"),
        YamlDataOwned::Value(ScalarOwned::Integer(i)) => format!("the integer {i}"),
        YamlDataOwned::Value(ScalarOwned::FloatingPoint(x)) => format!("the number {x}"),
        YamlDataOwned::Value(ScalarOwned::String(s)) => format!("the string \"{s}\""),
        YamlDataOwned::Sequence(_) => "a list".into(),
        YamlDataOwned::Mapping(_) => "a mapping".into(),
        YamlDataOwned::Alias(_) => "an alias (aliases are not supported)".into(),
        YamlDataOwned::Tagged(tag, _) => format!("a value tagged {tag}"),
        _ => "an unreadable value".into(),
    }
}

impl<'a> Value<'a> {
    /// The root value of a document.
    pub fn root(file: &'a str, node: &'a MarkedYamlOwned) -> Self {
        Value {
            file,
            node,
            path: String::new(),
        }
    }

    /// Where this value is written.
    pub fn location(&self) -> Location {
        Location {
            line: self.node.span.start.line(),
            column: self.node.span.start.col() + 1,
        }
    }

    /// The spec file name.
    pub fn file(&self) -> &'a str {
        self.file
    }

    /// An error at this value.
    pub fn error(&self, message: impl Into<String>) -> SpecError {
        SpecError::at(self.file, self.location(), &self.path, message)
    }

    fn expected(&self, what: &str) -> SpecError {
        self.error(format!("expected {what}, found {}", describe(self.node)))
    }

    /// True for `null` or an empty value.
    pub fn is_null(&self) -> bool {
        matches!(self.node.data, YamlDataOwned::Value(ScalarOwned::Null))
    }

    /// The value as a string, if it is one.
    pub fn as_plain_str(&self) -> Option<&'a str> {
        match &self.node.data {
            YamlDataOwned::Value(ScalarOwned::String(s)) => Some(s),
            _ => None,
        }
    }

    /// A string.
    pub fn str(&self) -> Result<&'a str, SpecError> {
        self.as_plain_str().ok_or_else(|| self.expected("a string"))
    }

    /// A boolean.
    pub fn bool(&self) -> Result<bool, SpecError> {
        match &self.node.data {
            YamlDataOwned::Value(ScalarOwned::Boolean(b)) => Ok(*b),
            _ => Err(self.expected("true or false")),
        }
    }

    /// A number (integers are accepted).
    pub fn f64(&self) -> Result<f64, SpecError> {
        match &self.node.data {
            YamlDataOwned::Value(ScalarOwned::FloatingPoint(x)) if x.is_finite() => Ok(**x),
            YamlDataOwned::Value(ScalarOwned::Integer(i)) => Ok(*i as f64),
            _ => Err(self.expected("a number")),
        }
    }

    /// A number that is greater than zero.
    pub fn positive_f64(&self) -> Result<f64, SpecError> {
        let x = self.f64()?;
        if x > 0.0 {
            Ok(x)
        } else {
            Err(self.error(format!("expected a number greater than 0, found {x}")))
        }
    }

    /// An integer from 1 to [`MAX_COUNT`].
    pub fn positive(&self) -> Result<usize, SpecError> {
        match &self.node.data {
            YamlDataOwned::Value(ScalarOwned::Integer(i)) if (1..=MAX_COUNT as i64).contains(i) => {
                Ok(*i as usize)
            }
            YamlDataOwned::Value(ScalarOwned::Integer(i)) if *i >= 1 => Err(self.error(format!(
                "expected a positive integer of at most {MAX_COUNT}, found {i}"
            ))),
            YamlDataOwned::Value(ScalarOwned::Integer(i)) => {
                Err(self.error(format!("expected a positive integer, found {i}")))
            }
            _ => Err(self.expected("a positive integer")),
        }
    }

    /// One positive integer `k` (meaning `[k, k]`) or a list of two.
    pub fn pair(&self) -> Result<[usize; 2], SpecError> {
        if let YamlDataOwned::Sequence(items) = &self.node.data {
            if items.len() != 2 {
                return Err(self.error(format!(
                    "expected one positive integer or a list of two, found a list of {}",
                    items.len()
                )));
            }
            let items = self.seq()?;
            return Ok([items[0].positive()?, items[1].positive()?]);
        }
        let k = self
            .positive()
            .map_err(|_| self.expected("one positive integer or a list of two"))?;
        Ok([k, k])
    }

    /// A list.
    pub fn seq(&self) -> Result<Vec<Value<'a>>, SpecError> {
        match &self.node.data {
            YamlDataOwned::Sequence(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, node)| Value {
                    file: self.file,
                    node,
                    path: format!("{}[{i}]", self.path),
                })
                .collect()),
            _ => Err(self.expected("a list")),
        }
    }

    /// A list, or a single value standing for a list of one.
    pub fn seq_or_one(&self) -> Result<Vec<Value<'a>>, SpecError> {
        match &self.node.data {
            YamlDataOwned::Sequence(_) => self.seq(),
            _ => Ok(vec![self.clone()]),
        }
    }

    /// An empty mapping standing at this value (for a variant written as a bare name).
    pub fn map_of_nothing(&self) -> Map<'a> {
        Map {
            owner: self.clone(),
            entries: Vec::new(),
            used: Vec::new(),
        }
    }

    /// A mapping with string keys; `null` counts as an empty mapping.
    pub fn map(&self) -> Result<Map<'a>, SpecError> {
        let mut entries = Vec::new();
        match &self.node.data {
            YamlDataOwned::Value(ScalarOwned::Null) => {}
            YamlDataOwned::Mapping(m) => {
                for (k, v) in m.iter() {
                    let key_value = Value {
                        file: self.file,
                        node: k,
                        path: self.path.clone(),
                    };
                    let key = key_value
                        .as_plain_str()
                        .ok_or_else(|| key_value.expected("a string key"))?;
                    let path = if self.path.is_empty() {
                        key.to_string()
                    } else {
                        format!("{}.{key}", self.path)
                    };
                    entries.push((
                        key,
                        key_value.location(),
                        Value {
                            file: self.file,
                            node: v,
                            path,
                        },
                    ));
                }
            }
            _ => return Err(self.expected("a mapping")),
        }
        Ok(Map {
            owner: self.clone(),
            entries,
            used: Vec::new(),
        })
    }
}

/// A mapping whose keys are checked off as they are read; [`Map::finish`] rejects the rest.
pub struct Map<'a> {
    owner: Value<'a>,
    entries: Vec<(&'a str, Location, Value<'a>)>,
    used: Vec<&'static str>,
}

impl<'a> Map<'a> {
    /// The optional value of `key`.
    pub fn get(&mut self, key: &'static str) -> Option<Value<'a>> {
        self.used.push(key);
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| v.clone())
    }

    /// The value of a required `key`.
    pub fn require(&mut self, key: &'static str, what: &str) -> Result<Value<'a>, SpecError> {
        self.get(key).ok_or_else(|| {
            let hint = match self
                .entries
                .iter()
                .find(|(k, _, _)| edit_distance(k, key) <= 2)
            {
                Some((k, _, _)) => format!(" (is `{k}` a misspelling of it?)"),
                None => String::new(),
            };
            let mut err = self
                .owner
                .error(format!("missing `{key}`: expected {what}{hint}"));
            err.field = if self.owner.path.is_empty() {
                key.to_string()
            } else {
                format!("{}.{key}", self.owner.path)
            };
            err
        })
    }

    /// The keys in file order, with their values.
    pub fn keys(&self) -> impl Iterator<Item = (&'a str, Value<'a>)> + '_ {
        self.entries.iter().map(|(k, _, v)| (*k, v.clone()))
    }

    /// The mapping itself.
    pub fn value(&self) -> &Value<'a> {
        &self.owner
    }

    /// Errors on the first key that was never asked for, listing the accepted keys.
    pub fn finish(self) -> Result<(), SpecError> {
        for (key, location, value) in &self.entries {
            if !self.used.contains(key) {
                let mut accepted = self.used.clone();
                accepted.sort_unstable();
                accepted.dedup();
                return Err(SpecError::at(
                    self.owner.file,
                    *location,
                    &value.path,
                    format!(
                        "unknown key `{key}`; expected one of: {}",
                        accepted
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(previous + 1).min(row[j] + 1);
        }
    }
    row[b.len()]
}
