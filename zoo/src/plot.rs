//! Pictures, as PNG or SVG: training curves of runs side by side, per-layer latency of engine
//! profiles, accuracy against latency, and what the binarizers of models do layer by layer.
//!
//! Charts are drawn with plotters; text uses a font embedded in the binary (Ubuntu Light, from
//! `epaint_default_fonts`), so a PNG looks the same on a machine without fonts. Files are
//! written atomically.

use std::path::Path;
use std::sync::Once;

use plotters::coord::ranged1d::{AsRangedCoord, SegmentedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordusize;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::train::EpochMetrics;
use crate::Error;

/// Colours of successive runs (Tableau 10: distinct, and readable on white).
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of run `i`.
pub fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// The family name of the embedded font.
pub(crate) const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
            .map_err(|_| ())
            .expect("the embedded font parses");
    });
}

/// A picture that can draw itself on any plotters backend.
pub trait Chart {
    /// Draws on `area` (already white).
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// The series' legend of `chart` in its box (text of `size` points, at `at`): the same in
/// every picture.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    size: u32,
    at: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .label_font((FONT, size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(at)
        .draw()
        .map_err(|e| e.to_string())
}

/// `chart` as an SVG document of `size` pixels.
pub fn svg(chart: &impl Chart, size: (u32, u32)) -> Result<String, String> {
    register_font();
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        area.fill(&WHITE).map_err(|e| e.to_string())?;
        chart.draw(&area)?;
        area.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Draws `chart` into `out` at `size` pixels: SVG when the name ends in `.svg`, PNG when in
/// `.png`. Written atomically.
pub fn save(chart: &impl Chart, out: &Path, size: (u32, u32)) -> Result<(), Error> {
    register_font();
    let fail = |message: String| Error::Write {
        path: out.display().to_string(),
        message,
    };
    let bytes = match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => svg(chart, size).map_err(&fail)?.into_bytes(),
        Some("png") => {
            let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
            {
                let area = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
                area.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
                chart.draw(&area).map_err(&fail)?;
                area.present().map_err(|e| fail(e.to_string()))?;
            }
            let image =
                image::RgbImage::from_raw(size.0, size.1, rgb).expect("the buffer holds the image");
            let mut png = std::io::Cursor::new(Vec::new());
            image
                .write_to(&mut png, image::ImageFormat::Png)
                .map_err(|e| fail(e.to_string()))?;
            png.into_inner()
        }
        _ => {
            return Err(fail(
                "expected a file name ending in `.png` or `.svg`".into(),
            ))
        }
    };
    crate::io::write_bytes_atomically(out, &bytes)
}

/// What the horizontal axis of curves counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// Epochs.
    Epoch,
    /// Optimizer steps.
    Step,
}

/// The per-epoch metrics of one run, with the name its curves carry.
#[derive(Clone, Debug)]
pub struct RunCurves {
    /// The legend's name for the run (its directory's name).
    pub name: String,
    /// One entry per epoch, from `metrics.jsonl`.
    pub epochs: Vec<EpochMetrics>,
}

impl RunCurves {
    /// Reads `metrics.jsonl` of the run directory `dir`.
    pub fn open(dir: &Path) -> Result<RunCurves, Error> {
        let epochs = crate::train::read_epochs(dir)?;
        let name = std::fs::canonicalize(dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(RunCurves { name, epochs })
    }
}

/// Training curves of several runs: train loss, top-1 (train dashed, validation solid) and the
/// learning rate, by epoch or by step, one colour per run.
pub struct Curves<'a> {
    /// The runs.
    pub runs: &'a [RunCurves],
    /// The horizontal axis.
    pub x: XAxis,
}

impl Curves<'_> {
    fn x(&self, m: &EpochMetrics) -> f64 {
        match self.x {
            XAxis::Epoch => m.epoch,
            XAxis::Step => m.step as f64,
        }
    }

    fn x_label(&self) -> &'static str {
        match self.x {
            XAxis::Epoch => "epoch",
            XAxis::Step => "optimizer step",
        }
    }

    fn x_range(&self) -> std::ops::Range<f64> {
        let end = self
            .runs
            .iter()
            .flat_map(|r| r.epochs.iter().map(|m| self.x(m)))
            .fold(0.0, f64::max);
        0.0..end.max(1e-9) * 1.02
    }

    /// One panel: `value` of every run's epochs (`None` skipped) against the x axis, dashed
    /// or solid.
    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        title: &str,
        y_label: &str,
        value: &dyn Fn(&EpochMetrics) -> Option<f64>,
        dashed: bool,
        legend_at: SeriesLabelPosition,
    ) -> Result<(), String> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .flat_map(|r| r.epochs.iter())
            .filter_map(value)
            .collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if values.is_empty() {
            (0.0, 1.0)
        } else {
            let pad = ((hi - lo) * 0.05).max(1e-9);
            (lo - pad, hi + pad)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(self.x_range(), lo..hi)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(self.x_label())
            .y_desc(y_label)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, run) in self.runs.iter().enumerate() {
            let colour = colour(i);
            let points: Vec<(f64, f64)> = run
                .epochs
                .iter()
                .filter_map(|m| value(m).map(|y| (self.x(m), y)))
                .collect();
            let style = colour.stroke_width(2);
            let legend = move |(x, y): (i32, i32)| {
                PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(2))
            };
            let drawn = if dashed {
                chart.draw_series(DashedLineSeries::new(points.clone(), 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(points.clone(), style))
            };
            drawn
                .map_err(|e| e.to_string())?
                .label(run.name.clone())
                .legend(legend);
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| e.to_string())?;
        }
        draw_legend(&mut chart, 13, legend_at)
    }
}

impl Chart for Curves<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let panels = area.split_evenly((2, 2));
        self.panel(
            &panels[0],
            "Training loss",
            "mean loss over the epoch",
            &|m| Some(m.train_loss),
            false,
            SeriesLabelPosition::UpperRight,
        )?;
        self.panel(
            &panels[1],
            "Validation top-1",
            "top-1 (%)",
            &|m| m.val.map(|v| v.top1),
            false,
            SeriesLabelPosition::LowerRight,
        )?;
        self.panel(
            &panels[2],
            "Training top-1 (augmented images)",
            "top-1 (%)",
            &|m| Some(m.train_top1),
            true,
            SeriesLabelPosition::LowerRight,
        )?;
        self.panel(
            &panels[3],
            "Learning rate (last step of the epoch)",
            "learning rate",
            &|m| Some(m.learning_rate),
            false,
            SeriesLabelPosition::UpperRight,
        )
    }
}

/// Draws the curves of `runs` into `out` (`.png` or `.svg`), 1280x900 pixels.
pub fn curves(runs: &[RunCurves], x: XAxis, out: &Path) -> Result<(), Error> {
    save(&Curves { runs, x }, out, (1280, 900))
}

/// One layer of a `zoo bench --profile` JSON file.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ProfileLayer {
    /// The layer's name.
    pub name: String,
    /// The engine's op kind (`binary_conv`, `lab+binary_conv`, `conv`, `max_pool`, ...).
    pub kind: String,
    /// Milliseconds per image at batch 1.
    pub ms: f64,
}

/// A per-layer profile of the inference engine, with the name its panel carries.
#[derive(Clone, Debug)]
pub struct Profile {
    /// The panel's title (the file's name).
    pub name: String,
    /// The layers, in execution order.
    pub layers: Vec<ProfileLayer>,
}

impl Profile {
    /// Reads a profile written by `zoo bench --profile` (`<prefix>.json`).
    pub fn open(path: &Path) -> Result<Profile, Error> {
        let layers = read_json_list(
            path,
            "a `zoo bench --profile` JSON file (a list of layers with name, kind and ms)",
            "layer",
        )?;
        let name = file_stem(path);
        Ok(Profile { name, layers })
    }
}

/// The groups of op kinds the latency bars are coloured by, with their colours.
const OP_GROUPS: [(&str, RGBColor); 6] = [
    ("binary conv", RGBColor(31, 119, 180)),
    ("LAB (+ binary conv)", RGBColor(255, 127, 14)),
    ("float conv / dense", RGBColor(44, 160, 44)),
    ("depthwise conv", RGBColor(148, 103, 189)),
    ("pooling", RGBColor(140, 86, 75)),
    ("element-wise", RGBColor(127, 127, 127)),
];

fn op_group(kind: &str) -> usize {
    match kind {
        k if k.contains("lab") => 1,
        k if k.contains("binary_conv") => 0,
        "conv" | "dense" => 2,
        "depthwise_conv" => 3,
        k if k.contains("pool") => 4,
        _ => 5,
    }
}

/// Per-layer latency as horizontal bars coloured by op kind, one panel per profile side by
/// side on a shared time axis (a sign model beside its LAB twin).
pub struct LatencyBars<'a> {
    /// The profiles.
    pub profiles: &'a [Profile],
}

impl Chart for LatencyBars<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let panels = area.split_evenly((1, self.profiles.len()));
        let max_ms = self
            .profiles
            .iter()
            .flat_map(|p| p.layers.iter().map(|l| l.ms))
            .fold(0.0, f64::max)
            * 1.08;
        for (profile, panel) in self.profiles.iter().zip(&panels) {
            let n = profile.layers.len();
            let total: f64 = profile.layers.iter().map(|l| l.ms).sum();
            let names: Vec<String> = profile.layers.iter().map(|l| l.name.clone()).collect();
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    format!("{}: {:.3} ms in all", profile.name, total),
                    (FONT, 20),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(190)
                .build_cartesian_2d(0.0..max_ms.max(1e-9), (0..n).into_segmented())
                .map_err(|e| e.to_string())?;
            // Layer i fills segment n - 1 - i: the first layer on top.
            chart
                .configure_mesh()
                .x_desc("ms per image at batch 1")
                .y_labels(n)
                .y_label_formatter(&|y| match y {
                    SegmentValue::CenterOf(s) if *s < n => names[n - 1 - s].clone(),
                    _ => String::new(),
                })
                .y_label_style((FONT, 11))
                .x_label_style((FONT, 13))
                .axis_desc_style((FONT, 15))
                .disable_y_mesh()
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(profile.layers.iter().enumerate().map(|(i, l)| {
                    let colour = OP_GROUPS[op_group(&l.kind)].1;
                    let mut bar = Rectangle::new(
                        [
                            (0.0, SegmentValue::Exact(n - 1 - i)),
                            (l.ms, SegmentValue::Exact(n - i)),
                        ],
                        colour.filled(),
                    );
                    bar.set_margin(2, 2, 0, 0);
                    bar
                }))
                .map_err(|e| e.to_string())?;
            for (name, colour) in OP_GROUPS {
                chart
                    .draw_series(std::iter::empty::<Rectangle<(f64, SegmentValue<usize>)>>())
                    .map_err(|e| e.to_string())?
                    .label(name)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled())
                    });
            }
            draw_legend(&mut chart, 13, SeriesLabelPosition::LowerRight)?;
        }
        Ok(())
    }
}

/// Draws per-layer latency bars of `profiles` side by side into `out` (`.png` or `.svg`).
pub fn latency(profiles: &[Profile], out: &Path) -> Result<(), Error> {
    let rows = profiles.iter().map(|p| p.layers.len()).max().unwrap_or(1) as u32;
    let width = 640 * profiles.len().max(1) as u32;
    save(&LatencyBars { profiles }, out, (width, 160 + 16 * rows))
}

/// One model of a results file: its accuracy and latency.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct ResultPoint {
    /// The model (or run group) name; a LAB model is named as its sign twin with `-lab`
    /// (`quicknet-lab` beside `quicknet`).
    pub model: String,
    /// Test top-1 (%).
    pub top1: f64,
    /// Batch-1 latency (ms).
    pub latency_ms: f64,
    /// Whether the model binarizes with LAB (default: its name says `lab`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab: Option<bool>,
}

impl ResultPoint {
    fn is_lab(&self) -> bool {
        self.lab.unwrap_or_else(|| self.model.contains("lab"))
    }
}

/// Reads a results file: a JSON list of `{model, top1, latency_ms}` (the accuracy campaign's
/// `results.json`).
pub fn open_results(path: &Path) -> Result<Vec<ResultPoint>, Error> {
    read_json_list(
        path,
        "a results file (a list of models with model, top1 and latency_ms)",
        "model",
    )
}

/// The name a file's series or panel carries: its name without the extension.
fn file_stem(path: &Path) -> String {
    path.file_stem().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Reads a non-empty JSON list from `path`; errors name the file and say it is not `what` or
/// lists no `item`.
fn read_json_list<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
    item: &str,
) -> Result<Vec<T>, Error> {
    let fail = |message: String| Error::Run {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let list: Vec<T> = serde_json::from_str(&text).map_err(|e| fail(format!("not {what}: {e}")))?;
    if list.is_empty() {
        return Err(fail(format!("lists no {item}")));
    }
    Ok(list)
}

/// The sign twin of a LAB model's name (`quicknet-lab-kd-x` → `quicknet-kd-x`), if it is one.
fn sign_twin(name: &str) -> Option<String> {
    name.find("-lab")
        .map(|at| format!("{}{}", &name[..at], &name[at + 4..]))
}

/// Accuracy against latency, one point per model, each LAB model joined to its sign twin.
pub struct Tradeoff<'a> {
    /// The models.
    pub points: &'a [ResultPoint],
}

impl Chart for Tradeoff<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let ((x_lo, x_hi), (y_lo, y_hi)) = self.points.iter().fold(
            ((f64::MAX, 0.0f64), (f64::MAX, f64::MIN)),
            |((xl, xh), (lo, hi)), p| {
                (
                    (xl.min(p.latency_ms), xh.max(p.latency_ms)),
                    (lo.min(p.top1), hi.max(p.top1)),
                )
            },
        );
        let pad = ((y_hi - y_lo) * 0.15).max(0.5);
        let mut chart = ChartBuilder::on(area)
            .caption("Accuracy against latency", (FONT, 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(x_lo * 0.85..x_hi * 1.3, (y_lo - pad)..(y_hi + pad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("batch-1 latency (ms)")
            .y_desc("test top-1 (%)")
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        let (sign, lab) = (OP_GROUPS[0].1, OP_GROUPS[1].1);
        for p in self.points {
            let twin =
                sign_twin(&p.model).and_then(|name| self.points.iter().find(|q| q.model == name));
            if let Some(q) = twin {
                chart
                    .draw_series(LineSeries::new(
                        [(q.latency_ms, q.top1), (p.latency_ms, p.top1)],
                        BLACK.mix(0.5).stroke_width(1),
                    ))
                    .map_err(|e| e.to_string())?;
            }
        }
        for (label, is_lab, colour) in [("sign", false, sign), ("LAB", true, lab)] {
            chart
                .draw_series(
                    self.points
                        .iter()
                        .filter(|p| p.is_lab() == is_lab)
                        .map(|p| {
                            EmptyElement::at((p.latency_ms, p.top1))
                                + Circle::new((0, 0), 5, colour.filled())
                                + Text::new(p.model.clone(), (8, -6), (FONT, 13))
                        }),
                )
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 7, y), 5, colour.filled()));
        }
        draw_legend(&mut chart, 14, SeriesLabelPosition::LowerRight)
    }
}

/// Draws the accuracy/latency scatter of `points` into `out` (`.png` or `.svg`).
pub fn tradeoff(points: &[ResultPoint], out: &Path) -> Result<(), Error> {
    save(&Tradeoff { points }, out, (1000, 700))
}

/// One binarized activation of a `zoo inspect --json` file.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct InspectedLayer {
    /// The layer whose input it is.
    pub layer: String,
    /// `sign`, `approx_sign`, `swish_sign` or `lab`.
    pub binarizer: String,
    /// Channels.
    pub channels: usize,
    /// Height and width of the binarized map.
    pub map: [usize; 2],
    /// Share of +1 over all images, channels and pixels (0 to 1).
    pub plus: f64,
    /// Channels that gave one sign at every pixel of every image.
    pub constant_channels: usize,
    /// LAB's learnt `beta` (none for other binarizers).
    #[serde(default)]
    pub beta: Option<f64>,
}

/// What the binarizers of one model do, layer by layer, with the name its series carries.
#[derive(Clone, Debug)]
pub struct Inspection {
    /// The legend's name (the file's name).
    pub name: String,
    /// The binarized activations, in network order.
    pub layers: Vec<InspectedLayer>,
}

impl Inspection {
    /// Reads a file written by `zoo inspect --json`.
    pub fn open(path: &Path) -> Result<Inspection, Error> {
        let layers = read_json_list(
            path,
            "a `zoo inspect --json` file (a list of binarized layers with layer, binarizer, \
             channels, map, plus and constant_channels)",
            "binarized layer",
        )?;
        let name = file_stem(path);
        Ok(Inspection { name, layers })
    }
}

/// Per binarized layer, one colour per model: the share of channels stuck at one sign (grouped
/// bars with their counts), the share of +1, and LAB's `beta` where a model has LAB. Each layer
/// is labelled by its map size, where LAB's 3x3 window has a neighbourhood only above 1x1.
pub struct Binarizers<'a> {
    /// The models (a sign model beside its LAB twin).
    pub inspections: &'a [Inspection],
}

/// A chart with the layers on segments across and `Y` upwards.
type Panel<'a, DB, Y> = ChartContext<'a, DB, Cartesian2d<SegmentedCoord<RangedCoordusize>, Y>>;

/// The share of a layer's channels stuck at one sign, in %.
fn stuck_share(l: &InspectedLayer) -> f64 {
    100.0 * l.constant_channels as f64 / l.channels.max(1) as f64
}

impl Binarizers<'_> {
    /// Layers on the horizontal axis: the longest model's (at least one).
    fn layers(&self) -> usize {
        self.inspections
            .iter()
            .map(|m| m.layers.len())
            .fold(1, usize::max)
    }

    /// Whether any model has LAB (a `beta` panel).
    fn has_beta(&self) -> bool {
        self.inspections
            .iter()
            .any(|m| m.layers.iter().any(|l| l.beta.is_some()))
    }

    /// The label of layer `i`: its position and map size, from the first model that has it.
    fn label(&self, i: usize) -> String {
        self.inspections
            .iter()
            .find_map(|m| m.layers.get(i))
            .map_or_else(String::new, |l| {
                format!("{}: {}x{}", i + 1, l.map[0], l.map[1])
            })
    }

    /// A model's name with its binarizers, in network order (`lab, sign` for LAB in the
    /// first stages only).
    fn legend(model: &Inspection) -> String {
        let mut kinds: Vec<&str> = Vec::new();
        for l in &model.layers {
            if !kinds.contains(&l.binarizer.as_str()) {
                kinds.push(&l.binarizer);
            }
        }
        format!("{} ({})", model.name, kinds.join(", "))
    }

    /// A panel with the layers on segments and `y` upwards, its mesh drawn.
    fn panel<'b, DB, Y>(
        &self,
        area: &'b DrawingArea<DB, Shift>,
        caption: &str,
        y: Y,
        y_desc: &str,
    ) -> Result<Panel<'b, DB, Y::CoordDescType>, String>
    where
        DB: DrawingBackend,
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let n = self.layers();
        let mut chart = ChartBuilder::on(area)
            .caption(caption, (FONT, 20))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            // `0..n - 1` gives the n segments 0..=n-1; a single layer takes `0..1` (an empty
            // second segment), since plotters maps a range of one value to its middle.
            .build_cartesian_2d((0..n.max(2) - 1).into_segmented(), y)
            .map_err(|e| e.to_string())?;
        let labels = |x: &SegmentValue<usize>| match x {
            SegmentValue::CenterOf(i) if *i < n => self.label(*i),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .x_labels(n)
            .x_label_formatter(&labels)
            .y_desc(y_desc)
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 15))
            .disable_x_mesh()
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(chart)
    }

    /// Grouped bars: model j's bar takes the j-th slice of its layer's segment, its count above.
    fn draw_stuck<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let most = self
            .inspections
            .iter()
            .flat_map(|m| m.layers.iter().map(stuck_share))
            .fold(0.0, f64::max);
        let mut chart = self.panel(
            area,
            "Channels at one sign on every image (% of the layer's channels)",
            0.0..(most * 1.2).clamp(10.0, 100.0),
            "% of channels",
        )?;
        let k = self.inspections.len().max(1) as i32;
        let segment = chart.plotting_area().dim_in_pixel().0 as i32 / self.layers() as i32;
        let slice = (segment - 8).max(k) / k;
        for (j, model) in self.inspections.iter().enumerate() {
            let (c, left) = (colour(j), 4 + j as i32 * slice);
            chart
                .draw_series(model.layers.iter().enumerate().map(|(i, l)| {
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), stuck_share(l)),
                            (SegmentValue::Exact(i + 1), 0.0),
                        ],
                        c.filled(),
                    );
                    bar.set_margin(0, 0, left as u32, (segment - left - slice).max(0) as u32);
                    bar
                }))
                .map_err(|e| e.to_string())?
                .label(Self::legend(model))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            chart
                .draw_series(
                    model
                        .layers
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.constant_channels > 0)
                        .map(|(i, l)| {
                            EmptyElement::at((SegmentValue::Exact(i), stuck_share(l)))
                                + Text::new(
                                    l.constant_channels.to_string(),
                                    (left, -16),
                                    (FONT, 12),
                                )
                        }),
                )
                .map_err(|e| e.to_string())?;
        }
        draw_legend(&mut chart, 14, SeriesLabelPosition::UpperLeft)
    }

    /// One line with markers per model through `value` of each layer that has one.
    fn draw_lines<DB: DrawingBackend, Y: Ranged<ValueType = f64>>(
        &self,
        chart: &mut Panel<'_, DB, Y>,
        value: impl Fn(&InspectedLayer) -> Option<f64>,
    ) -> Result<(), String> {
        for (j, model) in self.inspections.iter().enumerate() {
            let c = colour(j);
            let points: Vec<_> = model
                .layers
                .iter()
                .enumerate()
                .filter_map(|(i, l)| value(l).map(|v| (SegmentValue::CenterOf(i), v)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl Chart for Binarizers<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let panels = area.split_evenly((if self.has_beta() { 3 } else { 2 }, 1));
        self.draw_stuck(&panels[0])?;
        let mut plus = self.panel(
            &panels[1],
            "Share of +1 over every value of the layer",
            0.0..100.0,
            "+1 (%)",
        )?;
        self.draw_lines(&mut plus, |l| Some(100.0 * l.plus))?;
        if let Some(area) = panels.get(2) {
            // Positive `beta`s over decades: 0.003 is a collapsed LAB, 1 to 5 a working one.
            let (lo, hi) = self
                .inspections
                .iter()
                .flat_map(|m| m.layers.iter().filter_map(|l| l.beta))
                .map(f64::abs)
                .filter(|b| *b > 0.0)
                .fold((f64::MAX, 0.0f64), |(lo, hi), b| (lo.min(b), hi.max(b)));
            let mut beta = self.panel(
                area,
                "LAB's beta (the sharpness of its choice; log scale, absolute value)",
                (lo.min(1.0) / 2.0..hi.max(1.0) * 2.0).log_scale(),
                "|beta|",
            )?;
            self.draw_lines(&mut beta, |l| l.beta.map(f64::abs).filter(|b| *b > 0.0))?;
        }
        Ok(())
    }
}

/// Draws what the binarizers of `inspections` do, layer by layer, into `out` (`.png` or
/// `.svg`).
pub fn binarizers(inspections: &[Inspection], out: &Path) -> Result<(), Error> {
    let chart = Binarizers { inspections };
    let height = if chart.has_beta() { 1250 } else { 900 };
    save(&chart, out, (1280, height))
}
