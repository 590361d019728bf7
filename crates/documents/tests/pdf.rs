//! Real documents made by real tools: `fixtures/kitei.pdf` is `kitei.html` (synthetic text)
//! printed to PDF by headless Chromium with Noto Sans CJK.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn japanese_text_layer_of_a_chromium_pdf() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kitei.pdf"
    ))
    .unwrap();
    let e = documents::extract(&bytes).unwrap();
    assert_eq!(e.kind, "pdf");
    let flat: String = e.text.chars().filter(|c| !c.is_whitespace()).collect();
    for expected in [
        "サンプル市文書管理規程（抜粋）",
        "令和8年4月1日から起算して5年とする。",
        "総務部情報政策課",
    ] {
        assert!(flat.contains(expected), "{expected} in {:?}", e.text);
    }
}

#[test]
fn a_truncated_pdf_is_refused_not_a_crash() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kitei.pdf"
    ))
    .unwrap();
    assert!(documents::extract(&bytes[..bytes.len() / 3]).is_err());
}

// ---------------------------------------------------------------- the knowledge formats
// Made by `scripts/make-fixtures` with LibreOffice, pdftoppm and img2pdf from the texts in
// `fixtures/src`.

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn flat(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

#[test]
fn each_format_by_content_with_its_pages() {
    use documents::{detect, extract_pages, Kind};
    // The type comes from the content: a misleading name changes nothing.
    for (file, kind) in [
        ("manual.docx", Kind::Docx),
        ("table.xlsx", Kind::Xlsx),
        ("slides.pptx", Kind::Pptx),
        ("manual.pdf", Kind::Pdf),
        ("kitei.html", Kind::Html),
    ] {
        assert_eq!(
            detect(&fixture(file), "report.txt").unwrap(),
            kind,
            "{file}"
        );
    }
    let docx = extract_pages(&fixture("manual.docx"), Kind::Docx).unwrap();
    let text = &docx[0].text;
    assert!(text.contains("# 窓口業務マニュアル"), "{text}");
    assert!(
        text.contains("マイナンバーカードまたは運転免許証で行う。"),
        "{text}"
    );
    assert!(text.contains("住民票の写し | 300円"), "{text}");
    assert!(text.contains("令和7年4月1日から"), "{text}");
    let xlsx = extract_pages(&fixture("table.xlsx"), Kind::Xlsx).unwrap();
    assert_eq!(xlsx.len(), 1);
    assert!(
        xlsx[0].text.contains("文書の種類 | 保存期間 | 担当課"),
        "{}",
        xlsx[0].text
    );
    assert!(xlsx[0].text.contains("会議録 | 30年 | 議会事務局"));
    assert!(xlsx[0].title.is_some());
    let pptx = extract_pages(&fixture("slides.pptx"), Kind::Pptx).unwrap();
    assert_eq!(pptx.len(), 2);
    assert!(
        pptx[0].text.contains("防災訓練の実施について"),
        "{:?}",
        pptx
    );
    assert_eq!(pptx[1].number, 2);
    assert!(pptx[1].text.contains("避難所の鍵は防災安全課が保管する。"));
    let pdf = extract_pages(&fixture("manual.pdf"), Kind::Pdf).unwrap();
    assert!(
        flat(&pdf.iter().map(|p| p.text.as_str()).collect::<String>())
            .contains("請求者の本人確認は、マイナンバーカードまたは運転免許証で行う。")
    );
    let html = extract_pages(&fixture("kitei.html"), Kind::Html).unwrap();
    assert!(flat(&html[0].text).contains("令和8年4月1日から起算して5年とする。"));
    assert!(!html[0].text.contains("<"));
    // Text in the encodings offices use.
    let sjis = encoding_rs::SHIFT_JIS.encode("保存期間は五年とする。").0;
    let euc = encoding_rs::EUC_JP.encode("保存期間は五年とする。").0;
    for bytes in [sjis.to_vec(), euc.to_vec()] {
        let k = detect(&bytes, "a.txt").unwrap();
        assert_eq!(
            extract_pages(&bytes, k).unwrap()[0].text.trim(),
            "保存期間は五年とする。"
        );
    }
}

#[test]
fn a_scanned_pdf_has_pages_without_text_and_ocr_reads_them() {
    use documents::{extract_pages, Kind};
    let bytes = fixture("scanned.pdf");
    let pages = extract_pages(&bytes, Kind::Pdf).unwrap();
    assert!(!pages.is_empty());
    assert!(pages.iter().all(|p| p.text.trim().is_empty()), "{pages:?}");
    if !documents::ocr::available() {
        // CI installs tesseract-ocr-jpn; a machine without it must say so, not pass silently.
        assert!(std::env::var("CI").is_err(), "OCR is not installed on CI");
        eprintln!("skipped: tesseract-ocr-jpn / poppler-utils not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scan.pdf");
    std::fs::write(&path, &bytes).unwrap();
    let text = documents::ocr::pdf_page(&path, 1).unwrap();
    let text = flat(&text);
    for word in ["ごみ", "分別", "月曜日", "収集"] {
        assert!(text.contains(word), "{word} in {text}");
    }
}

#[test]
fn hostile_office_files_end_as_clear_errors() {
    use documents::{detect, extract_pages, DocError, Kind};
    use std::io::Write;
    // A zip bomb dressed as .docx: a small file that expands past the limit.
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        z.start_file("word/document.xml", opts).unwrap();
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..320 {
            z.write_all(&zeros).unwrap();
        }
        z.finish().unwrap();
    }
    let bomb = buf.into_inner();
    assert!(bomb.len() < 2_000_000, "{}", bomb.len());
    assert_eq!(detect(&bomb, "manual.docx").unwrap(), Kind::Docx);
    assert_eq!(extract_pages(&bomb, Kind::Docx), Err(DocError::ZipBomb));
    // A zip that is not an Office file; a broken one; an image; an empty file.
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        z.start_file("a.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(b"x").unwrap();
        z.finish().unwrap();
    }
    assert_eq!(
        detect(&buf.into_inner(), "a.docx"),
        Err(DocError::Unsupported)
    );
    let docx = fixture("manual.docx");
    assert_eq!(
        detect(&docx[..docx.len() / 2], "a.docx"),
        Err(DocError::BadOffice)
    );
    assert_eq!(
        detect(b"\x89PNG\r\n\x1a\n....", "a.txt"),
        Err(DocError::Unsupported)
    );
    assert_eq!(detect(b"", "a.txt"), Err(DocError::Empty));
}

// `encrypted.pdf` is manual.pdf encrypted with a user password by pypdf (AES-128);
// `claims-100000-pages.pdf` is a hand-written PDF whose page tree says 100,000 pages and
// holds one.
#[test]
fn an_encrypted_pdf_and_one_that_lies_about_its_pages() {
    use documents::{extract_pages, DocError, Kind};
    let e = extract_pages(&fixture("encrypted.pdf"), Kind::Pdf).unwrap_err();
    assert!(e == DocError::Encrypted || e == DocError::BadPdf, "{e:?}");
    assert!(
        e.upload_message_ja().contains("パスワード"),
        "{}",
        e.upload_message_ja()
    );
    let pages = extract_pages(&fixture("claims-100000-pages.pdf"), Kind::Pdf).unwrap();
    assert_eq!(pages.len(), 1);
    assert!(pages[0].text.contains("Page count lies"), "{pages:?}");
}
