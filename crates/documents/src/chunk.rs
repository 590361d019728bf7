//! Passages for retrieval: pages split at sentence ends (。！？) and line structure into
//! chunks of about 400–800 characters with some overlap, each with its page and the
//! heading it falls under; small tables stay whole. And the text that is indexed for a
//! passage: NFKC, with each 和暦 year followed by its 西暦 year (令和7年 → 2025年), so a
//! search for either finds the other; the original stays for display.

use crate::pages::Page;
use unicode_normalization::UnicodeNormalization;

pub const MAX_CHARS: usize = 800;
pub const MIN_CHARS: usize = 400;
pub const OVERLAP_CHARS: usize = 120;
/// A table up to this size is one chunk.
pub const TABLE_WHOLE_CHARS: usize = 1_500;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub page: u32,
    pub heading: Option<String>,
    pub text: String,
}

fn len(s: &str) -> usize {
    s.chars().count()
}

fn is_heading(line: &str) -> Option<String> {
    let t = line.trim();
    if let Some(h) = t.strip_prefix('#') {
        let h = h.trim_start_matches('#').trim();
        return (!h.is_empty()).then(|| h.to_string());
    }
    // 第3条、第二章、第1節 …: the headings of regulations.
    if let Some(rest) = t.strip_prefix('第') {
        let num: String = rest
            .chars()
            .take_while(|c| {
                c.is_ascii_digit() || "０１２３４５６７８９一二三四五六七八九十百".contains(*c)
            })
            .collect();
        if !num.is_empty() {
            let after = &rest[num.len()..];
            if after.starts_with(['章', '節', '款']) && len(t) <= 40 {
                return Some(t.to_string());
            }
            if after.starts_with('条') {
                // The article's caption, without its text when both share the line.
                let cap: String = t.chars().take_while(|c| !c.is_whitespace()).collect();
                return Some(cap.chars().take(40).collect());
            }
        }
    }
    None
}

/// Sentences of a line, each with its closing mark.
fn sentences(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        cur.push(c);
        if matches!(c, '。' | '！' | '？' | '!' | '?') {
            // Keep a closing bracket with its sentence: 「…。」
            while let Some(&n) = chars.peek() {
                if matches!(n, '」' | '』' | '）' | ')') {
                    cur.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// Splits text longer than `MAX_CHARS` into pieces that are not.
fn hard_split(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars
        .chunks(MAX_CHARS)
        .map(|c| c.iter().collect())
        .collect()
}

struct Builder {
    out: Vec<Chunk>,
    page: u32,
    heading: Option<String>,
    parts: Vec<String>,
}

impl Builder {
    fn size(&self) -> usize {
        self.parts.iter().map(|p| len(p)).sum()
    }

    fn emit(&mut self, keep_overlap: bool) {
        let text = self.parts.concat().trim().to_string();
        if text.is_empty() {
            self.parts.clear();
            return;
        }
        self.out.push(Chunk {
            page: self.page,
            heading: self.heading.clone(),
            text,
        });
        let mut keep = Vec::new();
        if keep_overlap {
            let mut n = 0;
            for p in self.parts.iter().rev() {
                if n + len(p) > OVERLAP_CHARS {
                    break;
                }
                n += len(p);
                keep.push(p.clone());
            }
            keep.reverse();
        }
        self.parts = keep;
    }

    fn push(&mut self, sentence: String) {
        for piece in if len(&sentence) > MAX_CHARS {
            hard_split(&sentence)
        } else {
            vec![sentence]
        } {
            if self.size() + len(&piece) > MAX_CHARS && self.size() > 0 {
                self.emit(true);
                // The overlap must not push a long sentence past the limit.
                if self.size() + len(&piece) > MAX_CHARS {
                    self.parts.clear();
                }
            }
            self.parts.push(piece);
        }
    }

    /// Ends the current chunk unless it is still small (then it runs on).
    fn boundary(&mut self, force: bool) {
        if force || self.size() >= MIN_CHARS {
            self.emit(false);
        }
    }
}

/// The chunks of a document's pages, in order.
pub fn chunk_pages(pages: &[Page]) -> Vec<Chunk> {
    let mut b = Builder {
        out: Vec::new(),
        page: 1,
        heading: None,
        parts: Vec::new(),
    };
    for p in pages {
        b.boundary(true);
        b.page = p.number;
        if let Some(t) = &p.title {
            b.heading = Some(t.clone());
        }
        let lines: Vec<&str> = p.text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            if line.contains(" | ") {
                // A table: its rows together.
                let start = i;
                while i < lines.len() && lines[i].contains(" | ") {
                    i += 1;
                }
                let rows = &lines[start..i];
                b.boundary(true);
                let whole = rows.join("\n");
                if len(&whole) <= TABLE_WHOLE_CHARS {
                    b.parts.push(whole);
                    b.emit(false);
                } else {
                    // Long tables in groups of rows, each with the header row.
                    let header = rows[0];
                    let mut group = vec![header.to_string()];
                    for r in &rows[1..] {
                        if len(&group.join("\n")) + len(r) > MAX_CHARS && group.len() > 1 {
                            b.parts.push(group.join("\n"));
                            b.emit(false);
                            group = vec![header.to_string()];
                        }
                        group.push(r.to_string());
                    }
                    b.parts.push(group.join("\n"));
                    b.emit(false);
                }
                continue;
            }
            if let Some(h) = is_heading(line) {
                b.boundary(true);
                b.heading = Some(h);
                // A heading that carries text (第3条 本文…) keeps it.
                if !line.trim_start().starts_with('#') {
                    for s in sentences(line) {
                        b.push(s);
                    }
                    b.parts.push("\n".into());
                }
                i += 1;
                continue;
            }
            if line.trim().is_empty() {
                b.boundary(false);
            } else {
                for s in sentences(line) {
                    b.push(s);
                }
                b.parts.push("\n".into());
            }
            i += 1;
        }
    }
    b.boundary(true);
    b.out
}

const ERAS: &[(&str, i32)] = &[
    ("令和", 2019),
    ("平成", 1989),
    ("昭和", 1926),
    ("大正", 1912),
    ("明治", 1868),
];

fn kanji_number(s: &str) -> Option<i32> {
    if s == "元" {
        return Some(1);
    }
    if let Ok(n) = s.parse::<i32>() {
        return Some(n);
    }
    let digit = |c: char| {
        "〇一二三四五六七八九"
            .chars()
            .position(|d| d == c)
            .map(|p| p as i32)
    };
    let (mut total, mut cur) = (0, 0);
    for c in s.chars() {
        if c == '十' {
            total += if cur == 0 { 10 } else { cur * 10 };
            cur = 0;
        } else {
            cur = cur * 10 + digit(c)?;
        }
    }
    Some(total + cur)
}

/// 和暦 years in `s` (after NFKC) as 西暦 years: 令和7年 → 2025.
pub fn western_years(s: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for (era, start) in ERAS {
        let mut rest = s;
        while let Some(i) = rest.find(era) {
            let after = &rest[i + era.len()..];
            let num: String = after
                .chars()
                .take_while(|c| c.is_ascii_digit() || "元〇一二三四五六七八九十".contains(*c))
                .collect();
            if !num.is_empty() && after[num.len()..].starts_with('年') {
                if let Some(n) = kanji_number(&num).filter(|n| (1..=99).contains(n)) {
                    out.push(start + n - 1);
                }
            }
            rest = after;
        }
    }
    out
}

/// What is indexed for a passage (or searched for a query): NFKC, and 西暦 for each 和暦
/// year, so 令和7年 and 2025年 find each other.
pub fn search_text(s: &str) -> String {
    let norm: String = s.nfkc().collect();
    let years = western_years(&norm);
    if years.is_empty() {
        return norm;
    }
    let mut out = norm;
    for y in years {
        out.push_str(&format!(" {y}年"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u32, text: &str) -> Page {
        Page {
            number: n,
            title: None,
            text: text.into(),
        }
    }

    #[test]
    fn wareki_years_become_western_years() {
        assert_eq!(western_years("令和7年4月1日から施行する。"), [2025]);
        assert_eq!(western_years("令和元年度、平成三十一年"), [2019, 2019]);
        assert_eq!(western_years("昭和六十四年と平成元年"), [1989, 1989]);
        assert!(western_years("令和の時代").is_empty());
        assert!(search_text("令和７年度予算").contains("2025年"));
        assert!(search_text("ﾏｲﾅﾝﾊﾞｰ").contains("マイナンバー"));
    }

    #[test]
    fn chunks_follow_sentences_pages_and_headings() {
        let sentence = "この規程は、文書の保存期間について定めるものである。";
        let long = sentence.repeat(60); // about 1,600 characters
        let pages = vec![
            p(1, &format!("# 文書管理規程\n第1条 {long}")),
            p(2, "第2条 保存期間は5年とする。"),
        ];
        let chunks = chunk_pages(&pages);
        assert!(chunks.len() >= 3, "{chunks:?}");
        for c in &chunks {
            assert!(len(&c.text) <= MAX_CHARS, "{}", len(&c.text));
            assert!(
                c.text.ends_with('。') || c.text.ends_with("る"),
                "{}",
                c.text
            );
        }
        assert_eq!(chunks[0].heading.as_deref(), Some("第1条"));
        assert_eq!(chunks[0].page, 1);
        // Overlap: the next chunk starts with the last sentence of the one before.
        assert!(chunks[1].text.starts_with(sentence), "{}", chunks[1].text);
        let last = chunks.last().unwrap();
        assert_eq!((last.page, last.heading.as_deref()), (2, Some("第2条")));
        assert!(last.text.contains("保存期間は5年"));
    }

    #[test]
    fn small_tables_stay_whole_and_long_ones_repeat_their_header() {
        let table = "区分 | 保存期間\n契約書 | 10年\n会議録 | 30年";
        let chunks = chunk_pages(&[p(1, &format!("表1の説明です。\n{table}\n以上です。"))]);
        assert!(chunks.iter().any(|c| c.text == table), "{chunks:?}");
        let mut rows = vec!["番号 | 名称 | 備考".to_string()];
        for i in 0..200 {
            rows.push(format!("{i} | 文書{i} | 特記事項なし"));
        }
        let chunks = chunk_pages(&[p(1, &rows.join("\n"))]);
        assert!(chunks.len() > 2);
        assert!(chunks
            .iter()
            .all(|c| c.text.starts_with("番号 | 名称 | 備考")));
    }
}
