//! The table of pretrained variants: every name and tag `zoo::load` knows, where its weights
//! come from, and what they were measured at.
//!
//! Names follow timm: `<model>.<tag>` (`quicknet.larq_in1k`, `reactnet-lab.fmnist`), and a
//! bare `<model>` means the model's default tag. Each hub variant lives in its own hub repo,
//! `<organisation>/<model>.<tag>`.

use crate::Error;

/// The hub organisation that publishes the zoo's own weights, unless overridden
/// ([`super::Hub::organisation`], `ZOO_HUB_ORG`).
pub const DEFAULT_ORGANISATION: &str = "zoo-bnn";

/// Where a variant's weights come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A hub repo in the zoo's layout, `<organisation>/<model>.<tag>`.
    Hub,
    /// A Keras HDF5 file on Larq Zoo's GitHub releases, converted on first use.
    LarqRelease {
        /// Path under the releases' base URL (`quicknet-v1.0/quicknet_weights.h5`).
        path: &'static str,
        /// SHA-256 pinned in `larq_zoo` 2.4's sources.
        sha256: &'static str,
    },
}

/// One pretrained variant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Variant {
    /// The registered model (`zoo list`).
    pub model: &'static str,
    /// The tag (`fmnist`, `larq_in1k`).
    pub tag: &'static str,
    /// Whether a bare `<model>` means this tag.
    pub default: bool,
    /// Where the weights come from.
    pub source: Source,
    /// The training data.
    pub dataset: &'static str,
    /// Input `HxWxC`.
    pub input: &'static str,
    /// Number of classes.
    pub classes: usize,
    /// Top-1 / top-5 accuracy (%) on the dataset's validation or test split, when measured.
    pub accuracy: Option<(f64, f64)>,
    /// Who measured the accuracy, and how.
    pub measured: &'static str,
}

impl Variant {
    /// `<model>.<tag>`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.model, self.tag)
    }
}

const IMAGENET: &str = "imagenet-1k";
const FMNIST: &str = "fashion-mnist";
const LARQ_MEASURED: &str = "Larq Zoo's published ImageNet validation accuracy";
const FMNIST_MEASURED: &str = "measured by benches/fashion_mnist_accuracy.sh (issue 13)";

const fn larq(
    model: &'static str,
    path: &'static str,
    sha256: &'static str,
    accuracy: (f64, f64),
) -> Variant {
    Variant {
        model,
        tag: "larq_in1k",
        default: true,
        source: Source::LarqRelease { path, sha256 },
        dataset: IMAGENET,
        input: "224x224x3",
        classes: 1000,
        accuracy: Some(accuracy),
        measured: LARQ_MEASURED,
    }
}

/// A Fashion-MNIST variant at `input` (`zoo train`'s default side for the model).
const fn fmnist(model: &'static str, default: bool, input: &'static str) -> Variant {
    Variant {
        model,
        tag: "fmnist",
        default,
        source: Source::Hub,
        dataset: FMNIST,
        input,
        classes: 10,
        accuracy: None,
        measured: FMNIST_MEASURED,
    }
}

/// Every pretrained variant. The README's table of pretrained weights lists the same rows.
pub static PRETRAINED: &[Variant] = &[
    larq(
        "quicknet",
        "quicknet-v1.0/quicknet_weights.h5",
        "8aba9e4e5f8d342faef04a0b2ae8e562da57dbb7d15162e8b3e091c951ba756c",
        (63.3, 84.6),
    ),
    larq(
        "quicknet-small",
        "quicknet-v1.0/quicknet_small_weights.h5",
        "1ac3b07df7f5a911dd0b49febb2486428ddf1ca130297c403815dfae5a1c71a2",
        (59.4, 81.8),
    ),
    larq(
        "quicknet-large",
        "quicknet-v1.0/quicknet_large_weights.h5",
        "c5158e8a59147b31370becd937825f4db8a5cdf308314874f678f596629be45c",
        (66.9, 87.0),
    ),
    larq(
        "birealnet",
        "birealnet-v0.3.0/birealnet_weights.h5",
        "6e6efac1584fcd60dd024198c87f42eb53b5ec719a5ca1f527e1fe7e8b997117",
        (57.47, 79.84),
    ),
    larq(
        "xnornet",
        "xnornet-v0.2.0/xnornet_weights.h5",
        "e6ba24f785655260ae76a2ef1fab520e3528243d9c8fac430299cd81dbeabe10",
        (44.96, 69.18),
    ),
    fmnist("quicknet", false, "32x32x1"),
    fmnist("quicknet-lab", true, "32x32x1"),
    fmnist("quicknet-small", false, "32x32x1"),
    fmnist("quicknet-large", false, "32x32x1"),
    fmnist("birealnet", false, "32x32x1"),
    fmnist("birealnet-lab", true, "32x32x1"),
    fmnist("labbnn", true, "32x32x1"),
    fmnist("reactnet", true, "32x32x1"),
    fmnist("reactnet-lab", true, "32x32x1"),
    // AlexNet's 6x6 VALID convolution needs the spec's 224x224.
    fmnist("xnornet", false, "224x224x1"),
    fmnist("xnornet-lab", true, "224x224x1"),
];

/// Looks up `<model>` (its default tag) or `<model>.<tag>`. An unknown name or tag is an error
/// listing the known ones.
pub fn variant(name: &str) -> Result<&'static Variant, Error> {
    let (model, tag) = match name.split_once('.') {
        Some((model, tag)) => (model, Some(tag)),
        None => (name, None),
    };
    let of_model: Vec<&Variant> = PRETRAINED.iter().filter(|v| v.model == model).collect();
    if of_model.is_empty() {
        // Each model once, in table order (a model's tags need not be neighbours).
        let mut models: Vec<&str> = Vec::new();
        for v in PRETRAINED {
            if !models.contains(&v.model) {
                models.push(v.model);
            }
        }
        return Err(Error::Hub(format!(
            "no pretrained model `{model}`: known models are {}; a hub repo is `org/name`, a \
             local one a directory",
            models.join(", ")
        )));
    }
    let found = match tag {
        Some(tag) => of_model.iter().find(|v| v.tag == tag),
        None => of_model.iter().find(|v| v.default),
    };
    found.copied().ok_or_else(|| {
        let tags: Vec<String> = of_model.iter().map(|v| v.name()).collect();
        Error::Hub(format!(
            "`{model}` has no pretrained tag `{}`: known are {}",
            tag.unwrap_or_default(),
            tags.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_has_one_default_and_registered_specs() {
        for entry in crate::list() {
            let defaults = PRETRAINED
                .iter()
                .filter(|v| v.model == entry.name && v.default)
                .count();
            assert_eq!(defaults, 1, "{} has {defaults} default tags", entry.name);
        }
        for v in PRETRAINED {
            assert!(
                crate::spec(v.model).is_ok(),
                "{} is not registered",
                v.model
            );
            assert!(v.input.parse::<crate::spec::InputShape>().is_ok());
        }
    }

    #[test]
    fn names_resolve_to_tags_and_unknown_ones_list_the_known() {
        assert_eq!(variant("quicknet").unwrap().tag, "larq_in1k");
        assert_eq!(variant("quicknet.fmnist").unwrap().tag, "fmnist");
        assert_eq!(variant("reactnet-lab").unwrap().tag, "fmnist");
        let e = variant("resnet50").unwrap_err().to_string();
        assert!(e.contains("resnet50") && e.contains("reactnet-lab"), "{e}");
        assert_eq!(e.matches("quicknet-lab").count(), 1, "each model once: {e}");
        assert_eq!(e.matches(" quicknet,").count(), 1, "each model once: {e}");
        let e = variant("reactnet-lab.in1k").unwrap_err().to_string();
        assert!(
            e.contains("`in1k`") && e.contains("reactnet-lab.fmnist"),
            "{e}"
        );
    }
}
