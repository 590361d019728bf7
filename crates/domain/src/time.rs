//! Showing times to people: stored in UTC, shown in Japan Standard Time, with the
//! Japanese era (和暦) where a form expects it.

use chrono::{DateTime, Datelike, FixedOffset, Offset, TimeZone, Timelike, Utc};

fn jst() -> FixedOffset {
    // 9 hours east of UTC is always in range; the fallback is never taken.
    FixedOffset::east_opt(9 * 3600).unwrap_or_else(|| Utc.fix())
}

pub fn to_jst(ms: i64) -> Option<DateTime<FixedOffset>> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.with_timezone(&jst()))
}

const WEEKDAYS: [&str; 7] = ["月", "火", "水", "木", "金", "土", "日"];

/// `2026年11月29日 (日) 14:05` in JST.
pub fn format_jst(ms: i64) -> String {
    match to_jst(ms) {
        Some(t) => format!(
            "{}年{}月{}日 ({}) {:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            WEEKDAYS[t.weekday().num_days_from_monday() as usize],
            t.hour(),
            t.minute()
        ),
        None => "-".to_string(),
    }
}

/// `2026-11-29 14:05:09` in JST: for tables and exports.
pub fn format_jst_compact(ms: i64) -> String {
    match to_jst(ms) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => "-".to_string(),
    }
}

/// RFC 3339 in UTC with milliseconds: for APIs and logs.
pub fn format_utc(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        None => "-".to_string(),
    }
}

/// 和暦: `令和8年11月29日` (元年 for the first year of an era).
pub fn format_wareki(ms: i64) -> String {
    let Some(t) = to_jst(ms) else {
        return "-".to_string();
    };
    let (y, m, d) = (t.year(), t.month(), t.day());
    let key = (y, m, d);
    let (era, start) = if key >= (2019, 5, 1) {
        ("令和", 2019)
    } else if key >= (1989, 1, 8) {
        ("平成", 1989)
    } else if key >= (1926, 12, 25) {
        ("昭和", 1926)
    } else {
        return format!("{y}年{m}月{d}日");
    };
    let n = y - start + 1;
    if n == 1 {
        format!("{era}元年{m}月{d}日")
    } else {
        format!("{era}{n}年{m}月{d}日")
    }
}

/// Parses a `YYYY-MM-DD` date typed in a form as the start of that day in JST.
pub fn parse_jst_date(s: &str) -> Option<i64> {
    let d = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok()?;
    let t = d.and_hms_opt(0, 0, 0)?;
    jst()
        .from_local_datetime(&t)
        .single()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_jst_with_weekday() {
        // 2026-11-29T05:05:00Z is 14:05 on Sunday in Japan.
        let ms = 1_795_928_700_000;
        assert_eq!(format_jst(ms), "2026年11月29日 (日) 14:05");
        assert_eq!(format_wareki(ms), "令和8年11月29日");
    }

    #[test]
    fn era_boundaries() {
        let d = |s: &str| parse_jst_date(s).unwrap_or(0);
        assert_eq!(format_wareki(d("2019-04-30")), "平成31年4月30日");
        assert_eq!(format_wareki(d("2019-05-01")), "令和元年5月1日");
        assert_eq!(format_wareki(d("1989-01-08")), "平成元年1月8日");
    }
}

/// The same moment `months` calendar months earlier, in JST (the 31st falls back to the
/// month's last day): where "kept for N months" ends.
pub fn months_before(ms: i64, months: u32) -> i64 {
    let Some(t) = to_jst(ms) else {
        return ms;
    };
    t.checked_sub_months(chrono::Months::new(months))
        .map(|t| t.timestamp_millis())
        .unwrap_or(i64::MIN)
}

#[cfg(test)]
mod months_tests {
    use super::*;

    #[test]
    fn months_before_counts_calendar_months_in_jst() {
        // 2026-04-01 09:00 JST → 2025-03-01 09:00 JST, 13 months earlier.
        let t = 1_775_001_600_000;
        assert_eq!(
            format_jst_compact(months_before(t, 13)),
            "2025-03-01 09:00:00"
        );
        // 31 March less one month is the last day of February.
        let m31 = parse_jst_date("2026-03-31").unwrap_or_default();
        assert_eq!(
            format_jst_compact(months_before(m31, 1)),
            "2026-02-28 00:00:00"
        );
    }
}
