//! Usage in Japanese characters (M4): how characters are counted, the month they fall in
//! (months run in JST), whether a request may start against the allowances that apply to
//! it, the 80 % warning and the month-end forecast.
//!
//! The arithmetic lives here; keeping the running totals is the server's and storage's job.

use chrono::{Datelike, FixedOffset, NaiveDate, Offset, TimeZone, Utc};
use serde::Serialize;
use unicode_normalization::UnicodeNormalization;

/// The city's allowance when nobody has set one: 5,000,000 characters a month.
pub const DEFAULT_MONTHLY_CHARS: i64 = 5_000_000;
/// Largest allowance, allocation or cap that can be set (absurd values are refused).
pub const MAX_LIMIT_CHARS: i64 = 100_000_000_000;
/// Output reserved for an answer before it exists; the real count replaces it.
pub const OUTPUT_ESTIMATE_CHARS: i64 = 2_000;
/// Share of an allowance at which users and admins are warned.
pub const WARN_PERCENT: i64 = 80;

/// Characters as the city counts them: Unicode scalar values after NFC, so full-width and
/// half-width kana and kanji each count 1 and a base letter with a combining mark that has
/// a precomposed form counts 1. A line break counts 1 whether it arrived as CRLF or LF (a
/// browser form sends CRLF, the API usually LF; the same text must cost the same).
pub fn count_chars(s: &str) -> i64 {
    let mut n = 0i64;
    let mut prev_cr = false;
    for c in s.nfc() {
        if c == '\n' && prev_cr {
            prev_cr = false;
            continue;
        }
        prev_cr = c == '\r';
        n += 1;
    }
    n
}

fn jst() -> FixedOffset {
    FixedOffset::east_opt(9 * 3600).unwrap_or_else(|| Utc.fix())
}

/// A calendar month in JST.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Month {
    pub year: i32,
    pub month: u32,
}

impl Month {
    /// The JST month containing this instant (UTC milliseconds).
    pub fn of(ms: i64) -> Month {
        let t = Utc
            .timestamp_millis_opt(ms)
            .single()
            .unwrap_or_default()
            .with_timezone(&jst());
        Month {
            year: t.year(),
            month: t.month(),
        }
    }

    /// `YYYY-MM`, as typed in a URL or a form.
    pub fn parse(s: &str) -> Option<Month> {
        let (y, m) = s.trim().split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let year: i32 = y.parse().ok()?;
        let month: u32 = m.parse().ok()?;
        ((2000..=2999).contains(&year) && (1..=12).contains(&month))
            .then_some(Month { year, month })
    }

    /// `2026-11`: the key stored with each record.
    pub fn key(&self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }

    /// `2026年11月`.
    pub fn label(&self) -> String {
        format!("{}年{}月", self.year, self.month)
    }

    /// `令和8年11月`.
    pub fn wareki(&self) -> String {
        if (self.year, self.month) >= (2019, 5) {
            let n = self.year - 2018;
            if n == 1 {
                format!("令和元年{}月", self.month)
            } else {
                format!("令和{n}年{}月", self.month)
            }
        } else {
            self.label()
        }
    }

    pub fn next(&self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn prev(&self) -> Month {
        if self.month == 1 {
            Month {
                year: self.year - 1,
                month: 12,
            }
        } else {
            Month {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// UTC milliseconds of 00:00 JST on the first day.
    pub fn start_ms(&self) -> i64 {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .and_then(|t| jst().from_local_datetime(&t).single())
            .map(|t| t.timestamp_millis())
            .unwrap_or_default()
    }

    pub fn days(&self) -> u32 {
        let n = self.next();
        ((n.start_ms() - self.start_ms()) / crate::clock::DAY_MS) as u32
    }
}

/// Day of the month (1–31) in JST.
pub fn day_of_month(ms: i64) -> u32 {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .with_timezone(&jst())
        .day()
}

/// What a limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    Tenant,
    Department,
    User,
}

/// One limit that applies to a request, with where it stands now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    pub kind: ScopeKind,
    /// Shown in messages: 「市全体」, the department's name, 「あなた」.
    pub name: String,
    pub limit: i64,
    /// Settled this month.
    pub used: i64,
    /// Held by requests still running.
    pub reserved: i64,
}

impl Standing {
    pub fn remaining(&self) -> i64 {
        self.limit - self.used - self.reserved
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Start; hold `reserve` characters until the real count is known.
    Admit { reserve: i64, over_limit: bool },
    /// Refused because of this limit.
    Refuse {
        kind: ScopeKind,
        name: String,
        limit: i64,
        remaining: i64,
        input: i64,
    },
}

/// May a request that counts `input` characters before any output start?
///
/// It may when every limit still has room for its input. It then holds its input plus an
/// estimate of the output, cut to the room left, so the holdings of running requests never
/// add up past a limit; only answers longer than their hold can carry a limit over, and by
/// no more than the requests in flight. With `allow_overrun` a request past a limit starts
/// anyway and is flagged for the admins.
pub fn admit(standings: &[Standing], input: i64, allow_overrun: bool) -> Admission {
    let input = input.max(0);
    let mut room = OUTPUT_ESTIMATE_CHARS;
    for s in standings {
        let remaining = s.remaining();
        if remaining <= 0 || input > remaining {
            if allow_overrun {
                return Admission::Admit {
                    reserve: input + OUTPUT_ESTIMATE_CHARS,
                    over_limit: true,
                };
            }
            return Admission::Refuse {
                kind: s.kind,
                name: s.name.clone(),
                limit: s.limit,
                remaining: remaining.max(0),
                input,
            };
        }
        room = room.min(remaining - input);
    }
    Admission::Admit {
        reserve: input + room,
        over_limit: false,
    }
}

/// Formats `1234567` as `1,234,567`.
pub fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The message a refused request shows.
pub fn refusal_message(
    kind: ScopeKind,
    name: &str,
    limit: i64,
    remaining: i64,
    input: i64,
) -> String {
    let whose = match kind {
        ScopeKind::Tenant => "全体".to_string(),
        ScopeKind::Department => format!("{name}への配分"),
        ScopeKind::User => "あなたの利用上限".to_string(),
    };
    if remaining <= 0 {
        format!(
            "今月の{whose}（{}文字）を使い切ったため、送信できません。来月1日（日本時間）に戻ります。急ぎの場合は情報管理者にご相談ください。",
            grouped(limit)
        )
    } else {
        format!(
            "このメッセージ（{}文字）は今月の{whose}の残り（{}文字）を超えるため、送信できません。文章を短くするか、情報管理者にご相談ください。",
            grouped(input),
            grouped(remaining)
        )
    }
}

/// How close a total is to its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Normal,
    /// At or past 80 %.
    Warning,
    /// At or past 100 %.
    Exhausted,
}

pub fn level(used: i64, limit: i64) -> Level {
    if limit <= 0 || used >= limit {
        Level::Exhausted
    } else if used * 100 >= limit * WARN_PERCENT {
        Level::Warning
    } else {
        Level::Normal
    }
}

/// Percentage used, rounded down, for display.
pub fn percent(used: i64, limit: i64) -> i64 {
    if limit <= 0 {
        100
    } else {
        used.saturating_mul(100) / limit
    }
}

/// Month-end forecast from the trend so far: the use per elapsed day carried to the end of
/// the month. `now_ms` inside the month; for a past month the total is the forecast.
pub fn forecast(used: i64, month: Month, now_ms: i64) -> i64 {
    let start = month.start_ms();
    let end = month.next().start_ms();
    if now_ms >= end {
        return used;
    }
    let elapsed = (now_ms - start).max(crate::clock::HOUR_MS);
    let total = end - start;
    ((used as i128 * total as i128) / elapsed as i128) as i64
}

/// An allowance, allocation or cap typed by an admin: a whole number of characters from
/// 1 to [`MAX_LIMIT_CHARS`]; commas and full-width digits are accepted.
pub fn parse_limit(label: &str, s: &str) -> Result<i64, String> {
    let cleaned: String = s
        .nfkc()
        .filter(|c| *c != ',' && !c.is_whitespace())
        .collect();
    if cleaned.is_empty() {
        return Err(format!("{label}を入力してください。"));
    }
    if cleaned.starts_with('-') {
        return Err(format!("{label}に負の値は設定できません。"));
    }
    let n: i64 = cleaned
        .parse()
        .map_err(|_| format!("{label}は文字数を整数で入力してください（例: 5,000,000）。"))?;
    if n < 1 {
        return Err(format!("{label}は1文字以上にしてください。"));
    }
    if n > MAX_LIMIT_CHARS {
        return Err(format!(
            "{label}が大きすぎます（上限は{}文字です）。",
            grouped(MAX_LIMIT_CHARS)
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_japanese_text_as_the_city_does() {
        assert_eq!(count_chars("市役所"), 3);
        // Full-width and half-width kana, full-width digits: one each.
        assert_eq!(count_chars("カナｶﾅ１２３"), 7);
        // A half-width voiced kana is two scalar values (ｶ + ﾟ) and NFC keeps them apart.
        assert_eq!(count_chars("ｶﾞ"), 2);
        // か + combining voiced mark composes to が under NFC.
        assert_eq!(count_chars("か\u{3099}"), 1);
        assert_eq!(count_chars("e\u{301}"), 1);
        // Emoji are counted by scalar value: a family is 5 (3 people, 2 joiners).
        assert_eq!(count_chars("😀"), 1);
        assert_eq!(count_chars("👨\u{200d}👩\u{200d}👧"), 5);
        // CRLF and LF are one line break each; a lone CR counts.
        assert_eq!(count_chars("一\r\n二\n三\r四"), 7);
        assert_eq!(count_chars(""), 0);
        assert_eq!(count_chars("令和８年度　予算"), 8);
    }

    #[test]
    fn months_run_in_jst() {
        // 2026-11-30 15:00 UTC is 2026-12-01 00:00 JST.
        let t = 1_796_050_800_000;
        assert_eq!(Month::of(t - 1).key(), "2026-11");
        assert_eq!(Month::of(t).key(), "2026-12");
        assert_eq!(Month::of(t).start_ms(), t);
        assert_eq!(day_of_month(t), 1);
        assert_eq!(Month::parse("2026-02").map(|m| m.days()), Some(28));
        assert_eq!(Month::parse("2028-02").map(|m| m.days()), Some(29));
        assert_eq!(
            Month::parse("2026-12").map(|m| m.next().key()),
            Some("2027-01".into())
        );
        assert_eq!(
            Month::parse("2027-01").map(|m| m.prev().key()),
            Some("2026-12".into())
        );
        assert_eq!(Month::parse("2026-13"), None);
        assert_eq!(Month::parse("2026-1"), None);
        assert_eq!(Month::parse("令和8-11"), None);
        assert_eq!(
            Month::parse("2026-11").map(|m| m.wareki()),
            Some("令和8年11月".into())
        );
    }

    fn standing(limit: i64, used: i64, reserved: i64) -> Standing {
        Standing {
            kind: ScopeKind::Department,
            name: "税務課".into(),
            limit,
            used,
            reserved,
        }
    }

    #[test]
    fn admits_within_room_and_holds_no_more_than_is_left() {
        assert_eq!(
            admit(&[standing(10_000, 0, 0)], 100, false),
            Admission::Admit {
                reserve: 100 + OUTPUT_ESTIMATE_CHARS,
                over_limit: false
            }
        );
        assert_eq!(
            admit(&[standing(1_000, 800, 0)], 100, false),
            Admission::Admit {
                reserve: 200,
                over_limit: false
            }
        );
        assert!(matches!(
            admit(&[standing(1_000, 800, 100)], 101, false),
            Admission::Refuse { remaining: 100, .. }
        ));
        assert!(matches!(
            admit(&[standing(1_000, 1_000, 0)], 1, false),
            Admission::Refuse { remaining: 0, .. }
        ));
        assert_eq!(
            admit(&[standing(1_000, 1_200, 0)], 1, true),
            Admission::Admit {
                reserve: 1 + OUTPUT_ESTIMATE_CHARS,
                over_limit: true
            }
        );
        // No limits at all (nothing configured beyond the tenant is still a limit, but
        // the function itself places none).
        assert!(matches!(admit(&[], 5, false), Admission::Admit { .. }));
    }

    #[test]
    fn holds_never_add_up_past_a_limit() {
        let mut s = standing(5_000, 0, 0);
        let mut admitted = 0;
        for _ in 0..100 {
            if let Admission::Admit { reserve, .. } = admit(std::slice::from_ref(&s), 30, false) {
                s.reserved += reserve;
                admitted += 1;
            }
        }
        assert!(s.reserved <= s.limit);
        assert!(admitted >= 2);
    }

    #[test]
    fn levels_and_forecast() {
        assert_eq!(level(79, 100), Level::Normal);
        assert_eq!(level(80, 100), Level::Warning);
        assert_eq!(level(100, 100), Level::Exhausted);
        assert_eq!(percent(4_000_000, 5_000_000), 80);
        let m = Month::parse("2026-11").unwrap_or(Month {
            year: 2026,
            month: 11,
        });
        // Ten days of a 30-day month: a third.
        let ten_days = m.start_ms() + 10 * crate::clock::DAY_MS;
        assert_eq!(forecast(1_000_000, m, ten_days), 3_000_000);
        assert_eq!(forecast(1_000_000, m, m.next().start_ms() + 5), 1_000_000);
    }

    #[test]
    fn limits_typed_by_admins() {
        assert_eq!(parse_limit("上限", "5,000,000"), Ok(5_000_000));
        assert_eq!(parse_limit("上限", "３００，０００"), Ok(300_000));
        assert!(parse_limit("上限", "-1").is_err());
        assert!(parse_limit("上限", "0").is_err());
        assert!(parse_limit("上限", "abc").is_err());
        assert!(parse_limit("上限", "").is_err());
        assert!(parse_limit("上限", "99999999999999999999").is_err());
        assert!(parse_limit("上限", "100000000001").is_err());
        assert_eq!(grouped(5_000_000), "5,000,000");
        assert_eq!(grouped(-1234), "-1,234");
        assert_eq!(grouped(12), "12");
    }
}
