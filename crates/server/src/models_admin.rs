//! Providers and models, for tenant admins: where LLM traffic goes (with the data location
//! and no-training facts of S18), which models staff see, which departments may use each,
//! the default, and a connection test that reports the provider's answer in Japanese.

use crate::api::JsonBody;
use crate::app::{Shared, TenantAdmin};
use crate::error::{AppError, AppResult};
use crate::form::Form;
use crate::pages::{render_status, Layout};
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use domain::settings::FieldError;
use domain::validate;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use storage::{ModelInput, Provider, ProviderInput};

/// A provider as shown to admins: the key is never sent back, only whether one is set.
#[derive(Serialize)]
pub struct ProviderView {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub kind_label: &'static str,
    pub base_url: String,
    pub api_version: Option<String>,
    pub proxy: Option<String>,
    pub region: String,
    pub no_training: bool,
    pub enabled: bool,
    pub key_set: bool,
}

impl ProviderView {
    fn of(p: &Provider) -> ProviderView {
        ProviderView {
            id: p.id.clone(),
            name: p.name.clone(),
            kind: p.kind.clone(),
            kind_label: llm::ProviderKind::parse(&p.kind)
                .map(|k| k.label())
                .unwrap_or("不明"),
            base_url: p.base_url.clone(),
            api_version: p.api_version.clone(),
            proxy: p.proxy.clone(),
            region: p.region.clone(),
            no_training: p.no_training,
            enabled: p.enabled,
            key_set: !p.api_key.is_empty(),
        }
    }
}

#[derive(Deserialize, Default, Clone)]
pub struct ProviderForm {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub base_url: String,
    #[serde(default)]
    pub api_key: String,
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub proxy: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub no_training: Option<String>,
    #[serde(default)]
    pub enabled: Option<String>,
}

fn flag(v: &Option<String>) -> bool {
    matches!(v.as_deref(), Some("1" | "true" | "on" | "yes"))
}

fn fe(field: &str, m: String) -> FieldError {
    FieldError {
        field: field.into(),
        message: m,
    }
}

fn check_provider(state: &Shared, f: &ProviderForm, creating: bool) -> AppResult<ProviderInput> {
    let mut errs = Vec::new();
    let name = validate::required_line("接続先の名前", &f.name, 100)
        .map_err(|e| errs.push(fe("name", e)))
        .ok();
    let kind = llm::ProviderKind::parse(&f.kind);
    if kind.is_none() {
        errs.push(fe("kind", "種類を選んでください。".into()));
    }
    let local = kind.is_some_and(llm::ProviderKind::is_local);
    let base_url = if local {
        // A file of the operator's models folder, by name: no other server path.
        let name = f.base_url.trim();
        match crate::local_models::resolve(&state.config, name) {
            Some(path) if path.is_file() => Some(name.to_string()),
            _ => {
                errs.push(fe(
                    "base_url",
                    format!(
                        "モデルファイルは、モデル用フォルダ（{}）にある .gguf ファイルの名前で指定してください。",
                        state.config.models_dir().display()
                    ),
                ));
                None
            }
        }
    } else {
        validate::provider_url(&f.base_url, state.config.llm.allow_internal_provider_urls)
            .map_err(|e| errs.push(fe("base_url", e)))
            .ok()
    };
    let api_key = validate::optional_line("APIキー", &f.api_key, 500)
        .map_err(|e| errs.push(fe("api_key", e)))
        .ok();
    if creating && !local && api_key.as_deref().is_some_and(str::is_empty) {
        errs.push(fe(
            "api_key",
            "APIキーを入力してください（閉域網内のサーバーで不要な場合は任意の文字列）。".into(),
        ));
    }
    let api_version = validate::optional_line("APIバージョン", &f.api_version, 50)
        .map_err(|e| errs.push(fe("api_version", e)))
        .ok();
    let proxy = match validate::optional_line("プロキシ", &f.proxy, 500) {
        Ok(p) if p.is_empty() => Some(None),
        Ok(p) if p.starts_with("http://") || p.starts_with("https://") => Some(Some(p)),
        Ok(_) => {
            errs.push(fe(
                "proxy",
                "プロキシは http:// または https:// で始めてください。".into(),
            ));
            None
        }
        Err(e) => {
            errs.push(fe("proxy", e));
            None
        }
    };
    let region = validate::required_line("データの処理場所", &f.region, 100)
        .map_err(|e| errs.push(fe("region", e)))
        .ok();
    match (
        name,
        kind,
        base_url,
        api_key,
        api_version,
        proxy,
        region,
        errs.is_empty(),
    ) {
        (
            Some(name),
            Some(kind),
            Some(base_url),
            Some(api_key),
            Some(api_version),
            Some(proxy),
            Some(region),
            true,
        ) => Ok(ProviderInput {
            name,
            kind: kind.as_str().to_string(),
            base_url,
            api_key,
            api_version: Some(api_version).filter(|v| !v.is_empty()),
            proxy,
            region,
            no_training: flag(&f.no_training),
            enabled: flag(&f.enabled),
        }),
        _ => Err(AppError::Validation(errs)),
    }
}

#[derive(Deserialize, Default, Clone)]
pub struct ModelForm {
    #[serde(default)]
    pub provider_id: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub enabled: Option<String>,
    #[serde(default)]
    pub is_default: Option<String>,
    /// Empty: every department. Otherwise department ids, comma separated (API).
    #[serde(default)]
    pub departments: String,
    /// The highest class of information the model may receive: 1–3 (empty: 2).
    #[serde(default)]
    pub max_class: String,
    /// The page's checkboxes, one `dept_<id>` field per chosen department.
    #[serde(flatten)]
    pub extra: std::collections::HashMap<String, String>,
}

fn check_model(f: &ModelForm) -> AppResult<ModelInput> {
    let mut errs = Vec::new();
    if !domain::ids::is_valid_id(&f.provider_id) {
        errs.push(fe("provider_id", "接続先を選んでください。".into()));
    }
    let model = validate::required_line("モデルID", &f.model, 200)
        .map_err(|e| errs.push(fe("model", e)))
        .ok();
    let display = validate::required_line("表示名", &f.display_name, 100)
        .map_err(|e| errs.push(fe("display_name", e)))
        .ok();
    let mut department_ids: Vec<String> = f
        .departments
        .split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    department_ids.extend(
        f.extra
            .keys()
            .filter_map(|k| k.strip_prefix("dept_"))
            .map(str::to_string),
    );
    department_ids.sort();
    department_ids.dedup();
    if department_ids.iter().any(|d| !domain::ids::is_valid_id(d)) {
        errs.push(fe("departments", "部署の指定が正しくありません。".into()));
    }
    let max_class = match f.max_class.trim() {
        "" | "2" => 2,
        "1" => 1,
        "3" => 3,
        _ => {
            errs.push(fe(
                "max_class",
                "扱える機密性は1〜3から選んでください。".into(),
            ));
            2
        }
    };
    match (model, display, errs.is_empty()) {
        (Some(model), Some(display_name), true) => Ok(ModelInput {
            max_class,
            provider_id: f.provider_id.clone(),
            model,
            display_name,
            enabled: flag(&f.enabled),
            is_default: flag(&f.is_default),
            all_departments: department_ids.is_empty(),
            department_ids,
        }),
        _ => Err(AppError::Validation(errs)),
    }
}

/// [`check_model`], with the class default of the provider: a model run on this server
/// may receive up to 機密性3 unless the admin chose otherwise; cloud models up to 2.
async fn check_model_for(state: &Shared, tenant: &str, f: &ModelForm) -> AppResult<ModelInput> {
    let mut input = check_model(f)?;
    if f.max_class.trim().is_empty() {
        if let Ok(p) = state.store.provider(tenant, &input.provider_id).await {
            if llm::ProviderKind::parse(&p.kind).is_some_and(llm::ProviderKind::is_local) {
                input.max_class = 3;
            }
        }
    }
    Ok(input)
}

/// Tries the provider with a tiny request; the answer in plain Japanese.
async fn test_provider(state: &Shared, p: &Provider, model: &str) -> (bool, String) {
    let client = match crate::chat::client_for(state, p) {
        Ok(c) => c,
        Err(e) => return (false, e.message_ja()),
    };
    match client.test_connection(model).await {
        Ok(()) => (
            true,
            format!("「{}」に接続できました（モデル {model}）。", p.name),
        ),
        Err(e) => (
            false,
            format!(
                "{}（{}）",
                e.message_ja(),
                e.detail.chars().take(200).collect::<String>()
            ),
        ),
    }
}

// ---------------------------------------------------------------- page

pub struct ModelRow {
    pub id: String,
    pub display_name: String,
    pub model: String,
    pub provider_name: String,
    pub enabled: bool,
    pub is_default: bool,
    pub departments: String,
}

#[derive(Template)]
#[template(path = "admin/models.html")]
struct ModelsPage {
    l: Layout,
    providers: Vec<ProviderView>,
    models: Vec<ModelRow>,
    departments: Vec<(String, String)>,
    kinds: Vec<(&'static str, &'static str)>,
    /// GGUF files of the models folder that can be run here.
    local_files: Vec<LocalRow>,
    models_dir: String,
    notice: String,
    test_ok: bool,
    errors: Vec<FieldError>,
    pf: ProviderForm,
    mf: ModelForm,
    /// (time in JST, where, code, the provider's error) of recent failures (S9).
    failures: Vec<(String, String, String, String)>,
}

pub struct LocalRow {
    pub name: String,
    pub summary: String,
    /// Pre-trained only: labelled as a demo that does not follow instructions.
    pub base: bool,
    pub usable: bool,
}

/// What the page shows besides the lists: a notice, errors, and the forms as typed.
#[derive(Default)]
struct Shown {
    notice: String,
    test_ok: bool,
    errors: Vec<FieldError>,
    pf: ProviderForm,
    mf: ModelForm,
}

impl Shown {
    /// Empty forms with the usual choices ticked.
    fn fresh() -> Shown {
        Shown {
            pf: ProviderForm {
                enabled: Some("1".into()),
                no_training: Some("1".into()),
                ..Default::default()
            },
            mf: ModelForm {
                enabled: Some("1".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

async fn models_page(
    state: &Shared,
    a: &crate::app::Authed,
    status: StatusCode,
    shown: Shown,
) -> AppResult<Response> {
    let Shown {
        notice,
        test_ok,
        errors,
        pf,
        mf,
    } = shown;
    let tenant = &a.ctx.tenant.id;
    let depts = state.store.list_departments(tenant).await?;
    let models = state.store.list_models(tenant).await?;
    let rows = models
        .iter()
        .map(|m| ModelRow {
            id: m.id.clone(),
            display_name: m.display_name.clone(),
            model: m.model.clone(),
            provider_name: m.provider_name.clone(),
            enabled: m.enabled,
            is_default: m.is_default,
            departments: if m.all_departments {
                "すべての部署".into()
            } else {
                m.department_ids
                    .iter()
                    .filter_map(|id| depts.iter().find(|d| &d.id == id))
                    .map(|d| d.path.clone())
                    .collect::<Vec<_>>()
                    .join("、")
            },
        })
        .collect();
    render_status(
        status,
        &ModelsPage {
            l: Layout::for_user(a, "AIモデル", "models"),
            providers: state
                .store
                .list_providers(tenant)
                .await?
                .iter()
                .map(ProviderView::of)
                .collect(),
            models: rows,
            departments: depts
                .iter()
                .map(|d| (d.id.clone(), d.path.clone()))
                .collect(),
            kinds: kinds(),
            local_files: {
                let config = state.config.clone();
                tokio::task::spawn_blocking(move || crate::local_models::list_files(&config))
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|f| LocalRow {
                        summary: f.summary(),
                        base: f.base_model(),
                        usable: f.info.is_ok(),
                        name: f.name,
                    })
                    .collect()
            },
            models_dir: state.config.models_dir().display().to_string(),
            notice,
            test_ok,
            errors,
            pf,
            mf,
            failures: state
                .store
                .list_failures(tenant, 20)
                .await?
                .into_iter()
                .map(|(at, source, code, detail)| {
                    let source = if source == "chat" {
                        "チャット".to_string()
                    } else {
                        source
                    };
                    (
                        domain::time::format_jst_compact(at),
                        source,
                        code,
                        detail.chars().take(300).collect(),
                    )
                })
                .collect(),
        },
    )
}

#[derive(Deserialize, Default)]
struct NoticeQuery {
    #[serde(default)]
    notice: String,
}

async fn page(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Query(q): Query<NoticeQuery>,
) -> AppResult<Response> {
    let notice = match q.notice.as_str() {
        "provider" => "接続先を保存しました。",
        "model" => "モデルを保存しました。",
        "local" => "ローカルモデルを登録しました。職員のチャットで選べます（機密性3まで）。",
        _ => "",
    };
    models_page(
        &state,
        &a,
        StatusCode::OK,
        Shown {
            notice: notice.into(),
            test_ok: true,
            ..Shown::fresh()
        },
    )
    .await
}

async fn provider_create(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Form(f): Form<ProviderForm>,
) -> AppResult<Response> {
    let saved = match check_provider(&state, &f, true) {
        Ok(input) => state
            .store
            .save_provider(&a.ctx.tenant.id, None, &input, a.ctx.now, a.audit())
            .await
            .map_err(AppError::from),
        Err(e) => Err(e),
    };
    match saved {
        Ok(_) => Ok(Redirect::to("/admin/models?notice=provider").into_response()),
        Err(AppError::Validation(errors)) => {
            models_page(
                &state,
                &a,
                StatusCode::UNPROCESSABLE_ENTITY,
                Shown {
                    notice: String::new(),
                    test_ok: true,
                    errors,
                    pf: f,
                    mf: ModelForm::default(),
                },
            )
            .await
        }
        Err(AppError::Conflict(m)) => {
            models_page(
                &state,
                &a,
                StatusCode::CONFLICT,
                Shown {
                    test_ok: true,
                    errors: vec![fe("name", m)],
                    pf: f,
                    ..Default::default()
                },
            )
            .await
        }
        Err(e) => Err(e),
    }
}

#[derive(Deserialize, Default)]
struct LocalForm {
    #[serde(default)]
    file: String,
}

/// One step from a GGUF file in the models folder to a model staff can choose: the local
/// provider for that file (reused when it exists) and a model that may receive up to
/// 機密性3, the default when the tenant has no default yet.
async fn local_add(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Form(f): Form<LocalForm>,
) -> AppResult<Response> {
    let tenant = a.ctx.tenant.id.clone();
    let config = state.config.clone();
    let files = tokio::task::spawn_blocking(move || crate::local_models::list_files(&config))
        .await
        .unwrap_or_default();
    let Some(file) = files.into_iter().find(|x| x.name == f.file) else {
        return Err(AppError::Validation(vec![fe(
            "file",
            "モデル用フォルダにそのファイルはありません。".into(),
        )]));
    };
    let info = file
        .info
        .clone()
        .map_err(|e| AppError::Validation(vec![fe("file", e)]))?;
    crate::local_models::register(&state, &tenant, &file.name, &info, a.audit())
        .await
        .map_err(|e| match AppError::from(e) {
            AppError::Conflict(m) => AppError::Validation(vec![fe("file", m)]),
            other => other,
        })?;
    Ok(Redirect::to("/admin/models?notice=local").into_response())
}

#[derive(Deserialize)]
struct ToggleForm {
    #[serde(default)]
    enabled: Option<String>,
}

#[derive(Template)]
#[template(path = "admin/model_edit.html")]
struct EditPage {
    l: Layout,
    heading: String,
    id: String,
    errors: Vec<FieldError>,
    provider: Option<ProviderForm>,
    model: Option<ModelForm>,
    kinds: Vec<(&'static str, &'static str)>,
    providers: Vec<(String, String)>,
    /// (id, path, chosen)
    departments: Vec<(String, String, bool)>,
}

fn kinds() -> Vec<(&'static str, &'static str)> {
    llm::ProviderKind::ALL
        .iter()
        .map(|k| (k.as_str(), k.label()))
        .collect()
}

async fn edit_page(
    state: &Shared,
    a: &crate::app::Authed,
    status: StatusCode,
    id: &str,
    errors: Vec<FieldError>,
    provider: Option<ProviderForm>,
    model: Option<ModelForm>,
) -> AppResult<Response> {
    let tenant = &a.ctx.tenant.id;
    let chosen: Vec<String> = model
        .as_ref()
        .map(|m| {
            m.extra
                .keys()
                .filter_map(|k| k.strip_prefix("dept_"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let departments = state
        .store
        .list_departments(tenant)
        .await?
        .into_iter()
        .map(|d| {
            let on = chosen.contains(&d.id);
            (d.id, d.path, on)
        })
        .collect();
    let heading = if provider.is_some() {
        "接続先の編集"
    } else {
        "モデルの編集"
    };
    render_status(
        status,
        &EditPage {
            l: Layout::for_user(a, heading, "models"),
            heading: heading.into(),
            id: id.to_string(),
            errors,
            provider,
            model,
            kinds: kinds(),
            providers: state
                .store
                .list_providers(tenant)
                .await?
                .into_iter()
                .map(|p| (p.id, p.name))
                .collect(),
            departments,
        },
    )
}

fn on(v: bool) -> Option<String> {
    v.then(|| "1".to_string())
}

async fn provider_edit(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
) -> AppResult<Response> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    let p = state.store.provider(&a.ctx.tenant.id, &id).await?;
    let form = ProviderForm {
        name: p.name,
        kind: p.kind,
        base_url: p.base_url,
        api_key: String::new(),
        api_version: p.api_version.unwrap_or_default(),
        proxy: p.proxy.unwrap_or_default(),
        region: p.region,
        no_training: on(p.no_training),
        enabled: on(p.enabled),
    };
    edit_page(
        &state,
        &a,
        StatusCode::OK,
        &id,
        Vec::new(),
        Some(form),
        None,
    )
    .await
}

async fn provider_update(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    Form(f): Form<ProviderForm>,
) -> AppResult<Response> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    state.store.provider(&a.ctx.tenant.id, &id).await?;
    let saved = match check_provider(&state, &f, false) {
        Ok(input) => state
            .store
            .save_provider(&a.ctx.tenant.id, Some(&id), &input, a.ctx.now, a.audit())
            .await
            .map_err(AppError::from),
        Err(e) => Err(e),
    };
    match saved {
        Ok(_) => Ok(Redirect::to("/admin/models?notice=provider").into_response()),
        Err(AppError::Validation(errors)) => {
            edit_page(
                &state,
                &a,
                StatusCode::UNPROCESSABLE_ENTITY,
                &id,
                errors,
                Some(f),
                None,
            )
            .await
        }
        Err(AppError::Conflict(m)) => {
            edit_page(
                &state,
                &a,
                StatusCode::CONFLICT,
                &id,
                vec![fe("name", m)],
                Some(f),
                None,
            )
            .await
        }
        Err(e) => Err(e),
    }
}

async fn model_edit(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
) -> AppResult<Response> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    let m = state.store.model(&a.ctx.tenant.id, &id).await?;
    let form = ModelForm {
        provider_id: m.provider_id,
        model: m.model,
        display_name: m.display_name,
        enabled: on(m.enabled),
        is_default: on(m.is_default),
        departments: String::new(),
        max_class: m.max_class.to_string(),
        extra: m
            .department_ids
            .iter()
            .map(|d| (format!("dept_{d}"), "1".to_string()))
            .collect(),
    };
    edit_page(
        &state,
        &a,
        StatusCode::OK,
        &id,
        Vec::new(),
        None,
        Some(form),
    )
    .await
}

async fn model_update(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    Form(f): Form<ModelForm>,
) -> AppResult<Response> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    state.store.model(&a.ctx.tenant.id, &id).await?;
    let saved = match check_model_for(&state, &a.ctx.tenant.id, &f).await {
        Ok(input) => state
            .store
            .save_model(&a.ctx.tenant.id, Some(&id), &input, a.ctx.now, a.audit())
            .await
            .map_err(model_error),
        Err(e) => Err(e),
    };
    match saved {
        Ok(_) => Ok(Redirect::to("/admin/models?notice=model").into_response()),
        Err(AppError::Validation(errors)) => {
            edit_page(
                &state,
                &a,
                StatusCode::UNPROCESSABLE_ENTITY,
                &id,
                errors,
                None,
                Some(f),
            )
            .await
        }
        Err(AppError::Conflict(m)) => {
            edit_page(
                &state,
                &a,
                StatusCode::CONFLICT,
                &id,
                vec![fe("display_name", m)],
                None,
                Some(f),
            )
            .await
        }
        Err(e) => Err(e),
    }
}

async fn provider_toggle(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    Form(f): Form<ToggleForm>,
) -> AppResult<Response> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    let p = state.store.provider(&a.ctx.tenant.id, &id).await?;
    let input = ProviderInput {
        name: p.name,
        kind: p.kind,
        base_url: p.base_url,
        api_key: String::new(),
        api_version: p.api_version,
        proxy: p.proxy,
        region: p.region,
        no_training: p.no_training,
        enabled: flag(&f.enabled),
    };
    state
        .store
        .save_provider(&a.ctx.tenant.id, Some(&id), &input, a.ctx.now, a.audit())
        .await?;
    Ok(Redirect::to("/admin/models?notice=provider").into_response())
}

#[derive(Deserialize)]
struct TestForm {
    #[serde(default)]
    model: String,
}

async fn provider_test(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    Form(f): Form<TestForm>,
) -> AppResult<Response> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    let p = state.store.provider(&a.ctx.tenant.id, &id).await?;
    let model = validate::required_line("モデルID", &f.model, 200)
        .map_err(|e| AppError::field("model", e))?;
    let (ok, message) = test_provider(&state, &p, &model).await;
    models_page(
        &state,
        &a,
        StatusCode::OK,
        Shown {
            notice: message,
            test_ok: ok,
            ..Shown::fresh()
        },
    )
    .await
}

async fn model_create(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Form(f): Form<ModelForm>,
) -> AppResult<Response> {
    let saved = match check_model_for(&state, &a.ctx.tenant.id, &f).await {
        Ok(input) => state
            .store
            .save_model(&a.ctx.tenant.id, None, &input, a.ctx.now, a.audit())
            .await
            .map_err(|e| match e {
                storage::StorageError::NotFound => {
                    AppError::field("provider_id", "接続先または部署が見つかりません。")
                }
                other => other.into(),
            }),
        Err(e) => Err(e),
    };
    match saved {
        Ok(_) => Ok(Redirect::to("/admin/models?notice=model").into_response()),
        Err(AppError::Validation(errors)) => {
            models_page(
                &state,
                &a,
                StatusCode::UNPROCESSABLE_ENTITY,
                Shown {
                    notice: String::new(),
                    test_ok: true,
                    errors,
                    pf: ProviderForm::default(),
                    mf: f,
                },
            )
            .await
        }
        Err(AppError::Conflict(m)) => {
            models_page(
                &state,
                &a,
                StatusCode::CONFLICT,
                Shown {
                    test_ok: true,
                    errors: vec![fe("display_name", m)],
                    mf: f,
                    ..Default::default()
                },
            )
            .await
        }
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
struct ModelToggleForm {
    #[serde(default)]
    enabled: Option<String>,
    #[serde(default)]
    is_default: Option<String>,
}

async fn model_toggle(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    Form(f): Form<ModelToggleForm>,
) -> AppResult<Response> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    let m = state.store.model(&a.ctx.tenant.id, &id).await?;
    let input = ModelInput {
        provider_id: m.provider_id,
        model: m.model,
        display_name: m.display_name,
        enabled: f
            .enabled
            .as_ref()
            .map(|_| flag(&f.enabled))
            .unwrap_or(m.enabled),
        is_default: f
            .is_default
            .as_ref()
            .map(|_| flag(&f.is_default))
            .unwrap_or(m.is_default),
        all_departments: m.all_departments,
        department_ids: m.department_ids,
        max_class: m.max_class,
    };
    state
        .store
        .save_model(&a.ctx.tenant.id, Some(&id), &input, a.ctx.now, a.audit())
        .await?;
    Ok(Redirect::to("/admin/models?notice=model").into_response())
}

// ---------------------------------------------------------------- API

#[derive(Deserialize)]
struct ProviderBody {
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    api_key: String,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    proxy: Option<String>,
    #[serde(default)]
    region: String,
    #[serde(default)]
    no_training: bool,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

impl ProviderBody {
    fn form(&self) -> ProviderForm {
        let b = |v: bool| if v { Some("1".to_string()) } else { None };
        ProviderForm {
            name: self.name.clone(),
            kind: self.kind.clone(),
            base_url: self.base_url.clone(),
            api_key: self.api_key.clone(),
            api_version: self.api_version.clone().unwrap_or_default(),
            proxy: self.proxy.clone().unwrap_or_default(),
            region: self.region.clone(),
            no_training: b(self.no_training),
            enabled: b(self.enabled),
        }
    }
}

async fn api_providers(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
) -> AppResult<Json<Value>> {
    let list: Vec<ProviderView> = state
        .store
        .list_providers(&a.ctx.tenant.id)
        .await?
        .iter()
        .map(ProviderView::of)
        .collect();
    Ok(Json(json!({"providers": list})))
}

async fn api_provider_create(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    JsonBody(b): JsonBody<ProviderBody>,
) -> AppResult<(StatusCode, Json<Value>)> {
    let input = check_provider(&state, &b.form(), true)?;
    let p = state
        .store
        .save_provider(&a.ctx.tenant.id, None, &input, a.ctx.now, a.audit())
        .await?;
    Ok((StatusCode::CREATED, Json(json!(ProviderView::of(&p)))))
}

async fn api_provider_update(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ProviderBody>,
) -> AppResult<Json<Value>> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    state.store.provider(&a.ctx.tenant.id, &id).await?;
    let input = check_provider(&state, &b.form(), false)?;
    let p = state
        .store
        .save_provider(&a.ctx.tenant.id, Some(&id), &input, a.ctx.now, a.audit())
        .await?;
    Ok(Json(json!(ProviderView::of(&p))))
}

async fn api_provider_test(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<TestBody>,
) -> AppResult<Json<Value>> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    let p = state.store.provider(&a.ctx.tenant.id, &id).await?;
    let model = validate::required_line("モデルID", &b.model, 200)
        .map_err(|e| AppError::field("model", e))?;
    let (ok, message) = test_provider(&state, &p, &model).await;
    Ok(Json(json!({"ok": ok, "message": message})))
}

#[derive(Deserialize)]
struct TestBody {
    #[serde(default)]
    model: String,
}

#[derive(Deserialize)]
struct ModelBody {
    #[serde(default)]
    provider_id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    display_name: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    is_default: bool,
    /// Empty or absent: every department.
    #[serde(default)]
    department_ids: Vec<String>,
    /// 1–3; absent: 2.
    #[serde(default)]
    max_class: Option<i64>,
}

impl ModelBody {
    fn form(&self) -> ModelForm {
        let b = |v: bool| if v { Some("1".to_string()) } else { None };
        ModelForm {
            provider_id: self.provider_id.clone(),
            model: self.model.clone(),
            display_name: self.display_name.clone(),
            enabled: b(self.enabled),
            is_default: b(self.is_default),
            departments: self.department_ids.join(","),
            max_class: self.max_class.map(|c| c.to_string()).unwrap_or_default(),
            extra: Default::default(),
        }
    }
}

async fn api_models(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
) -> AppResult<Json<Value>> {
    Ok(Json(
        json!({"models": state.store.list_models(&a.ctx.tenant.id).await?}),
    ))
}

fn model_error(e: storage::StorageError) -> AppError {
    match e {
        storage::StorageError::NotFound => {
            AppError::field("provider_id", "接続先または部署が見つかりません。")
        }
        other => other.into(),
    }
}

async fn api_model_create(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    JsonBody(b): JsonBody<ModelBody>,
) -> AppResult<(StatusCode, Json<Value>)> {
    let input = check_model_for(&state, &a.ctx.tenant.id, &b.form()).await?;
    let m = state
        .store
        .save_model(&a.ctx.tenant.id, None, &input, a.ctx.now, a.audit())
        .await
        .map_err(model_error)?;
    Ok((StatusCode::CREATED, Json(json!(m))))
}

async fn api_model_update(
    State(state): State<Shared>,
    TenantAdmin(a): TenantAdmin,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ModelBody>,
) -> AppResult<Json<Value>> {
    if !domain::ids::is_valid_id(&id) {
        return Err(AppError::NotFound);
    }
    state.store.model(&a.ctx.tenant.id, &id).await?;
    let input = check_model_for(&state, &a.ctx.tenant.id, &b.form()).await?;
    let m = state
        .store
        .save_model(&a.ctx.tenant.id, Some(&id), &input, a.ctx.now, a.audit())
        .await
        .map_err(model_error)?;
    Ok(Json(json!(m)))
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/models", get(page))
        .route("/admin/models/providers", post(provider_create))
        .route(
            "/admin/models/providers/{id}/enabled",
            post(provider_toggle),
        )
        .route("/admin/models/providers/{id}/test", post(provider_test))
        .route(
            "/admin/models/providers/{id}",
            get(provider_edit).post(provider_update),
        )
        .route(
            "/admin/models/models/{id}",
            get(model_edit).post(model_update),
        )
        .route("/admin/models/local", post(local_add))
        .route("/admin/models/models", post(model_create))
        .route("/admin/models/models/{id}/flags", post(model_toggle))
        .route(
            "/api/v1/admin/providers",
            get(api_providers).post(api_provider_create),
        )
        .route(
            "/api/v1/admin/providers/{id}",
            axum::routing::put(api_provider_update),
        )
        .route("/api/v1/admin/providers/{id}/test", post(api_provider_test))
        .route(
            "/api/v1/admin/models",
            get(api_models).post(api_model_create),
        )
        .route(
            "/api/v1/admin/models/{id}",
            axum::routing::put(api_model_update),
        )
}
