//! `zoo bench` and `zoo predict`: the inference engine on a `.zoo` file, a pretrained model or
//! random weights.

use std::path::{Path, PathBuf};

use zoo::spec::InputShape;

use crate::{config_of, parse_classes, parse_input};

/// `zoo bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// A `.zoo` file, a registered model name or spec file (random weights), or a pretrained
    /// model: `<model>.<tag>`, a hub repo `org/name` or a local repo directory.
    model: String,
    /// Input shape HxWxC (default: the model's).
    #[arg(long, value_parser = parse_input)]
    input: Option<InputShape>,
    /// Number of classes of a named model (default: the spec's).
    #[arg(long, value_parser = parse_classes)]
    classes: Option<usize>,
    /// Timed batch-1 runs.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Images per call for the throughput figure (0: no throughput figure).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Also time every layer and print a table (op, shape, ms, share), written as CSV and
    /// JSON too.
    #[arg(long, conflicts_with = "floor")]
    profile: bool,
    /// Time the arithmetic floor of the model's binary layers instead of the model: a fixed
    /// XNOR-popcount loop (all in L1, no layout or epilogue) over the model's binary MACs,
    /// with the same kernel and threads. Fixed work: its spread over processes is the
    /// machine's own.
    #[arg(long)]
    floor: bool,
    /// Also time a second model (same forms as MODEL; the same --input and --classes), one
    /// call of each in turn, and print its latency and its time over MODEL's per pair of
    /// calls: a slow spell of the machine slows both calls of a pair alike, so this ratio
    /// (LAB's cost over sign, say) holds where separate processes disagree.
    #[arg(long, value_name = "MODEL", conflicts_with_all = ["floor", "profile"])]
    against: Option<String>,
    /// Where the profile goes: `<PREFIX>.csv` and `<PREFIX>.json` (default:
    /// `runs/profiles/<model>-<input>-<threads>t`, or `-cuda<N>` on a GPU).
    #[arg(long)]
    profile_out: Option<PathBuf>,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `zoo predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// A `.zoo` file, or a pretrained model: a name (`quicknet-lab`, `quicknet.larq_in1k`), a
    /// hub repo `org/name` or a local repo directory.
    model: String,
    /// A JPEG or PNG image.
    image: PathBuf,
    /// How many classes to print.
    #[arg(long, default_value_t = 5)]
    top: usize,
}

/// Times the engine on `device`.
pub fn bench(args: BenchArgs, device: &str, threads: usize) -> Result<(), zoo::Error> {
    let model = model_for(&args.model, args.input, args.classes)?;
    let gpu = zoo::device::gpu_ordinal(device)?;
    let report = measure(&model, &args, device, threads, gpu.is_some())?;
    print_report(&report, gpu);
    if let Some(ops) = &report.profile {
        print!("{}", zoo::engine::bench::render_profile(ops));
        let prefix = args.profile_out.unwrap_or_else(|| {
            let on = match gpu {
                Some(gpu) => format!("cuda{gpu}"),
                None => format!("{}t", report.threads),
            };
            PathBuf::from("runs/profiles").join(format!("{}-{}-{on}", report.model, report.input))
        });
        write_profile(ops, &prefix)?;
    }
    if let Some(path) = args.json {
        let body = serde_json::to_string_pretty(&report).expect("report serialises");
        zoo::io::write_bytes_atomically(&path, body.as_bytes())?;
    }
    Ok(())
}

/// The timings of `model` that `args` ask for: the CPU kernels' floor, or its latency (beside another
/// model's, with its throughput at a batch and its per-layer profile when asked).
fn measure(
    model: &zoo::engine::ZooModel,
    args: &BenchArgs,
    device: &str,
    threads: usize,
    on_gpu: bool,
) -> Result<zoo::engine::bench::Report, zoo::Error> {
    if args.floor {
        if on_gpu {
            return Err(zoo::Error::Train(
                "--floor times the CPU kernels' arithmetic floor; drop --device".into(),
            ));
        }
        let engine = zoo::engine::Engine::new(model, threads)?;
        return zoo::engine::bench::floor(&engine, args.runs, args.warmup);
    }
    let engine = zoo::engine::runner(model, device, threads)?;
    let against = match &args.against {
        Some(other) => {
            let other = model_for(other, args.input, args.classes)?;
            Some(zoo::engine::runner(&other, device, threads)?)
        }
        None => None,
    };
    zoo::engine::bench::bench(
        &*engine,
        args.runs,
        args.warmup,
        args.batch,
        args.profile,
        against.as_deref(),
    )
}

/// The report's figures on standard output.
fn print_report(report: &zoo::engine::bench::Report, gpu: Option<usize>) {
    let floor = report.measure == zoo::engine::bench::Measure::Floor;
    let what = match floor {
        true => format!(
            "floor of {}'s binary layers ({} binary MACs)",
            report.model,
            zoo::summary::si(report.binary_macs)
        ),
        false => report.model.clone(),
    };
    let on = match gpu {
        Some(_) => format!("on {}", report.kernel),
        None => format!("{} thread(s), {} kernel", report.threads, report.kernel),
    };
    println!(
        "{what} at {}, {on}: batch 1 {}",
        report.input, report.latency_ms
    );
    if floor {
        let rate = report.binary_macs as f64 / (report.latency_ms.median / 1e3);
        println!("{:.0} G binary MACs/s", rate / 1e9);
    }
    if let Some(a) = &report.against {
        println!("{}, in turn with it: batch 1 {}", a.model, a.latency_ms);
        let r = &a.ratio;
        println!(
            "{} / {} per pair of calls: median {:.3} (quartiles {:.3} / {:.3}), {:+.1}%",
            a.model,
            report.model,
            r.median,
            r.p25,
            r.p75,
            (r.median - 1.0) * 100.0
        );
    }
    if let Some(t) = &report.throughput {
        println!("batch {}: {:.1} images/s", t.batch, t.images_per_s);
    }
}

/// The per-layer profile as `<prefix>.csv` and `<prefix>.json`.
fn write_profile(ops: &[zoo::engine::OpTime], prefix: &Path) -> Result<(), zoo::Error> {
    if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| zoo::Error::Write {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let csv = prefix.with_extension("csv");
    let json_path = prefix.with_extension("json");
    zoo::io::write_bytes_atomically(&csv, zoo::engine::bench::profile_csv(ops).as_bytes())?;
    let body = serde_json::to_string_pretty(ops).expect("profile serialises");
    zoo::io::write_bytes_atomically(&json_path, body.as_bytes())?;
    println!(
        "profile written to {} and {}",
        csv.display(),
        json_path.display()
    );
    Ok(())
}

/// Classifies an image on `device`.
pub fn predict(args: PredictArgs, device: &str, threads: usize) -> Result<(), zoo::Error> {
    let zoo_model = packed_model(&args.model)?;
    let engine = zoo::engine::runner(&zoo_model, device, threads)?;
    let input = engine.config().input;
    let pixels = if input.channels == 1 {
        zoo::data::fashion_mnist::eval_image(&args.image, input.height)?
    } else {
        zoo::data::folder::eval_image(&args.image, input.height)?
    };
    let logits = engine.run(&pixels, 1)?;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for (rank, &class) in order.iter().take(args.top).enumerate() {
        let name = zoo_model
            .labels
            .as_ref()
            .and_then(|l| l.get(class))
            .map_or(String::new(), |n| format!(" {n}"));
        println!(
            "{}. class {class}{name}: {:.2}% (logit {:.4})",
            rank + 1,
            100.0 * exp[class] / sum,
            logits[class]
        );
    }
    Ok(())
}

/// A `.zoo` file, else a pretrained model's packed form.
fn packed_model(model: &str) -> Result<zoo::engine::ZooModel, zoo::Error> {
    let path = Path::new(model);
    if path.is_file() {
        zoo::engine::ZooModel::load(path)
    } else {
        zoo::hub::Hub::from_env().load_packed(model)
    }
}

/// A `.zoo` file, random weights of a registered model or spec file, or a pretrained model (a
/// tagged name, a hub repo or a local repo directory).
fn model_for(
    model: &str,
    input: Option<InputShape>,
    classes: Option<usize>,
) -> Result<zoo::engine::ZooModel, zoo::Error> {
    let path = std::path::Path::new(model);
    let zoo_model = if path.is_file() && zoo::spec(model).is_err() {
        let mut m = zoo::engine::ZooModel::load(path)?;
        if let Some(input) = input {
            m.config.input = input;
        }
        m
    } else if let Ok(spec) = zoo::spec(model) {
        let config = config_of(&spec, input, classes);
        zoo::engine::bench::random_model(model, &config, 0)?
    } else {
        let mut m = zoo::hub::Hub::from_env().load_packed(model)?;
        if let Some(input) = input {
            m.config.input = input;
        }
        m
    };
    Ok(zoo_model)
}
