//! `zoo show`: what the binarizers of trained models see and give on one image.

use std::path::{Path, PathBuf};

use zoo::data::Dataset;
use zoo::show::{InputImage, ShownModel};

/// `zoo show`.
#[derive(clap::Args)]
pub struct ShowArgs {
    /// The models, side by side: run directories, pretrained models (`quicknet-lab`,
    /// `org/name`, a repo directory) or weights files (with --spec). An image file among them
    /// is the input.
    #[arg(required = true)]
    models: Vec<String>,
    /// Use image N of the embedded Fashion-MNIST test set as the input.
    #[arg(long)]
    fmnist: Option<usize>,
    /// Layers to show, comma-separated: positions in the order `zoo inspect` lists the
    /// binarized activations (1 is the first) or layer names (default: the first of each
    /// spatial size, up to 4).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<String>,
    /// Channels to show of every layer, comma-separated (default: the first 4).
    #[arg(long, value_delimiter = ',')]
    channels: Vec<usize>,
    /// The architecture of weights files that carry no run configuration (a registered name
    /// or a spec file); they take the spec's input size.
    #[arg(long)]
    spec: Option<String>,
    /// The picture to write: `.png` or `.svg`.
    #[arg(short, long, default_value = "maps.png")]
    output: PathBuf,
}

/// Where the input image comes from.
enum Input {
    FashionMnist(usize),
    File(PathBuf),
}

impl Input {
    /// The image as a model of `channels x side x side` inputs sees it.
    fn load(&self, channels: usize, side: usize, model: &str) -> Result<InputImage, zoo::Error> {
        let pixels = match self {
            Input::FashionMnist(n) => {
                if channels != 1 {
                    return Err(zoo::Error::Train(format!(
                        "--fmnist gives gray images, but {model} takes {channels} channels: give an image file"
                    )));
                }
                fashion_mnist_image(*n, side)?.0
            }
            Input::File(path) if channels == 1 => zoo::data::fashion_mnist::eval_image(path, side)?,
            Input::File(path) => zoo::data::folder::eval_image(path, side)?,
        };
        Ok(InputImage {
            shape: [channels, side, side],
            pixels,
        })
    }

    fn describe(&self) -> Result<String, zoo::Error> {
        Ok(match self {
            Input::FashionMnist(n) => {
                let class = fashion_mnist_image(*n, 32)?.1;
                format!("Fashion-MNIST test image {n} ({class})")
            }
            Input::File(path) => path.display().to_string(),
        })
    }
}

/// Image `n` of the embedded Fashion-MNIST test set at `side x side`, and its class.
fn fashion_mnist_image(n: usize, side: usize) -> Result<(Vec<f32>, String), zoo::Error> {
    let dir = zoo::data::fashion_mnist::embedded_dir();
    let test = zoo::data::FashionMnist::open(&dir, zoo::data::Split::Validation, side)?;
    if n >= test.len() {
        return Err(zoo::Error::Train(format!(
            "--fmnist {n}: the Fashion-MNIST test set has images 0 to {}",
            test.len() - 1
        )));
    }
    let mut pixels = vec![0f32; side * side];
    let label = test.load(n, None, &mut pixels)?;
    Ok((pixels, test.classes()[label as usize].clone()))
}

/// An argument that names an image file rather than a model.
fn is_image_file(arg: &str) -> bool {
    let path = Path::new(arg);
    path.is_file() && image::ImageFormat::from_path(path).is_ok()
}

/// The name a model carries in the figure: a run's or repo's folder name, a file's stem, or the
/// hub name as given.
fn display_name(arg: &str) -> String {
    let path = Path::new(arg);
    let name = if path.is_dir() {
        std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    } else if path.is_file() {
        path.file_stem().map(|n| n.to_string_lossy().into_owned())
    } else {
        None
    };
    name.unwrap_or_else(|| arg.to_string())
}

/// Draws the chosen binarized activations of every model on one image.
pub fn show(args: ShowArgs) -> Result<(), zoo::Error> {
    let (images, models): (Vec<String>, Vec<String>) =
        args.models.into_iter().partition(|a| is_image_file(a));
    let input = match (images.as_slice(), args.fmnist) {
        ([path], None) => Input::File(path.into()),
        ([], Some(n)) => Input::FashionMnist(n),
        ([], None) => {
            return Err(zoo::Error::Train(
                "no input: give an image file or --fmnist N (a Fashion-MNIST test image)".into(),
            ))
        }
        _ => {
            return Err(zoo::Error::Train(
                "more than one input: give one image file or --fmnist N".into(),
            ))
        }
    };
    if models.is_empty() {
        return Err(zoo::Error::Train(
            "no model to show: give run directories, pretrained models or weights files".into(),
        ));
    }
    let mut shown = Vec::new();
    for arg in &models {
        let (_, weights, model) = crate::eval::open_weights(arg, args.spec.clone())?;
        let config = match &weights.config {
            Some(run) => run.model_config()?,
            None => crate::config_of(&zoo::spec(&model)?, None, None),
        };
        let name = display_name(arg);
        let network = weights.network_for(&model, &config)?;
        let image = input.load(config.input.channels, config.input.height, &name)?;
        let maps = zoo::show::activation_maps(&network, &image)?;
        shown.push((name, image, maps));
    }
    // Rows are chosen on the first model and taken at the same positions in the others.
    let rows = if args.layers.is_empty() {
        zoo::show::default_layers(&shown[0].2, 4)
    } else {
        zoo::show::find_layers(&shown[0].2, &args.layers, &shown[0].0)?
    };
    let channels = if args.channels.is_empty() {
        let fewest = shown
            .iter()
            .flat_map(|(_, _, maps)| rows.iter().map(|&r| maps.get(r).map_or(0, |m| m.shape[0])))
            .min()
            .unwrap_or(0);
        (0..fewest.min(4)).collect()
    } else {
        args.channels
    };
    let models: Vec<ShownModel> = shown
        .into_iter()
        .map(|(name, image, maps)| {
            let picked = rows
                .iter()
                .map(|&r| {
                    maps.get(r).cloned().ok_or_else(|| {
                        zoo::Error::Train(format!(
                            "{name} has {} binarized layers, fewer than the {} shown: choose them with --layers",
                            maps.len(),
                            r + 1
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ShownModel {
                name,
                image,
                maps: picked,
            })
        })
        .collect::<Result<_, zoo::Error>>()?;
    let title = format!("What the binarizers see and give: {}", input.describe()?);
    zoo::show::feature_maps(&title, &models, &channels, &args.output)?;
    println!("{title}");
    println!(
        "{:<24} {:<32} {:<11} {:>12} {:>7} {:>9}",
        "model", "layer", "binarizer", "HxWxC", "+1 %", "constant"
    );
    for model in &models {
        for map in &model.maps {
            let [c, h, w] = map.shape;
            println!(
                "{:<24} {:<32} {:<11} {:>12} {:>7.2} {:>9}",
                model.name,
                map.layer,
                map.binarizer,
                format!("{h}x{w}x{c}"),
                100.0 * map.plus(),
                map.constant_channels()
            );
        }
    }
    println!("wrote {}", args.output.display());
    Ok(())
}
