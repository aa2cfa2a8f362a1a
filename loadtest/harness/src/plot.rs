//! SVG plots of a directory of results: latency and delivered rate against offered rate for
//! `chat`, memory per connection for `conns`, the backlog over time for `drain`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Reads every `*.json` result in `results` and writes the plots that have data into `out`.
pub fn draw_all(results: &Path, out: &Path) -> anyhow::Result<()> {
    let mut docs = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(results)
        .with_context(|| format!("reading {}", results.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path)?;
        let doc: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        docs.push(doc);
    }
    std::fs::create_dir_all(out)?;
    let of = |w: &'static str| docs.iter().filter(move |d| d["workload"] == w);
    let label = |d: &Value| d["result"]["label"].as_str().unwrap_or("run").to_string();

    let mut latency = Vec::new();
    let mut throughput = Vec::new();
    for d in of("chat") {
        let steps: Vec<&Value> = d["result"]["steps"]
            .as_array()
            .map(|a| a.iter().filter(|s| s["kind"] == "rate").collect())
            .unwrap_or_default();
        let point = |s: &Value, y: &str, field: &str| {
            Some((s["offered_per_sec"].as_f64()?, s[y][field].as_f64()?))
        };
        for (field, name) in [("p50_ms", "p50"), ("p99_ms", "p99")] {
            latency.push(Series {
                name: format!("{} {name}", label(d)),
                points: steps
                    .iter()
                    .filter_map(|s| point(s, "latency", field))
                    .collect(),
            });
        }
        throughput.push(Series {
            name: label(d),
            points: steps
                .iter()
                .filter_map(|s| {
                    Some((
                        s["offered_per_sec"].as_f64()?,
                        s["delivered_per_sec"].as_f64()?,
                    ))
                })
                .collect(),
        });
    }
    if !latency.is_empty() {
        write(
            out,
            "chat-latency.svg",
            &log_chart(
                "One-to-one delivery latency across nodes",
                "offered messages/s",
                "latency (ms, log scale)",
                &latency,
            ),
        )?;
        write(
            out,
            "chat-throughput.svg",
            &line_chart(
                "Delivered against offered rate",
                "offered messages/s",
                "delivered messages/s",
                &throughput,
            ),
        )?;
    }

    let bars: Vec<(String, f64)> = of("conns")
        .filter_map(|d| {
            Some((
                label(d),
                d["result"]["rss_per_conn_bytes"].as_f64()? / 1024.0,
            ))
        })
        .collect();
    if !bars.is_empty() {
        write(
            out,
            "conns-memory.svg",
            &bar_chart(
                "Server memory per idle connection",
                "KiB of RSS per connection",
                &bars,
            ),
        )?;
    }

    let mut rooms = Vec::new();
    for d in of("rooms") {
        let steps = d["result"]["steps"].as_array().cloned().unwrap_or_default();
        for (field, name) in [("p50_ms", "p50"), ("p99_ms", "p99")] {
            rooms.push(Series {
                name: format!("{} {name}", label(d)),
                points: steps
                    .iter()
                    .filter_map(|s| {
                        Some((s["members"].as_f64()?, s["last_member"][field].as_f64()?))
                    })
                    .collect(),
            });
        }
    }
    if !rooms.is_empty() {
        write(
            out,
            "rooms-last-member.svg",
            &log_chart(
                "Room fan-out: time until the last member has the message",
                "members in the room",
                "ms from send (log scale)",
                &rooms,
            ),
        )?;
    }

    let drains: Vec<Series> = of("drain")
        .map(|d| Series {
            name: label(d),
            points: d["result"]["backlog_series"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    if !drains.is_empty() {
        write(
            out,
            "drain-backlog.svg",
            &line_chart(
                "Worker backlog after a burst",
                "seconds since the burst began",
                "entries not yet in Postgres",
                &drains,
            ),
        )?;
    }
    Ok(())
}

fn write(dir: &Path, name: &str, svg: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("loadgen: wrote {}", path.display());
    Ok(())
}

/// A tick step of 1, 2 or 5 times a power of ten giving about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let normalized = raw / magnitude;
    let nice = if normalized <= 1.0 {
        1.0
    } else if normalized <= 2.0 {
        2.0
    } else if normalized <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn fmt_tick(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.2}").trim_end_matches('0').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;

fn frame(svg: &mut String, title: &str, x_label: &str, y_label: &str) {
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>
"#,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        escape(title),
        LEFT + (W - LEFT - RIGHT) / 2.0,
        H - 12.0,
        escape(x_label),
        TOP + (H - TOP - BOTTOM) / 2.0,
        escape(y_label),
    );
}

/// A horizontal grid line at height `y`, labelled `value` on the y axis.
fn gridline(svg: &mut String, y: f64, value: f64) {
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
        W - RIGHT,
        LEFT - 6.0,
        y + 4.0,
        fmt_tick(value)
    );
}

fn y_axis(svg: &mut String, y_max: f64) -> f64 {
    let step = tick_step(y_max);
    let top = (y_max / step).ceil().max(1.0) * step;
    let plot_h = H - TOP - BOTTOM;
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        gridline(svg, H - BOTTOM - v / top * plot_h, v);
        v += step;
    }
    top
}

/// Lines with markers, one per series, axes from zero.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    lines(title, x_label, y_label, series, false)
}

/// Like `line_chart`, with a logarithmic y axis (for latencies that span orders of magnitude).
pub fn log_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    lines(title, x_label, y_label, series, true)
}

/// A log axis from the decade below the smallest value to the decade above the largest; returns
/// (log10 of the bottom, log10 of the top).
fn log_axis(svg: &mut String, y_min: f64, y_max: f64) -> (f64, f64) {
    let bottom = y_min.max(1e-3).log10().floor();
    let top = y_max.max(1e-2).log10().ceil().max(bottom + 1.0);
    let plot_h = H - TOP - BOTTOM;
    let mut decade = bottom;
    while decade <= top {
        let y = H - BOTTOM - (decade - bottom) / (top - bottom) * plot_h;
        gridline(svg, y, 10f64.powf(decade));
        decade += 1.0;
    }
    (bottom, top)
}

/// The series' label without a trailing percentile, so p50 and p99 of one run share a colour.
fn run_of(name: &str) -> &str {
    name.trim_end_matches(" p50").trim_end_matches(" p99")
}

fn lines(title: &str, x_label: &str, y_label: &str, series: &[Series], log_y: bool) -> String {
    let mut svg = String::new();
    frame(&mut svg, title, x_label, y_label);
    let all = series.iter().flat_map(|s| s.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(0.0, f64::max);
    let y_max = all.clone().map(|p| p.1).fold(0.0, f64::max);
    let y_min = all
        .map(|p| p.1)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let (y_top, log_range) = if log_y {
        let smallest = if y_min.is_finite() { y_min } else { 1.0 };
        (0.0, Some(log_axis(&mut svg, smallest, y_max)))
    } else {
        (y_axis(&mut svg, y_max), None)
    };
    let height_of = |y: f64| match log_range {
        Some((bottom, top)) => (y.max(1e-3).log10() - bottom) / (top - bottom),
        None => y / y_top,
    };
    let x_step = tick_step(x_max);
    let x_top = (x_max / x_step).ceil().max(1.0) * x_step;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let mut v = 0.0;
    while v <= x_top + x_step / 2.0 {
        let x = LEFT + v / x_top * plot_w;
        let _ = writeln!(
            svg,
            r##"<line x1="{x}" x2="{x}" y1="{}" y2="{}" stroke="#999"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 5.0,
            H - BOTTOM + 19.0,
            fmt_tick(v)
        );
        v += x_step;
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{}" y2="{}" stroke="#333"/><line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{}" stroke="#333"/>"##,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM,
        H - BOTTOM
    );
    let mut runs: Vec<&str> = Vec::new();
    for (i, s) in series.iter().enumerate() {
        let run = run_of(&s.name);
        let color_index = match runs.iter().position(|r| *r == run) {
            Some(k) => k,
            None => {
                runs.push(run);
                runs.len() - 1
            }
        };
        let color = PALETTE[color_index % PALETTE.len()];
        let dash = if s.name.ends_with("p50") {
            r#" stroke-dasharray="5 4""#
        } else {
            ""
        };
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    LEFT + x / x_top * plot_w,
                    H - BOTTOM - height_of(*y) * plot_h
                )
            })
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            points.join(" ")
        );
        if s.points.len() <= 60 {
            for p in &points {
                if let Some((x, y)) = p.split_once(',') {
                    let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
                }
            }
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            W - RIGHT + 12.0,
            W - RIGHT + 36.0,
            W - RIGHT + 42.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Vertical bars with their values written on top.
pub fn bar_chart(title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let mut svg = String::new();
    frame(&mut svg, title, "", y_label);
    let y_max = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let y_top = y_axis(&mut svg, y_max);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    for (i, (name, value)) in bars.iter().enumerate() {
        let h = value / y_top * plot_h;
        let x = LEFT + i as f64 * slot + slot * 0.2;
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{value:.1}</text><text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            H - BOTTOM - h,
            slot * 0.6,
            PALETTE[i % PALETTE.len()],
            x + slot * 0.3,
            H - BOTTOM - h - 6.0,
            x + slot * 0.3,
            H - BOTTOM + 19.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tick steps are round numbers giving a handful of ticks.
    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(10.0), 2.0);
        assert_eq!(tick_step(4_500.0), 1000.0);
        assert_eq!(tick_step(0.0), 1.0);
    }

    /// A chart is one well-formed SVG element holding every series name, escaped.
    #[test]
    fn charts_are_svg() {
        let svg = line_chart(
            "t",
            "x",
            "y",
            &[Series {
                name: "ours <p99>".into(),
                points: vec![(1000.0, 1.5), (5000.0, 2.5)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("ours &lt;p99&gt;"));
        let bars = bar_chart(
            "t",
            "y",
            &[("ours".into(), 3.2), ("socket.io".into(), 10.1)],
        );
        assert!(bars.contains(">10.1<") && bars.contains(">socket.io<"));
        let log = log_chart(
            "t",
            "x",
            "y",
            &[Series {
                name: "a p50".into(),
                points: vec![(1.0, 0.5), (2.0, 5000.0)],
            }],
        );
        // Decades from 0.1 to 10,000 ms are labelled.
        assert!(log.contains(">0.1<") && log.contains(">10k<"), "{log}");
    }
}
