//! The report's charts, drawn with plotters' SVG backend into strings that
//! the page inlines (no network, no script). Every function returns the
//! `<svg>` element, or the reason it could not draw (shown instead of it).

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

pub const W: u32 = 640;
pub const H: u32 = 300;

/// Colours of the series, in order (Okabe–Ito, readable by the colour-blind).
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

const CUT: RGBColor = RGBColor(200, 30, 30);

type Res = Result<String, String>;

/// Tick labels: integers without a fraction, else up to 3 decimals.
fn tick(v: &f64) -> String {
    if v.fract().abs() < 1e-9 && v.abs() < 1e12 {
        format!("{}", *v as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("chart: {e}")
}

/// `[lo, hi]` of the finite values, widened when empty or flat.
fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = (hi - lo) * 0.04;
        (lo - pad, hi + pad)
    }
}

/// The SVG as an inline HTML element: plotters writes a standalone file's
/// root (with the SVG namespace URL, which inline SVG in HTML does not need).
fn inline(svg: String) -> String {
    svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1).replacen("<svg ", "<svg role=\"img\" ", 1)
}

/// One named series of values.
pub struct Series<'a> {
    pub name: &'a str,
    pub values: &'a [f64],
}

/// A W×H SVG with a captioned f64 × f64 grid (no light mesh lines); `draw`
/// adds the series and says whether to draw their legend. Histograms, lines
/// and scatters share it.
fn xy_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x: (f64, f64),
    y: (f64, f64),
    draw: impl FnOnce(&mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<RangedCoordf64, RangedCoordf64>>) -> Result<bool, String>,
) -> Res {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x.0..x.1, y.0..y.1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        if draw(&mut chart)? {
            chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK.mix(0.3)).draw().map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(inline(buf))
}

/// Counts of `vals` in `bins` equal bins over `[lo, hi]`.
pub fn bin_counts(vals: &[f64], lo: f64, hi: f64, bins: usize) -> Vec<u64> {
    let mut c = vec![0u64; bins];
    let span = hi - lo;
    for &v in vals.iter().filter(|v| v.is_finite()) {
        let b = (((v - lo) / span) * bins as f64).floor();
        c[(b.max(0.0) as usize).min(bins - 1)] += 1;
    }
    c
}

/// Overlaid histograms of one or more series on shared bins, with an
/// optional vertical line (a threshold, a cut) and its label.
pub fn histogram(title: &str, x_label: &str, series: &[Series], bins: usize, vline: Option<(f64, &str)>) -> Res {
    let all = series.iter().flat_map(|s| s.values.iter().copied()).chain(vline.map(|v| v.0));
    let (lo, hi) = range(all);
    let counts: Vec<Vec<u64>> = series.iter().map(|s| bin_counts(s.values, lo, hi, bins)).collect();
    let ymax = counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64 * 1.1;
    let width = (hi - lo) / bins as f64;
    xy_chart(title, x_label, "count", (lo, hi), (0.0, ymax), |chart| {
        for (k, (s, c)) in series.iter().zip(&counts).enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            chart
                .draw_series(c.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, &n)| {
                    let x0 = lo + width * i as f64;
                    Rectangle::new([(x0, 0.0), (x0 + width, n as f64)], color.mix(if series.len() > 1 { 0.45 } else { 0.75 }).filled())
                }))
                .map_err(err)?
                .label(format!("{} (n = {})", s.name, s.values.iter().filter(|v| v.is_finite()).count()))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.6).filled()));
        }
        if let Some((x, label)) = vline {
            chart
                .draw_series(LineSeries::new([(x, 0.0), (x, ymax)], CUT.stroke_width(2)))
                .map_err(err)?
                .label(label.to_string())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], CUT.stroke_width(2)));
        }
        Ok(true)
    })
}

/// Lines over a shared x (training curves).
pub fn lines(title: &str, x_label: &str, y_label: &str, xs: &[f64], series: &[(&str, &[f64])]) -> Res {
    let (x0, x1) = range(xs.iter().copied());
    let (y0, y1) = range(series.iter().flat_map(|s| s.1.iter().copied()));
    xy_chart(title, x_label, y_label, (x0, x1), (y0, y1), |chart| {
        for (k, (name, ys)) in series.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let pts: Vec<(f64, f64)> =
                xs.iter().zip(ys.iter()).filter(|(x, y)| x.is_finite() && y.is_finite()).map(|(&x, &y)| (x, y)).collect();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(err)?
                .label(name.to_string())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], color.stroke_width(2)));
            if pts.len() <= 64 {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled()))).map_err(err)?;
            }
        }
        Ok(series.len() > 1)
    })
}

/// One point per item (per-prompt reward mean vs std).
pub fn scatter(title: &str, x_label: &str, y_label: &str, pts: &[(f64, f64)]) -> Res {
    let (x0, x1) = range(pts.iter().map(|p| p.0));
    let (y0, y1) = range(pts.iter().map(|p| p.1).chain([0.0]));
    xy_chart(title, x_label, y_label, (x0, x1), (y0, y1), |chart| {
        chart
            .draw_series(
                pts.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).map(|&p| Circle::new(p, 3, PALETTE[0].mix(0.6).filled())),
            )
            .map_err(err)?;
        Ok(false)
    })
}

/// Horizontal bars: one row per label, one bar per series (a funnel of
/// rows in/out per stage, failures by reason).
pub fn bars(title: &str, x_label: &str, labels: &[String], series: &[(&str, &[f64])]) -> Res {
    let n = labels.len().max(1);
    let xmax = series.iter().flat_map(|s| s.1.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::max).max(1.0) * 1.08;
    let height = (60 + 26 * n as u32 * series.len().max(1) as u32).clamp(140, 900);
    let label_w = labels.iter().map(|l| l.chars().count()).max().unwrap_or(4).clamp(4, 28) as u32 * 8 + 12;
    let k = series.len().max(1) as f64;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (W, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(label_w)
            .build_cartesian_2d(0.0..xmax, -0.5..(n as f64 - 0.5))
            .map_err(err)?;
        let fmt = |y: &f64| {
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 {
                // Rows run top to bottom in the labels' order.
                labels.get(n - 1 - i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_labels(n)
            .y_label_formatter(&fmt)
            .x_label_formatter(&tick)
            .label_style(("sans-serif", 13))
            .disable_y_mesh()
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for (j, (name, vals)) in series.iter().enumerate() {
            let color = PALETTE[j % PALETTE.len()];
            let h = 0.8 / k;
            chart
                .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                    let y = (n - 1 - i) as f64 + 0.4 - h * (j as f64 + 1.0);
                    Rectangle::new([(0.0, y), (v.max(0.0), y + h * 0.92)], color.mix(0.8).filled())
                }))
                .map_err(err)?
                .label(name.to_string())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.8).filled()));
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(inline(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_the_range() {
        // [0, 4] in 4 bins of width 1: 0 and 0.5 → bin 0; 4 (the top edge) → the last bin.
        assert_eq!(bin_counts(&[0.0, 0.5, 1.0, 3.9, 4.0, f64::NAN], 0.0, 4.0, 4), [2, 1, 0, 2]);
    }

    #[test]
    fn charts_are_inline_svg_even_for_degenerate_data() {
        for svg in [
            histogram("h", "x", &[Series { name: "a", values: &[] }], 10, None).unwrap(),
            histogram("h", "x", &[Series { name: "a", values: &[1.0, 1.0] }, Series { name: "b", values: &[2.0] }], 10, Some((1.5, "cut")))
                .unwrap(),
            lines("l", "step", "loss", &[1.0], &[("loss", &[0.7])]).unwrap(),
            scatter("s", "mean", "std", &[]).unwrap(),
            bars("b", "rows", &["a".into(), "b".into()], &[("in", &[3.0, 0.0]), ("out", &[1.0, 0.0])]).unwrap(),
        ] {
            assert!(svg.starts_with("<svg role=\"img\" "), "{}", &svg[..60.min(svg.len())]);
            assert!(!svg.contains("http"), "no URL in an inline chart");
        }
    }
}
