//! Prompt templates (M9): the placeholder language a template body is written in, the form
//! it yields, composing the prompt from what staff typed, and the checks on a template an
//! admin or a member of staff writes.
//!
//! A body marks its inputs with `{{ラベル}}`, optionally typed:
//! `{{会議録:長文}}` (several lines), `{{実施日:日付}}` (a date, written out in 和暦),
//! `{{文体:選択=です・ます調/だ・である調}}` (one of the options); a `?` after the label makes
//! it optional: `{{補足?:長文}}`. The form is derived from the body, so a template can never
//! ask for something its prompt does not use, nor use something the form did not ask for.

use crate::settings::FieldError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The categories templates are filed under, in the order the pages show them.
pub const CATEGORIES: &[&str] = &[
    "会議録・議事録",
    "説明原稿・あいさつ文",
    "住民向け文書",
    "議会答弁・想定問答",
    "税務",
    "福祉",
    "公用文の作成・校正",
    "翻訳",
    "起案・企画",
    "メール・文書",
    "データ・表計算",
    "広報",
    "RAG向け",
    "その他",
];

/// Longest one-line input.
pub const MAX_TEXT_CHARS: usize = 1_000;
pub const MAX_FIELDS: usize = 20;
pub const MAX_BODY_CHARS: usize = 20_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "options", rename_all = "snake_case")]
pub enum FieldKind {
    Text,
    LongText,
    Date,
    Choice(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Field {
    pub label: String,
    pub kind: FieldKind,
    pub required: bool,
    /// The placeholder exactly as written, for substitution.
    #[serde(skip)]
    spec: String,
}

impl Field {
    pub fn is_long(&self) -> bool {
        self.kind == FieldKind::LongText
    }
    pub fn is_date(&self) -> bool {
        self.kind == FieldKind::Date
    }
    pub fn options(&self) -> &[String] {
        match &self.kind {
            FieldKind::Choice(o) => o,
            _ => &[],
        }
    }
    pub fn is_choice(&self) -> bool {
        matches!(self.kind, FieldKind::Choice(_))
    }
}

fn bad_label(label: &str) -> bool {
    label.is_empty()
        || label.chars().count() > 20
        || label
            .chars()
            .any(|c| matches!(c, '{' | '}' | ':' | '?' | '=' | '/') || c.is_control())
}

fn parse_one(spec: &str) -> Result<Field, String> {
    let (head, kind) = match spec.split_once(':') {
        Some((h, k)) => (h, Some(k)),
        None => (spec, None),
    };
    let (label, required) = match head.strip_suffix('?') {
        Some(l) => (l.trim(), false),
        None => (head.trim(), true),
    };
    if bad_label(label) {
        return Err(format!(
            "「{{{{{spec}}}}}」の項目名が正しくありません（1〜20文字で、{{ }} : ? = / は使えません）。"
        ));
    }
    let kind = match kind.map(str::trim) {
        None => FieldKind::Text,
        Some("長文") => FieldKind::LongText,
        Some("日付") => FieldKind::Date,
        Some(k) if k.starts_with("選択=") => {
            let opts: Vec<String> = k["選択=".len()..]
                .split('/')
                .map(|o| o.trim().to_string())
                .collect();
            if opts.len() < 2
                || opts.len() > 20
                || opts
                    .iter()
                    .any(|o| o.is_empty() || o.chars().count() > 50 || o.contains(['{', '}']))
            {
                return Err(format!(
                    "「{{{{{spec}}}}}」の選択肢は「/」で区切って2〜20個、各50文字以内で書いてください。"
                ));
            }
            FieldKind::Choice(opts)
        }
        Some(other) => {
            return Err(format!(
                "「{{{{{spec}}}}}」の種類「{other}」は使えません。長文・日付・選択=…… のいずれかにするか、省略してください。"
            ))
        }
    };
    Ok(Field {
        label: label.to_string(),
        kind,
        required,
        spec: spec.to_string(),
    })
}

/// The form a body asks for: each distinct placeholder once, in order of first use.
pub fn fields(body: &str) -> Result<Vec<Field>, String> {
    let mut out: Vec<Field> = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err("「{{」に対応する「}}」がありません。".into());
        };
        let spec = &after[..end];
        if spec.contains("{{") {
            return Err(format!("「{{{{{spec}}}}}」の中に「{{{{」があります。"));
        }
        let f = parse_one(spec.trim())?;
        match out.iter().find(|x| x.label == f.label) {
            Some(prev) if prev.kind != f.kind || prev.required != f.required => {
                return Err(format!(
                    "項目「{}」が違う種類で2回使われています。同じ書き方にそろえてください。",
                    f.label
                ))
            }
            Some(_) => {}
            None => out.push(f),
        }
        rest = &after[end + 2..];
    }
    if rest.contains("}}") {
        return Err("「}}」に対応する「{{」がありません。".into());
    }
    if out.len() > MAX_FIELDS {
        return Err(format!("入力項目は{MAX_FIELDS}個までにしてください。"));
    }
    Ok(out)
}

/// Form field names: `f0`, `f1`… in the order of [`fields`].
pub fn input_name(i: usize) -> String {
    format!("f{i}")
}

/// The prompt with every placeholder replaced by what was typed; every problem is listed
/// (by form field name), and nothing is composed unless all is well.
pub fn compose(
    body: &str,
    values: &HashMap<String, String>,
    max_long_chars: usize,
) -> Result<String, Vec<FieldError>> {
    let fs = fields(body).map_err(|m| {
        vec![FieldError {
            field: "body".into(),
            message: m,
        }]
    })?;
    let mut errors = Vec::new();
    let mut filled: Vec<(String, String)> = Vec::new();
    for (i, f) in fs.iter().enumerate() {
        let name = input_name(i);
        let raw = values.get(&name).map(String::as_str).unwrap_or("");
        let mut err = |m: String| {
            errors.push(FieldError {
                field: name.clone(),
                message: m,
            })
        };
        let value = raw.replace("\r\n", "\n");
        let trimmed = value.trim();
        if trimmed.is_empty() {
            if f.required {
                err(format!("「{}」を入力してください。", f.label));
            }
            filled.push((f.spec.clone(), String::new()));
            continue;
        }
        let limit = if f.is_long() {
            max_long_chars
        } else {
            MAX_TEXT_CHARS
        };
        let n = value.chars().count();
        if n > limit {
            err(format!(
                "「{}」が長すぎます（{}文字。{}文字以内にしてください）。",
                f.label,
                crate::usage::grouped(n as i64),
                crate::usage::grouped(limit as i64)
            ));
            continue;
        }
        if let Some(bad) = value
            .chars()
            .find(|c| c.is_control() && !matches!(c, '\n' | '\t'))
        {
            err(format!(
                "「{}」に使えない制御文字（U+{:04X}）が含まれています。",
                f.label, bad as u32
            ));
            continue;
        }
        if !f.is_long() && value.contains('\n') {
            err(format!("「{}」は1行で入力してください。", f.label));
            continue;
        }
        let text = match &f.kind {
            FieldKind::Date => match crate::time::parse_jst_date(trimmed) {
                Some(ms) => crate::time::format_wareki(ms),
                None => {
                    err(format!(
                        "「{}」は日付（例: 2026-11-29）で入力してください。",
                        f.label
                    ));
                    continue;
                }
            },
            FieldKind::Choice(opts) => {
                if !opts.iter().any(|o| o == trimmed) {
                    err(format!("「{}」は一覧から選んでください。", f.label));
                    continue;
                }
                trimmed.to_string()
            }
            _ => trimmed.to_string(),
        };
        filled.push((f.spec.clone(), text));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // Substitute in one pass, so typed text that looks like a placeholder stays as typed.
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").unwrap_or(after.len());
        let spec = after[..end].trim();
        if let Some((_, v)) = filled.iter().find(|(s, _)| s.trim() == spec) {
            out.push_str(v);
        } else if let Ok(f) = parse_one(spec) {
            // The same field written a second time (same label and kind).
            if let Some((_, v)) = filled.iter().find(|(s, _)| {
                parse_one(s.trim())
                    .map(|g| g.label == f.label)
                    .unwrap_or(false)
            }) {
                out.push_str(v);
            }
        }
        rest = after.get(end + 2..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(out)
}

/// A template as written by a person or shipped with the product.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TemplateText {
    pub category: String,
    pub title: String,
    pub purpose: String,
    pub guidance: String,
    pub body: String,
}

impl TemplateText {
    /// Checks every part; the errors name the form fields.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut push = |field: &str, message: String| {
            errs.push(FieldError {
                field: field.into(),
                message,
            })
        };
        if !CATEGORIES.contains(&self.category.as_str()) {
            push("category", "分類を一覧から選んでください。".into());
        }
        if let Err(e) = crate::validate::required_line("名前", &self.title, 60) {
            push("title", e);
        }
        if let Err(e) = crate::validate::optional_line("用途", &self.purpose, 200) {
            push("purpose", e);
        }
        if let Err(e) = crate::validate::multi_line("使い方の注意", &self.guidance, 2_000) {
            push("guidance", e);
        }
        if self.body.trim().is_empty() {
            push("body", "プロンプトの本文を入力してください。".into());
        } else if let Err(e) =
            crate::validate::multi_line("プロンプトの本文", &self.body, MAX_BODY_CHARS)
        {
            push("body", e);
        } else if let Err(e) = fields(&self.body) {
            push("body", e);
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// A built-in template: shipped with the product, read-only, versioned.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BuiltIn {
    pub key: String,
    pub version: u32,
    #[serde(flatten)]
    pub text: TemplateText,
}

#[derive(Deserialize)]
struct BuiltInFile {
    templates: Vec<BuiltIn>,
}

static BUILTIN_JSON: &str = include_str!("../data/builtin-templates.json");

/// The built-in templates (checked by a test: each parses and composes).
pub fn builtins() -> &'static [BuiltIn] {
    static LIST: std::sync::OnceLock<Vec<BuiltIn>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        serde_json::from_str::<BuiltInFile>(BUILTIN_JSON)
            .map(|f| f.templates)
            .unwrap_or_default()
    })
}

/// The exchange format for sharing templates between cities.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExchangeFile {
    pub format: String,
    pub version: u32,
    pub templates: Vec<TemplateText>,
}

pub const EXCHANGE_FORMAT: &str = "yakuba-templates";

/// Reads an exchange file; every problem is reported with the template's position.
pub fn parse_exchange(bytes: &[u8]) -> Result<Vec<TemplateText>, Vec<String>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| vec!["ファイルを UTF-8 のテキストとして読めません。".to_string()])?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let file: ExchangeFile = serde_json::from_str(text).map_err(|e| {
        vec![format!(
            "テンプレートのファイル（JSON）として読めません（{}行目付近）。",
            e.line()
        )]
    })?;
    if file.format != EXCHANGE_FORMAT || file.version != 1 {
        return Err(vec![
            "yakuba のテンプレートのファイルではありません（format と version を確認してください）。"
                .into(),
        ]);
    }
    if file.templates.is_empty() {
        return Err(vec!["テンプレートが1件も含まれていません。".into()]);
    }
    if file.templates.len() > 500 {
        return Err(vec!["一度に取り込めるのは500件までです。".into()]);
    }
    let mut errors = Vec::new();
    for (i, t) in file.templates.iter().enumerate() {
        if let Err(es) = t.validate() {
            for e in es {
                errors.push(format!("{}件目（{}）: {}", i + 1, t.title, e.message));
            }
        }
    }
    if errors.is_empty() {
        Ok(file.templates)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fields_come_from_the_body() {
        let body = "件名: {{件名}}\n{{会議録:長文}}\n{{実施日:日付}} {{文体:選択=です・ます調/だ・である調}} {{補足?:長文}} {{件名}}";
        let fs = fields(body).unwrap_or_default();
        assert_eq!(fs.len(), 5);
        assert_eq!(fs[0].label, "件名");
        assert_eq!(fs[1].kind, FieldKind::LongText);
        assert_eq!(fs[2].kind, FieldKind::Date);
        assert_eq!(fs[3].options(), ["です・ます調", "だ・である調"]);
        assert!(!fs[4].required);
        for bad in [
            "{{件名",
            "件名}}",
            "{{件名:色}}",
            "{{:長文}}",
            "{{選択肢:選択=一つ}}",
            "{{a{{b}}",
            "{{件名}} {{件名:長文}}",
            "{{これはとても長い項目名で二十文字を超えています}}",
        ] {
            assert!(fields(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn compose_checks_and_fills() {
        let body = "{{件名}}について{{文体:選択=です・ます調/だ・である調}}で。\n{{本文:長文}}\n{{日:日付}}{{補足?}}。{{件名}}";
        let ok = compose(
            body,
            &vals(&[
                ("f0", "説明会"),
                ("f1", "です・ます調"),
                ("f2", "一行目\r\n二行目 {{件名}}"),
                ("f3", "2026-11-29"),
            ]),
            1_000,
        )
        .unwrap_or_default();
        assert_eq!(
            ok,
            "説明会についてです・ます調で。\n一行目\n二行目 {{件名}}\n令和8年11月29日。説明会"
        );
        let errs = compose(
            body,
            &vals(&[
                ("f1", "敬語"),
                ("f2", &"あ".repeat(1_001)),
                ("f3", "11月29日"),
            ]),
            1_000,
        )
        .err()
        .unwrap_or_default();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["f0", "f1", "f2", "f3"]);
        assert!(errs[0].message.contains("「件名」を入力してください"));
        assert!(errs[2].message.contains("長すぎます"));
        let errs = compose("{{件名}}", &vals(&[("f0", "改行\nあり")]), 10)
            .err()
            .unwrap_or_default();
        assert!(errs[0].message.contains("1行"));
        let errs = compose("{{件名}}", &vals(&[("f0", "ベル\u{7}")]), 10)
            .err()
            .unwrap_or_default();
        assert!(errs[0].message.contains("制御文字"));
    }

    /// Every built-in template parses, is valid, and composes with sample values into a
    /// prompt with nothing left unfilled.
    #[test]
    fn every_builtin_renders_with_sample_values() {
        let list = builtins();
        assert!(list.len() >= 40, "{} built-in templates", list.len());
        let mut keys = std::collections::HashSet::new();
        for b in list {
            assert!(keys.insert(b.key.clone()), "duplicate key {}", b.key);
            assert!(
                b.text.validate().is_ok(),
                "{}: {:?}",
                b.key,
                b.text.validate()
            );
            let fs = fields(&b.text.body).unwrap_or_default();
            let values: HashMap<String, String> = fs
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let v = match &f.kind {
                        FieldKind::Date => "2026-11-29".to_string(),
                        FieldKind::Choice(o) => o[0].clone(),
                        FieldKind::LongText => "試験用の長文です。\n二行目です。".to_string(),
                        FieldKind::Text => "試験用の値".to_string(),
                    };
                    (input_name(i), v)
                })
                .collect();
            let out = compose(&b.text.body, &values, 100_000);
            let out = out.unwrap_or_else(|e| panic!("{}: {e:?}", b.key));
            assert!(!out.contains("{{") && !out.contains("}}"), "{}", b.key);
            assert!(out.contains("試験用") || fs.is_empty(), "{}", b.key);
            if matches!(b.text.category.as_str(), "税務" | "福祉") {
                assert!(
                    b.text.guidance.contains("個人") || b.text.guidance.contains("マイナンバー"),
                    "{} must say what not to enter",
                    b.key
                );
            }
        }
        for c in &CATEGORIES[..13] {
            assert!(
                list.iter().filter(|b| b.text.category == *c).count() >= 2,
                "{c}"
            );
        }
    }

    #[test]
    fn exchange_files_are_checked_whole() {
        let good = serde_json::json!({"format": "yakuba-templates", "version": 1, "templates": [
            {"category": "広報", "title": "記事", "purpose": "", "guidance": "", "body": "{{話題}}の記事"}
        ]})
        .to_string();
        assert_eq!(parse_exchange(good.as_bytes()).map(|v| v.len()), Ok(1));
        let bad = serde_json::json!({"format": "yakuba-templates", "version": 1, "templates": [
            {"category": "広報", "title": "記事", "body": "{{話題}}の記事"},
            {"category": "謎", "title": "", "body": "{{話題"}
        ]})
        .to_string();
        let errs = parse_exchange(bad.as_bytes()).err().unwrap_or_default();
        assert!(errs.iter().all(|e| e.starts_with("2件目")), "{errs:?}");
        assert!(errs.len() >= 3);
        assert!(parse_exchange(b"{").is_err());
        assert!(parse_exchange(b"\xff\xfe").is_err());
        assert!(parse_exchange(br#"{"format":"other","version":1,"templates":[]}"#).is_err());
    }
}
