//! Authorisation, decided in one place. Handlers describe what they want to do and to
//! what; this module answers. An object outside the caller's reach is reported as
//! [`Decision::NotFound`], so the server answers 404 and reveals nothing about it.

use crate::Role;

/// Who is asking: always a signed-in user of one tenant.
#[derive(Clone, Debug)]
pub struct Actor {
    pub tenant_id: String,
    pub user_id: String,
    pub login_id: String,
    pub role: Role,
    pub department_id: String,
    /// Full path of the actor's department, e.g. `総務部/情報政策課`.
    pub department_path: String,
}

/// A user account as the policy sees it.
#[derive(Clone, Debug)]
pub struct UserTarget<'a> {
    pub tenant_id: &'a str,
    pub user_id: &'a str,
    pub role: Role,
    pub department_path: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The caller may see the object but not do this to it.
    Forbidden,
    /// The caller may not even know the object exists.
    NotFound,
}

/// Which accounts a caller may list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserScope {
    All,
    /// The department with this path and every department below it.
    Subtree(String),
}

/// True when `path` is `root` or lies below it.
pub fn in_subtree(root: &str, path: &str) -> bool {
    path == root || (path.starts_with(root) && path[root.len()..].starts_with('/'))
}

/// The admin area at all (navigation, pages).
pub fn can_open_admin(actor: &Actor) -> bool {
    matches!(
        actor.role,
        Role::TenantAdmin | Role::DepartmentAdmin | Role::Auditor
    )
}

/// Tenant-wide settings, departments, imports.
pub fn can_manage_tenant(actor: &Actor) -> bool {
    actor.role == Role::TenantAdmin
}

/// Audit records and logs: read-only for auditors.
pub fn can_read_audit(actor: &Actor) -> bool {
    matches!(actor.role, Role::TenantAdmin | Role::Auditor)
}

/// Which user accounts the caller may see, if any.
pub fn user_scope(actor: &Actor) -> Option<UserScope> {
    match actor.role {
        Role::TenantAdmin => Some(UserScope::All),
        Role::DepartmentAdmin => Some(UserScope::Subtree(actor.department_path.clone())),
        _ => None,
    }
}

/// May the caller see this account?
pub fn view_user(actor: &Actor, target: &UserTarget<'_>) -> Decision {
    if target.tenant_id != actor.tenant_id {
        return Decision::NotFound;
    }
    match user_scope(actor) {
        Some(UserScope::All) => Decision::Allow,
        Some(UserScope::Subtree(root)) if in_subtree(&root, target.department_path) => {
            Decision::Allow
        }
        _ => Decision::NotFound,
    }
}

/// May the caller change this account (name, e-mail, department, role, status, password
/// reset, deletion)? Department admins look after ordinary staff of their own subtree only;
/// nobody disables, deletes or demotes themselves through the admin screens.
pub fn manage_user(actor: &Actor, target: &UserTarget<'_>) -> Decision {
    match view_user(actor, target) {
        Decision::Allow => {}
        other => return other,
    }
    if target.user_id == actor.user_id {
        return Decision::Forbidden;
    }
    match actor.role {
        Role::TenantAdmin => Decision::Allow,
        Role::DepartmentAdmin if target.role == Role::User => Decision::Allow,
        _ => Decision::Forbidden,
    }
}

/// May the caller give an account this role in this department (creating or changing it)?
pub fn assign(actor: &Actor, role: Role, department_path: &str) -> Decision {
    match actor.role {
        Role::TenantAdmin => Decision::Allow,
        Role::DepartmentAdmin
            if role == Role::User && in_subtree(&actor.department_path, department_path) =>
        {
            Decision::Allow
        }
        _ => Decision::Forbidden,
    }
}

/// May the caller use a model that is open to every department, or to these departments
/// (given by path; a department includes the ones below it)?
pub fn can_use_model(actor: &Actor, all_departments: bool, allowed_paths: &[String]) -> bool {
    all_departments
        || allowed_paths
            .iter()
            .any(|p| in_subtree(p, &actor.department_path))
}

/// Whose usage figures the caller may see besides their own: the whole tenant (tenant
/// admins and auditors), a department subtree (department admins: their own), with top
/// users listed only for admins and auditors.
pub fn can_view_tenant_usage(actor: &Actor) -> bool {
    matches!(actor.role, Role::TenantAdmin | Role::Auditor)
}

/// May the caller see the usage of the department at `path` (and below it)?
pub fn view_department_usage(actor: &Actor, path: &str) -> Decision {
    match actor.role {
        Role::TenantAdmin | Role::Auditor => Decision::Allow,
        Role::DepartmentAdmin if in_subtree(&actor.department_path, path) => Decision::Allow,
        _ => Decision::NotFound,
    }
}

/// The chat log (who asked what, and the answers) is for tenant admins and auditors (M6);
/// support operators never see chat content (S2).
pub fn can_read_chat_logs(actor: &Actor) -> bool {
    matches!(actor.role, Role::TenantAdmin | Role::Auditor)
}

/// Disposal (M12, S16) is carried out by tenant admins; auditors read the records and
/// certificates.
pub fn can_dispose(actor: &Actor) -> bool {
    actor.role == Role::TenantAdmin
}

pub fn can_read_disposals(actor: &Actor) -> bool {
    matches!(actor.role, Role::TenantAdmin | Role::Auditor)
}

/// A tenant disposal needs two people: the approver is a tenant admin other than the one
/// who asked for it.
pub fn approve_disposal(actor: &Actor, requested_by: &str) -> Decision {
    if !can_dispose(actor) || actor.user_id == requested_by {
        Decision::Forbidden
    } else {
        Decision::Allow
    }
}

/// Alerts from the analysis of the audit log (S8): read by tenant admins and auditors,
/// handled (acknowledged) by tenant admins.
pub fn can_read_alerts(actor: &Actor) -> bool {
    can_read_audit(actor)
}

pub fn can_handle_alerts(actor: &Actor) -> bool {
    actor.role == Role::TenantAdmin
}

/// The export of all of a tenant's data for migration (S18) is the tenant admin's.
pub fn can_export_tenant(actor: &Actor) -> bool {
    actor.role == Role::TenantAdmin
}

/// Where a knowledge collection lives, for the decisions below.
#[derive(Clone, Copy, Debug)]
pub struct CollectionPlace<'a> {
    pub tenant_id: &'a str,
    /// The owning department's path; `None` for a collection shared tenant-wide.
    pub department_path: Option<&'a str>,
    /// Only named members may read it.
    pub restricted: bool,
    /// Whether the actor is one of the named members.
    pub is_member: bool,
}

/// Reading a collection's documents: search, chat, citations, the document pages (S1).
/// Staff of the owning department (and the ones below it) read a department's collection;
/// everyone reads a shared one; a restricted one only its members. Support operators never
/// read content (S2). Anything else is not there at all.
pub fn read_collection(actor: &Actor, place: &CollectionPlace<'_>) -> Decision {
    if place.tenant_id != actor.tenant_id || actor.role == Role::Support {
        return Decision::NotFound;
    }
    if place.restricted {
        return if place.is_member {
            Decision::Allow
        } else {
            Decision::NotFound
        };
    }
    match place.department_path {
        None => Decision::Allow,
        Some(p) if in_subtree(p, &actor.department_path) => Decision::Allow,
        Some(_) => Decision::NotFound,
    }
}

/// Uploading and deleting documents, changing a collection and its members: department
/// admins for their department and the ones below it, tenant admins for every collection.
/// Managing does not include reading the documents' text.
pub fn manage_collection(actor: &Actor, place: &CollectionPlace<'_>) -> Decision {
    if place.tenant_id != actor.tenant_id {
        return Decision::NotFound;
    }
    let allowed = match (actor.role, place.department_path) {
        (Role::TenantAdmin, _) => true,
        (Role::DepartmentAdmin, Some(p)) => in_subtree(&actor.department_path, p),
        _ => false,
    };
    if allowed {
        Decision::Allow
    } else if see_collection(actor, place) {
        Decision::Forbidden
    } else {
        Decision::NotFound
    }
}

/// Knowing a collection exists (name, size, state): its readers, its managers, and
/// tenant admins for all of them.
pub fn see_collection(actor: &Actor, place: &CollectionPlace<'_>) -> bool {
    place.tenant_id == actor.tenant_id
        && (read_collection(actor, place) == Decision::Allow
            || actor.role == Role::TenantAdmin
            || (actor.role == Role::DepartmentAdmin
                && place
                    .department_path
                    .is_some_and(|p| in_subtree(&actor.department_path, p))))
}

/// Creating a collection: tenant-wide ones by tenant admins; a department's by its admins
/// (or a tenant admin).
pub fn create_collection(actor: &Actor, department_path: Option<&str>) -> Decision {
    match (actor.role, department_path) {
        (Role::TenantAdmin, _) => Decision::Allow,
        (Role::DepartmentAdmin, Some(p)) if in_subtree(&actor.department_path, p) => {
            Decision::Allow
        }
        _ => Decision::Forbidden,
    }
}

/// S14: a model receives passages only from collections at or below its class.
pub fn model_may_receive(model_max_class: i64, classification: i64) -> bool {
    classification <= model_max_class
}

/// Allowances, allocations and caps are the tenant admin's.
pub fn can_set_usage_limits(actor: &Actor) -> bool {
    actor.role == Role::TenantAdmin
}

/// Where a template lives, for the decisions below.
pub enum TemplatePlace<'a> {
    Tenant,
    /// A department's template, by the department's path (it covers the ones below).
    Department(&'a str),
    /// Someone's own template, by owner id.
    Personal(&'a str),
}

/// May the caller see (and use) a template? The same rule the storage query applies:
/// tenant-wide ones, their own, their department's and those above it; a department admin
/// also those below theirs; a tenant admin every department's. Anything else is "not found".
pub fn view_template(actor: &Actor, place: &TemplatePlace<'_>) -> Decision {
    let ok = match place {
        TemplatePlace::Tenant => true,
        TemplatePlace::Personal(owner) => *owner == actor.user_id,
        TemplatePlace::Department(path) => {
            actor.role == Role::TenantAdmin
                || in_subtree(path, &actor.department_path)
                || (actor.role == Role::DepartmentAdmin && in_subtree(&actor.department_path, path))
        }
    };
    if ok {
        Decision::Allow
    } else {
        Decision::NotFound
    }
}

/// May the caller create, change or delete a template in this place? Their own personal
/// ones; a department's if they administer it (department admin of it or above, tenant
/// admin); tenant-wide ones as tenant admin.
pub fn manage_template(actor: &Actor, place: &TemplatePlace<'_>) -> Decision {
    if let TemplatePlace::Personal(owner) = place {
        if *owner != actor.user_id {
            return Decision::NotFound;
        }
        return Decision::Allow;
    }
    let ok = match place {
        TemplatePlace::Tenant => actor.role == Role::TenantAdmin,
        TemplatePlace::Department(path) => {
            actor.role == Role::TenantAdmin
                || (actor.role == Role::DepartmentAdmin && in_subtree(&actor.department_path, path))
        }
        TemplatePlace::Personal(_) => false,
    };
    if ok {
        Decision::Allow
    } else if view_template(actor, place) == Decision::Allow {
        Decision::Forbidden
    } else {
        Decision::NotFound
    }
}

/// Chat is for staff and admins; support operators never see chat content (S2).
pub fn can_chat(actor: &Actor) -> bool {
    actor.role != Role::Support
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(role: Role, path: &str) -> Actor {
        Actor {
            tenant_id: "t1".into(),
            user_id: "me".into(),
            login_id: "me".into(),
            role,
            department_id: "d".into(),
            department_path: path.into(),
        }
    }

    fn target<'a>(tenant: &'a str, role: Role, path: &'a str) -> UserTarget<'a> {
        UserTarget {
            tenant_id: tenant,
            user_id: "other",
            role,
            department_path: path,
        }
    }

    #[test]
    fn collections_are_read_by_their_department_and_members_only() {
        let place = |dept: Option<&'static str>, restricted, is_member| CollectionPlace {
            tenant_id: "t1",
            department_path: dept,
            restricted,
            is_member,
        };
        let zeimu = place(Some("税務部"), false, false);
        let staff = actor(Role::User, "税務部/市民税課");
        let other = actor(Role::User, "福祉部");
        assert_eq!(read_collection(&staff, &zeimu), Decision::Allow);
        assert_eq!(read_collection(&other, &zeimu), Decision::NotFound);
        assert_eq!(
            read_collection(&other, &place(None, false, false)),
            Decision::Allow
        );
        assert_eq!(
            read_collection(&staff, &place(Some("税務部"), true, false)),
            Decision::NotFound
        );
        assert_eq!(
            read_collection(&other, &place(Some("税務部"), true, true)),
            Decision::Allow
        );
        // Tenant admins see and manage every collection but read only their own.
        let admin = actor(Role::TenantAdmin, "総務部/情報政策課");
        assert_eq!(read_collection(&admin, &zeimu), Decision::NotFound);
        assert!(see_collection(&admin, &zeimu));
        assert_eq!(manage_collection(&admin, &zeimu), Decision::Allow);
        let dadmin = actor(Role::DepartmentAdmin, "税務部");
        assert_eq!(manage_collection(&dadmin, &zeimu), Decision::Allow);
        assert_eq!(
            manage_collection(&dadmin, &place(None, false, false)),
            Decision::Forbidden
        );
        assert_eq!(manage_collection(&staff, &zeimu), Decision::Forbidden);
        assert_eq!(manage_collection(&other, &zeimu), Decision::NotFound);
        assert_eq!(
            create_collection(&dadmin, Some("福祉部")),
            Decision::Forbidden
        );
        assert_eq!(
            create_collection(&dadmin, Some("税務部/市民税課")),
            Decision::Allow
        );
        assert_eq!(
            read_collection(&actor(Role::Support, "税務部"), &zeimu),
            Decision::NotFound
        );
        let foreign = CollectionPlace {
            tenant_id: "t2",
            ..zeimu
        };
        assert_eq!(read_collection(&staff, &foreign), Decision::NotFound);
        assert_eq!(manage_collection(&admin, &foreign), Decision::NotFound);
        assert!(model_may_receive(3, 3) && !model_may_receive(2, 3));
    }

    #[test]
    fn disposal_needs_a_second_tenant_admin() {
        let admin = actor(Role::TenantAdmin, "総務部");
        assert_eq!(approve_disposal(&admin, "me"), Decision::Forbidden);
        assert_eq!(approve_disposal(&admin, "someone"), Decision::Allow);
        for role in [
            Role::DepartmentAdmin,
            Role::Auditor,
            Role::User,
            Role::Support,
        ] {
            let a = actor(role, "総務部");
            assert_eq!(approve_disposal(&a, "someone"), Decision::Forbidden);
            assert!(!can_dispose(&a));
            assert!(!can_export_tenant(&a));
            assert!(!can_handle_alerts(&a));
        }
        assert!(can_read_disposals(&actor(Role::Auditor, "監査")));
        assert!(can_read_alerts(&actor(Role::Auditor, "監査")));
        assert!(!can_read_alerts(&actor(Role::DepartmentAdmin, "総務部")));
    }

    #[test]
    fn subtree_is_by_whole_segments() {
        assert!(in_subtree("総務部", "総務部"));
        assert!(in_subtree("総務部", "総務部/情報政策課"));
        assert!(!in_subtree("総務部", "総務部長室"));
        assert!(!in_subtree("総務部/情報政策課", "総務部"));
    }

    #[test]
    fn other_tenant_is_not_found_even_for_tenant_admin() {
        let a = actor(Role::TenantAdmin, "総務部");
        assert_eq!(
            view_user(&a, &target("t2", Role::User, "総務部")),
            Decision::NotFound
        );
        assert_eq!(
            manage_user(&a, &target("t2", Role::User, "総務部")),
            Decision::NotFound
        );
    }

    #[test]
    fn department_admin_reaches_own_subtree_and_only_ordinary_staff() {
        let a = actor(Role::DepartmentAdmin, "福祉部");
        assert_eq!(
            view_user(&a, &target("t1", Role::User, "福祉部/介護保険課")),
            Decision::Allow
        );
        assert_eq!(
            view_user(&a, &target("t1", Role::User, "税務部")),
            Decision::NotFound
        );
        assert_eq!(
            manage_user(&a, &target("t1", Role::TenantAdmin, "福祉部")),
            Decision::Forbidden
        );
        assert_eq!(assign(&a, Role::TenantAdmin, "福祉部"), Decision::Forbidden);
        assert_eq!(assign(&a, Role::User, "税務部"), Decision::Forbidden);
        assert_eq!(assign(&a, Role::User, "福祉部/介護保険課"), Decision::Allow);
    }

    #[test]
    fn staff_auditors_and_support_see_no_accounts() {
        for r in [Role::User, Role::Auditor, Role::Support] {
            let a = actor(r, "総務部");
            assert_eq!(
                view_user(&a, &target("t1", Role::User, "総務部")),
                Decision::NotFound
            );
            assert!(!can_manage_tenant(&a));
        }
        assert!(can_read_audit(&actor(Role::Auditor, "x")));
        assert!(!can_read_audit(&actor(Role::User, "x")));
        assert!(!can_read_audit(&actor(Role::Support, "x")));
    }

    #[test]
    fn models_are_open_to_departments_and_the_ones_below() {
        let a = actor(Role::User, "福祉部/介護保険課");
        assert!(can_use_model(&a, true, &[]));
        assert!(can_use_model(&a, false, &["福祉部".into()]));
        assert!(!can_use_model(
            &a,
            false,
            &["税務部".into(), "福祉部/障害福祉課".into()]
        ));
        assert!(!can_chat(&actor(Role::Support, "x")));
    }

    #[test]
    fn nobody_manages_themselves() {
        let a = actor(Role::TenantAdmin, "総務部");
        let mut t = target("t1", Role::TenantAdmin, "総務部");
        t.user_id = "me";
        assert_eq!(manage_user(&a, &t), Decision::Forbidden);
    }

    #[test]
    fn usage_figures_by_role() {
        let dept_admin = actor(Role::DepartmentAdmin, "市民部");
        assert_eq!(
            view_department_usage(&dept_admin, "市民部/市民課"),
            Decision::Allow
        );
        assert_eq!(
            view_department_usage(&dept_admin, "総務部"),
            Decision::NotFound
        );
        assert_eq!(
            view_department_usage(&actor(Role::User, "市民部"), "市民部"),
            Decision::NotFound
        );
        assert_eq!(
            view_department_usage(&actor(Role::Auditor, "監査"), "総務部"),
            Decision::Allow
        );
        assert!(can_view_tenant_usage(&actor(Role::TenantAdmin, "総務部")));
        assert!(!can_view_tenant_usage(&dept_admin));
        assert!(can_set_usage_limits(&actor(Role::TenantAdmin, "総務部")));
        assert!(!can_set_usage_limits(&actor(Role::Auditor, "総務部")));
    }

    #[test]
    fn templates_by_place() {
        let staff = actor(Role::User, "税務部/課税課");
        let dept_admin = actor(Role::DepartmentAdmin, "税務部");
        let tenant_admin = actor(Role::TenantAdmin, "総務部");
        let d = |p| TemplatePlace::Department(p);
        assert_eq!(
            view_template(&staff, &TemplatePlace::Tenant),
            Decision::Allow
        );
        assert_eq!(view_template(&staff, &d("税務部")), Decision::Allow);
        assert_eq!(view_template(&staff, &d("税務部/課税課")), Decision::Allow);
        assert_eq!(
            view_template(&staff, &d("税務部/納税課")),
            Decision::NotFound
        );
        assert_eq!(view_template(&staff, &d("福祉部")), Decision::NotFound);
        assert_eq!(
            view_template(&staff, &TemplatePlace::Personal("other")),
            Decision::NotFound
        );
        assert_eq!(
            view_template(&staff, &TemplatePlace::Personal("me")),
            Decision::Allow
        );
        assert_eq!(
            view_template(&dept_admin, &d("税務部/納税課")),
            Decision::Allow
        );
        assert_eq!(view_template(&tenant_admin, &d("福祉部")), Decision::Allow);
        assert_eq!(manage_template(&staff, &d("税務部")), Decision::Forbidden);
        assert_eq!(manage_template(&staff, &d("福祉部")), Decision::NotFound);
        assert_eq!(
            manage_template(&staff, &TemplatePlace::Tenant),
            Decision::Forbidden
        );
        assert_eq!(
            manage_template(&staff, &TemplatePlace::Personal("me")),
            Decision::Allow
        );
        assert_eq!(
            manage_template(&dept_admin, &d("税務部/課税課")),
            Decision::Allow
        );
        assert_eq!(
            manage_template(&dept_admin, &d("福祉部")),
            Decision::NotFound
        );
        assert_eq!(
            manage_template(&dept_admin, &TemplatePlace::Tenant),
            Decision::Forbidden
        );
        assert_eq!(
            manage_template(&tenant_admin, &TemplatePlace::Tenant),
            Decision::Allow
        );
        assert_eq!(
            manage_template(&tenant_admin, &TemplatePlace::Personal("x")),
            Decision::NotFound
        );
    }
}
