//! A city's security settings (policies S4, S5, S6): the login banner, password rules,
//! lockout and session time-outs, with stricter values for privileged accounts.

use crate::validate;
use crate::Role;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordPolicy {
    pub min_length: u32,
    /// Hours a temporary password stays valid.
    pub temporary_valid_hours: u32,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            min_length: 12,
            temporary_valid_hours: 72,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutPolicy {
    /// This many failures within `window_minutes` lock the account…
    pub max_failures: u32,
    pub window_minutes: u32,
    /// …for this long.
    pub lock_minutes: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionPolicy {
    pub idle_minutes: u32,
    pub absolute_minutes: u32,
}

/// Limits on chat input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatPolicy {
    /// Longest message (characters) staff may send.
    pub max_message_chars: u32,
}

impl Default for ChatPolicy {
    fn default() -> Self {
        Self {
            max_message_chars: 100_000,
        }
    }
}

/// The monthly allowance in characters (M4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsagePolicy {
    /// Characters a month for the whole city, input and output both counted.
    pub monthly_chars: i64,
    /// Whether context the service adds (attached files, earlier turns, retrieved
    /// passages) counts toward the allowance. Always shown; counted only by choice.
    pub count_context: bool,
    /// Let requests past a limit go ahead (flagged for admins) instead of stopping them.
    pub allow_overrun: bool,
    /// Cap for each member of staff unless one is set for them; `None` for no cap.
    pub user_monthly_chars: Option<i64>,
}

impl Default for UsagePolicy {
    fn default() -> Self {
        Self {
            monthly_chars: crate::usage::DEFAULT_MONTHLY_CHARS,
            count_context: false,
            allow_overrun: false,
            user_monthly_chars: None,
        }
    }
}

/// How long chat records are kept (M6 asks at least a month; S16 wants them gone after).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Conversations and messages older than this many months are removed.
    pub chat_months: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self { chat_months: 13 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSettings {
    /// Shown on the sign-in page before anyone signs in.
    pub banner: String,
    pub password: PasswordPolicy,
    pub lockout_user: LockoutPolicy,
    pub lockout_admin: LockoutPolicy,
    pub session_user: SessionPolicy,
    pub session_admin: SessionPolicy,
    pub chat: ChatPolicy,
    pub usage: UsagePolicy,
    pub retention: RetentionPolicy,
}

impl Default for TenantSettings {
    fn default() -> Self {
        Self {
            banner: "このシステムは許可された職員のみが利用できます。\n利用状況は記録され、情報セキュリティポリシーに基づき監査されます。".into(),
            password: PasswordPolicy::default(),
            lockout_user: LockoutPolicy {
                max_failures: 5,
                window_minutes: 15,
                lock_minutes: 15,
            },
            lockout_admin: LockoutPolicy {
                max_failures: 3,
                window_minutes: 30,
                lock_minutes: 60,
            },
            session_user: SessionPolicy {
                idle_minutes: 30,
                absolute_minutes: 12 * 60,
            },
            session_admin: SessionPolicy {
                idle_minutes: 15,
                absolute_minutes: 8 * 60,
            },
            chat: ChatPolicy::default(),
            usage: UsagePolicy::default(),
            retention: RetentionPolicy::default(),
        }
    }
}

/// One problem with a settings form: the field it belongs to and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl TenantSettings {
    pub fn lockout_for(&self, role: Role) -> LockoutPolicy {
        if role.is_privileged() {
            self.lockout_admin
        } else {
            self.lockout_user
        }
    }

    pub fn session_for(&self, role: Role) -> SessionPolicy {
        if role.is_privileged() {
            self.session_admin
        } else {
            self.session_user
        }
    }

    /// Checks ranges, and that the rules for administrators are no weaker than for staff.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut push = |field: &str, message: String| {
            errs.push(FieldError {
                field: field.into(),
                message,
            })
        };
        if let Err(e) = validate::multi_line("ログイン画面のお知らせ", &self.banner, 2000)
        {
            push("banner", e);
        }
        let p = &self.password;
        if !(8..=128).contains(&p.min_length) {
            push(
                "password.min_length",
                "パスワードの最小文字数は8〜128の範囲で指定してください。".into(),
            );
        }
        if !(1..=720).contains(&p.temporary_valid_hours) {
            push(
                "password.temporary_valid_hours",
                "仮パスワードの有効期間は1〜720時間の範囲で指定してください。".into(),
            );
        }
        for (key, label, l) in [
            ("lockout_user", "一般職員", self.lockout_user),
            ("lockout_admin", "管理者", self.lockout_admin),
        ] {
            if !(1..=100).contains(&l.max_failures) {
                push(
                    &format!("{key}.max_failures"),
                    format!("{label}のロックまでの失敗回数は1〜100回で指定してください。"),
                );
            }
            if !(1..=1440).contains(&l.window_minutes) {
                push(
                    &format!("{key}.window_minutes"),
                    format!("{label}の失敗回数を数える期間は1〜1440分で指定してください。"),
                );
            }
            if !(1..=10080).contains(&l.lock_minutes) {
                push(
                    &format!("{key}.lock_minutes"),
                    format!("{label}のロック時間は1〜10080分で指定してください。"),
                );
            }
        }
        for (key, label, s) in [
            ("session_user", "一般職員", self.session_user),
            ("session_admin", "管理者", self.session_admin),
        ] {
            if !(1..=480).contains(&s.idle_minutes) {
                push(
                    &format!("{key}.idle_minutes"),
                    format!("{label}の無操作タイムアウトは1〜480分で指定してください。"),
                );
            }
            if !(10..=1440).contains(&s.absolute_minutes) {
                push(
                    &format!("{key}.absolute_minutes"),
                    format!("{label}の最大ログイン時間は10〜1440分で指定してください。"),
                );
            } else if s.idle_minutes > s.absolute_minutes {
                push(
                    &format!("{key}.idle_minutes"),
                    format!("{label}の無操作タイムアウトは最大ログイン時間以下にしてください。"),
                );
            }
        }
        if !(1..=1_000_000).contains(&self.chat.max_message_chars) {
            push(
                "chat.max_message_chars",
                "1回の入力の上限は1〜1,000,000文字で指定してください。".into(),
            );
        }
        if !(1..=120).contains(&self.retention.chat_months) {
            push(
                "retention.chat_months",
                "チャットの保存期間は1〜120か月で指定してください（1か月未満にはできません）。"
                    .into(),
            );
        }
        let u = &self.usage;
        if !(1..=crate::usage::MAX_LIMIT_CHARS).contains(&u.monthly_chars) {
            push(
                "usage.monthly_chars",
                format!(
                    "月間の利用上限は1〜{}文字で指定してください。",
                    crate::usage::grouped(crate::usage::MAX_LIMIT_CHARS)
                ),
            );
        }
        if let Some(cap) = u.user_monthly_chars {
            if cap < 1 || cap > u.monthly_chars {
                push(
                    "usage.user_monthly_chars",
                    "職員1人あたりの上限は1文字以上、全体の上限以下にしてください。".into(),
                );
            }
        }
        if self.lockout_admin.max_failures > self.lockout_user.max_failures {
            push(
                "lockout_admin.max_failures",
                "管理者のロックまでの失敗回数は一般職員以下にしてください。".into(),
            );
        }
        if self.session_admin.idle_minutes > self.session_user.idle_minutes
            || self.session_admin.absolute_minutes > self.session_user.absolute_minutes
        {
            push(
                "session_admin.idle_minutes",
                "管理者のタイムアウトは一般職員以下にしてください。".into(),
            );
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_stricter_for_admins() {
        let s = TenantSettings::default();
        assert_eq!(s.validate(), Ok(()));
        assert!(
            s.session_for(Role::TenantAdmin).idle_minutes < s.session_for(Role::User).idle_minutes
        );
        assert!(
            s.lockout_for(Role::TenantAdmin).max_failures < s.lockout_for(Role::User).max_failures
        );
    }

    #[test]
    fn weaker_admin_rules_are_refused() {
        let mut s = TenantSettings::default();
        s.lockout_admin.max_failures = 10;
        assert!(s.validate().is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(serde_json::from_str::<TenantSettings>(r#"{"bannner":"x"}"#).is_err());
        assert!(serde_json::from_str::<TenantSettings>(r#"{"banner":"x"}"#).is_ok());
    }
}
