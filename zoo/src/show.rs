//! What the binarizers see and give on one image: for chosen layers, the real-valued input of
//! each binarizer and the binary map it produces, for several models side by side (a sign model
//! beside its LAB twin, the paper's qualitative figure), and each layer's share of +1 per
//! channel.

use std::path::Path;

use candle_core::{Device, Tensor};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::plot::{colour, draw_legend, Chart, FONT};
use crate::{Error, Network};

/// One image as a model sees it: normalised pixels, `[channels, height, width]`.
#[derive(Clone, Debug)]
pub struct InputImage {
    /// `[channels, height, width]`.
    pub shape: [usize; 3],
    /// Channel-major pixels.
    pub pixels: Vec<f32>,
}

/// One binarized activation of one image.
#[derive(Clone, Debug)]
pub struct ActivationMap {
    /// The layer whose input (or, for a `binarize` layer, output) it is.
    pub layer: String,
    /// The binarizer: `sign`, `approx_sign`, `swish_sign` or `lab`.
    pub binarizer: &'static str,
    /// `[channels, height, width]`.
    pub shape: [usize; 3],
    /// The binarizer's real-valued input, channel-major.
    pub input: Vec<f32>,
    /// Its ±1 output, channel-major.
    pub output: Vec<f32>,
}

impl ActivationMap {
    fn plane(&self) -> usize {
        self.shape[1] * self.shape[2]
    }

    /// The real-valued input of channel `c`, row-major.
    pub fn channel_input(&self, c: usize) -> &[f32] {
        &self.input[c * self.plane()..(c + 1) * self.plane()]
    }

    /// The binary output of channel `c`, row-major.
    pub fn channel_output(&self, c: usize) -> &[f32] {
        &self.output[c * self.plane()..(c + 1) * self.plane()]
    }

    /// The share of +1 of each channel.
    pub fn plus_shares(&self) -> Vec<f64> {
        (0..self.shape[0])
            .map(|c| {
                let plus = self.channel_output(c).iter().filter(|&&v| v > 0.0).count();
                plus as f64 / self.plane() as f64
            })
            .collect()
    }

    /// The share of +1 over all channels and pixels.
    pub fn plus(&self) -> f64 {
        self.output.iter().filter(|&&v| v > 0.0).count() as f64 / self.output.len() as f64
    }

    /// Channels whose output has the same sign at every pixel.
    pub fn constant_channels(&self) -> usize {
        self.plus_shares()
            .iter()
            .filter(|&&s| s == 0.0 || s == 1.0)
            .count()
    }
}

/// Runs `image` through `network` in inference mode and keeps every binarized activation, in
/// the order they run (the order `zoo inspect` lists them).
pub fn activation_maps(network: &Network, image: &InputImage) -> Result<Vec<ActivationMap>, Error> {
    let [c, h, w] = image.shape;
    let xs = Tensor::from_vec(image.pixels.clone(), (1, c, h, w), &Device::Cpu)?;
    let mut maps = Vec::new();
    network.forward_observed(&xs, false, &mut |layer, binarizer, input, output| {
        let shape = match *input.dims() {
            [1, c, h, w] => [c, h, w],
            [1, c] => [c, 1, 1],
            ref dims => candle_core::bail!("`{layer}`: unexpected activation shape {dims:?}"),
        };
        maps.push(ActivationMap {
            layer: layer.to_string(),
            binarizer: binarizer.name(),
            shape,
            input: input.flatten_all()?.to_vec1()?,
            output: output.flatten_all()?.to_vec1()?,
        });
        Ok(())
    })?;
    if maps.is_empty() {
        return Err(Error::Train(
            "the model binarizes no activation: there is nothing to show".into(),
        ));
    }
    Ok(maps)
}

/// The layers shown by default: the first binarized activation of each spatial size (one per
/// stage), leaving out 1x1 maps when larger ones exist, at most `limit`, spread over the
/// network.
pub fn default_layers(maps: &[ActivationMap], limit: usize) -> Vec<usize> {
    let wide = maps.iter().any(|m| m.plane() > 1);
    let mut sizes = Vec::new();
    let mut picked = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let size = (m.shape[1], m.shape[2]);
        if (wide && m.plane() == 1) || sizes.contains(&size) {
            continue;
        }
        sizes.push(size);
        picked.push(i);
    }
    if picked.len() > limit && limit > 1 {
        let n = picked.len() - 1;
        picked = (0..limit)
            .map(|k| picked[(k * n + (limit - 1) / 2) / (limit - 1)])
            .collect();
    }
    picked.truncate(limit.max(1));
    picked
}

/// The positions in `maps` of the `wanted` layers, each a 1-based position in the order of
/// [`activation_maps`] or a layer name; errors name `model` and what it has.
pub fn find_layers(
    maps: &[ActivationMap],
    wanted: &[String],
    model: &str,
) -> Result<Vec<usize>, Error> {
    wanted
        .iter()
        .map(|w| {
            let found = match w.parse::<usize>() {
                Ok(p) => p.checked_sub(1).filter(|&i| i < maps.len()),
                Err(_) => maps.iter().position(|m| &m.layer == w),
            };
            found.ok_or_else(|| {
                let names: Vec<&str> = maps.iter().map(|m| m.layer.as_str()).collect();
                Error::Train(format!(
                    "{model} has no binarized layer `{w}`: expected a position from 1 to {} or one of {}",
                    maps.len(),
                    names.join(", ")
                ))
            })
        })
        .collect()
}

/// One model's column group: its name, the image as it sees it and the chosen activations,
/// one per row.
#[derive(Clone, Debug)]
pub struct ShownModel {
    /// The name above its columns.
    pub name: String,
    /// Its input.
    pub image: InputImage,
    /// The activations, one per row.
    pub maps: Vec<ActivationMap>,
}

/// The figure: models side by side, one row per chosen layer with the binarizer's input
/// (above) and binary output (below) of each chosen channel, and a chart of the share of +1
/// per channel.
pub struct FeatureMaps<'a> {
    /// The title.
    pub title: &'a str,
    /// The models, all with the same number of rows.
    pub models: &'a [ShownModel],
    /// The channels shown in every row.
    pub channels: &'a [usize],
}

const TILE: i32 = 96;
const GAP: i32 = 6;
const LABELS: i32 = 150;
const GROUP_GAP: i32 = 28;
const SHARES: i32 = 330;
const TITLE: i32 = 40;
const HEADER: i32 = TILE + 30;
const CAPTION: i32 = 24;
const ROW: i32 = CAPTION + 2 * (TILE + GAP) + 30;

fn group_width(channels: usize) -> i32 {
    channels.max(1) as i32 * (TILE + GAP) + GROUP_GAP
}

/// The size in pixels of a figure of `models` side by side, `channels` per row, `rows` layers.
pub fn figure_size(models: usize, channels: usize, rows: usize) -> (u32, u32) {
    let width = LABELS + models as i32 * group_width(channels) + SHARES;
    (width as u32, (TITLE + HEADER + rows as i32 * ROW) as u32)
}

/// Blue below zero, white at zero, red above, scaled by the largest magnitude.
fn diverging(v: f32, scale: f32) -> RGBColor {
    let t = (v / scale).clamp(-1.0, 1.0) as f64;
    let (r, g, b) = if t < 0.0 {
        (33, 102, 172)
    } else {
        (178, 24, 43)
    };
    let mix = |c: u8| (255.0 + (c as f64 - 255.0) * t.abs()).round() as u8;
    RGBColor(mix(r), mix(g), mix(b))
}

impl FeatureMaps<'_> {
    /// Every model has the same number of rows, and every row every chosen channel.
    fn check(&self) -> Result<(), String> {
        let rows = self.models.first().map_or(0, |m| m.maps.len());
        for model in self.models {
            if model.maps.len() != rows {
                return Err(format!(
                    "{} shows {} layers where {} shows {rows}: every model needs as many",
                    model.name,
                    model.maps.len(),
                    self.models[0].name
                ));
            }
            for map in &model.maps {
                if let Some(c) = self.channels.iter().find(|&&c| c >= map.shape[0]) {
                    return Err(format!(
                        "channel {c} does not exist in `{}` of {}, which has {} channels",
                        map.layer, model.name, map.shape[0]
                    ));
                }
            }
        }
        Ok(())
    }

    fn group_width(&self) -> i32 {
        group_width(self.channels.len())
    }

    /// The figure's size in pixels.
    pub fn size(&self) -> (u32, u32) {
        let rows = self.models.first().map_or(0, |m| m.maps.len());
        figure_size(self.models.len(), self.channels.len(), rows)
    }

    /// Draws an `h x w` map into the `TILE`-pixel square at `(x, y)`, nearest-neighbour,
    /// pixel `(i, j)` in `colour(i * w + j)`.
    fn tile<DB: DrawingBackend>(
        area: &DrawingArea<DB, Shift>,
        (x, y): (i32, i32),
        (h, w): (usize, usize),
        colour: impl Fn(usize) -> RGBColor,
    ) -> Result<(), String> {
        let n = h.max(w).max(1);
        let side = TILE as usize;
        let (cell, rows, cols) = if n <= side {
            (side / n, h, w)
        } else {
            (1, (h * side / n).max(1), (w * side / n).max(1))
        };
        let (x, y) = (
            x + (side - cell * cols) as i32 / 2,
            y + (side - cell * rows) as i32 / 2,
        );
        let cell = cell as i32;
        for i in 0..rows {
            for j in 0..cols {
                let at = (i * h / rows) * w + j * w / cols;
                let (px, py) = (x + j as i32 * cell, y + i as i32 * cell);
                area.draw(&Rectangle::new(
                    [(px, py), (px + cell, py + cell)],
                    colour(at).filled(),
                ))
                .map_err(|e| e.to_string())?;
            }
        }
        area.draw(&Rectangle::new(
            [
                (x - 1, y - 1),
                (x + cell * cols as i32, y + cell * rows as i32),
            ],
            BLACK.mix(0.35),
        ))
        .map_err(|e| e.to_string())
    }

    fn text<DB: DrawingBackend>(
        area: &DrawingArea<DB, Shift>,
        text: &str,
        at: (i32, i32),
        size: u32,
    ) -> Result<(), String> {
        area.draw(&Text::new(text.to_string(), at, (FONT, size)))
            .map_err(|e| e.to_string())
    }

    /// The image a model sees, gray or RGB, its range stretched to black..white.
    fn image<DB: DrawingBackend>(
        area: &DrawingArea<DB, Shift>,
        image: &InputImage,
        at: (i32, i32),
    ) -> Result<(), String> {
        let [c, h, w] = image.shape;
        let (lo, hi) = image
            .pixels
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let level = |v: f32| (255.0 * (v - lo) / (hi - lo).max(1e-12)).round() as u8;
        let plane = h * w;
        Self::tile(area, at, (h, w), |i| {
            if c >= 3 {
                let [r, g, b] = [0, 1, 2].map(|k| level(image.pixels[k * plane + i]));
                RGBColor(r, g, b)
            } else {
                let v = level(image.pixels[i]);
                RGBColor(v, v, v)
            }
        })
    }

    /// Row `row`'s chart: the share of +1 of every channel, sorted, one line per model.
    fn shares<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        row: usize,
    ) -> Result<(), String> {
        let mut chart = ChartBuilder::on(area)
            .caption("share of +1 per channel, sorted", (FONT, 14))
            .margin(6)
            .x_label_area_size(30)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..100f64, 0f64..100f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("channels (%)")
            .y_desc("+1 (%)")
            .x_labels(5)
            .y_labels(5)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FONT, 11))
            .axis_desc_style((FONT, 12))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, model) in self.models.iter().enumerate() {
            let map = &model.maps[row];
            let mut shares = map.plus_shares();
            shares.sort_by(f64::total_cmp);
            let last = (shares.len() - 1).max(1) as f64;
            let points: Vec<(f64, f64)> = shares
                .iter()
                .enumerate()
                .map(|(k, s)| (100.0 * k as f64 / last, 100.0 * s))
                .collect();
            let colour = colour(i);
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(format!(
                    "{}: {} of {} constant",
                    model.name,
                    map.constant_channels(),
                    map.shape[0]
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
        }
        draw_legend(&mut chart, 11, SeriesLabelPosition::UpperLeft)
    }
}

impl Chart for FeatureMaps<'_> {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<(), String> {
        self.check()?;
        let rows = self.models.first().map_or(0, |m| m.maps.len());
        Self::text(area, self.title, (12, 10), 20)?;
        Self::text(area, "input", (12, TITLE + TILE / 2 - 8), 15)?;
        let (width, _) = self.size();
        let shares_x = width as i32 - SHARES;
        for (m, model) in self.models.iter().enumerate() {
            let x0 = LABELS + m as i32 * self.group_width();
            Self::image(area, &model.image, (x0, TITLE))?;
            let [c, h, w] = model.image.shape;
            let name_x = x0 + TILE + 2 * GAP;
            area.draw(&Text::new(
                model.name.clone(),
                (name_x, TITLE + 8),
                (FONT, 17).into_font().color(&colour(m)),
            ))
            .map_err(|e| e.to_string())?;
            Self::text(area, &format!("{h}x{w}x{c}"), (name_x, TITLE + 32), 13)?;
        }
        for row in 0..rows {
            let y0 = TITLE + HEADER + row as i32 * ROW;
            let (input_y, output_y) = (y0 + CAPTION, y0 + CAPTION + TILE + GAP);
            Self::text(area, "binarizer input", (12, input_y + TILE / 2 - 16), 14)?;
            Self::text(area, "blue < 0 < red", (12, input_y + TILE / 2 + 2), 12)?;
            Self::text(area, "binary output", (12, output_y + TILE / 2 - 16), 14)?;
            Self::text(
                area,
                "white +1, black -1",
                (12, output_y + TILE / 2 + 2),
                12,
            )?;
            for (m, model) in self.models.iter().enumerate() {
                let map = &model.maps[row];
                let [c, h, w] = map.shape;
                let x0 = LABELS + m as i32 * self.group_width();
                Self::text(
                    area,
                    &format!(
                        "{} ({}, {h}x{w}x{c}): {:.0}% +1",
                        map.layer,
                        map.binarizer,
                        100.0 * map.plus()
                    ),
                    (x0, y0 + 4),
                    13,
                )?;
                let shares = map.plus_shares();
                for (k, &channel) in self.channels.iter().enumerate() {
                    let x = x0 + k as i32 * (TILE + GAP);
                    let input = map.channel_input(channel);
                    let scale = input.iter().fold(1e-12f32, |s, v| s.max(v.abs()));
                    Self::tile(area, (x, input_y), (h, w), |i| diverging(input[i], scale))?;
                    let output = map.channel_output(channel);
                    Self::tile(area, (x, output_y), (h, w), |i| {
                        if output[i] > 0.0 {
                            WHITE
                        } else {
                            RGBColor(25, 25, 25)
                        }
                    })?;
                    Self::text(
                        area,
                        &format!("ch {channel}: {:.0}% +1", 100.0 * shares[channel]),
                        (x, output_y + TILE + 4),
                        12,
                    )?;
                }
            }
            let shares_area = area.clone().shrink((shares_x, y0), (SHARES - 10, ROW - 8));
            self.shares(&shares_area, row)?;
        }
        Ok(())
    }
}

/// Draws `models` side by side into `out` (`.png` or `.svg`), the chosen `channels` of each
/// row.
pub fn feature_maps(
    title: &str,
    models: &[ShownModel],
    channels: &[usize],
    out: &Path,
) -> Result<(), Error> {
    let figure = FeatureMaps {
        title,
        models,
        channels,
    };
    figure.check().map_err(Error::Train)?;
    crate::plot::save(&figure, out, figure.size())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(side: usize) -> ActivationMap {
        ActivationMap {
            layer: format!("conv{side}"),
            binarizer: "sign",
            shape: [1, side, side],
            input: vec![0.0; side * side],
            output: vec![1.0; side * side],
        }
    }

    #[test]
    fn default_layers_are_the_first_of_each_size_spread_over_the_network() {
        let maps: Vec<ActivationMap> = [8, 8, 4, 4, 2, 2, 1].map(map).into();
        assert_eq!(default_layers(&maps, 4), [0, 2, 4]);
        assert_eq!(default_layers(&maps, 2), [0, 4]);
        assert_eq!(default_layers(&maps, 1), [0]);
        // Only 1x1 maps: those are shown.
        assert_eq!(default_layers(&[map(1), map(1)], 4), [0]);
        let six: Vec<ActivationMap> = [64, 32, 16, 8, 4, 2].map(map).into();
        assert_eq!(default_layers(&six, 4), [0, 2, 3, 5]);
    }

    #[test]
    fn layers_are_found_by_position_or_name() {
        let maps: Vec<ActivationMap> = [8, 4].map(map).into();
        let wanted = ["2".to_string(), "conv8".to_string()];
        assert_eq!(find_layers(&maps, &wanted, "m").unwrap(), [1, 0]);
        let err = find_layers(&maps, &["3".into()], "m")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no binarized layer `3`") && err.contains("conv8, conv4"),
            "{err}"
        );
    }
}
