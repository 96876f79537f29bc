//! PNG bar charts for the report, drawn with plotters' bitmap backend.
//!
//! plotters draws text through a font engine (`ttf`: font-kit with the
//! system's fontconfig and FreeType; `ab_glyph`: a font file to ship). The
//! charts need neither: [`Glyphs`] wraps the bitmap backend and draws every
//! text plotters lays out (title, axis labels, legend, values) from the
//! public-domain 8×8 bitmap font of the `font8x8` crate, scaled to the
//! requested size.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};

/// A bitmap backend that draws text with the built-in 8×8 font.
pub struct Glyphs<'a>(BitMapBackend<'a>);

/// A glyph's rows, the column its ink starts at and the ink's width (a
/// space is 3 columns wide).
fn glyph(c: char) -> ([u8; 8], u32, u32) {
    // font8x8's × sits high, like an exponent: a plain x reads better.
    let c = if c == '×' { 'x' } else { c };
    let rows = match c as u32 {
        n @ 0x20..=0x7e => font8x8::legacy::BASIC_LEGACY[n as usize],
        n @ 0xa0..=0xff => font8x8::legacy::LATIN_LEGACY[n as usize - 0xa0],
        _ => font8x8::legacy::BASIC_LEGACY[usize::from(b'?')],
    };
    // Bit 0 is the leftmost pixel.
    let ink = rows.iter().fold(0u8, |acc, r| acc | r);
    if ink == 0 {
        return (rows, 0, 3);
    }
    let first = ink.trailing_zeros();
    let last = 7 - ink.leading_zeros();
    (rows, first, last - first + 1)
}

/// Pixels per font pixel: plotters' font size 10 is one, 20 two, ...
fn scale(size: f64) -> i32 {
    (size / 10.0).round().max(1.0) as i32
}

/// Unscaled width of `text`: each glyph's ink and one column between glyphs.
fn text_width(text: &str) -> i32 {
    let w: u32 = text.chars().map(|c| glyph(c).2 + 1).sum();
    w.saturating_sub(1) as i32
}

impl<'a> Glyphs<'a> {
    pub fn new(path: &'a Path, size: (u32, u32)) -> Self {
        Glyphs(BitMapBackend::new(path, size))
    }
}

impl DrawingBackend for Glyphs<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        (iw, ih): (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.blit_bitmap(pos, (iw, ih), src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let s = scale(style.size());
        Ok(((text_width(text) * s) as u32, (8 * s) as u32))
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let s = scale(style.size());
        let (width, height) = (text_width(text) * s, 8 * s);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Center => -width / 2,
            HPos::Right => -width,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let transform = style.transform();
        let mut x0 = 0;
        for c in text.chars() {
            let (rows, first, width) = glyph(c);
            for (row, bits) in rows.iter().enumerate() {
                for col in 0..width {
                    if bits >> (first + col) & 1 == 0 {
                        continue;
                    }
                    // One font pixel: an s×s square, rotated as asked.
                    let (px, py) = (x0 + col as i32 * s + dx, row as i32 * s + dy);
                    for (i, j) in (0..s).flat_map(|i| (0..s).map(move |j| (i, j))) {
                        let (x, y) = transform.transform(px + i, py + j);
                        self.0.draw_pixel((pos.0 + x, pos.1 + y), color)?;
                    }
                }
            }
            x0 += (width as i32 + 1) * s;
        }
        Ok(())
    }
}

/// The category axis of [`BarChart`]: group `i` centered at `i`, one key
/// point (label) per group.
struct Rows {
    groups: usize,
    linear: RangedCoordf64,
}

impl Rows {
    fn new(groups: usize) -> Self {
        Rows {
            groups,
            linear: (-0.5..groups as f64 - 0.5).into(),
        }
    }
}

impl Ranged for Rows {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.groups).map(|g| g as f64).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.linear.range()
    }
}

/// One set of bars with its legend entry and color.
pub struct Series {
    pub name: String,
    pub color: RGBColor,
    /// One value per group; `None` leaves the bar out.
    pub values: Vec<Option<f64>>,
}

/// A horizontal grouped bar chart: one group per label (top to bottom),
/// one bar per series in each group, the value written at the bar's end.
pub struct BarChart<'a> {
    pub title: &'a str,
    pub axis: &'a str,
    pub groups: Vec<String>,
    pub series: Vec<Series>,
    /// Writes a value at its bar's end and on the axis.
    pub format: &'a dyn Fn(f64) -> String,
    /// A vertical line across the chart (e.g. at 1.0× for ratios).
    pub reference: Option<f64>,
}

pub const BLUE_BAR: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
pub const LIGHT_BLUE_BAR: RGBColor = RGBColor(0x8c, 0xb8, 0xe3);
pub const ORANGE_BAR: RGBColor = RGBColor(0xe0, 0x7b, 0x22);
pub const GREY_BAR: RGBColor = RGBColor(0x6e, 0x6e, 0x6e);
pub const LIGHT_GREY_BAR: RGBColor = RGBColor(0xbd, 0xbd, 0xbd);

/// Font size of all text: 16-pixel glyphs.
const TEXT: f64 = 20.0;
const WIDTH: u32 = 1100;
/// Title and legend.
const HEADER: u32 = 80;

impl BarChart<'_> {
    pub fn draw(&self, path: &Path) -> Result<()> {
        self.render(path)
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))
    }

    fn render(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let n = self.groups.len();
        let per_group = self.series.len().max(1);
        let bar_px = 22;
        let height = HEADER + 110 + n as u32 * (per_group as u32 * bar_px + 24);
        let label_px = self
            .groups
            .iter()
            .map(|g| text_width(g) * scale(TEXT))
            .max()
            .unwrap_or(0) as u32
            + 24;
        let top = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .copied()
            .chain(self.reference)
            .fold(0.0f64, f64::max);
        // Room at the right for the value written at the longest bar.
        let x_max = if top > 0.0 { top * 1.25 } else { 1.0 };

        let root = Glyphs::new(path, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, body) = root.split_vertically(HEADER);
        let text = ("sans-serif", TEXT).into_font().color(&BLACK);
        let centered = text.clone().pos(Pos::new(HPos::Center, VPos::Top));
        header.draw(&Text::new(self.title, (WIDTH as i32 / 2, 16), centered))?;
        // The legend, one row under the title: a swatch and a name each.
        let s = scale(TEXT);
        let swatch = 8 * s;
        let widths: Vec<i32> = self
            .series
            .iter()
            .map(|series| swatch + 8 + text_width(&series.name) * s)
            .collect();
        let gap = 32;
        let total: i32 = widths.iter().sum::<i32>() + gap * (widths.len() as i32 - 1).max(0);
        let mut x = (WIDTH as i32 - total) / 2;
        let y = 16 + 8 * s + 18;
        for (series, w) in self.series.iter().zip(&widths) {
            header.draw(&Rectangle::new(
                [(x, y), (x + swatch, y + swatch)],
                series.color.filled(),
            ))?;
            header.draw(&Text::new(
                series.name.as_str(),
                (x + swatch + 8, y),
                text.clone(),
            ))?;
            x += w + gap;
        }

        let mut chart = ChartBuilder::on(&body)
            .margin(20)
            .margin_top(4)
            .x_label_area_size(64)
            .y_label_area_size(label_px)
            .build_cartesian_2d(0f64..x_max, Rows::new(n))?;
        // Group 0 at the top.
        let row = |g: usize| (n - 1 - g) as f64;
        let groups = &self.groups;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_labels(6)
            .x_label_formatter(&|v| (self.format)(*v))
            .y_label_formatter(&|v| {
                let g = v.round();
                if g >= 0.0 && (g as usize) < n {
                    groups[n - 1 - g as usize].clone()
                } else {
                    String::new()
                }
            })
            .label_style(text.clone())
            .axis_desc_style(text.clone())
            .x_desc(self.axis)
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.12))
            .draw()?;

        // Under the bars and their values.
        if let Some(r) = self.reference {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(r, -0.5), (r, n as f64 - 0.5)],
                Color::stroke_width(&BLACK, 2),
            )))?;
        }
        let band = 0.8 / per_group as f64;
        let value_style = text.clone().pos(Pos::new(HPos::Left, VPos::Center));
        for (si, series) in self.series.iter().enumerate() {
            let color = series.color;
            let bars = series.values.iter().enumerate().filter_map(|(g, v)| {
                let v = (*v)?;
                let y0 = row(g) + 0.4 - band * (si + 1) as f64;
                Some((v, y0 + band * 0.08, y0 + band * 0.92))
            });
            chart.draw_series(
                bars.clone()
                    .map(|(v, y0, y1)| Rectangle::new([(0.0, y0), (v, y1)], color.filled())),
            )?;
            chart.draw_series(bars.map(|(v, y0, y1)| {
                EmptyElement::at((v, (y0 + y1) / 2.0))
                    + Text::new((self.format)(v), (6, 0), value_style.clone())
            }))?;
        }
        root.present()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyph_widths() {
        // `i` is narrower than `m`, a space is 3 columns.
        assert!(glyph('i').2 < glyph('m').2);
        assert_eq!(glyph(' ').2, 3);
        assert_eq!(text_width("ab"), (glyph('a').2 + 1 + glyph('b').2) as i32);
        // Latin-1 signs come from the same font.
        assert!(glyph('÷').2 > 0);
    }

    #[test]
    fn draws_a_chart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        BarChart {
            title: "t",
            axis: "x",
            groups: vec!["one".into(), "two".into()],
            series: vec![Series {
                name: "s".into(),
                color: BLUE_BAR,
                values: vec![Some(1.0), None],
            }],
            format: &|v| format!("{v:.1}"),
            reference: Some(1.0),
        }
        .draw(&path)
        .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
    }
}
