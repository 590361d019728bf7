//! Range and form of every input (policy S10). Each check returns the cleaned value or a
//! message in Japanese that says what to do, ready to show beside the field.

/// Characters never accepted in text: C0/C1 controls (other than the line breaks and tabs
/// a multi-line field allows), bidirectional overrides that disguise text, and U+FEFF.
fn is_forbidden(c: char, multi_line: bool) -> bool {
    if multi_line && matches!(c, '\n' | '\t') {
        return false;
    }
    c.is_control()
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{FEFF}' | '\u{FFFD}')
}

/// A required one-line text field of at most `max` characters, trimmed.
pub fn required_line(label: &str, value: &str, max: usize) -> Result<String, String> {
    let v = optional_line(label, value, max)?;
    if v.is_empty() {
        return Err(format!("{label}を入力してください。"));
    }
    Ok(v)
}

/// An optional one-line text field; empty when left blank.
pub fn optional_line(label: &str, value: &str, max: usize) -> Result<String, String> {
    let v = value.trim();
    if v.chars().any(|c| is_forbidden(c, false)) {
        return Err(format!(
            "{label}に使用できない文字（制御文字など）が含まれています。取り除いてください。"
        ));
    }
    let n = v.chars().count();
    if n > max {
        return Err(format!(
            "{label}は{max}文字以内で入力してください（現在{n}文字）。"
        ));
    }
    Ok(v.to_string())
}

/// A multi-line text (banner, notes): line breaks normalised to `\n`.
pub fn multi_line(label: &str, value: &str, max: usize) -> Result<String, String> {
    let v = value.replace("\r\n", "\n").replace('\r', "\n");
    let v = v.trim_end();
    if v.chars().any(|c| is_forbidden(c, true)) {
        return Err(format!(
            "{label}に使用できない文字（制御文字など）が含まれています。取り除いてください。"
        ));
    }
    let n = v.chars().count();
    if n > max {
        return Err(format!(
            "{label}は{max}文字以内で入力してください（現在{n}文字）。"
        ));
    }
    Ok(v.to_string())
}

pub const LOGIN_ID_MAX: usize = 64;

/// Login ids: 2–64 of `A-Z a-z 0-9 . _ - @`, starting with a letter or digit; kept in
/// lower case so that `Tanaka01` and `tanaka01` cannot both exist.
pub fn login_id(value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err("ログインIDを入力してください。".into());
    }
    let n = v.chars().count();
    if !(2..=LOGIN_ID_MAX).contains(&n) {
        return Err(format!(
            "ログインIDは2文字以上{LOGIN_ID_MAX}文字以内で入力してください。"
        ));
    }
    let ok_chars = v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    let ok_start = v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok_chars || !ok_start {
        return Err("ログインIDは半角英数字と「. _ - @」で入力し、英数字で始めてください。".into());
    }
    Ok(v.to_ascii_lowercase())
}

/// An optional e-mail address.
pub fn email(value: &str) -> Result<Option<String>, String> {
    let v = optional_line("メールアドレス", value, 254)?;
    if v.is_empty() {
        return Ok(None);
    }
    let bad = || {
        "メールアドレスの形式が正しくありません（例: taro.yamada@city.example.lg.jp）。".to_string()
    };
    let (local, domain) = v.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || v.chars().any(|c| c.is_whitespace() || !c.is_ascii())
    {
        return Err(bad());
    }
    Ok(Some(v))
}

pub const DEPARTMENT_NAME_MAX: usize = 50;
pub const DEPARTMENT_DEPTH_MAX: usize = 6;

/// A department's own name (one level of the tree).
pub fn department_name(value: &str) -> Result<String, String> {
    let v = required_line("部署名", value, DEPARTMENT_NAME_MAX)?;
    if v.contains('/') || v.contains('／') {
        return Err("部署名に「/」は使えません。階層は親部署を選んで作成してください。".into());
    }
    Ok(v)
}

/// A department path such as `総務部/情報政策課` (half- or full-width slashes), cleaned to
/// `総務部/情報政策課`.
pub fn department_path(value: &str) -> Result<String, String> {
    let v = optional_line("所属", value, 400)?;
    if v.is_empty() {
        return Err("所属（部署のパス、例: 総務部/情報政策課）を入力してください。".into());
    }
    let parts: Vec<&str> = v.split(['/', '／']).map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "所属「{v}」の形式が正しくありません（例: 総務部/情報政策課）。"
        ));
    }
    if parts.len() > DEPARTMENT_DEPTH_MAX {
        return Err(format!("所属の階層は{DEPARTMENT_DEPTH_MAX}段までです。"));
    }
    for p in &parts {
        department_name(p)?;
    }
    Ok(parts.join("/"))
}

/// True for loopback, private, link-local, unspecified and similar addresses.
pub fn is_internal_ip(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 0
                || (v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]))
            // carrier-grade NAT
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_ip(IpAddr::V4(v4));
            }
            let seg = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (seg & 0xfe00) == 0xfc00
                || (seg & 0xffc0) == 0xfe80
        }
    }
}

/// The base URL of an LLM provider: http(s), no credentials in it, and — unless the
/// deployment allows internal targets (a city's own vLLM server, tests) — no loopback or
/// private address in any spelling (`127.0.0.1`, `0x7f000001`, `2130706433`,
/// `[::ffff:7f00:1]`, `localhost`).
pub fn provider_url(value: &str, allow_internal: bool) -> Result<String, String> {
    let v = required_line("接続先URL", value, 500)?;
    let v = v.trim_end_matches('/').to_string();
    let lower = v.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
        .ok_or("接続先URLは https:// （閉域網内のサーバーは http:// も可）で始めてください。")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("接続先URLにユーザー名やパスワードを含めないでください。APIキーは専用の欄に入力します。".into());
    }
    if authority.is_empty() || v.chars().any(char::is_whitespace) {
        return Err("接続先URLの形式が正しくありません。".into());
    }
    let host = if let Some(h) = authority.strip_prefix('[') {
        h.split(']').next().unwrap_or("").to_string()
    } else {
        authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
            .to_string()
    };
    // `localhost.` is `localhost`: a trailing dot must not slip past the name checks.
    let host = host.trim_end_matches('.').to_string();
    if !allow_internal {
        let internal_name = host == "localhost"
            || host.ends_with(".localhost")
            || host.ends_with(".local")
            || host.ends_with(".internal");
        let numeric = !host.is_empty()
            && (host.bytes().all(|b| b.is_ascii_digit() || b == b'.') || host.starts_with("0x"));
        let parsed = host.parse::<std::net::IpAddr>().ok();
        let internal =
            internal_name || parsed.is_some_and(is_internal_ip) || (numeric && parsed.is_none());
        if internal {
            return Err("内部ネットワークのアドレスは接続先にできません（この設定はサービス全体の管理者が許可した場合のみ可能です）。".into());
        }
    }
    Ok(v)
}

/// A whole number typed in a form, within a range.
pub fn number_in(label: &str, value: &str, min: i64, max: i64) -> Result<i64, String> {
    let v = value.trim();
    let n: i64 = v
        .parse()
        .map_err(|_| format!("{label}は半角数字で入力してください。"))?;
    if n < min || n > max {
        return Err(format!("{label}は{min}〜{max}の範囲で入力してください。"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_controls_and_bidi_overrides() {
        assert!(required_line("氏名", "山田\u{0007}太郎", 50).is_err());
        assert!(required_line("氏名", "山田\u{202E}太郎", 50).is_err());
        assert!(required_line("氏名", "山田\n太郎", 50).is_err());
        assert!(multi_line("バナー", "一行目\r\n二行目", 50).is_ok());
        assert!(multi_line("バナー", "\u{001b}[31m", 50).is_err());
    }

    #[test]
    fn counts_characters_not_bytes() {
        assert!(required_line("氏名", &"あ".repeat(50), 50).is_ok());
        assert!(required_line("氏名", &"あ".repeat(51), 50).is_err());
    }

    #[test]
    fn login_ids() {
        assert_eq!(
            login_id(" Tanaka.Ichiro ").ok(),
            Some("tanaka.ichiro".into())
        );
        assert!(login_id("a").is_err());
        assert!(login_id("_x").is_err());
        assert!(login_id("田中").is_err());
        assert!(login_id("a b").is_err());
    }

    #[test]
    fn department_paths() {
        assert_eq!(
            department_path("総務部／ 情報政策課").ok(),
            Some("総務部/情報政策課".into())
        );
        assert!(department_path("総務部//情報政策課").is_err());
        assert!(department_path("").is_err());
    }

    #[test]
    fn provider_urls_refuse_internal_targets_in_every_spelling() {
        assert_eq!(
            provider_url("https://api.openai.com/v1/", false).ok(),
            Some("https://api.openai.com/v1".into())
        );
        for bad in [
            "http://127.0.0.1:8000/v1",
            "http://localhost/v1",
            "http://localhost.:8080/v1",
            "http://LOCALHOST./v1",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://[::1]/",
            "http://[::ffff:7f00:1]/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://169.254.169.254/latest",
            "http://user@api.example.jp/",
            "ftp://x.example/",
            "javascript:alert(1)",
            "http://0.0.0.0/",
            "http://[fd00::1]/",
        ] {
            assert!(provider_url(bad, false).is_err(), "{bad}");
        }
        assert!(provider_url("http://127.0.0.1:8000/v1", true).is_ok());
        assert!(provider_url("http://user:pw@127.0.0.1/", true).is_err());
    }

    #[test]
    fn emails() {
        assert_eq!(email("").ok(), Some(None));
        assert!(email("a@b.jp").is_ok());
        assert!(email("a@b").is_err());
        assert!(email("a b@c.jp").is_err());
    }
}
