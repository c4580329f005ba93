//! `bench --plot FILE.svg`: the run's latency distribution and its calls/s over time, two
//! charts one above the other in one SVG file. plotters' SVG backend writes text as SVG
//! `<text>` for the viewer to render, so no font is needed to draw it.

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use crate::latency::{Latencies, Timeline};

/// The first chart's title.
pub const LATENCY_TITLE: &str = "Latency distribution";
/// The second chart's title.
pub const RATE_TITLE: &str = "Calls per second over time";

/// The image's size in pixels.
const SIZE: (u32, u32) = (960, 800);
/// Bars in the latency chart.
const BINS: u32 = 80;
/// Points in the calls/s chart at most.
const POINTS: usize = 60;

/// What the charts say about the run they show, in their subtitles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLabel {
    /// E.g. `20000 calls, concurrency 64, exclusive replies`.
    pub text: String,
    /// How long the run took.
    pub run: Duration,
}

/// Writes the charts of `latencies` and `timeline` to `path` (an SVG file).
pub fn write_svg(
    path: &Path,
    label: &RunLabel,
    latencies: &Latencies,
    timeline: &Timeline,
) -> Result<(), String> {
    draw(path, label, latencies, timeline).map_err(|e| format!("{}: {e}", path.display()))
}

fn draw(
    path: &Path,
    label: &RunLabel,
    latencies: &Latencies,
    timeline: &Timeline,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2);
    latency_chart(&top, label, latencies)?;
    rate_chart(&bottom, label, timeline)?;
    root.present()?;
    Ok(())
}

/// Calls per latency bar, up to p99.9 (the rest would squash the body into one bar), with the
/// percentiles marked.
fn latency_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    label: &RunLabel,
    latencies: &Latencies,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let p = latencies.percentiles();
    let upper = p.p999.max(1);
    let bins = latencies.bins(upper, BINS);
    let ms = |us: u64| us as f64 / 1000.0;
    let highest = bins.iter().map(|b| b.2).max().unwrap_or(0).max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{LATENCY_TITLE} (to p99.9; {})", label.text),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0f64..ms(bins.last().map_or(upper, |b| b.1)),
            0f64..highest * 1.1,
        )?;
    chart
        .configure_mesh()
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("latency (ms)")
        .y_desc("calls")
        .draw()?;
    chart.draw_series(bins.iter().map(|&(from, to, calls)| {
        Rectangle::new(
            [(ms(from), 0.0), (ms(to), calls as f64)],
            BLUE.mix(0.6).filled(),
        )
    }))?;
    for (name, value, color) in [
        ("p50", p.p50, GREEN),
        ("p90", p.p90, MAGENTA),
        ("p99", p.p99, RED),
    ] {
        chart
            .draw_series(LineSeries::new(
                [(ms(value), 0.0), (ms(value), highest * 1.1)],
                color.stroke_width(2),
            ))?
            .label(format!("{name} {:.2} ms", ms(value)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Calls ended per second, in windows of whole timeline slots.
fn rate_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    label: &RunLabel,
    timeline: &Timeline,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let rates = timeline.rates(POINTS, label.run);
    let end = rates.last().map_or(1.0, |r| r.0).max(0.1);
    let highest = rates.iter().map(|r| r.1).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{RATE_TITLE} ({})", label.text), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..end, 0f64..highest * 1.1)?;
    chart
        .configure_mesh()
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("seconds since start")
        .y_desc("calls/s")
        .draw()?;
    chart.draw_series(LineSeries::new(rates, BLUE.stroke_width(2)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_both_charts_as_svg() {
        let mut latencies = Latencies::new();
        let mut timeline = Timeline::default();
        for i in 0..5_000u64 {
            latencies.record(Duration::from_micros(200 + (i * 7919) % 3_000));
            timeline.record(Duration::from_micros(i * 400));
        }
        let path = std::env::temp_dir().join(format!("bench-plot-{}.svg", std::process::id()));
        let label = RunLabel {
            text: "5000 calls, concurrency 8 <&>".into(),
            run: Duration::from_secs(2),
        };
        write_svg(&path, &label, &latencies, &timeline).expect("written");
        let svg = std::fs::read_to_string(&path).expect("readable");
        let _ = std::fs::remove_file(&path);
        assert!(
            svg.trim_start().starts_with("<svg"),
            "{}",
            &svg[..200.min(svg.len())]
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(LATENCY_TITLE), "latency chart's title");
        assert!(svg.contains(RATE_TITLE), "rate chart's title");
        assert!(svg.contains("p99 "), "the p99 marker's legend");
        // The label is escaped, not markup.
        assert!(svg.contains("&lt;&amp;&gt;") && !svg.contains("<&>"));
        // 80 bars and two polylines at least.
        assert!(svg.matches("<rect").count() >= 80);
        assert!(svg.matches("<polyline").count() >= 2);
    }

    #[test]
    fn an_empty_run_still_draws() {
        let path = std::env::temp_dir().join(format!("bench-empty-{}.svg", std::process::id()));
        let label = RunLabel {
            text: "0 calls".into(),
            run: Duration::ZERO,
        };
        write_svg(&path, &label, &Latencies::new(), &Timeline::default()).expect("written");
        let svg = std::fs::read_to_string(&path).expect("readable");
        let _ = std::fs::remove_file(&path);
        assert!(svg.contains(RATE_TITLE));
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let path = Path::new("/nonexistent-dir/x/plot.svg");
        let e = write_svg(
            path,
            &RunLabel {
                text: String::new(),
                run: Duration::ZERO,
            },
            &Latencies::new(),
            &Timeline::default(),
        )
        .expect_err("cannot write");
        assert!(e.contains("/nonexistent-dir/x/plot.svg"), "{e}");
    }
}
