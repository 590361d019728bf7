//! Prompt templates (M9) in the pages and the API: the list (built-in, tenant-wide,
//! department, personal) with search, categories, favourites and use counts; running a
//! template (form → composed prompt, editable → sent as a chat message); writing, copying,
//! editing and deleting; import and export as JSON.
//!
//! A template is named in URLs by `b.<key>` (built-in) or its id. Who may see or change one
//! is decided by `domain::policy`, and listing filters inside the query.

use crate::app::{Authed, Shared};
use crate::chat::{self, ModelChoice};
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::pages::{render, render_status, Layout};
use askama::Template;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use domain::policy::{self, Decision, TemplatePlace};
use domain::settings::FieldError;
use domain::templates::{self as tpl, Field, TemplateText, CATEGORIES};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use storage::{PromptTemplate, TemplateInput, Viewer};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/templates", get(list_page))
        .route("/templates/new", get(new_page).post(create))
        .route("/templates/import", post(import))
        .route("/templates/export.json", get(export_all))
        .route("/templates/{id}", get(run_page))
        .route("/templates/{id}/compose", post(compose_page))
        .route("/templates/{id}/favourite", post(favourite))
        .route("/templates/{id}/edit", get(edit_page).post(update))
        .route("/templates/{id}/delete", post(delete))
        .route("/templates/{id}/export.json", get(export_one))
        .route("/api/v1/templates", get(api_list))
        .route("/api/v1/templates/{id}/compose", post(api_compose))
}

// ---------------------------------------------------------------- resolving

fn viewer(a: &Authed) -> Viewer {
    let actor = a.actor();
    Viewer {
        user_id: actor.user_id.clone(),
        department_path: actor.department_path.clone(),
        all_departments: actor.role == domain::Role::TenantAdmin,
        admin_subtree: (actor.role == domain::Role::DepartmentAdmin)
            .then(|| actor.department_path.clone()),
    }
}

/// A template the caller may see.
enum Found {
    BuiltIn(&'static tpl::BuiltIn),
    Custom(Box<PromptTemplate>),
}

impl Found {
    fn reference(&self) -> String {
        match self {
            Found::BuiltIn(b) => format!("b.{}", b.key),
            Found::Custom(t) => t.id.clone(),
        }
    }
    /// Key for favourites and use counts.
    fn store_ref(&self) -> String {
        match self {
            Found::BuiltIn(b) => format!("builtin:{}", b.key),
            Found::Custom(t) => t.id.clone(),
        }
    }
    fn text(&self) -> TemplateText {
        match self {
            Found::BuiltIn(b) => b.text.clone(),
            Found::Custom(t) => TemplateText {
                category: t.category.clone(),
                title: t.title.clone(),
                purpose: t.purpose.clone(),
                guidance: t.guidance.clone(),
                body: t.body.clone(),
            },
        }
    }
    fn model_id(&self) -> Option<&str> {
        match self {
            Found::BuiltIn(_) => None,
            Found::Custom(t) => t.model_id.as_deref(),
        }
    }
    /// The knowledge a run asks over: the RAG templates shipped with the product use every
    /// collection the user may read.
    fn knowledge(&self) -> Option<Vec<String>> {
        match self {
            Found::BuiltIn(b) => (b.text.category == "RAG向け").then(Vec::new),
            Found::Custom(t) => t.knowledge.clone(),
        }
    }
}

fn place_of(t: &PromptTemplate) -> TemplatePlace<'_> {
    match t.scope.as_str() {
        "tenant" => TemplatePlace::Tenant,
        "department" => TemplatePlace::Department(t.department_path.as_deref().unwrap_or("")),
        _ => TemplatePlace::Personal(t.owner_id.as_deref().unwrap_or("")),
    }
}

fn scope_label(t: &PromptTemplate) -> String {
    match t.scope.as_str() {
        "tenant" => "全庁".into(),
        "department" => format!("部署: {}", t.department_path.clone().unwrap_or_default()),
        _ => "個人".into(),
    }
}

async fn find(state: &Shared, a: &Authed, r: &str) -> AppResult<Found> {
    chat::require_chat(a)?;
    if let Some(key) = r.strip_prefix("b.") {
        return tpl::builtins()
            .iter()
            .find(|b| b.key == key)
            .map(Found::BuiltIn)
            .ok_or(AppError::NotFound);
    }
    if !domain::ids::is_valid_id(r) {
        return Err(AppError::NotFound);
    }
    let t = state
        .store
        .template(&a.ctx.tenant.id, &viewer(a), r)
        .await?;
    // The query already filtered; the policy is the one place the rule is stated.
    if policy::view_template(a.actor(), &place_of(&t)) != Decision::Allow {
        return Err(AppError::NotFound);
    }
    Ok(Found::Custom(Box::new(t)))
}

async fn find_managed(state: &Shared, a: &Authed, id: &str) -> AppResult<PromptTemplate> {
    match find(state, a, id).await? {
        Found::BuiltIn(_) => Err(AppError::Forbidden),
        Found::Custom(t) => match policy::manage_template(a.actor(), &place_of(&t)) {
            Decision::Allow => Ok(*t),
            Decision::Forbidden => Err(AppError::Forbidden),
            Decision::NotFound => Err(AppError::NotFound),
        },
    }
}

// ---------------------------------------------------------------- list

pub struct Entry {
    pub reference: String,
    pub title: String,
    pub purpose: String,
    pub badge: String,
    pub uses: i64,
    pub favourite: bool,
}

pub struct Group {
    pub category: &'static str,
    pub entries: Vec<Entry>,
}

#[derive(Template)]
#[template(path = "templates/list.html")]
struct ListPage {
    l: Layout,
    q: String,
    category: String,
    fav: bool,
    categories: &'static [&'static str],
    groups: Vec<Group>,
    total: usize,
    notice: String,
    errors: Vec<String>,
    scopes: Vec<(String, String)>,
}

#[derive(Deserialize, Default)]
struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    category: String,
    #[serde(default)]
    fav: String,
    #[serde(default)]
    notice: String,
}

/// Every template the caller may see: (reference, store ref, text, badge).
async fn visible(state: &Shared, a: &Authed) -> AppResult<Vec<(Found, String)>> {
    let mut out: Vec<(Found, String)> = tpl::builtins()
        .iter()
        .map(|b| (Found::BuiltIn(b), "標準".to_string()))
        .collect();
    for t in state
        .store
        .list_templates(&a.ctx.tenant.id, &viewer(a))
        .await?
    {
        let badge = scope_label(&t);
        out.push((Found::Custom(Box::new(t)), badge));
    }
    Ok(out)
}

fn matches(t: &TemplateText, q: &str) -> bool {
    let q = q.trim();
    if q.is_empty() {
        return true;
    }
    let hay = format!("{} {} {} {}", t.title, t.purpose, t.category, t.guidance).to_lowercase();
    q.split_whitespace()
        .all(|w| hay.contains(&w.to_lowercase()))
}

/// Where the caller may put a template: (value, label).
fn scope_choices(a: &Authed, departments: &HashMap<String, String>) -> Vec<(String, String)> {
    let actor = a.actor();
    let mut out = vec![("personal".to_string(), "個人（自分だけ）".to_string())];
    let mut depts: Vec<(&String, &String)> = departments
        .iter()
        .filter(|(_, p)| {
            policy::manage_template(actor, &TemplatePlace::Department(p)) == Decision::Allow
        })
        .collect();
    depts.sort_by(|x, y| x.1.cmp(y.1));
    for (id, p) in depts {
        out.push((format!("department:{id}"), format!("部署: {p}")));
    }
    if policy::manage_template(actor, &TemplatePlace::Tenant) == Decision::Allow {
        out.push(("tenant".to_string(), "全庁".to_string()));
    }
    out
}

async fn list_view(
    state: &Shared,
    a: &Authed,
    q: &ListQuery,
    errors: Vec<String>,
) -> AppResult<ListPage> {
    let favs = state
        .store
        .template_favourites(&a.ctx.tenant.id, &a.auth.user.id)
        .await?;
    let uses = state.store.template_uses(&a.ctx.tenant.id).await?;
    let fav_only = q.fav == "1";
    let mut groups: Vec<Group> = CATEGORIES
        .iter()
        .map(|c| Group {
            category: c,
            entries: Vec::new(),
        })
        .collect();
    let mut total = 0;
    for (f, badge) in visible(state, a).await? {
        let t = f.text();
        let sref = f.store_ref();
        let favourite = favs.contains(&sref);
        if (fav_only && !favourite)
            || (!q.category.is_empty() && t.category != q.category)
            || !matches(&t, &q.q)
        {
            continue;
        }
        if let Some(g) = groups.iter_mut().find(|g| g.category == t.category) {
            total += 1;
            g.entries.push(Entry {
                reference: f.reference(),
                title: t.title,
                purpose: t.purpose,
                badge,
                uses: uses.get(&sref).copied().unwrap_or(0),
                favourite,
            });
        }
    }
    for g in &mut groups {
        g.entries
            .sort_by(|x, y| y.favourite.cmp(&x.favourite).then(y.uses.cmp(&x.uses)));
    }
    groups.retain(|g| !g.entries.is_empty());
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    Ok(ListPage {
        l: Layout::for_user(a, "テンプレート", "templates"),
        q: q.q.clone(),
        category: q.category.clone(),
        fav: fav_only,
        categories: CATEGORIES,
        groups,
        total,
        notice: match q.notice.as_str() {
            "deleted" => "テンプレートを削除しました。".into(),
            n if n.starts_with("imported") => format!(
                "{}件のテンプレートを取り込みました。",
                n.trim_start_matches("imported")
            ),
            _ => String::new(),
        },
        errors,
        scopes: scope_choices(a, &catalog.department_paths),
    })
}

async fn list_page(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<ListQuery>,
) -> AppResult<Response> {
    chat::require_chat(&a)?;
    render(&list_view(&state, &a, &q, Vec::new()).await?)
}

async fn favourite(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    let found = find(&state, &a, &id).await?;
    let on = f.get("on").map(String::as_str) == Some("1");
    state
        .store
        .set_template_favourite(
            &a.ctx.tenant.id,
            &a.auth.user.id,
            &found.store_ref(),
            on,
            a.ctx.now,
        )
        .await?;
    let back = f
        .get("back")
        .filter(|b| b.starts_with("/templates") && !b.starts_with("//"))
        .cloned()
        .unwrap_or_else(|| "/templates".into());
    Ok(Redirect::to(&back).into_response())
}

// ---------------------------------------------------------------- run

pub struct FormField {
    pub name: String,
    pub label: String,
    pub required: bool,
    pub long: bool,
    pub date: bool,
    pub options: Vec<String>,
    pub value: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "templates/run.html")]
struct RunPage {
    l: Layout,
    reference: String,
    t: TemplateText,
    badge: String,
    builtin: bool,
    can_manage: bool,
    fields: Vec<FormField>,
    models: Vec<ModelChoice>,
    selected_model: String,
    composed: String,
    errors: Vec<FieldError>,
    max_chars: u32,
    /// `null`, `[]` (all readable) or the collection ids, for the chat to ask over.
    knowledge_json: String,
    knowledge_note: String,
}

fn form_fields(
    fs: &[Field],
    values: &HashMap<String, String>,
    errors: &[FieldError],
) -> Vec<FormField> {
    fs.iter()
        .enumerate()
        .map(|(i, f)| {
            let name = tpl::input_name(i);
            FormField {
                value: values.get(&name).cloned().unwrap_or_default(),
                error: errors
                    .iter()
                    .filter(|e| e.field == name)
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>()
                    .join(" "),
                name,
                label: f.label.clone(),
                required: f.required,
                long: f.is_long(),
                date: f.is_date(),
                options: f.options().to_vec(),
            }
        })
        .collect()
}

async fn run_view(
    state: &Shared,
    a: &Authed,
    found: &Found,
    values: &HashMap<String, String>,
    composed: String,
    errors: Vec<FieldError>,
    model: Option<&str>,
) -> AppResult<RunPage> {
    let t = found.text();
    let fs = tpl::fields(&t.body).unwrap_or_default();
    let models: Vec<ModelChoice> = chat::usable_models(state, a)
        .await?
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    let wanted = model.or(found.model_id());
    let selected_model = models
        .iter()
        .find(|m| Some(m.id.as_str()) == wanted)
        .or_else(|| models.iter().find(|m| m.is_default))
        .or(models.first())
        .map(|m| m.id.clone())
        .unwrap_or_default();
    let (badge, builtin, can_manage) = match found {
        Found::BuiltIn(_) => ("標準".to_string(), true, false),
        Found::Custom(c) => (
            scope_label(c),
            false,
            policy::manage_template(a.actor(), &place_of(c)) == Decision::Allow,
        ),
    };
    Ok(RunPage {
        l: Layout::for_user(a, &t.title, "templates"),
        reference: found.reference(),
        fields: form_fields(&fs, values, &errors),
        t,
        badge,
        builtin,
        can_manage,
        models,
        selected_model,
        composed,
        errors,
        max_chars: a.ctx.tenant.settings.chat.max_message_chars,
        knowledge_note: match found.knowledge() {
            None => String::new(),
            Some(k) if k.is_empty() => {
                "このテンプレートは、使えるナレッジ（庁内の文書）すべてを根拠に回答させます。"
                    .into()
            }
            Some(k) => format!(
                "このテンプレートは、指定されたナレッジ（{}件）を根拠に回答させます。",
                k.len()
            ),
        },
        knowledge_json: serde_json::to_string(&found.knowledge()).unwrap_or_else(|_| "null".into()),
    })
}

async fn run_page(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let found = find(&state, &a, &id).await?;
    render(
        &run_view(
            &state,
            &a,
            &found,
            &HashMap::new(),
            String::new(),
            Vec::new(),
            None,
        )
        .await?,
    )
}

async fn compose_page(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(values): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    let found = find(&state, &a, &id).await?;
    let max = a.ctx.tenant.settings.chat.max_message_chars as usize;
    let model = values.get("model_id").cloned();
    match tpl::compose(&found.text().body, &values, max) {
        Ok(prompt) => {
            state
                .store
                .record_template_use(&a.ctx.tenant.id, &found.store_ref(), a.ctx.now)
                .await?;
            render(
                &run_view(
                    &state,
                    &a,
                    &found,
                    &values,
                    prompt,
                    Vec::new(),
                    model.as_deref(),
                )
                .await?,
            )
        }
        Err(errors) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &run_view(
                &state,
                &a,
                &found,
                &values,
                String::new(),
                errors,
                model.as_deref(),
            )
            .await?,
        ),
    }
}

// ---------------------------------------------------------------- write

#[derive(Template)]
#[template(path = "templates/edit.html")]
struct EditPage {
    l: Layout,
    action: String,
    heading: String,
    t: TemplateText,
    scope: String,
    scopes: Vec<(String, String)>,
    categories: &'static [&'static str],
    models: Vec<ModelChoice>,
    model_id: String,
    errors: Vec<FieldError>,
    source: String,
    /// `""` none, `all`, `selected`.
    knowledge_mode: String,
    /// (id, label, chosen)
    collections: Vec<(String, String, bool)>,
}

#[derive(Deserialize, Default)]
struct NewQuery {
    #[serde(default)]
    from: String,
}

fn field_errors_of(errors: &[FieldError], field: &str) -> String {
    crate::pages::field_message(errors, field)
}

impl EditPage {
    fn error_for(&self, field: &str) -> String {
        field_errors_of(&self.errors, field)
    }
}

async fn edit_view(
    state: &Shared,
    a: &Authed,
    action: String,
    heading: &str,
    w: Written,
    errors: Vec<FieldError>,
) -> AppResult<EditPage> {
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let models = chat::usable_models(state, a)
        .await?
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    let chosen = w.knowledge.clone().unwrap_or_default();
    let collections = crate::knowledge::readable(state, a)
        .await?
        .into_iter()
        .map(|c| {
            let on = chosen.contains(&c.id);
            (
                c.id,
                format!("{}（機密性{}）", c.name, c.classification),
                on,
            )
        })
        .collect();
    let knowledge_mode = match &w.knowledge {
        None => "",
        Some(k) if k.is_empty() => "all",
        Some(_) => "selected",
    }
    .to_string();
    Ok(EditPage {
        knowledge_mode,
        collections,
        l: Layout::for_user(a, heading, "templates"),
        action,
        heading: heading.to_string(),
        t: w.text,
        scope: w.scope,
        scopes: scope_choices(a, &catalog.department_paths),
        categories: CATEGORIES,
        models,
        model_id: w.model_id,
        errors,
        source: w.source,
    })
}

async fn new_page(
    State(state): State<Shared>,
    a: Authed,
    Query(q): Query<NewQuery>,
) -> AppResult<Response> {
    chat::require_chat(&a)?;
    let (t, source, model, knowledge) = if q.from.is_empty() {
        (
            TemplateText {
                category: "その他".into(),
                ..Default::default()
            },
            String::new(),
            String::new(),
            None,
        )
    } else {
        let f = find(&state, &a, &q.from).await?;
        let mut t = f.text();
        t.title = format!("{}（コピー）", t.title);
        let source = match &f {
            Found::BuiltIn(b) => format!("builtin:{}@{}", b.key, b.version),
            Found::Custom(c) => c.id.clone(),
        };
        (
            t,
            source,
            f.model_id().unwrap_or_default().to_string(),
            f.knowledge(),
        )
    };
    render(
        &edit_view(
            &state,
            &a,
            "/templates/new".into(),
            "テンプレートを作成",
            Written {
                text: t,
                scope: "personal".into(),
                model_id: model,
                source,
                knowledge,
                knowledge_selected: false,
            },
            Vec::new(),
        )
        .await?,
    )
}

/// The form's scope (`personal`, `department:<id>`, `tenant`) as a place the caller may
/// write to, checked by the policy.
fn resolve_scope(
    a: &Authed,
    departments: &HashMap<String, String>,
    scope: &str,
) -> AppResult<(String, Option<String>, Option<String>)> {
    let actor = a.actor();
    let (place, stored) = match scope {
        "personal" => (
            TemplatePlace::Personal(&actor.user_id),
            ("personal".to_string(), None, Some(actor.user_id.clone())),
        ),
        "tenant" => (TemplatePlace::Tenant, ("tenant".to_string(), None, None)),
        s => {
            let Some(id) = s.strip_prefix("department:") else {
                return Err(AppError::field(
                    "scope",
                    "公開範囲を一覧から選んでください。",
                ));
            };
            let Some(path) = departments.get(id) else {
                return Err(AppError::NotFound);
            };
            (
                TemplatePlace::Department(path),
                ("department".to_string(), Some(id.to_string()), None),
            )
        }
    };
    match policy::manage_template(actor, &place) {
        Decision::Allow => Ok(stored),
        Decision::Forbidden => Err(AppError::Forbidden),
        Decision::NotFound => Err(AppError::NotFound),
    }
}

struct Written {
    text: TemplateText,
    scope: String,
    model_id: String,
    source: String,
    knowledge: Option<Vec<String>>,
    /// "Chosen collections" was picked (an empty choice is then an error, not "all").
    knowledge_selected: bool,
}

fn written(f: &HashMap<String, String>) -> Written {
    let g = |k: &str| f.get(k).cloned().unwrap_or_default();
    Written {
        text: TemplateText {
            category: g("category"),
            title: g("title").trim().to_string(),
            purpose: g("purpose").trim().to_string(),
            guidance: g("guidance").replace("\r\n", "\n").trim_end().to_string(),
            body: g("body").replace("\r\n", "\n").trim_end().to_string(),
        },
        scope: g("scope"),
        model_id: g("model_id"),
        source: g("source"),
        knowledge_selected: g("knowledge_mode") == "selected",
        knowledge: match g("knowledge_mode").as_str() {
            "all" => Some(Vec::new()),
            "selected" => {
                let mut ids: Vec<String> = f
                    .keys()
                    .filter_map(|k| k.strip_prefix("kb_"))
                    .map(str::to_string)
                    .collect();
                ids.sort();
                Some(ids)
            }
            _ => None,
        },
    }
}

async fn checked_input(state: &Shared, a: &Authed, w: &Written) -> AppResult<TemplateInput> {
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let (scope, department_id, owner_id) = resolve_scope(a, &catalog.department_paths, &w.scope)?;
    w.text.validate().map_err(AppError::Validation)?;
    let model_id = if w.model_id.is_empty() {
        None
    } else if chat::usable_models(state, a)
        .await?
        .iter()
        .any(|(m, _)| m.id == w.model_id)
    {
        Some(w.model_id.clone())
    } else {
        return Err(AppError::field(
            "model_id",
            "このモデルは選べません。一覧から選び直してください。",
        ));
    };
    if let Some(ids) = &w.knowledge {
        let readable: Vec<String> = crate::knowledge::readable(state, a)
            .await?
            .into_iter()
            .map(|c| c.id)
            .collect();
        if ids.iter().any(|id| !readable.contains(id)) {
            return Err(AppError::field(
                "knowledge",
                "選べないナレッジが含まれています。一覧から選び直してください。",
            ));
        }
        if ids.is_empty() && w.knowledge_selected {
            return Err(AppError::field(
                "knowledge",
                "使うナレッジを1つ以上選んでください（すべてを使う場合は「使えるものすべて」）。",
            ));
        }
    }
    Ok(TemplateInput {
        knowledge: w.knowledge.clone(),
        scope,
        department_id,
        owner_id,
        category: w.text.category.clone(),
        title: w.text.title.clone(),
        purpose: w.text.purpose.clone(),
        guidance: w.text.guidance.clone(),
        body: w.text.body.clone(),
        model_id,
        source_key: (!w.source.is_empty()).then(|| w.source.chars().take(100).collect()),
    })
}

async fn create(
    State(state): State<Shared>,
    a: Authed,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    chat::require_chat(&a)?;
    let w = written(&f);
    match checked_input(&state, &a, &w).await {
        Ok(input) => {
            let ids = state
                .store
                .create_templates(
                    &a.ctx.tenant.id,
                    &[input],
                    &a.auth.user.id,
                    a.ctx.now,
                    a.audit(),
                )
                .await?;
            let id = ids.first().cloned().unwrap_or_default();
            Ok(Redirect::to(&format!("/templates/{id}")).into_response())
        }
        Err(AppError::Validation(errors)) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &edit_view(
                &state,
                &a,
                "/templates/new".into(),
                "テンプレートを作成",
                w,
                errors,
            )
            .await?,
        ),
        Err(e) => Err(e),
    }
}

fn scope_value(t: &PromptTemplate) -> String {
    match t.scope.as_str() {
        "department" => format!("department:{}", t.department_id.clone().unwrap_or_default()),
        s => s.to_string(),
    }
}

async fn edit_page(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let t = find_managed(&state, &a, &id).await?;
    let text = Found::Custom(Box::new(t.clone())).text();
    render(
        &edit_view(
            &state,
            &a,
            format!("/templates/{id}/edit"),
            "テンプレートを編集",
            Written {
                text,
                scope: scope_value(&t),
                model_id: t.model_id.clone().unwrap_or_default(),
                source: String::new(),
                knowledge: t.knowledge.clone(),
                knowledge_selected: false,
            },
            Vec::new(),
        )
        .await?,
    )
}

async fn update(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    find_managed(&state, &a, &id).await?;
    let w = written(&f);
    match checked_input(&state, &a, &w).await {
        Ok(input) => {
            state
                .store
                .update_template(&a.ctx.tenant.id, &id, &input, a.ctx.now, a.audit())
                .await?;
            Ok(Redirect::to(&format!("/templates/{id}")).into_response())
        }
        Err(AppError::Validation(errors)) => render_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            &edit_view(
                &state,
                &a,
                format!("/templates/{id}/edit"),
                "テンプレートを編集",
                w,
                errors,
            )
            .await?,
        ),
        Err(e) => Err(e),
    }
}

async fn delete(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    find_managed(&state, &a, &id).await?;
    state
        .store
        .delete_template(&a.ctx.tenant.id, &id, a.audit())
        .await?;
    Ok(Redirect::to("/templates?notice=deleted").into_response())
}

// ---------------------------------------------------------------- import / export

fn exchange(texts: Vec<TemplateText>) -> Response {
    let file = tpl::ExchangeFile {
        format: tpl::EXCHANGE_FORMAT.into(),
        version: 1,
        templates: texts,
    };
    let body = serde_json::to_string_pretty(&file).unwrap_or_default();
    (
        [
            (header::CONTENT_TYPE, "application/json; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"yakuba-templates.json\"",
            ),
        ],
        body,
    )
        .into_response()
}

async fn export_one(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let f = find(&state, &a, &id).await?;
    Ok(exchange(vec![f.text()]))
}

/// Every template the caller may see that the city wrote (built-in ones ship with yakuba).
async fn export_all(State(state): State<Shared>, a: Authed) -> AppResult<Response> {
    chat::require_chat(&a)?;
    let texts = visible(&state, &a)
        .await?
        .into_iter()
        .filter(|(f, _)| matches!(f, Found::Custom(_)))
        .map(|(f, _)| f.text())
        .collect();
    Ok(exchange(texts))
}

async fn import(State(state): State<Shared>, a: Authed, mp: Multipart) -> AppResult<Response> {
    chat::require_chat(&a)?;
    let up = crate::form::read_upload(mp).await?;
    let file = up.file;
    let scope = up
        .fields
        .get("scope")
        .cloned()
        .unwrap_or_else(|| "personal".into());
    let catalog = state.catalog(&a.ctx.tenant.id).await?;
    let (scope, department_id, owner_id) = resolve_scope(&a, &catalog.department_paths, &scope)?;
    let errors = match file.filter(|b| !b.is_empty()) {
        None => vec!["取り込むファイル（JSON）を選んでください。".to_string()],
        Some(bytes) => match tpl::parse_exchange(&bytes) {
            Ok(texts) => {
                let inputs: Vec<TemplateInput> = texts
                    .into_iter()
                    .map(|t| TemplateInput {
                        scope: scope.clone(),
                        department_id: department_id.clone(),
                        owner_id: owner_id.clone(),
                        category: t.category,
                        title: t.title,
                        purpose: t.purpose,
                        guidance: t.guidance,
                        body: t.body,
                        model_id: None,
                        // Collections are the city's own; an import asks over none.
                        knowledge: None,
                        source_key: Some("import".into()),
                    })
                    .collect();
                let n = inputs.len();
                state
                    .store
                    .create_templates(
                        &a.ctx.tenant.id,
                        &inputs,
                        &a.auth.user.id,
                        a.ctx.now,
                        a.audit(),
                    )
                    .await?;
                return Ok(Redirect::to(&format!("/templates?notice=imported{n}")).into_response());
            }
            Err(errors) => errors,
        },
    };
    render_status(
        StatusCode::UNPROCESSABLE_ENTITY,
        &list_view(&state, &a, &ListQuery::default(), errors).await?,
    )
}

// ---------------------------------------------------------------- API

fn fields_json(body: &str) -> Value {
    serde_json::to_value(tpl::fields(body).unwrap_or_default()).unwrap_or(Value::Null)
}

async fn api_list(State(state): State<Shared>, a: Authed) -> AppResult<Json<Value>> {
    chat::require_chat(&a)?;
    let uses = state.store.template_uses(&a.ctx.tenant.id).await?;
    let list: Vec<Value> = visible(&state, &a)
        .await?
        .into_iter()
        .map(|(f, badge)| {
            let t = f.text();
            json!({
                "id": f.reference(),
                "scope": badge,
                "category": t.category,
                "title": t.title,
                "purpose": t.purpose,
                "guidance": t.guidance,
                "fields": fields_json(&t.body),
                "uses": uses.get(&f.store_ref()).copied().unwrap_or(0),
            })
        })
        .collect();
    Ok(Json(json!({ "templates": list })))
}

#[derive(Deserialize)]
struct ComposeBody {
    /// Values by field label.
    #[serde(default)]
    values: HashMap<String, String>,
}

async fn api_compose(
    State(state): State<Shared>,
    a: Authed,
    Path(id): Path<String>,
    crate::api::JsonBody(b): crate::api::JsonBody<ComposeBody>,
) -> AppResult<Json<Value>> {
    let found = find(&state, &a, &id).await?;
    let body = found.text().body;
    let fs = tpl::fields(&body).unwrap_or_default();
    if let Some(unknown) = b.values.keys().find(|k| !fs.iter().any(|f| &f.label == *k)) {
        return Err(AppError::field(
            "values",
            format!("このテンプレートに「{unknown}」という項目はありません。"),
        ));
    }
    let by_name: HashMap<String, String> = fs
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            b.values
                .get(&f.label)
                .map(|v| (tpl::input_name(i), v.clone()))
        })
        .collect();
    let max = a.ctx.tenant.settings.chat.max_message_chars as usize;
    let prompt = tpl::compose(&body, &by_name, max).map_err(|errs| {
        // Name fields by their labels in the API.
        AppError::Validation(
            errs.into_iter()
                .map(|e| FieldError {
                    field: e
                        .field
                        .strip_prefix('f')
                        .and_then(|n| n.parse::<usize>().ok())
                        .and_then(|i| fs.get(i))
                        .map(|f| f.label.clone())
                        .unwrap_or(e.field),
                    message: e.message,
                })
                .collect(),
        )
    })?;
    state
        .store
        .record_template_use(&a.ctx.tenant.id, &found.store_ref(), a.ctx.now)
        .await?;
    Ok(Json(
        json!({ "prompt": prompt, "model_id": found.model_id() }),
    ))
}
