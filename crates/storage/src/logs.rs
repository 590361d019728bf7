//! The chat log IT staff read (M6): every answer with who asked, from which department,
//! when, with which model, the question and the answer, character counts and status —
//! newest first, filtered, and paged by position (time and id), so a page deep in millions
//! of rows costs the same as the first.

use crate::{get_i64, get_opt_i64, get_opt_str, get_str, like_escape, Result, Store};
use sqlx::any::AnyRow;

#[derive(Clone, Debug, Default)]
pub struct LogFilter {
    /// UTC milliseconds, inclusive.
    pub from_ms: Option<i64>,
    /// UTC milliseconds, exclusive.
    pub to_ms: Option<i64>,
    pub login_id: Option<String>,
    /// A department and everything below it.
    pub department_path: Option<String>,
    pub model_name: Option<String>,
    pub status: Option<String>,
    /// Words that must all appear in the question or the answer.
    pub keyword: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LogRow {
    pub id: String,
    pub at: i64,
    pub login_id: String,
    pub user_name: String,
    pub department_path: String,
    pub conversation_id: String,
    pub conversation_title: String,
    /// The user deleted the conversation (it is kept for the record).
    pub conversation_deleted: bool,
    pub model_name: String,
    pub provider_name: String,
    pub status: String,
    pub question: String,
    pub answer: String,
    pub input_chars: i64,
    pub output_chars: i64,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub total_ms: Option<i64>,
    pub error_code: Option<String>,
}

/// The position after which the next page starts: (time, id) of the last row shown.
pub type LogCursor = (i64, String);

const QUESTION: &str =
    "(SELECT q.content FROM messages q WHERE q.conversation_id = a.conversation_id \
    AND q.role = 'user' AND q.seq < a.seq ORDER BY q.seq DESC LIMIT 1)";

fn from_row(r: &AnyRow) -> Result<LogRow> {
    Ok(LogRow {
        id: get_str(r, "id")?,
        at: get_i64(r, "created_at")?,
        login_id: get_str(r, "login_id")?,
        user_name: get_str(r, "display_name")?,
        department_path: get_str(r, "path")?,
        conversation_id: get_str(r, "conversation_id")?,
        conversation_title: get_str(r, "title")?,
        conversation_deleted: get_opt_i64(r, "deleted_at")?.is_some(),
        model_name: get_opt_str(r, "model_name")?.unwrap_or_default(),
        provider_name: get_opt_str(r, "provider_name")?.unwrap_or_default(),
        status: get_str(r, "status")?,
        question: get_opt_str(r, "question")?.unwrap_or_default(),
        answer: get_str(r, "content")?,
        input_chars: get_i64(r, "input_chars")?,
        output_chars: get_i64(r, "output_chars")?,
        input_tokens: get_opt_i64(r, "input_tokens")?,
        output_tokens: get_opt_i64(r, "output_tokens")?,
        ttft_ms: get_opt_i64(r, "ttft_ms")?,
        total_ms: get_opt_i64(r, "total_ms")?,
        error_code: get_opt_str(r, "error_code")?,
    })
}

enum Arg {
    S(String),
    I(i64),
}

impl Store {
    /// One page of the chat log, newest first, after `cursor`.
    pub async fn chat_logs(
        &self,
        tenant_id: &str,
        f: &LogFilter,
        cursor: Option<&LogCursor>,
        limit: i64,
    ) -> Result<Vec<LogRow>> {
        let mut wh = String::from("a.tenant_id = $1 AND a.role = 'assistant'");
        let mut args = vec![Arg::S(tenant_id.to_string())];
        let mut push = |cond: &str, arg: Arg, wh: &mut String| {
            args.push(arg);
            wh.push_str(&cond.replace("$?", &format!("${}", args.len())));
        };
        if let Some(t) = f.from_ms {
            push(" AND a.created_at >= $?", Arg::I(t), &mut wh);
        }
        if let Some(t) = f.to_ms {
            push(" AND a.created_at < $?", Arg::I(t), &mut wh);
        }
        if let Some(l) = &f.login_id {
            push(" AND u.login_id = $?", Arg::S(l.clone()), &mut wh);
        }
        if let Some(p) = &f.department_path {
            push(
                " AND (d.path = $? OR substr(d.path, 1, length($?) + 1) = $? || '/')",
                Arg::S(p.clone()),
                &mut wh,
            );
        }
        if let Some(m) = &f.model_name {
            push(" AND a.model_name = $?", Arg::S(m.clone()), &mut wh);
        }
        if let Some(s) = &f.status {
            push(" AND a.status = $?", Arg::S(s.clone()), &mut wh);
        }
        if let Some(k) = &f.keyword {
            for word in k.split_whitespace().take(5) {
                push(
                    &format!(
                        " AND (a.content LIKE $? ESCAPE '\\' OR {QUESTION} LIKE $? ESCAPE '\\')"
                    ),
                    Arg::S(format!("%{}%", like_escape(word))),
                    &mut wh,
                );
            }
        }
        if let Some((t, id)) = cursor {
            push(
                " AND (a.created_at < $? OR (a.created_at = $?",
                Arg::I(*t),
                &mut wh,
            );
            push(" AND a.id < $?))", Arg::S(id.clone()), &mut wh);
        }
        args.push(Arg::I(limit));
        let sql = format!(
            "SELECT a.id, a.created_at, a.status, a.model_name, a.provider_name, a.content, a.input_chars, a.output_chars, \
             a.input_tokens, a.output_tokens, a.ttft_ms, a.total_ms, a.error_code, c.id AS conversation_id, c.title, c.deleted_at, \
             u.login_id, u.display_name, d.path, {QUESTION} AS question \
             FROM messages a JOIN conversations c ON c.id = a.conversation_id JOIN users u ON u.id = c.user_id \
             JOIN departments d ON d.id = u.department_id \
             WHERE {wh} ORDER BY a.created_at DESC, a.id DESC LIMIT ${}",
            args.len()
        );
        let mut q = sqlx::query(&sql);
        for a in args {
            q = match a {
                Arg::S(s) => q.bind(s),
                Arg::I(i) => q.bind(i),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(from_row).collect()
    }
}
