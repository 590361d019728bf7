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
