//! OCR for pages without a text layer (scanned PDFs), with Debian's `pdftoppm`
//! (poppler-utils) and `tesseract` with its Japanese data (tesseract-ocr-jpn), run as
//! separate processes: a crash or a hostile file cannot take the server with it. Blocking:
//! call it off the async threads.

use std::path::Path;
use std::process::Command;

/// Whether both programs and the Japanese language data are installed.
pub fn available() -> bool {
    let pdftoppm = Command::new("pdftoppm").arg("-v").output().is_ok();
    let jpn = Command::new("tesseract")
        .arg("--list-langs")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "jpn")
        })
        .unwrap_or(false);
    pdftoppm && jpn
}

/// Reads one page (1-based) of the PDF at `pdf` in Japanese. Returns the text, or why not.
pub fn pdf_page(pdf: &Path, page: u32) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = dir.path().join("page");
    let out = Command::new("pdftoppm")
        .args(["-r", "300", "-gray", "-png", "-singlefile"])
        .args(["-f", &page.to_string(), "-l", &page.to_string()])
        .arg(pdf)
        .arg(&image)
        .output()
        .map_err(|e| format!("pdftoppm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pdftoppm: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let out = Command::new("tesseract")
        .arg(image.with_extension("png"))
        .arg("stdout")
        .args(["-l", "jpn", "--psm", "3"])
        .output()
        .map_err(|e| format!("tesseract: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tesseract: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(join_japanese(&String::from_utf8_lossy(&out.stdout)))
}

/// Tesseract puts spaces between Japanese characters; they are not in the text.
pub fn join_japanese(s: &str) -> String {
    let wide = |c: char| (c as u32) >= 0x2E80;
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for (i, c) in chars.iter().enumerate() {
        if *c == ' ' {
            let prev = i.checked_sub(1).and_then(|j| chars.get(j)).copied();
            let next = chars.get(i + 1).copied();
            if prev.is_some_and(wide) && next.is_some_and(wide) {
                continue;
            }
        }
        out.push(*c);
    }
    out
}
