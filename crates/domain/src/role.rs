//! Roles with least privilege (policy S2).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// 一般職員: chat, templates, knowledge of their department.
    User,
    /// 所属管理者: manages the staff of their own department and the ones below it.
    DepartmentAdmin,
    /// 情報管理者: administers the whole city.
    TenantAdmin,
    /// 監査担当: reads logs and audit records, changes nothing.
    Auditor,
    /// サポート担当: helpdesk only, never chat content.
    Support,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::User,
        Role::DepartmentAdmin,
        Role::TenantAdmin,
        Role::Auditor,
        Role::Support,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::DepartmentAdmin => "department_admin",
            Role::TenantAdmin => "tenant_admin",
            Role::Auditor => "auditor",
            Role::Support => "support",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Role::User => "一般職員",
            Role::DepartmentAdmin => "所属管理者",
            Role::TenantAdmin => "情報管理者",
            Role::Auditor => "監査担当",
            Role::Support => "サポート担当",
        }
    }

    /// Accepts the stored name, the Japanese label and a few spellings people type in CSVs.
    pub fn parse(s: &str) -> Option<Role> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase().replace('-', "_");
        match lower.as_str() {
            "" | "user" | "一般" | "一般職員" | "職員" | "利用者" => Some(Role::User),
            "department_admin" | "dept_admin" | "所属管理者" | "部署管理者" | "課室管理者" => {
                Some(Role::DepartmentAdmin)
            }
            "tenant_admin" | "admin" | "情報管理者" | "システム管理者" | "全体管理者" => {
                Some(Role::TenantAdmin)
            }
            "auditor" | "監査担当" | "監査" | "監査者" => Some(Role::Auditor),
            "support" | "サポート" | "サポート担当" => Some(Role::Support),
            _ => None,
        }
    }

    /// Privileged ids get stricter lockout and shorter sessions (policy S4).
    pub fn is_privileged(self) -> bool {
        !matches!(self, Role::User)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
