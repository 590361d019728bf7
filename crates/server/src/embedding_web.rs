//! 管理 → ナレッジ検索の埋め込みモデル (M8, S14): the tenant admin chooses the embedding
//! model that gives knowledge search its vectors (an OpenAI-compatible or Azure OpenAI
//! connection already set up under AIモデル), the highest class of documents it may
//! receive, and the similarity below which a passage found by vector alone is not used;
//! sees how far the passages are embedded; tests the connection.

use crate::app::{Authed, Shared, TenantAdmin};
use crate::error::AppResult;
use crate::form::Form;
use crate::pages::{render_status, Layout};
use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/knowledge/embedding", get(page).post(save))
        .route("/admin/knowledge/embedding/remove", post(remove))
        .route("/admin/knowledge/embedding/test", post(test))
        .route(
            "/api/v1/admin/knowledge/embedder",
            get(api_get).put(api_put).delete(api_delete),
        )
}

#[derive(Template)]
#[template(path = "admin/embedding.html")]
struct EmbeddingPage {
    l: Layout,
    /// (id, name) of connections that can embed.
    providers: Vec<(String, String)>,
    provider_id: String,
    model: String,
    max_class: String,
    min_score: String,
    configured: bool,
    /// "1,234 / 2,000 件の区切り" and what waits or failed.
    progress: String,
    notice: String,
    ok: bool,
    errors: Vec<String>,
}

struct Typed {
    provider_id: String,
    model: String,
    max_class: String,
    min_score: String,
}

async fn view(
    state: &Shared,
    a: &Authed,
    typed: Option<Typed>,
    notice: String,
    ok: bool,
    errors: Vec<String>,
) -> AppResult<EmbeddingPage> {
    let tenant = &a.ctx.tenant.id;
    let providers = state
        .store
        .list_providers(tenant)
        .await?
        .into_iter()
        .filter(|p| matches!(p.kind.as_str(), "openai" | "azure_openai"))
        .map(|p| {
            let label = format!(
                "{}（{}）{}",
                p.name,
                llm::ProviderKind::parse(&p.kind).map_or("", |k| k.label()),
                if p.enabled { "" } else { "・停止中" }
            );
            (p.id, label)
        })
        .collect();
    let current = state.store.kb_embedder(tenant).await?;
    let progress = match &current {
        Some(e) => {
            let (done, total, waiting, failed) =
                state.store.vector_progress(tenant, &e.key()).await?;
            let mut s = format!("検索用ベクトルを作成済みの区切り: {done} / {total}");
            if waiting > 0 {
                s.push_str(&format!("（作成待ちの文書 {waiting} 件）"));
            }
            if failed > 0 {
                s.push_str(&format!(
                    "。作成に失敗した文書が {failed} 件あります（全文検索では見つかります。接続を確かめて「保存する」を押すと作り直します）"
                ));
            }
            s.push_str("。機密性が上限を超えるナレッジの区切りは、ベクトルを作りません。");
            s
        }
        None => String::new(),
    };
    let typed = typed.unwrap_or_else(|| match &current {
        Some(e) => Typed {
            provider_id: e.provider_id.clone(),
            model: e.model.clone(),
            max_class: e.max_class.to_string(),
            min_score: e.min_score_pct.to_string(),
        },
        None => Typed {
            provider_id: String::new(),
            model: String::new(),
            max_class: "2".into(),
            min_score: "30".into(),
        },
    });
    Ok(EmbeddingPage {
        l: Layout::for_user(a, "ナレッジ検索の埋め込みモデル", "models"),
        providers,
        provider_id: typed.provider_id,
        model: typed.model,
        max_class: typed.max_class,
        min_score: typed.min_score,
        configured: current.is_some(),
        progress,
        notice,
        ok,
        errors,
    })
}

async fn page(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Query(q): Query<HashMap<String, String>>,
) -> AppResult<Response> {
    let notice = match q.get("notice").map(String::as_str) {
        Some("saved") => "保存しました。ナレッジの文書の検索用ベクトルを順に作成します（作成が済むまでは全文検索だけで探します）。",
        Some("unchanged") => "保存しました。",
        Some("removed") => "埋め込みモデルの設定を外しました。ナレッジは全文検索だけで探します。",
        _ => "",
    };
    render_status(
        StatusCode::OK,
        &view(&state, &a, None, notice.into(), true, Vec::new()).await?,
    )
}

fn field(f: &HashMap<String, String>, k: &str) -> String {
    f.get(k).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The form checked: the embedder to store, or the messages to show.
async fn check(
    state: &Shared,
    a: &Authed,
    f: &HashMap<String, String>,
) -> AppResult<Result<storage::Embedder, Vec<String>>> {
    let mut errors = Vec::new();
    let provider_id = field(f, "provider_id");
    let provider = match state.store.provider(&a.ctx.tenant.id, &provider_id).await {
        Ok(p) if matches!(p.kind.as_str(), "openai" | "azure_openai") => Some(p),
        Ok(_) => {
            errors.push("埋め込みに使える接続先は「OpenAI 互換」と「Azure OpenAI」です。".into());
            None
        }
        Err(storage::StorageError::NotFound) => {
            errors.push("接続先を選んでください（先に「AIモデル」で接続先を登録します）。".into());
            None
        }
        Err(e) => return Err(e.into()),
    };
    let model = field(f, "model");
    if let Err(e) = domain::validate::required_line("モデル名", &model, 200) {
        errors.push(e);
    }
    let max_class = domain::validate::number_in("機密性の上限", &field(f, "max_class"), 1, 3);
    if max_class.is_err() {
        errors.push("機密性の上限は1〜3から選んでください。".into());
    }
    let min_score = domain::validate::number_in("関連度の下限", &field(f, "min_score"), 0, 100);
    if min_score.is_err() {
        errors.push("関連度の下限は0〜100（%）で入力してください。".into());
    }
    Ok(match (provider, max_class, min_score, errors.is_empty()) {
        (Some(p), Ok(c), Ok(m), true) => Ok(storage::Embedder {
            provider_id: p.id,
            model,
            max_class: c,
            min_score_pct: m,
            updated_at: 0,
        }),
        _ => Err(errors),
    })
}

/// The form again, as typed, with what is wrong.
async fn refused(
    state: &Shared,
    a: &Authed,
    f: &HashMap<String, String>,
    errors: Vec<String>,
) -> AppResult<Response> {
    render_status(
        StatusCode::UNPROCESSABLE_ENTITY,
        &view(state, a, Some(typed(f)), String::new(), false, errors).await?,
    )
}

fn typed(f: &HashMap<String, String>) -> Typed {
    Typed {
        provider_id: field(f, "provider_id"),
        model: field(f, "model"),
        max_class: field(f, "max_class"),
        min_score: field(f, "min_score"),
    }
}

/// Stores the embedder and sets the vectors going. Returns the documents queued: all of
/// them after a change of model; after saving the same one again, those that failed.
async fn apply(state: &Shared, a: &Authed, e: &storage::Embedder) -> AppResult<u64> {
    let tenant = &a.ctx.tenant.id;
    let before = state.store.kb_embedder(tenant).await?;
    let mut queued = state
        .store
        .set_kb_embedder(tenant, Some(e), a.audit(), state.now())
        .await?;
    if queued == 0 && before.is_some() {
        queued = state.store.retry_failed_embeds(tenant, state.now()).await?;
    }
    state.vectors.drop_tenant(tenant);
    state.ingest.notify_one();
    Ok(queued)
}

/// Removes the embedder and its vectors: search is by words only again.
async fn unset(state: &Shared, a: &Authed) -> AppResult<()> {
    state
        .store
        .set_kb_embedder(&a.ctx.tenant.id, None, a.audit(), state.now())
        .await?;
    state.vectors.drop_tenant(&a.ctx.tenant.id);
    Ok(())
}

async fn save(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    let e = match check(&state, &a, &f).await? {
        Ok(e) => e,
        Err(errors) => return refused(&state, &a, &f, errors).await,
    };
    let queued = apply(&state, &a, &e).await?;
    let notice = if queued > 0 { "saved" } else { "unchanged" };
    Ok(Redirect::to(&format!("/admin/knowledge/embedding?notice={notice}")).into_response())
}

async fn remove(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Form(_f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    unset(&state, &a).await?;
    Ok(Redirect::to("/admin/knowledge/embedding?notice=removed").into_response())
}

/// Embeds a short Japanese sentence with the model as typed (nothing is saved).
async fn test(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    let e = match check(&state, &a, &f).await? {
        Ok(e) => e,
        Err(errors) => return refused(&state, &a, &f, errors).await,
    };
    let p = state
        .store
        .provider(&a.ctx.tenant.id, &e.provider_id)
        .await?;
    let (ok, msg) = match crate::chat::client_for(&state, &p) {
        Err(err) => (false, err.message_ja()),
        Ok(client) => match client
            .embed(&e.model, &["住民票の写しの交付申請について".to_string()])
            .await
        {
            Ok(r) => {
                let dims = r.vectors.first().map_or(0, Vec::len);
                (
                    true,
                    format!("「{}」で埋め込みを作成できました（{dims}次元）。", p.name),
                )
            }
            Err(err) => (
                false,
                format!(
                    "{}（{}）",
                    err.message_ja(),
                    err.detail.chars().take(200).collect::<String>()
                ),
            ),
        },
    };
    let errors = if ok { Vec::new() } else { vec![msg.clone()] };
    let notice = if ok { msg } else { String::new() };
    render_status(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        },
        &view(&state, &a, Some(typed(&f)), notice, ok, errors).await?,
    )
}

// ------------------------------------------------------------------ JSON API

/// The setting and how far the vectors are (`null` setting when none).
async fn api_view(state: &Shared, tenant: &str) -> AppResult<Value> {
    Ok(match state.store.kb_embedder(tenant).await? {
        Some(e) => {
            let (done, total, waiting, failed) =
                state.store.vector_progress(tenant, &e.key()).await?;
            json!({
                "embedder": {"provider_id": e.provider_id, "model": e.model, "max_class": e.max_class, "min_score_pct": e.min_score_pct},
                "passages_embedded": done, "passages": total, "documents_waiting": waiting, "documents_failed": failed,
            })
        }
        None => json!({"embedder": null}),
    })
}

async fn api_get(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
) -> AppResult<axum::Json<Value>> {
    Ok(axum::Json(api_view(&state, &a.ctx.tenant.id).await?))
}

#[derive(serde::Deserialize)]
struct EmbedderBody {
    #[serde(default)]
    provider_id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    max_class: Option<i64>,
    #[serde(default)]
    min_score_pct: Option<i64>,
}

async fn api_put(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    crate::api::JsonBody(b): crate::api::JsonBody<EmbedderBody>,
) -> AppResult<axum::Json<Value>> {
    let f: HashMap<String, String> = [
        ("provider_id", b.provider_id),
        ("model", b.model),
        ("max_class", b.max_class.unwrap_or(2).to_string()),
        ("min_score", b.min_score_pct.unwrap_or(30).to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let e = match check(&state, &a, &f).await? {
        Ok(e) => e,
        Err(errors) => return Err(crate::error::AppError::field("embedder", errors.join(" "))),
    };
    apply(&state, &a, &e).await?;
    Ok(axum::Json(api_view(&state, &a.ctx.tenant.id).await?))
}

async fn api_delete(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
) -> AppResult<StatusCode> {
    unset(&state, &a).await?;
    Ok(StatusCode::NO_CONTENT)
}
