//! Documents for the knowledge base (M8), page by page: the type is decided by the content
//! (magic bytes, and the parts inside an Office zip), never by the file name; PDF pages
//! keep their numbers, slides their slide numbers, sheets their order; Word tables and
//! Excel rows become lines of cells separated by ` | `. Office files are zips, so their
//! entries and expansion are limited (zip bombs).

use crate::{decode_text, tidy, DocError};
use quick_xml::events::Event;
use std::io::Read;

/// Limits on Office zips: entries, and bytes after expansion (all parts together).
pub const MAX_ZIP_ENTRIES: usize = 5_000;
pub const MAX_EXPANDED_BYTES: u64 = 300 * 1024 * 1024;
/// More pages than this and the file is refused.
pub const MAX_PAGES: usize = 5_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pdf,
    Docx,
    Xlsx,
    Pptx,
    Html,
    Markdown,
    Csv,
    Text,
}

impl Kind {
    pub fn code(self) -> &'static str {
        match self {
            Kind::Pdf => "pdf",
            Kind::Docx => "docx",
            Kind::Xlsx => "xlsx",
            Kind::Pptx => "pptx",
            Kind::Html => "html",
            Kind::Markdown => "markdown",
            Kind::Csv => "csv",
            Kind::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Pdf,
            Kind::Docx,
            Kind::Xlsx,
            Kind::Pptx,
            Kind::Html,
            Kind::Markdown,
            Kind::Csv,
            Kind::Text,
        ]
        .into_iter()
        .find(|k| k.code() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Pdf => "PDF",
            Kind::Docx => "Word",
            Kind::Xlsx => "Excel",
            Kind::Pptx => "PowerPoint",
            Kind::Html => "HTML",
            Kind::Markdown => "Markdown",
            Kind::Csv => "CSV",
            Kind::Text => "テキスト",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// 1-based: the page, slide or sheet.
    pub number: u32,
    /// A name for the page when it has one (a sheet's name).
    pub title: Option<String>,
    pub text: String,
}

/// The type of a file by its content. `name` only tells Markdown and CSV from plain text.
pub fn detect(bytes: &[u8], name: &str) -> Result<Kind, DocError> {
    if bytes.is_empty() {
        return Err(DocError::Empty);
    }
    if bytes.starts_with(b"%PDF-") {
        return Ok(Kind::Pdf);
    }
    if bytes.starts_with(b"PK\x03\x04") {
        let mut zip = open_zip(bytes)?;
        let has =
            |zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, n: &str| zip.by_name(n).is_ok();
        if has(&mut zip, "word/document.xml") {
            return Ok(Kind::Docx);
        }
        if has(&mut zip, "xl/workbook.xml") {
            return Ok(Kind::Xlsx);
        }
        if has(&mut zip, "ppt/presentation.xml") {
            return Ok(Kind::Pptx);
        }
        return Err(DocError::Unsupported);
    }
    // Other binary formats (images, old Office files, executables) are not text.
    if bytes.starts_with(&[0xD0, 0xCF, 0x11, 0xE0])
        || bytes.starts_with(b"\x89PNG")
        || bytes.starts_with(&[0xFF, 0xD8, 0xFF])
        || bytes.starts_with(b"GIF8")
        || bytes.starts_with(b"MZ")
        || bytes.starts_with(b"\x7FELF")
    {
        return Err(DocError::Unsupported);
    }
    let head = decode_text(&bytes[..bytes.len().min(4096)]).unwrap_or_default();
    let start = head
        .trim_start_matches('\u{feff}')
        .trim_start()
        .to_ascii_lowercase();
    if start.starts_with("<!doctype html") || start.starts_with("<html") {
        return Ok(Kind::Html);
    }
    let lower = name.to_lowercase();
    Ok(if lower.ends_with(".md") || lower.ends_with(".markdown") {
        Kind::Markdown
    } else if lower.ends_with(".csv") {
        Kind::Csv
    } else if lower.ends_with(".html") || lower.ends_with(".htm") {
        Kind::Html
    } else {
        Kind::Text
    })
}

/// The pages of a document. CPU-bound: call it off the async threads. Pages without text
/// (a scanned PDF) come back empty; OCR is the caller's next step.
pub fn extract_pages(bytes: &[u8], kind: Kind) -> Result<Vec<Page>, DocError> {
    let pages = match kind {
        Kind::Pdf => pdf(bytes)?,
        Kind::Docx => docx(bytes)?,
        Kind::Xlsx => xlsx(bytes)?,
        Kind::Pptx => pptx(bytes)?,
        Kind::Html => vec![page(1, html_text(&decode_text(bytes)?))],
        Kind::Markdown | Kind::Csv | Kind::Text => vec![page(1, decode_text(bytes)?)],
    };
    if pages.len() > MAX_PAGES {
        return Err(DocError::TooManyPages);
    }
    Ok(pages
        .into_iter()
        .map(|p| Page {
            text: tidy(&crate::radicals_to_ideographs(&p.text)),
            ..p
        })
        .collect())
}

fn page(number: u32, text: String) -> Page {
    Page {
        number,
        title: None,
        text,
    }
}

fn pdf(bytes: &[u8]) -> Result<Vec<Page>, DocError> {
    // The PDF parser may panic on hostile input; a bad file must not take the worker down.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pdf_extract::extract_text_from_mem_by_pages(bytes)
    }));
    match r {
        Ok(Ok(pages)) => Ok(pages
            .into_iter()
            .enumerate()
            .map(|(i, t)| page(i as u32 + 1, t))
            .collect()),
        Ok(Err(e)) if e.to_string().to_lowercase().contains("encrypt") => Err(DocError::Encrypted),
        _ => Err(DocError::BadPdf),
    }
}

fn open_zip(bytes: &[u8]) -> Result<zip::ZipArchive<std::io::Cursor<&[u8]>>, DocError> {
    let zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|_| DocError::BadOffice)?;
    if zip.len() > MAX_ZIP_ENTRIES {
        return Err(DocError::ZipBomb);
    }
    Ok(zip)
}

/// Reads zip parts with a budget of expanded bytes shared by all of them.
struct Parts<'a> {
    zip: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    budget: u64,
}

impl<'a> Parts<'a> {
    fn new(bytes: &'a [u8]) -> Result<Parts<'a>, DocError> {
        Ok(Parts {
            zip: open_zip(bytes)?,
            budget: MAX_EXPANDED_BYTES,
        })
    }

    fn names(&self) -> Vec<String> {
        self.zip
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.to_string()))
            .collect()
    }

    fn read(&mut self, name: &str) -> Result<Option<String>, DocError> {
        let Ok(f) = self.zip.by_name(name) else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        // Never trust the declared size: read one byte past the budget to notice it.
        f.take(self.budget + 1)
            .read_to_end(&mut buf)
            .map_err(|_| DocError::BadOffice)?;
        if buf.len() as u64 > self.budget {
            return Err(DocError::ZipBomb);
        }
        self.budget -= buf.len() as u64;
        String::from_utf8(buf)
            .map(Some)
            .map_err(|_| DocError::BadOffice)
    }
}

/// Text of an entity reference (`&amp;`, `&#x3042;`).
fn entity(r: &quick_xml::events::BytesRef<'_>) -> String {
    if let Ok(Some(c)) = r.resolve_char_ref() {
        return c.to_string();
    }
    quick_xml::escape::resolve_predefined_entity(r.as_ref())
        .unwrap_or_default()
        .to_string()
}

fn local(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|b| *b == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

fn attr(e: &quick_xml::events::BytesStart<'_>, key: &str) -> Option<String> {
    e.attributes().flatten().find_map(|a| {
        (local(a.key.as_ref().as_bytes()) == key.as_bytes()).then(|| {
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map(|v| v.into_owned())
                .unwrap_or_default()
        })
    })
}

enum EvKind {
    Start,
    Empty,
}

fn docx(bytes: &[u8]) -> Result<Vec<Page>, DocError> {
    let mut parts = Parts::new(bytes)?;
    let xml = parts
        .read("word/document.xml")?
        .ok_or(DocError::BadOffice)?;
    let mut r = quick_xml::Reader::from_str(&xml);
    let mut pages = vec![String::new()];
    let (mut para, mut cell_texts, mut row_cells) =
        (String::new(), Vec::<String>::new(), Vec::<String>::new());
    let (mut in_text, mut depth_tbl, mut heading) = (false, 0usize, false);
    loop {
        let ev = r.read_event().map_err(|_| DocError::BadOffice)?;
        let ev_kind = if matches!(ev, Event::Empty(_)) {
            EvKind::Empty
        } else {
            EvKind::Start
        };
        match ev {
            Event::Start(e) | Event::Empty(e) => {
                let n = e.name();
                match local(n.as_ref().as_bytes()) {
                    // An empty <w:t/> has no text to wait for.
                    b"t" => in_text = matches!(ev_kind, EvKind::Start),
                    b"tab" => para.push('\t'),
                    b"br" => {
                        if attr(&e, "type").as_deref() == Some("page") {
                            let p = std::mem::take(&mut para);
                            if let Some(x) = pages.last_mut() {
                                x.push_str(&p);
                            }
                            pages.push(String::new());
                        } else {
                            para.push('\n');
                        }
                    }
                    b"tbl" if matches!(ev_kind, EvKind::Start) => depth_tbl += 1,
                    b"pStyle" => {
                        let v = attr(&e, "val").unwrap_or_default().to_lowercase();
                        heading = v.starts_with("heading")
                            || v.starts_with("title")
                            || v.contains("見出し");
                    }
                    _ => {}
                }
            }
            Event::Text(t) if in_text => para.push_str(&t.xml10_content()),
            Event::GeneralRef(g) if in_text => para.push_str(&entity(&g)),
            Event::End(e) => match local(e.name().as_ref().as_bytes()) {
                b"t" => in_text = false,
                b"p" => {
                    let mut text = std::mem::take(&mut para);
                    if heading && !text.trim().is_empty() {
                        text = format!("# {}", text.trim());
                    }
                    heading = false;
                    if depth_tbl > 0 {
                        cell_texts.push(text);
                    } else if let Some(last) = pages.last_mut() {
                        last.push_str(&text);
                        last.push('\n');
                    }
                }
                b"tc" => {
                    row_cells.push(std::mem::take(&mut cell_texts).join(" ").trim().to_string())
                }
                b"tr" => {
                    let row = std::mem::take(&mut row_cells).join(" | ");
                    if let Some(last) = pages.last_mut() {
                        last.push_str(&row);
                        last.push('\n');
                    }
                }
                b"tbl" => depth_tbl = depth_tbl.saturating_sub(1),
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(pages
        .into_iter()
        .enumerate()
        .map(|(i, t)| page(i as u32 + 1, t))
        .collect())
}

fn shared_strings(xml: &str) -> Result<Vec<String>, DocError> {
    let mut r = quick_xml::Reader::from_str(xml);
    let (mut out, mut cur, mut in_t) = (Vec::new(), String::new(), false);
    loop {
        match r.read_event().map_err(|_| DocError::BadOffice)? {
            Event::Start(e) if local(e.name().as_ref().as_bytes()) == b"t" => in_t = true,
            Event::End(e) => match local(e.name().as_ref().as_bytes()) {
                b"t" => in_t = false,
                b"si" => out.push(std::mem::take(&mut cur)),
                _ => {}
            },
            Event::Text(t) if in_t => cur.push_str(&t.xml10_content()),
            Event::GeneralRef(g) if in_t => cur.push_str(&entity(&g)),
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

/// `Target` of each relationship id in a `.rels` part.
fn relationships(xml: &str) -> Result<Vec<(String, String)>, DocError> {
    let mut r = quick_xml::Reader::from_str(xml);
    let mut out = Vec::new();
    loop {
        match r.read_event().map_err(|_| DocError::BadOffice)? {
            Event::Start(e) | Event::Empty(e)
                if local(e.name().as_ref().as_bytes()) == b"Relationship" =>
            {
                if let (Some(id), Some(t)) = (attr(&e, "Id"), attr(&e, "Target")) {
                    out.push((id, t));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

fn part_path(base: &str, target: &str) -> String {
    match target.strip_prefix('/') {
        Some(abs) => abs.to_string(),
        None => format!("{base}{target}"),
    }
}

fn xlsx(bytes: &[u8]) -> Result<Vec<Page>, DocError> {
    let mut parts = Parts::new(bytes)?;
    let strings = match parts.read("xl/sharedStrings.xml")? {
        Some(x) => shared_strings(&x)?,
        None => Vec::new(),
    };
    let rels = relationships(
        &parts
            .read("xl/_rels/workbook.xml.rels")?
            .unwrap_or_default(),
    )?;
    let wb = parts.read("xl/workbook.xml")?.ok_or(DocError::BadOffice)?;
    let mut sheets = Vec::new();
    let mut r = quick_xml::Reader::from_str(&wb);
    loop {
        match r.read_event().map_err(|_| DocError::BadOffice)? {
            Event::Start(e) | Event::Empty(e)
                if local(e.name().as_ref().as_bytes()) == b"sheet" =>
            {
                let name = attr(&e, "name").unwrap_or_default();
                let target = attr(&e, "id")
                    .and_then(|id| rels.iter().find(|(i, _)| *i == id).map(|(_, t)| t.clone()));
                if let Some(t) = target {
                    sheets.push((name, part_path("xl/", &t)));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let mut pages = Vec::new();
    for (i, (name, path)) in sheets.into_iter().enumerate() {
        let xml = parts.read(&path)?.unwrap_or_default();
        let mut r = quick_xml::Reader::from_str(&xml);
        let mut text = String::new();
        let mut row: Vec<String> = Vec::new();
        let (mut cell_type, mut value, mut in_v) = (String::new(), String::new(), false);
        loop {
            match r.read_event().map_err(|_| DocError::BadOffice)? {
                Event::Start(e) => match local(e.name().as_ref().as_bytes()) {
                    b"c" => {
                        cell_type = attr(&e, "t").unwrap_or_default();
                        value.clear();
                    }
                    b"v" | b"t" => in_v = true,
                    _ => {}
                },
                Event::Text(t) if in_v => value.push_str(&t.xml10_content()),
                Event::GeneralRef(g) if in_v => value.push_str(&entity(&g)),
                Event::End(e) => match local(e.name().as_ref().as_bytes()) {
                    b"v" | b"t" => in_v = false,
                    b"c" => {
                        let v = if cell_type == "s" {
                            value
                                .trim()
                                .parse::<usize>()
                                .ok()
                                .and_then(|i| strings.get(i).cloned())
                                .unwrap_or_default()
                        } else if cell_type == "b" {
                            if value.trim() == "1" {
                                "TRUE".into()
                            } else {
                                "FALSE".into()
                            }
                        } else {
                            value.clone()
                        };
                        row.push(v.replace(['\r', '\n'], " ").trim().to_string());
                    }
                    b"row" => {
                        while row.last().is_some_and(String::is_empty) {
                            row.pop();
                        }
                        if !row.is_empty() {
                            text.push_str(&row.join(" | "));
                            text.push('\n');
                        }
                        row.clear();
                    }
                    _ => {}
                },
                Event::Eof => break,
                _ => {}
            }
        }
        pages.push(Page {
            number: i as u32 + 1,
            title: Some(name.clone()),
            text: format!("# {name}\n{text}"),
        });
    }
    Ok(pages)
}

fn pptx(bytes: &[u8]) -> Result<Vec<Page>, DocError> {
    let mut parts = Parts::new(bytes)?;
    // Slides in presentation order.
    let rels = relationships(
        &parts
            .read("ppt/_rels/presentation.xml.rels")?
            .unwrap_or_default(),
    )?;
    let pres = parts
        .read("ppt/presentation.xml")?
        .ok_or(DocError::BadOffice)?;
    let mut order = Vec::new();
    let mut r = quick_xml::Reader::from_str(&pres);
    loop {
        match r.read_event().map_err(|_| DocError::BadOffice)? {
            Event::Start(e) | Event::Empty(e)
                if local(e.name().as_ref().as_bytes()) == b"sldId" =>
            {
                if let Some(t) = attr(&e, "id")
                    .and_then(|id| rels.iter().find(|(i, _)| *i == id).map(|(_, t)| t.clone()))
                {
                    order.push(part_path("ppt/", &t));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if order.is_empty() {
        let mut names: Vec<String> = parts
            .names()
            .into_iter()
            .filter(|n| n.starts_with("ppt/slides/slide") && n.ends_with(".xml"))
            .collect();
        names.sort_by_key(|n| {
            n.trim_start_matches("ppt/slides/slide")
                .trim_end_matches(".xml")
                .parse::<u32>()
                .unwrap_or(u32::MAX)
        });
        order = names;
    }
    let mut pages = Vec::new();
    for (i, path) in order.iter().enumerate() {
        let xml = parts.read(path)?.unwrap_or_default();
        let mut r = quick_xml::Reader::from_str(&xml);
        let (mut text, mut in_t) = (String::new(), false);
        loop {
            match r.read_event().map_err(|_| DocError::BadOffice)? {
                Event::Start(e) if local(e.name().as_ref().as_bytes()) == b"t" => in_t = true,
                Event::Text(t) if in_t => text.push_str(&t.xml10_content()),
                Event::GeneralRef(g) if in_t => text.push_str(&entity(&g)),
                Event::End(e) => match local(e.name().as_ref().as_bytes()) {
                    b"t" => in_t = false,
                    b"p" => text.push('\n'),
                    _ => {}
                },
                Event::Eof => break,
                _ => {}
            }
        }
        pages.push(page(i as u32 + 1, text));
    }
    Ok(pages)
}

/// The visible text of an HTML page: tags dropped, scripts and styles skipped, block
/// elements on their own lines, entities decoded.
pub fn html_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    let mut skip_until: Option<&str> = None;
    while let Some(lt) = rest.find('<') {
        if skip_until.is_none() {
            out.push_str(&decode_entities(&rest[..lt]));
        }
        let after = &rest[lt..];
        let end = if after.starts_with("<!--") {
            after.find("-->").map(|i| i + 3)
        } else {
            after.find('>').map(|i| i + 1)
        };
        let Some(end) = end else { break };
        let tag = after[1..end - 1].trim().to_ascii_lowercase();
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if let Some(until) = skip_until {
            if tag.starts_with('/') && name == until {
                skip_until = None;
            }
        } else if !tag.starts_with('/') && matches!(name.as_str(), "script" | "style" | "template")
        {
            skip_until = Some(match name.as_str() {
                "script" => "script",
                "style" => "style",
                _ => "template",
            });
        } else if matches!(
            name.as_str(),
            "p" | "div"
                | "br"
                | "li"
                | "tr"
                | "h1"
                | "h2"
                | "h3"
                | "h4"
                | "h5"
                | "h6"
                | "section"
                | "article"
                | "table"
                | "title"
        ) {
            out.push('\n');
        } else if matches!(name.as_str(), "td" | "th") && !tag.starts_with('/') {
            out.push_str(" | ");
        }
        rest = &after[end..];
    }
    if skip_until.is_none() {
        out.push_str(&decode_entities(rest));
    }
    out
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let semi = tail.find(';').filter(|j| *j <= 10);
        let decoded = semi.and_then(|j| {
            let name = &tail[1..j];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" | "#39" => Some('\''),
                "nbsp" => Some(' '),
                _ => name
                    .strip_prefix("#x")
                    .or_else(|| name.strip_prefix("#X"))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| name.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, j))
        });
        match decoded {
            Some((c, j)) => {
                out.push(c);
                rest = &tail[j + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}
