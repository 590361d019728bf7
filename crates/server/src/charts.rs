//! Charts drawn on the server as SVG: no chart script, nothing fetched, and the strict CSP
//! holds (presentation attributes only, no `style`). Each chart carries a `<title>` and a
//! text description, and the pages show the same figures as a table beside it.

use domain::usage::grouped;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step for the value axis, so gridlines fall on readable numbers.
fn nice_max(v: i64) -> i64 {
    if v <= 0 {
        return 10;
    }
    let mut step = 1i64;
    while step.saturating_mul(10) <= v {
        step = step.saturating_mul(10);
    }
    for m in [1, 2, 5, 10] {
        if step.saturating_mul(m) >= v {
            return step.saturating_mul(m);
        }
    }
    step.saturating_mul(10)
}

const W: f64 = 720.0;
const H: f64 = 240.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

fn frame(title: &str, desc: &str, max: i64, body: &str, x_labels: &str) -> String {
    let mut grid = String::new();
    for i in 0..=4 {
        let v = max * i / 4;
        let y = TOP + (H - TOP - BOTTOM) * (1.0 - i as f64 / 4.0);
        grid.push_str(&format!(
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#d8d8db" stroke-width="1"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11" fill="#414141">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            grouped(v)
        ));
    }
    format!(
        r##"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-labelledby="{id}-t {id}-d" xmlns="http://www.w3.org/2000/svg"><title id="{id}-t">{t}</title><desc id="{id}-d">{d}</desc>{grid}{body}{x_labels}</svg>"##,
        id = chart_id(title),
        t = esc(title),
        d = esc(desc),
    )
}

fn chart_id(title: &str) -> String {
    let mut h: u32 = 2166136261;
    for b in title.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    format!("c{h:08x}")
}

/// Vertical bars, one per label (days, months), with every `label_every`th label shown.
pub fn bars(title: &str, unit: &str, data: &[(String, i64)], label_every: usize) -> String {
    let max = nice_max(data.iter().map(|d| d.1).max().unwrap_or(0));
    let n = data.len().max(1) as f64;
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let slot = plot_w / n;
    let bar = (slot * 0.7).max(1.0);
    let mut body = String::new();
    let mut labels = String::new();
    for (i, (label, v)) in data.iter().enumerate() {
        let h = plot_h * (*v as f64 / max as f64);
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        body.push_str(&format!(
            r##"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="#0017c1"><title>{}: {}{}</title></rect>"##,
            TOP + plot_h - h,
            esc(label),
            grouped(*v),
            esc(unit)
        ));
        if label_every > 0 && i % label_every == 0 {
            labels.push_str(&format!(
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11" fill="#414141">{}</text>"##,
                x + bar / 2.0,
                H - 10.0,
                esc(label)
            ));
        }
    }
    let total: i64 = data.iter().map(|d| d.1).sum();
    let desc = format!("{}件、合計{}{}", data.len(), grouped(total), unit);
    frame(title, &desc, max, &body, &labels)
}

/// Use accumulated day by day against the limit, with the forecast to the month's end.
pub fn cumulative(
    title: &str,
    daily: &[i64],
    days_in_month: usize,
    limit: Option<i64>,
    forecast: Option<i64>,
) -> String {
    let mut acc = Vec::with_capacity(daily.len());
    let mut sum = 0i64;
    for v in daily {
        sum += v;
        acc.push(sum);
    }
    let top = [sum, limit.unwrap_or(0), forecast.unwrap_or(0)]
        .into_iter()
        .max()
        .unwrap_or(0);
    let max = nice_max(top);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x_of = |day: f64| LEFT + plot_w * (day / days_in_month.max(1) as f64);
    let y_of = |v: i64| TOP + plot_h * (1.0 - v as f64 / max as f64);
    let mut body = String::new();
    if let Some(l) = limit {
        body.push_str(&format!(
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ec0000" stroke-width="2"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11" fill="#ec0000">上限 {}</text>"##,
            W - RIGHT,
            W - RIGHT,
            y_of(l) - 4.0,
            grouped(l),
            y = y_of(l)
        ));
        let warn = l * domain::usage::WARN_PERCENT / 100;
        body.push_str(&format!(
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#b78f00" stroke-width="1" stroke-dasharray="4 3"/>"##,
            W - RIGHT,
            y = y_of(warn)
        ));
    }
    let mut points = format!("{LEFT:.1},{:.1}", y_of(0));
    for (i, v) in acc.iter().enumerate() {
        points.push_str(&format!(" {:.1},{:.1}", x_of((i + 1) as f64), y_of(*v)));
    }
    body.push_str(&format!(
        r##"<polyline points="{points}" fill="none" stroke="#0017c1" stroke-width="2.5"/>"##
    ));
    if let Some(f) = forecast {
        if !acc.is_empty() && acc.len() < days_in_month {
            body.push_str(&format!(
                r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#0017c1" stroke-width="1.5" stroke-dasharray="6 4"/>"##,
                x_of(acc.len() as f64),
                y_of(sum),
                x_of(days_in_month as f64),
                y_of(f)
            ));
        }
    }
    let mut labels = String::new();
    for day in [1usize, 5, 10, 15, 20, 25, days_in_month] {
        labels.push_str(&format!(
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11" fill="#414141">{day}日</text>"##,
            x_of(day as f64 - 0.5),
            H - 10.0
        ));
    }
    let mut desc = format!("{}日までの累計{}文字", acc.len(), grouped(sum));
    if let Some(l) = limit {
        desc.push_str(&format!("、上限{}文字", grouped(l)));
    }
    if let Some(f) = forecast {
        desc.push_str(&format!("、月末の見込み{}文字", grouped(f)));
    }
    frame(title, &desc, max, &body, &labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_axes_round() {
        let svg = bars(
            "日別",
            "文字",
            &[("<script>".into(), 5), ("2日".into(), 1234)],
            1,
        );
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains("2,000"));
        assert_eq!(nice_max(0), 10);
        assert_eq!(nice_max(4_100_000), 5_000_000);
        assert_eq!(nice_max(5_000_000), 5_000_000);
        let c = cumulative("累計", &[10, 20], 30, Some(100), Some(900));
        assert!(c.contains("上限 100"));
        assert!(c.contains("stroke-dasharray=\"6 4\""));
    }
}
