//! CSV files for people: UTF-8 with a BOM and CRLF line ends, so Excel in a Japanese office
//! opens them correctly, and cells that Excel would run as formulas are neutralised.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// A cell that starts like a formula (`=`, `+`, `-`, `@`, tab, CR) gets a leading `'`.
pub fn cell(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
        .collect();
    if clean.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{clean}")
    } else {
        clean
    }
}

pub fn build(
    headers: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) -> Result<Vec<u8>, csv::Error> {
    let mut out = vec![0xEF, 0xBB, 0xBF];
    {
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .from_writer(&mut out);
        w.write_record(headers)?;
        for r in rows {
            w.write_record(r.iter().map(|c| cell(c)))?;
        }
        w.flush()?;
    }
    Ok(out)
}

pub fn response(filename: &str, body: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_neutralised_and_excel_gets_a_bom() {
        assert_eq!(cell("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(cell("山田"), "山田");
        let b = build(&["a"], vec![vec!["-1".into()]]).unwrap();
        assert_eq!(&b[..3], &[0xEF, 0xBB, 0xBF]);
        assert_eq!(String::from_utf8_lossy(&b[3..]), "a\r\n'-1\r\n");
    }
}
