//! Text from files people attach or upload. For now: plain text (UTF-8 with or without a
//! BOM, UTF-16 with a BOM, Shift_JIS as Japanese Windows writes it) and the text layer of
//! PDFs. The type is decided by the content, never by the file name. Scanned PDFs without a
//! text layer are reported as such (OCR arrives with the knowledge issue).

use std::panic::AssertUnwindSafe;

pub mod chunk;
pub mod ocr;
pub mod pages;

pub use pages::{detect, extract_pages, Kind, Page};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DocError {
    #[error("unsupported file type")]
    Unsupported,
    #[error("the file is empty")]
    Empty,
    #[error("text encoding could not be read")]
    Encoding,
    #[error("the PDF could not be read")]
    BadPdf,
    #[error("the PDF has no text layer")]
    NoText,
    #[error("the PDF is encrypted")]
    Encrypted,
    #[error("the Office file could not be read")]
    BadOffice,
    #[error("the archive expands too far")]
    ZipBomb,
    #[error("too many pages")]
    TooManyPages,
}

impl DocError {
    /// What to tell staff, in Japanese.
    pub fn message_ja(&self) -> &'static str {
        match self {
            DocError::Unsupported => "添付できるのはテキストファイル（.txt、.md、.csv など）と PDF です。",
            DocError::Empty => "添付ファイルが空です。",
            DocError::Encoding => "添付ファイルの文字コードを判別できません。UTF-8 または Shift_JIS で保存してください。",
            DocError::BadPdf => "PDF を読み取れません（壊れているか、パスワードで保護されています）。",
            DocError::NoText => "この PDF には文字情報がありません（スキャンした画像の PDF と思われます）。文字を含む PDF かテキストファイルを添付してください。",
            DocError::Encrypted => "パスワードで保護された PDF は読み取れません。保護を解除してから登録してください。",
            DocError::BadOffice => "Office ファイルを読み取れません（壊れているか、パスワードで保護されています）。",
            DocError::ZipBomb => "展開すると大きくなりすぎるファイルのため、処理しませんでした（圧縮爆弾の疑い）。",
            DocError::TooManyPages => "ページ数が多すぎます（1ファイル 5,000 ページまで）。分割して登録してください。",
        }
    }

    /// The same for documents uploaded to the knowledge base.
    pub fn upload_message_ja(&self) -> &'static str {
        match self {
            DocError::Unsupported => "登録できるのは PDF、Word（.docx）、Excel（.xlsx）、PowerPoint（.pptx）、HTML、Markdown、CSV、テキストファイルです。",
            DocError::Empty => "ファイルが空です。",
            DocError::Encoding => "文字コードを判別できません。UTF-8、Shift_JIS または EUC-JP で保存してください。",
            other => other.message_ja(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// `text` or `pdf`.
    pub kind: &'static str,
    pub text: String,
}

fn looks_binary(bytes: &[u8]) -> bool {
    const MAGIC: &[&[u8]] = &[
        b"PK\x03\x04",
        b"\x89PNG",
        b"\xff\xd8\xff",
        b"GIF8",
        b"\x7fELF",
        b"MZ",
        b"\x1f\x8b",
        b"Rar!",
        b"7z\xbc\xaf",
    ];
    MAGIC.iter().any(|m| bytes.starts_with(m)) || bytes.iter().take(8192).any(|b| *b == 0)
}

/// Decodes text in the encodings Japanese offices produce.
pub fn decode_text(bytes: &[u8]) -> Result<String, DocError> {
    if let Some((enc, bom)) = encoding_rs::Encoding::for_bom(bytes) {
        let (text, bad) = enc.decode_without_bom_handling(&bytes[bom..]);
        return if bad {
            Err(DocError::Encoding)
        } else {
            Ok(text.into_owned())
        };
    }
    if looks_binary(bytes) {
        return Err(DocError::Unsupported);
    }
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Ok(s.to_string());
    }
    // Shift_JIS or EUC-JP: whichever decodes cleanly; when both do, the one that reads as
    // more kana and common kanji (the other then is mojibake of rare characters).
    let sjis = encoding_rs::SHIFT_JIS.decode_without_bom_handling_and_without_replacement(bytes);
    let euc = encoding_rs::EUC_JP.decode_without_bom_handling_and_without_replacement(bytes);
    let score = |t: &str| {
        t.chars()
            .filter(|c| {
                matches!(*c as u32, 0x3041..=0x30FF | 0x4E00..=0x9FFF) || "。、".contains(*c)
            })
            .count() as f64
            / t.chars().count().max(1) as f64
    };
    match (sjis, euc) {
        (Some(a), Some(b)) => Ok(if score(&b) > score(&a) { b } else { a }.into_owned()),
        (Some(a), None) => Ok(a.into_owned()),
        (None, Some(b)) => Ok(b.into_owned()),
        (None, None) => Err(DocError::Encoding),
    }
}

/// Extracts the text of an attached file. CPU-bound: call it off the async threads.
pub fn extract(bytes: &[u8]) -> Result<Extracted, DocError> {
    if bytes.is_empty() {
        return Err(DocError::Empty);
    }
    if bytes.starts_with(b"%PDF-") {
        // The PDF parser may panic on hostile input; a bad file must not take the server down.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pdf_extract::extract_text_from_mem(bytes)
        }));
        let text = match result {
            Ok(Ok(t)) => t,
            _ => return Err(DocError::BadPdf),
        };
        let text = tidy(&radicals_to_ideographs(&text));
        if text.trim().is_empty() {
            return Err(DocError::NoText);
        }
        return Ok(Extracted { kind: "pdf", text });
    }
    let text = decode_text(bytes)?;
    Ok(Extracted {
        kind: "text",
        text: tidy(&text),
    })
}

/// PDF fonts often map 文, 月, 日… to the look-alike Kangxi radicals (U+2F00–U+2FDF) and
/// CJK radical supplements; those become the ordinary ideographs (their NFKC form), so the
/// text can be searched and read by a model. Nothing else is normalised here.
pub(crate) fn radicals_to_ideographs(s: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if ('\u{2E80}'..='\u{2FDF}').contains(&c) {
            out.extend(std::iter::once(c).nfkc());
        } else {
            out.push(c);
        }
    }
    out
}

/// Line breaks normalised, control characters (other than tab and newline) removed,
/// runs of blank lines collapsed.
pub(crate) fn tidy(s: &str) -> String {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    let cleaned: String = s
        .chars()
        .filter(|c| !c.is_control() || matches!(c, '\n' | '\t'))
        .collect();
    let mut out = String::with_capacity(cleaned.len());
    let mut blank = 0;
    for line in cleaned.lines() {
        if line.trim().is_empty() {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_in_office_encodings() {
        let (sjis, _, _) = encoding_rs::SHIFT_JIS.encode("議事録\r\n令和8年度");
        assert_eq!(extract(&sjis).unwrap().text, "議事録\n令和8年度");
        let bom = [&[0xEF, 0xBB, 0xBF][..], "本文".as_bytes()].concat();
        assert_eq!(extract(&bom).unwrap().text, "本文");
        assert_eq!(
            extract("\u{1b}[31m赤\u{7}".as_bytes()).unwrap().text,
            "[31m赤"
        );
    }

    #[test]
    fn binaries_and_broken_pdfs_are_refused() {
        assert_eq!(extract(b"PK\x03\x04zipzip"), Err(DocError::Unsupported));
        assert_eq!(
            extract(&[0x89, b'P', b'N', b'G', 0, 0]),
            Err(DocError::Unsupported)
        );
        assert_eq!(extract(b""), Err(DocError::Empty));
        assert_eq!(
            extract(b"%PDF-1.7\n garbage that is not a pdf"),
            Err(DocError::BadPdf)
        );
    }
}
