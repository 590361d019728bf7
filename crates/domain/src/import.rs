//! Bulk import of staff accounts from CSV (policy S3).
//!
//! Japanese offices export from Excel, which writes Shift_JIS ("CSV (コンマ区切り)") or
//! UTF-8 with a BOM ("CSV UTF-8"); both are read, and UTF-16 with a BOM too. The whole file
//! is checked before anything is written: the result is either a complete plan or the list
//! of every problem by row.

use crate::validate;
use crate::Role;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};

pub const MAX_ROWS: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImportRow {
    /// Line in the file (1 = header).
    pub line: u64,
    pub login_id: String,
    pub display_name: String,
    pub department_path: String,
    pub role: Role,
    pub email: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RowError {
    /// Line in the file; 0 for problems with the file as a whole.
    pub line: u64,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImportPlan {
    /// Departments that will be created, parents before children.
    pub departments_to_create: Vec<String>,
    pub users: Vec<ImportRow>,
    /// Which encoding the file was read as, for the preview.
    pub encoding: String,
}

fn file_error(message: impl Into<String>) -> Vec<RowError> {
    vec![RowError {
        line: 0,
        message: message.into(),
    }]
}

/// Decodes the bytes of a CSV file, returning the text and the name of the encoding used.
pub fn decode(bytes: &[u8]) -> Result<(String, &'static str), Vec<RowError>> {
    if bytes.is_empty() {
        return Err(file_error("ファイルが空です。"));
    }
    if let Some((enc, bom_len)) = encoding_rs::Encoding::for_bom(bytes) {
        let (text, had_errors) = enc.decode_without_bom_handling(&bytes[bom_len..]);
        if had_errors {
            return Err(file_error(format!(
                "ファイルの文字コード（{}）として読めない部分があります。",
                enc.name()
            )));
        }
        let name = if enc == encoding_rs::UTF_8 {
            "UTF-8（BOM付き）"
        } else {
            "UTF-16"
        };
        return Ok((text.into_owned(), name));
    }
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Ok((s.to_string(), "UTF-8"));
    }
    // Excel's "CSV (コンマ区切り)" on Japanese Windows: code page 932, which encoding_rs
    // implements under the WHATWG name Shift_JIS.
    let (text, _, had_errors) = encoding_rs::SHIFT_JIS.decode(bytes);
    if had_errors {
        return Err(file_error(
            "ファイルの文字コードを判別できません。UTF-8 または Shift_JIS の CSV で保存してください。",
        ));
    }
    Ok((text.into_owned(), "Shift_JIS"))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Col {
    LoginId,
    Name,
    Department,
    Role,
    Email,
}

fn column_of(header: &str) -> Option<Col> {
    let h: String = header
        .trim()
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '_' && *c != '-')
        .collect::<String>()
        .to_lowercase();
    match h.as_str() {
        "loginid" | "login" | "ログインid" | "ログインｉｄ" | "ユーザーid" | "ユーザid"
        | "職員番号" | "id" => Some(Col::LoginId),
        "displayname" | "name" | "氏名" | "表示名" | "名前" => Some(Col::Name),
        "department" | "departmentpath" | "所属" | "部署" | "所属部署" | "部署パス" => {
            Some(Col::Department)
        }
        "role" | "権限" | "ロール" | "役割" => Some(Col::Role),
        "email" | "mail" | "メール" | "メールアドレス" | "e-mail" => Some(Col::Email),
        _ => None,
    }
}

/// Reads and checks every row on its own (form of each field, duplicates inside the file).
pub fn parse(bytes: &[u8]) -> Result<(Vec<ImportRow>, &'static str), Vec<RowError>> {
    let (rows, errors, encoding) = parse_rows(bytes)?;
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok((rows, encoding))
}

/// The rows that are well-formed, and the problems of the others.
type Parsed = (Vec<ImportRow>, Vec<RowError>, &'static str);

fn parse_rows(bytes: &[u8]) -> Result<Parsed, Vec<RowError>> {
    let (text, encoding) = decode(bytes)?;
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());

    let headers = rdr
        .headers()
        .map_err(|_| file_error("1行目（見出し）を読み取れません。"))?
        .clone();
    let mut cols: HashMap<Col, usize> = HashMap::new();
    let mut errors = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        match column_of(h) {
            Some(c) => {
                if cols.insert(c, i).is_some() {
                    errors.push(RowError { line: 1, message: format!("見出し「{h}」が重複しています。") });
                }
            }
            None if h.trim().is_empty() => {}
            None => errors.push(RowError {
                line: 1,
                message: format!(
                    "見出し「{h}」は使えません。使える見出し: ログインID, 氏名, 所属, 権限, メールアドレス"
                ),
            }),
        }
    }
    for (c, label) in [
        (Col::LoginId, "ログインID"),
        (Col::Name, "氏名"),
        (Col::Department, "所属"),
    ] {
        if !cols.contains_key(&c) {
            errors.push(RowError {
                line: 1,
                message: format!("見出しに「{label}」の列がありません。"),
            });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let get = |rec: &csv::StringRecord, c: Col| -> String {
        cols.get(&c)
            .and_then(|&i| rec.get(i))
            .unwrap_or("")
            .to_string()
    };

    let mut rows = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    // Line numbers as a spreadsheet shows them, whatever the line ends (CRLF or LF).
    let line_at = |byte: u64| -> u64 {
        // The reader may place a record's start on the line break before it (CRLF).
        let bytes = text.as_bytes();
        let mut end = (byte as usize).min(bytes.len());
        while end < bytes.len() && (bytes[end] == b'\r' || bytes[end] == b'\n') {
            end += 1;
        }
        bytes[..end].iter().filter(|b| **b == b'\n').count() as u64 + 1
    };
    for (n, rec) in rdr.records().enumerate() {
        let line = n as u64 + 2;
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| line_at(p.byte())).unwrap_or(line);
                errors.push(RowError {
                    line,
                    message: "この行を CSV として読み取れません（引用符の閉じ忘れなど）。".into(),
                });
                continue;
            }
        };
        if rec.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let line = rec.position().map(|p| line_at(p.byte())).unwrap_or(line);
        if rows.len() + errors.len() >= MAX_ROWS {
            return Err(file_error(format!(
                "一度に取り込めるのは{MAX_ROWS}行までです。ファイルを分けてください。"
            )));
        }
        let mut row_errs = Vec::new();
        let login_id = validate::login_id(&get(&rec, Col::LoginId))
            .map_err(|e| row_errs.push(e))
            .ok();
        let display_name = validate::required_line("氏名", &get(&rec, Col::Name), 100)
            .map_err(|e| row_errs.push(e))
            .ok();
        let department_path = validate::department_path(&get(&rec, Col::Department))
            .map_err(|e| row_errs.push(e))
            .ok();
        let role_text = get(&rec, Col::Role);
        let role = Role::parse(&role_text);
        if role.is_none() {
            row_errs.push(format!(
                "権限「{role_text}」は使えません（一般職員・所属管理者・情報管理者・監査担当・サポート担当のいずれか）。"
            ));
        }
        let email = validate::email(&get(&rec, Col::Email))
            .map_err(|e| row_errs.push(e))
            .ok();
        if let Some(id) = &login_id {
            if let Some(first) = seen.get(id) {
                row_errs.push(format!("ログインID「{id}」は{first}行目と重複しています。"));
            } else {
                seen.insert(id.clone(), line);
            }
        }
        match (login_id, display_name, department_path, role, email) {
            (
                Some(login_id),
                Some(display_name),
                Some(department_path),
                Some(role),
                Some(email),
            ) if row_errs.is_empty() => rows.push(ImportRow {
                line,
                login_id,
                display_name,
                department_path,
                role,
                email,
            }),
            _ => errors.extend(
                row_errs
                    .into_iter()
                    .map(|message| RowError { line, message }),
            ),
        }
    }
    if rows.is_empty() && errors.is_empty() {
        return Err(file_error("取り込む行がありません（1行目は見出しです）。"));
    }
    Ok((rows, errors, encoding))
}

/// Checks the rows against what already exists and decides what will be created.
pub fn plan(
    bytes: &[u8],
    existing_departments: &HashSet<String>,
    existing_logins: &HashSet<String>,
    create_missing_departments: bool,
) -> Result<ImportPlan, Vec<RowError>> {
    let (rows, mut errors, encoding) = parse_rows(bytes)?;
    let mut to_create = BTreeSet::new();
    for r in &rows {
        if existing_logins.contains(&r.login_id) {
            errors.push(RowError {
                line: r.line,
                message: format!("ログインID「{}」は既に登録されています。", r.login_id),
            });
        }
        if !existing_departments.contains(&r.department_path) {
            if create_missing_departments {
                let parts: Vec<&str> = r.department_path.split('/').collect();
                for i in 1..=parts.len() {
                    let p = parts[..i].join("/");
                    if !existing_departments.contains(&p) {
                        to_create.insert(p);
                    }
                }
            } else {
                errors.push(RowError {
                    line: r.line,
                    message: format!(
                        "所属「{}」は登録されていません。部署を先に作成するか、「存在しない部署を作成する」を選んでください。",
                        r.department_path
                    ),
                });
            }
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Err(errors);
    }
    let mut departments_to_create: Vec<String> = to_create.into_iter().collect();
    departments_to_create.sort_by_key(|p| (p.matches('/').count(), p.clone()));
    Ok(ImportPlan {
        departments_to_create,
        users: rows,
        encoding: encoding.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_shift_jis_from_excel() {
        let text = "ログインID,氏名,所属,権限,メールアドレス\r\nyamada01,山田 花子,総務部/情報政策課,一般職員,\r\n";
        let (bytes, _, _) = encoding_rs::SHIFT_JIS.encode(text);
        let p = plan(
            &bytes,
            &set(&["総務部", "総務部/情報政策課"]),
            &set(&[]),
            false,
        )
        .unwrap();
        assert_eq!(p.encoding, "Shift_JIS");
        assert_eq!(p.users[0].display_name, "山田 花子");
        assert_eq!(p.users[0].department_path, "総務部/情報政策課");
    }

    #[test]
    fn reads_utf8_with_bom_and_english_headers() {
        let bytes = "\u{feff}login_id,display_name,department,role,email\nsato,佐藤 一郎,税務部,tenant_admin,sato@city.example.lg.jp\n".as_bytes();
        let p = plan(bytes, &set(&["税務部"]), &set(&[]), false).unwrap();
        assert_eq!(p.encoding, "UTF-8（BOM付き）");
        assert_eq!(p.users[0].role, Role::TenantAdmin);
    }

    #[test]
    fn lists_every_problem_by_line() {
        let bytes = "ログインID,氏名,所属\nok01,正常,総務部\nok01,重複,総務部\n,名無し,総務部\nbad02,,総務部\nbad03,未登録,存在しない部\n".as_bytes();
        let errs = plan(bytes, &set(&["総務部"]), &set(&[]), false).unwrap_err();
        let lines: Vec<u64> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4, 5, 6]);
        assert!(errs[0].message.contains("2行目と重複"));
    }

    #[test]
    fn line_numbers_with_crlf() {
        let bytes = "ログインID,氏名,所属\r\nok1,正常,総務部\r\nbad id,誤り,総務部\r\n".as_bytes();
        let errs = plan(bytes, &set(&["総務部"]), &set(&[]), false).unwrap_err();
        assert_eq!(errs[0].line, 3);
    }

    #[test]
    fn existing_login_is_an_error() {
        let bytes = "ログインID,氏名,所属\ntaken,既存,総務部\n".as_bytes();
        let errs = plan(bytes, &set(&["総務部"]), &set(&["taken"]), false).unwrap_err();
        assert!(errs[0].message.contains("既に登録"));
    }

    #[test]
    fn creates_missing_departments_parents_first() {
        let bytes = "ログインID,氏名,所属\na1,甲,福祉部/介護保険課/認定係\n".as_bytes();
        let p = plan(bytes, &set(&[]), &set(&[]), true).unwrap();
        assert_eq!(
            p.departments_to_create,
            vec!["福祉部", "福祉部/介護保険課", "福祉部/介護保険課/認定係"]
        );
    }

    #[test]
    fn unknown_headers_and_garbage() {
        assert!(plan(b"foo,bar\n1,2\n", &set(&[]), &set(&[]), false).is_err());
        assert!(plan(b"", &set(&[]), &set(&[]), false).is_err());
        assert!(plan(&[0xff, 0xfe, 0xfd, 0x00, 0x81], &set(&[]), &set(&[]), false).is_err());
        assert!(plan(
            "ログインID,氏名,所属\n".as_bytes(),
            &set(&[]),
            &set(&[]),
            false
        )
        .is_err());
    }
}
