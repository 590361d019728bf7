//! The storage conformance suite: the same checks on SQLite always, and on PostgreSQL when
//! `YAKUBA_TEST_DATABASE_URL` is set (each run in a fresh database of its own).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use domain::policy::UserScope;
use domain::settings::TenantSettings;
use domain::Role;
use sqlx::Executor;
use storage::*;

struct Db {
    store: Store,
    _dir: Option<tempfile::TempDir>,
    drop_pg: Option<(String, String)>,
}

async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::connect(&url, 4).await.unwrap();
    store.migrate().await.unwrap();
    Db {
        store,
        _dir: Some(dir),
        drop_pg: None,
    }
}

async fn postgres() -> Option<Db> {
    let base = std::env::var("YAKUBA_TEST_DATABASE_URL").ok()?;
    let name = format!("yakuba_conf_{}", domain::ids::random_token(6));
    let admin = Store::connect(&base, 1).await.unwrap();
    admin
        .pool()
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    admin.close().await;
    let url = match base.rfind('/') {
        Some(i) => format!("{}/{name}", &base[..i]),
        None => panic!("bad url"),
    };
    let store = Store::connect(&url, 4).await.unwrap();
    store.migrate().await.unwrap();
    Some(Db {
        store,
        _dir: None,
        drop_pg: Some((base, name)),
    })
}

impl Db {
    async fn finish(self) {
        self.store.close().await;
        if let Some((base, name)) = self.drop_pg {
            let admin = Store::connect(&base, 1).await.unwrap();
            admin
                .pool()
                .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
                .await
                .unwrap();
        }
    }
}

fn ev(actor: &str) -> AuditEvent {
    AuditEvent {
        actor_login: actor.into(),
        ip: "127.0.0.1".into(),
        at_ms: 1_000,
        ..Default::default()
    }
}

fn ev_t(tenant: &str) -> AuditEvent {
    AuditEvent {
        tenant_id: tenant.into(),
        ..ev("tester")
    }
}

async fn backends() -> Vec<Db> {
    let mut v = vec![sqlite().await];
    if let Some(pg) = postgres().await {
        v.push(pg);
    }
    v
}

fn new_user(tenant: &str, login: &str, dept: &str, role: Role) -> NewUser {
    NewUser {
        tenant_id: tenant.into(),
        login_id: login.into(),
        display_name: format!("職員 {login}"),
        email: None,
        department_id: dept.into(),
        role,
        password_hash: "$argon2id$fake".into(),
        temporary_until: None,
        now: 1_000,
    }
}

#[tokio::test]
async fn tenants_departments_and_users() {
    for db in backends().await {
        let s = &db.store;
        let b = format!("{:?}", s.backend());
        assert!(
            s.migrate().await.unwrap().is_empty(),
            "{b}: migrations are idempotent"
        );

        let t = s
            .create_tenant("sample", "サンプル市", None, 1_000, ev("cli"))
            .await
            .unwrap();
        let t2 = s
            .create_tenant("other", "よそ町", Some("other.example"), 1_000, ev("cli"))
            .await
            .unwrap();
        assert!(matches!(
            s.create_tenant("sample", "x", None, 1, ev("cli")).await,
            Err(StorageError::Conflict(_))
        ));
        assert_eq!(s.tenant_by_slug("sample").await.unwrap().id, t.id);
        assert_eq!(s.tenant_by_host("OTHER.example").await.unwrap().id, t2.id);
        assert_eq!(
            s.tenant_by_id(&t.id).await.unwrap().settings,
            TenantSettings::default()
        );

        let soumu = s
            .create_department(&t.id, None, "総務部", 1_000, ev_t(&t.id))
            .await
            .unwrap();
        let joho = s
            .create_department(&t.id, Some(&soumu.id), "情報政策課", 1_000, ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(joho.path, "総務部/情報政策課");
        assert!(matches!(
            s.create_department(&t.id, Some(&soumu.id), "情報政策課", 1_000, ev_t(&t.id))
                .await,
            Err(StorageError::Conflict(_))
        ));
        // Another tenant's department cannot be used as a parent.
        assert!(matches!(
            s.create_department(&t2.id, Some(&soumu.id), "x", 1_000, ev_t(&t2.id))
                .await,
            Err(StorageError::NotFound)
        ));
        let zeimu = s
            .ensure_department_path(&t.id, "税務部/市民税課/諸税係", 1_000, ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(zeimu.path, "税務部/市民税課/諸税係");
        assert_eq!(s.list_departments(&t.id).await.unwrap().len(), 5);

        let admin = s
            .create_user(
                &new_user(&t.id, "admin01", &joho.id, Role::TenantAdmin),
                ev_t(&t.id),
            )
            .await
            .unwrap();
        let staff = s
            .create_user(
                &new_user(&t.id, "staff_01", &zeimu.id, Role::User),
                ev_t(&t.id),
            )
            .await
            .unwrap();
        assert_eq!(staff.department_path, "税務部/市民税課/諸税係");
        assert!(matches!(
            s.create_user(
                &new_user(&t.id, "staff_01", &joho.id, Role::User),
                ev_t(&t.id)
            )
            .await,
            Err(StorageError::Conflict(_))
        ));
        // Same login id in another tenant is fine; other tenant's ids are not found.
        let d2 = s
            .create_department(&t2.id, None, "総務課", 1_000, ev_t(&t2.id))
            .await
            .unwrap();
        let other = s
            .create_user(
                &new_user(&t2.id, "staff_01", &d2.id, Role::User),
                ev_t(&t2.id),
            )
            .await
            .unwrap();
        assert!(matches!(
            s.user_by_id(&t.id, &other.id).await,
            Err(StorageError::NotFound)
        ));
        assert_eq!(
            s.user_by_login(&t.id, "STAFF_01").await.unwrap().id,
            staff.id
        );

        // Search, scope and paging; LIKE wildcards in the query are literal.
        let (all, n) = s
            .list_users(&t.id, &UserScope::All, &UserFilter::default(), 10, 0)
            .await
            .unwrap();
        assert_eq!((all.len(), n), (2, 2));
        let (_, n) = s
            .list_users(
                &t.id,
                &UserScope::All,
                &UserFilter {
                    query: Some("%".into()),
                    ..Default::default()
                },
                10,
                0,
            )
            .await
            .unwrap();
        assert_eq!(n, 0, "{b}");
        let (_, n) = s
            .list_users(
                &t.id,
                &UserScope::All,
                &UserFilter {
                    query: Some("_01".into()),
                    ..Default::default()
                },
                10,
                0,
            )
            .await
            .unwrap();
        assert_eq!(n, 1, "{b}: underscore is literal");
        let (found, _) = s
            .list_users(
                &t.id,
                &UserScope::Subtree("税務部".into()),
                &UserFilter::default(),
                10,
                0,
            )
            .await
            .unwrap();
        assert_eq!(
            found
                .iter()
                .map(|u| u.login_id.as_str())
                .collect::<Vec<_>>(),
            vec!["staff_01"]
        );
        let (found, _) = s
            .list_users(
                &t.id,
                &UserScope::All,
                &UserFilter {
                    query: Some("職員 ADMIN".into()),
                    ..Default::default()
                },
                10,
                0,
            )
            .await
            .unwrap();
        assert_eq!(found.len(), 1, "{b}: case-insensitive search");

        // Rename moves the paths below.
        s.rename_department(
            &t.id,
            &zeimu.parent_id.clone().unwrap(),
            "市民税課（改）",
            ev_t(&t.id),
        )
        .await
        .unwrap();
        assert_eq!(
            s.user_by_id(&t.id, &staff.id)
                .await
                .unwrap()
                .department_path,
            "税務部/市民税課（改）/諸税係"
        );
        // Departments with members or children are not deleted.
        assert!(matches!(
            s.delete_department(&t.id, &zeimu.id, ev_t(&t.id)).await,
            Err(StorageError::Conflict(_))
        ));
        assert!(matches!(
            s.delete_department(&t.id, &soumu.id, ev_t(&t.id)).await,
            Err(StorageError::Conflict(_))
        ));

        // Updates, the last admin rule, disable ends sessions, delete.
        let up = UserUpdate {
            department_id: Some(joho.id.clone()),
            display_name: Some("山田 花子".into()),
            ..Default::default()
        };
        let moved = s
            .update_user(&t.id, &staff.id, &up, 2_000, ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(moved.department_path, "総務部/情報政策課");
        assert!(s
            .delete_department(&t.id, &zeimu.id, ev_t(&t.id))
            .await
            .is_ok());
        let demote = UserUpdate {
            role: Some(Role::User),
            ..Default::default()
        };
        assert!(matches!(
            s.update_user(&t.id, &admin.id, &demote, 2_000, ev_t(&t.id))
                .await,
            Err(StorageError::Conflict(_))
        ));
        assert!(matches!(
            s.set_user_status(&t.id, &admin.id, UserStatus::Disabled, 2_000, ev_t(&t.id))
                .await,
            Err(StorageError::Conflict(_))
        ));
        assert!(matches!(
            s.delete_user(&t.id, &admin.id, ev_t(&t.id)).await,
            Err(StorageError::Conflict(_))
        ));

        let a = LoginAttempt {
            tenant_id: &t.id,
            typed_login: "staff_01",
            ip: "127.0.0.1",
            now: 3_000,
        };
        s.record_login_success(&a, &moved, "digest1", "csrf1", "ua", ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(s.count_sessions(&t.id, &staff.id).await.unwrap(), 1);
        let (sess, u) = s.session_with_user("digest1").await.unwrap().unwrap();
        assert_eq!(
            (sess.user_id.as_str(), u.login_id.as_str()),
            (staff.id.as_str(), "staff_01")
        );
        s.set_user_status(&t.id, &staff.id, UserStatus::Disabled, 4_000, ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(
            s.count_sessions(&t.id, &staff.id).await.unwrap(),
            0,
            "{b}: disabling ends sessions"
        );
        assert!(s.session_with_user("digest1").await.unwrap().is_none());
        s.delete_user(&t.id, &staff.id, ev_t(&t.id)).await.unwrap();
        assert!(matches!(
            s.user_by_id(&t.id, &staff.id).await,
            Err(StorageError::NotFound)
        ));

        // Settings round trip.
        let st = TenantSettings {
            banner: "許可された職員のみ".into(),
            ..Default::default()
        };
        s.update_tenant_settings(&t.id, &st, ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(
            s.tenant_by_id(&t.id).await.unwrap().settings.banner,
            "許可された職員のみ"
        );

        // Housekeeping removes sessions past their time-outs only.
        let a = LoginAttempt {
            tenant_id: &t.id,
            typed_login: "admin01",
            ip: "127.0.0.1",
            now: 10_000,
        };
        s.record_login_success(&a, &admin, "old", "c", "ua", ev_t(&t.id))
            .await
            .unwrap();
        let a = LoginAttempt { now: 90_000, ..a };
        s.record_login_success(&a, &admin, "new", "c", "ua", ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(s.purge_sessions(50_000, 0).await.unwrap(), 1);
        assert!(s.session_with_user("new").await.unwrap().is_some());

        let reports = s.verify_audit().await.unwrap();
        assert_eq!(reports.len(), 2);
        assert!(reports.iter().all(|r| r.result.is_ok()), "{b}: {reports:?}");
        db.finish().await;
    }
}

#[tokio::test]
async fn lockout_and_previous_sign_in() {
    for db in backends().await {
        let s = &db.store;
        let t = s
            .create_tenant("sample", "サンプル市", None, 0, ev("cli"))
            .await
            .unwrap();
        let d = s
            .ensure_department_path(&t.id, "総務部", 0, ev_t(&t.id))
            .await
            .unwrap();
        let u = s
            .create_user(&new_user(&t.id, "kato", &d.id, Role::User), ev_t(&t.id))
            .await
            .unwrap();
        let policy = t.settings.lockout_user;
        let min = domain::clock::MINUTE_MS;
        let at = |now: i64| LoginAttempt {
            tenant_id: &t.id,
            typed_login: "kato",
            ip: "10.0.0.1",
            now,
        };

        // First sign-in, then 2 failures, then sign-in again: the notice says 2 failures.
        s.record_login_success(&at(min), &u, "s1", "c", "ua", ev_t(&t.id))
            .await
            .unwrap();
        let u = s.user_by_id(&t.id, &u.id).await.unwrap();
        for i in 0..2 {
            let r = s
                .record_login_failure(
                    &at(2 * min + i),
                    Some(&u),
                    policy,
                    "bad_password",
                    ev_t(&t.id),
                )
                .await
                .unwrap();
            assert!(r.is_none());
        }
        let sess = s
            .record_login_success(&at(3 * min), &u, "s2", "c", "ua", ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(sess.prev_login_at, Some(min));
        assert_eq!(sess.failures_since, 2);

        // Failures before the last success do not count towards the lock.
        let u = s.user_by_id(&t.id, &u.id).await.unwrap();
        let mut locked = None;
        for i in 0..policy.max_failures {
            locked = s
                .record_login_failure(
                    &at(4 * min + i as i64),
                    Some(&u),
                    policy,
                    "bad_password",
                    ev_t(&t.id),
                )
                .await
                .unwrap();
            if i + 1 < policy.max_failures {
                assert!(locked.is_none(), "locked too early at {i}");
            }
        }
        let until = locked.expect("locked at the limit");
        assert_eq!(
            until,
            4 * min + (policy.max_failures as i64 - 1) + policy.lock_minutes as i64 * min
        );
        assert_eq!(
            s.count_sessions(&t.id, &u.id).await.unwrap(),
            0,
            "a lock ends open sessions"
        );
        let u = s.user_by_id(&t.id, &u.id).await.unwrap();
        assert_eq!(u.locked_until, Some(until));

        // Unknown accounts are recorded but lock nothing.
        assert!(s
            .record_login_failure(&at(5 * min), None, policy, "unknown_user", ev_t(&t.id))
            .await
            .unwrap()
            .is_none());

        let (recs, total) = s
            .list_audit(
                &t.id,
                &AuditFilter {
                    action_prefix: Some("auth.lockout".into()),
                    ..Default::default()
                },
                10,
                0,
            )
            .await
            .unwrap();
        assert_eq!((recs.len(), total), (1, 1));
        let (_, failures) = s
            .list_audit(
                &t.id,
                &AuditFilter {
                    result: Some("failure".into()),
                    ..Default::default()
                },
                100,
                0,
            )
            .await
            .unwrap();
        assert_eq!(failures, 2 + policy.max_failures as i64 + 1);
        db.finish().await;
    }
}

#[tokio::test]
async fn audit_tampering_is_detected() {
    for db in backends().await {
        let s = &db.store;
        let t = s
            .create_tenant("sample", "サンプル市", None, 0, ev("cli"))
            .await
            .unwrap();
        for i in 0..6 {
            s.append_audit(&ev_t(&t.id).with(
                "test.event",
                format!("x:{i}"),
                serde_json::json!({"i": i}),
            ))
            .await
            .unwrap();
        }
        let ok = |r: Vec<ChainReport>| r.into_iter().all(|r| r.result.is_ok());
        let broken_at =
            |r: Vec<ChainReport>| r.into_iter().find_map(|r| r.result.err()).map(|b| b.seq);
        assert!(ok(s.verify_audit().await.unwrap()));

        // Content change.
        sqlx::query("UPDATE audit_log SET target = 'x:forged' WHERE tenant_id = $1 AND seq = 3")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        assert_eq!(broken_at(s.verify_audit().await.unwrap()), Some(3));
        sqlx::query("UPDATE audit_log SET target = 'x:1' WHERE tenant_id = $1 AND seq = 3")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        assert!(
            ok(s.verify_audit().await.unwrap()),
            "restoring the content restores the chain"
        );

        // Reordering: swap two records' sequence numbers.
        sqlx::query("UPDATE audit_log SET seq = 100 WHERE tenant_id = $1 AND seq = 4")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE audit_log SET seq = 4 WHERE tenant_id = $1 AND seq = 5")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE audit_log SET seq = 5 WHERE tenant_id = $1 AND seq = 100")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        assert_eq!(broken_at(s.verify_audit().await.unwrap()), Some(4));
        sqlx::query("UPDATE audit_log SET seq = 100 WHERE tenant_id = $1 AND seq = 4")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE audit_log SET seq = 4 WHERE tenant_id = $1 AND seq = 5")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE audit_log SET seq = 5 WHERE tenant_id = $1 AND seq = 100")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        assert!(ok(s.verify_audit().await.unwrap()));

        // Deletion in the middle, and of the last record.
        sqlx::query("DELETE FROM audit_log WHERE tenant_id = $1 AND seq = 7")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        assert_eq!(broken_at(s.verify_audit().await.unwrap()), Some(7));
        sqlx::query("DELETE FROM audit_log WHERE tenant_id = $1 AND seq = 2")
            .bind(&t.id)
            .execute(s.pool())
            .await
            .unwrap();
        assert_eq!(broken_at(s.verify_audit().await.unwrap()), Some(2));
        db.finish().await;
    }
}

#[tokio::test]
async fn import_is_all_or_nothing() {
    for db in backends().await {
        let s = &db.store;
        let t = s
            .create_tenant("sample", "サンプル市", None, 0, ev("cli"))
            .await
            .unwrap();
        let d = s
            .ensure_department_path(&t.id, "総務部", 0, ev_t(&t.id))
            .await
            .unwrap();
        let csv = "ログインID,氏名,所属\nu1,一号,総務部/新設課\nu2,二号,福祉部\n";
        let existing: std::collections::HashSet<String> = ["総務部".to_string()].into();
        let plan =
            domain::import::plan(csv.as_bytes(), &existing, &Default::default(), true).unwrap();
        assert_eq!(plan.departments_to_create, vec!["福祉部", "総務部/新設課"]);

        // Someone takes u2 between preview and confirm: nothing at all is created.
        s.create_user(&new_user(&t.id, "u2", &d.id, Role::User), ev_t(&t.id))
            .await
            .unwrap();
        let hashes = vec!["h".to_string(); 2];
        let err = s
            .apply_import(&t.id, &plan, &hashes, 10, None, 5, ev_t(&t.id))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::Conflict(ref m) if m.contains("3行目")),
            "{err:?}"
        );
        assert_eq!(s.list_departments(&t.id).await.unwrap().len(), 1);
        assert!(s.user_by_login(&t.id, "u1").await.is_err());
        assert!(s
            .verify_audit()
            .await
            .unwrap()
            .iter()
            .all(|r| r.result.is_ok()));

        s.delete_user(
            &t.id,
            &s.user_by_login(&t.id, "u2").await.unwrap().id,
            ev_t(&t.id),
        )
        .await
        .unwrap();
        let out = s
            .apply_import(&t.id, &plan, &hashes, 10, None, 5, ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!((out.users_created, out.departments_created), (2, 2));
        let u1 = s.user_by_login(&t.id, "u1").await.unwrap();
        assert!(u1.password_temporary);
        assert_eq!(u1.password_expires_at, Some(10));
        assert_eq!(u1.department_path, "総務部/新設課");
        db.finish().await;
    }
}

/// Benchmark, run by hand (numbers go in the closing note):
/// `cargo test -p storage --release --test conformance -- --ignored --nocapture bench_user_list`
/// Seeds 100,000 accounts in 60 departments and times the admin list queries (one page of
/// 50 with its total) against the naive baseline of loading every account.
#[tokio::test]
#[ignore]
async fn bench_user_list_100k() {
    use std::time::Instant;
    for db in backends().await {
        let s = &db.store;
        let t = s
            .create_tenant("bench", "ベンチ市", None, 0, ev("cli"))
            .await
            .unwrap();
        let mut depts = Vec::new();
        for bu in [
            "総務部",
            "税務部",
            "福祉部",
            "市民生活部",
            "建設部",
            "教育部",
        ] {
            for ka in 0..10 {
                let d = s
                    .ensure_department_path(&t.id, &format!("{bu}/第{ka}課"), 0, ev_t(&t.id))
                    .await
                    .unwrap();
                depts.push(d.id);
            }
        }
        let seed = Instant::now();
        let sei = [
            "佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "山本", "中村", "小林", "加藤",
        ];
        let mei = [
            "一郎",
            "花子",
            "健太",
            "由美",
            "翔",
            "さくら",
            "大輔",
            "美咲",
            "誠",
            "陽菜",
        ];
        let mut tx = s.pool().begin().await.unwrap();
        for i in 0..100_000usize {
            sqlx::query(
                "INSERT INTO users (id, tenant_id, login_id, display_name, email, department_id, role, status, password_hash, \
                 password_temporary, password_expires_at, password_changed_at, last_login_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, NULL, $5, 'user', 'active', 'x', 0, NULL, 0, $6, 0, 0)",
            )
            .bind(domain::ids::new_id())
            .bind(&t.id)
            .bind(format!("staff{i:06}"))
            .bind(format!("{} {}{}", sei[i % 10], mei[(i / 10) % 10], i % 7))
            .bind(&depts[i % depts.len()])
            .bind((i as i64 % 400) * domain::clock::DAY_MS)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        let b = format!("{:?}", s.backend());
        println!(
            "{b}: seeded 100,000 accounts in {:.1} s",
            seed.elapsed().as_secs_f64()
        );
        let scope = UserScope::All;
        let cases: Vec<(&str, UserScope, UserFilter, i64)> = vec![
            (
                "first page, no filter",
                scope.clone(),
                UserFilter::default(),
                0,
            ),
            (
                "page 1,000 (offset 49,950)",
                scope.clone(),
                UserFilter::default(),
                49_950,
            ),
            (
                "search 「佐藤 花」",
                scope.clone(),
                UserFilter {
                    query: Some("佐藤 花".into()),
                    ..Default::default()
                },
                0,
            ),
            (
                "search login id 「staff09999」",
                scope.clone(),
                UserFilter {
                    query: Some("staff09999".into()),
                    ..Default::default()
                },
                0,
            ),
            (
                "department admin scope 福祉部",
                UserScope::Subtree("福祉部".into()),
                UserFilter::default(),
                0,
            ),
            (
                "unused for 90 days",
                scope.clone(),
                UserFilter {
                    unused_since: Some(300 * domain::clock::DAY_MS),
                    ..Default::default()
                },
                0,
            ),
        ];
        let report = |name: &str, mut ms: Vec<f64>| {
            ms.sort_by(|a, b| a.total_cmp(b));
            let p = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
            println!(
                "{b}: {name:<34} median {:>7.2} ms  p99 {:>7.2} ms  (n={})",
                p(0.5),
                p(0.99),
                ms.len()
            );
        };
        for (name, sc, f, offset) in cases {
            let mut ms = Vec::new();
            for _ in 0..40 {
                let t0 = Instant::now();
                let (page, total) = s.list_users(&t.id, &sc, &f, 50, offset).await.unwrap();
                ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                assert!(total >= page.len() as i64);
            }
            report(name, ms);
        }
        let mut ms = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            let (all, _) = s
                .list_users(&t.id, &scope, &UserFilter::default(), 200_000, 0)
                .await
                .unwrap();
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(all.len(), 100_000);
        }
        report("baseline: load all 100,000", ms);
        let mut ms = Vec::new();
        for _ in 0..40 {
            let t0 = Instant::now();
            s.list_departments(&t.id).await.unwrap();
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        report("department tree with counts", ms);
        db.finish().await;
    }
}

#[tokio::test]
async fn providers_models_conversations_and_answers() {
    for db in backends().await {
        let s = &db.store;
        let b = format!("{:?}", s.backend());
        let t = s
            .create_tenant("sample", "サンプル市", None, 0, ev("cli"))
            .await
            .unwrap();
        let t2 = s
            .create_tenant("other", "よそ町", None, 0, ev("cli"))
            .await
            .unwrap();
        let d = s
            .ensure_department_path(&t.id, "総務部", 0, ev_t(&t.id))
            .await
            .unwrap();
        let u = s
            .create_user(&new_user(&t.id, "chat1", &d.id, Role::User), ev_t(&t.id))
            .await
            .unwrap();
        let other = s
            .create_user(&new_user(&t.id, "chat2", &d.id, Role::User), ev_t(&t.id))
            .await
            .unwrap();

        let pin = ProviderInput {
            name: "Azure 東日本".into(),
            kind: "azure_openai".into(),
            base_url: "https://example.openai.azure.com".into(),
            api_key: "sk-secret-1".into(),
            region: "Japan East".into(),
            no_training: true,
            enabled: true,
            ..Default::default()
        };
        let p = s
            .save_provider(&t.id, None, &pin, 1, ev_t(&t.id))
            .await
            .unwrap();
        assert!(!format!("{p:?}").contains("sk-secret-1"));
        // An edit with an empty key keeps the stored one.
        let p = s
            .save_provider(
                &t.id,
                Some(&p.id),
                &ProviderInput {
                    api_key: String::new(),
                    region: "Japan West".into(),
                    ..pin.clone()
                },
                2,
                ev_t(&t.id),
            )
            .await
            .unwrap();
        assert_eq!(
            (p.api_key.as_str(), p.region.as_str()),
            ("sk-secret-1", "Japan West")
        );
        assert!(matches!(
            s.provider(&t2.id, &p.id).await,
            Err(StorageError::NotFound)
        ));
        assert!(
            matches!(
                s.save_provider(&t.id, None, &pin, 1, ev_t(&t.id)).await,
                Err(StorageError::Conflict(_))
            ),
            "{b}"
        );

        let m1 = s
            .save_model(
                &t.id,
                None,
                &ModelInput {
                    max_class: 2,
                    provider_id: p.id.clone(),
                    model: "gpt-4o".into(),
                    display_name: "GPT-4o".into(),
                    enabled: true,
                    is_default: true,
                    all_departments: true,
                    department_ids: vec![],
                },
                3,
                ev_t(&t.id),
            )
            .await
            .unwrap();
        let m2 = s
            .save_model(
                &t.id,
                None,
                &ModelInput {
                    max_class: 2,
                    provider_id: p.id.clone(),
                    model: "gpt-4o-mini".into(),
                    display_name: "GPT-4o mini".into(),
                    enabled: true,
                    is_default: true,
                    all_departments: false,
                    department_ids: vec![d.id.clone()],
                },
                3,
                ev_t(&t.id),
            )
            .await
            .unwrap();
        assert_eq!(m2.department_ids, vec![d.id.clone()]);
        let models = s.list_models(&t.id).await.unwrap();
        assert_eq!(
            models.iter().filter(|m| m.is_default).count(),
            1,
            "{b}: one default"
        );
        assert!(!s.model(&t.id, &m1.id).await.unwrap().is_default);
        // Another tenant's provider cannot carry our model.
        assert!(s
            .save_model(
                &t2.id,
                None,
                &ModelInput {
                    max_class: 2,
                    provider_id: p.id.clone(),
                    model: "x".into(),
                    display_name: "x".into(),
                    ..Default::default()
                },
                3,
                ev_t(&t2.id)
            )
            .await
            .is_err());

        let c = s
            .create_conversation(&t.id, &u.id, "新しい会話", 10)
            .await
            .unwrap();
        assert!(
            matches!(
                s.conversation(&t.id, &other.id, &c.id).await,
                Err(StorageError::NotFound)
            ),
            "{b}: other user's conversation"
        );
        let turn = NewTurn {
            sources: None,
            tenant_id: t.id.clone(),
            conversation_id: c.id.clone(),
            content: "議事録を要約してください".into(),
            attachment_name: None,
            attachment_text: None,
            input_chars: 12,
            model_id: m1.id.clone(),
            model_name: "GPT-4o".into(),
            provider_name: p.name.clone(),
            now: 20,
        };
        let (q, a) = s.begin_turn(&turn, ev_t(&t.id)).await.unwrap();
        let msgs = s.messages(&t.id, &c.id).await.unwrap();
        assert_eq!(
            msgs.iter()
                .map(|m| (m.seq, m.role.as_str(), m.status.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "user", "complete"), (2, "assistant", "streaming")]
        );
        assert_eq!(msgs[0].id, q);
        // A crash leaves no answer "streaming" forever.
        assert_eq!(s.fail_interrupted_answers().await.unwrap(), 1);
        let end = AnswerEnd {
            status: "stopped".into(),
            content: "要約：".into(),
            ttft_ms: Some(40),
            total_ms: 90,
            ..Default::default()
        };
        s.finish_answer(&t.id, &a, &end, &u.id, 30, None)
            .await
            .unwrap();
        let m = s.message(&t.id, &a).await.unwrap();
        assert_eq!(
            (m.status.as_str(), m.output_chars, m.ttft_ms),
            ("stopped", 3, Some(40))
        );
        let (_, a2) = s
            .begin_turn(
                &NewTurn {
                    now: 40,
                    ..turn.clone()
                },
                ev_t(&t.id),
            )
            .await
            .unwrap();
        let end = AnswerEnd {
            status: "failed".into(),
            error_code: Some("rate_limited".into()),
            error_detail: Some("429".into()),
            total_ms: 5,
            ..Default::default()
        };
        s.finish_answer(&t.id, &a2, &end, &u.id, 50, None)
            .await
            .unwrap();
        assert_eq!(
            s.list_failures(&t.id, 10).await.unwrap()[0].2,
            "rate_limited"
        );
        assert_eq!(s.messages(&t.id, &c.id).await.unwrap().len(), 4);

        s.rename_conversation(&t.id, &u.id, &c.id, "議事録の要約")
            .await
            .unwrap();
        assert!(matches!(
            s.rename_conversation(&t.id, &other.id, &c.id, "x").await,
            Err(StorageError::NotFound)
        ));
        assert_eq!(
            s.list_conversations(&t.id, &u.id, "議事録", 50)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            s.list_conversations(&t.id, &u.id, "%", 50)
                .await
                .unwrap()
                .len(),
            0
        );
        assert!(matches!(
            s.delete_conversation(&t.id, &other.id, &c.id, ev_t(&t.id))
                .await,
            Err(StorageError::NotFound)
        ));
        s.delete_conversation(&t.id, &u.id, &c.id, ev_t(&t.id))
            .await
            .unwrap();
        // Hidden from its owner, kept for the chat log (M6).
        assert!(matches!(
            s.conversation(&t.id, &u.id, &c.id).await,
            Err(StorageError::NotFound)
        ));
        assert!(s
            .list_conversations(&t.id, &u.id, "", 10)
            .await
            .unwrap()
            .iter()
            .all(|x| x.id != c.id));
        assert!(matches!(
            s.delete_conversation(&t.id, &u.id, &c.id, ev_t(&t.id))
                .await,
            Err(StorageError::NotFound)
        ));
        assert!(!s.messages(&t.id, &c.id).await.unwrap().is_empty());
        let (_, _, deleted) = s.conversation_for_log(&t.id, &c.id).await.unwrap();
        assert!(deleted);
        let logs = s
            .chat_logs(&t.id, &LogFilter::default(), None, 10)
            .await
            .unwrap();
        assert!(logs
            .iter()
            .any(|l| l.conversation_id == c.id && l.conversation_deleted));
        assert!(s
            .verify_audit()
            .await
            .unwrap()
            .iter()
            .all(|r| r.result.is_ok()));
        db.finish().await;
    }
}

#[tokio::test]
async fn usage_records_counters_and_reports() {
    for db in backends().await {
        let s = &db.store;
        let t = s
            .create_tenant("usage", "利用市", None, 1_000, ev("cli"))
            .await
            .unwrap();
        let other = s
            .create_tenant("usage2", "よそ町", Some("u2.example"), 1_000, ev("cli"))
            .await
            .unwrap();
        let top = s
            .ensure_department_path(&t.id, "税務部", 1_000, ev_t(&t.id))
            .await
            .unwrap();
        let sub = s
            .ensure_department_path(&t.id, "税務部/課税課", 1_000, ev_t(&t.id))
            .await
            .unwrap();
        let fuku = s
            .ensure_department_path(&t.id, "福祉部", 1_000, ev_t(&t.id))
            .await
            .unwrap();
        let rec = |user: &str, dept: &Department, chain: Vec<String>, day: i64, counted: i64| {
            UsageRecord {
                tenant_id: t.id.clone(),
                month: "2026-11".into(),
                day,
                at: 1_000,
                user_id: user.into(),
                user_login: user.into(),
                user_name: format!("職員 {user}"),
                department_id: Some(dept.id.clone()),
                department_path: dept.path.clone(),
                dept_chain: chain,
                model_id: None,
                model_name: "モデルA".into(),
                message_id: None,
                status: "complete".into(),
                input_chars: counted / 2,
                output_chars: counted - counted / 2,
                context_chars: 7,
                counted_chars: counted,
                input_tokens: Some(3),
                output_tokens: None,
                over_limit: day == 3,
            }
        };
        let kazei = vec![top.id.clone(), sub.id.clone()];
        s.record_usage(&rec("u1", &sub, kazei.clone(), 1, 100))
            .await
            .unwrap();
        s.record_usage(&rec("u1", &sub, kazei.clone(), 3, 50))
            .await
            .unwrap();
        s.record_usage(&rec("u2", &top, vec![top.id.clone()], 3, 30))
            .await
            .unwrap();
        s.record_usage(&rec("u3", &fuku, vec![fuku.id.clone()], 2, 1_000))
            .await
            .unwrap();
        // A failed request with nothing back counts nothing, and touches no counter.
        s.record_usage(&rec("u3", &fuku, vec![fuku.id.clone()], 2, 0))
            .await
            .unwrap();
        let keys: Vec<String> = vec![
            "tenant".into(),
            format!("d:{}", top.id),
            format!("d:{}", sub.id),
            format!("d:{}", fuku.id),
            "u:u1".into(),
            "u:nobody".into(),
        ];
        let used = s.usage_used(&t.id, "2026-11", &keys).await.unwrap();
        assert_eq!(used["tenant"], 1_180);
        assert_eq!(
            used[&format!("d:{}", top.id)],
            180,
            "a department includes the ones below"
        );
        assert_eq!(used[&format!("d:{}", sub.id)], 150);
        assert_eq!(used[&format!("d:{}", fuku.id)], 1_000);
        assert_eq!(used["u:u1"], 150);
        assert!(!used.contains_key("u:nobody"));
        assert!(s
            .usage_used(&t.id, "2026-10", &keys)
            .await
            .unwrap()
            .is_empty());
        assert!(s
            .usage_used(&other.id, "2026-11", &keys)
            .await
            .unwrap()
            .is_empty());

        let all = s
            .usage_report(&t.id, "2026-11", &UsageFilter::default(), 2)
            .await
            .unwrap();
        assert_eq!(all.totals.requests, 5);
        assert_eq!(all.totals.counted_chars, 1_180);
        assert_eq!(all.totals.context_chars, 35);
        assert_eq!(all.totals.input_tokens, 15);
        assert_eq!(all.totals.output_tokens, 0);
        assert_eq!(all.totals.over_limit, 2);
        assert_eq!(all.daily, vec![(1, 100), (2, 1_000), (3, 80)]);
        assert_eq!(all.by_department[0].0, "福祉部");
        assert_eq!(all.by_model.len(), 1);
        assert_eq!(all.top_users.len(), 2);
        assert_eq!(all.top_users[0].login_id, "u3");
        assert_eq!(all.top_users[1].totals.counted_chars, 150);
        // A department subtree, by its chain.
        let zeimu = s
            .usage_report(
                &t.id,
                "2026-11",
                &UsageFilter {
                    user_id: None,
                    dept_chain: Some(top.id.clone()),
                },
                10,
            )
            .await
            .unwrap();
        assert_eq!(zeimu.totals.counted_chars, 180);
        assert_eq!(zeimu.by_department.len(), 2);
        let me = s
            .usage_report(
                &t.id,
                "2026-11",
                &UsageFilter {
                    user_id: Some("u2".into()),
                    dept_chain: None,
                },
                0,
            )
            .await
            .unwrap();
        assert_eq!(me.totals.counted_chars, 30);
        assert!(me.top_users.is_empty());
        let months = s
            .usage_by_month(
                &t.id,
                &["2026-10".into(), "2026-11".into()],
                &UsageFilter::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            months,
            vec![("2026-10".into(), 0), ("2026-11".into(), 1_180)]
        );

        // Allocations and caps: all or nothing, audited, gone with their department.
        s.set_usage_allocations(
            &t.id,
            &[(top.id.clone(), Some(300_000)), (fuku.id.clone(), Some(5))],
            2_000,
            ev_t(&t.id),
        )
        .await
        .unwrap();
        s.set_usage_allocations(&t.id, &[(fuku.id.clone(), None)], 2_000, ev_t(&t.id))
            .await
            .unwrap();
        let alloc = s.usage_allocations(&t.id).await.unwrap();
        assert_eq!(alloc.len(), 1);
        assert_eq!(alloc[&top.id], 300_000);
        assert!(s.usage_allocations(&other.id).await.unwrap().is_empty());
        let u = s
            .create_user(&new_user(&t.id, "capped", &sub.id, Role::User), ev_t(&t.id))
            .await
            .unwrap();
        s.set_usage_user_cap(&t.id, &u.id, Some(42), 2_000, ev_t(&t.id))
            .await
            .unwrap();
        assert_eq!(s.usage_user_caps(&t.id).await.unwrap()[&u.id], 42);
        let capped = s.usage_capped_users(&t.id).await.unwrap();
        assert_eq!(
            capped,
            vec![(
                "capped".into(),
                "職員 capped".into(),
                "税務部/課税課".into(),
                42
            )]
        );
        for r in s.verify_audit().await.unwrap() {
            assert!(r.result.is_ok(), "{}", r.tenant_id);
        }
        db.finish().await;
    }
}

async fn key_rows(s: &Store, tenant: &str) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) AS n FROM tenant_keys WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(s.pool())
        .await
        .unwrap()
        .try_get::<i64, _>("n")
        .unwrap()
}

fn sha(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[tokio::test]
async fn files_are_sealed_per_tenant_and_shredded_with_their_keys() {
    use std::sync::Arc;
    for db in backends().await {
        let s = &db.store;
        let b = format!("{:?}", s.backend());
        let t1 = s
            .create_tenant("sealed", "暗号市", None, 1_000, ev("cli"))
            .await
            .unwrap();
        let t2 = s
            .create_tenant("neighbour", "隣町", None, 1_000, ev("cli"))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let objects = Arc::new(FsObjects::new(dir.path().join("files")));
        let master = MasterKey::generate();
        let again = MasterKey::parse(&master.to_hex()).unwrap();
        let clock: Arc<dyn domain::Clock> = Arc::new(domain::ManualClock::new(5_000));
        let blobs = BlobStore::new(objects.clone(), master, s.clone(), clock.clone());

        // The first file makes the tenant's key, on the record; the same content again is
        // not written twice.
        let plain = "住民税の減免に関する内部資料。非公開。".repeat(4000);
        let name = sha(plain.as_bytes());
        let src = dir.path().join("upload");
        std::fs::write(&src, &plain).unwrap();
        assert!(blobs.keys(&t1.id).await.unwrap().is_empty(), "{b}");
        assert!(blobs
            .put_file(&t1.id, &name, &src, ev_t(&t1.id))
            .await
            .unwrap());
        assert!(!blobs
            .put_file(&t1.id, &name, &src, ev_t(&t1.id))
            .await
            .unwrap());
        assert_eq!(key_rows(s, &t1.id).await, 1, "{b}");
        let filter = AuditFilter {
            action_prefix: Some("tenant_key.create".into()),
            ..Default::default()
        };
        let (recs, n) = s.list_audit(&t1.id, &filter, 10, 0).await.unwrap();
        assert_eq!(n, 1, "{b}");
        assert!(!recs[0].detail.contains(&again.to_hex()[..]), "{b}");
        assert_eq!(blobs.read(&t1.id, &name).await.unwrap(), plain.as_bytes());
        let stored = std::fs::read(objects.path(&t1.id, &name)).unwrap();
        assert!(storage::blob::is_sealed(&stored));
        assert!(
            !String::from_utf8_lossy(&stored).contains("住民税"),
            "{b}: plaintext on disk"
        );

        // The neighbour cannot read it, even with the file copied into its own place.
        assert!(matches!(
            blobs.read(&t2.id, &name).await,
            Err(StorageError::Io(_))
        ));
        let copy = objects.path(&t2.id, &name);
        std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
        std::fs::copy(objects.path(&t1.id, &name), &copy).unwrap();
        assert!(matches!(
            blobs.read(&t2.id, &name).await,
            Err(StorageError::Integrity(_))
        ));
        // Keys made at once by several requests: one key.
        let makers: Vec<_> = (0..4)
            .map(|_| {
                let (blobs, t) = (blobs.clone(), t2.id.clone());
                tokio::spawn(async move { blobs.keys_for_writing(&t, None).await })
            })
            .collect();
        for m in makers {
            assert!(!m.await.unwrap().unwrap().is_empty());
        }
        assert_eq!(key_rows(s, &t2.id).await, 1, "{b}");
        assert!(matches!(
            blobs.read(&t2.id, &name).await,
            Err(StorageError::Integrity(_))
        ));

        // Another master key (a restored database with a new installation's key): a clear
        // error, not garbage; the right one opens every key.
        let wrong = BlobStore::new(
            objects.clone(),
            MasterKey::generate(),
            s.clone(),
            clock.clone(),
        );
        for e in [
            wrong.read(&t1.id, &name).await.unwrap_err(),
            s.verify_tenant_keys(&MasterKey::generate())
                .await
                .unwrap_err(),
        ] {
            assert!(
                matches!(&e, StorageError::Key(m) if m.contains("マスターキー")),
                "{b}: {e:?}"
            );
        }
        assert_eq!(s.verify_tenant_keys(&again).await.unwrap(), 2, "{b}");

        // Files from before encryption: read as they are, then sealed in place; a file
        // whose content is not its name is reported and left alone.
        let old = "旧版で保存した例規集".as_bytes();
        let old_name = sha(old);
        let bad_name = sha(b"something else");
        for (n, body) in [(&old_name, old), (&bad_name, &b"not its hash"[..])] {
            let p = objects.path(&t1.id, n);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
        }
        assert_eq!(blobs.read(&t1.id, &old_name).await.unwrap(), old);
        let report = blobs.seal_legacy(&t1.id, ev_t(&t1.id)).await.unwrap();
        assert_eq!((report.sealed, report.already), (1, 1), "{b}: {report:?}");
        assert_eq!(report.failed.len(), 1, "{b}");
        assert_eq!(report.failed[0].0, bad_name);
        assert!(report.failed[0].1.contains("ハッシュ"), "{report:?}");
        assert!(storage::blob::is_sealed(
            &std::fs::read(objects.path(&t1.id, &old_name)).unwrap()
        ));
        assert_eq!(
            std::fs::read(objects.path(&t1.id, &bad_name)).unwrap(),
            b"not its hash"
        );
        assert_eq!(blobs.read(&t1.id, &old_name).await.unwrap(), old);
        let report = blobs.seal_legacy(&t1.id, ev_t(&t1.id)).await.unwrap();
        assert_eq!((report.sealed, report.already), (0, 2), "{b}: {report:?}");
        blobs.remove(&t1.id, &bad_name).await.unwrap();
        blobs.remove(&t1.id, &bad_name).await.unwrap();

        // Disposal of the tenant deletes its keys in the same transaction: its files no
        // longer open, before they are even removed. The neighbour keeps its key.
        let requester = Operator {
            id: "u1".into(),
            label: "依頼者（admin01）".into(),
        };
        let approver = Operator {
            id: "u2".into(),
            label: "承認者（admin02）".into(),
        };
        let d = s
            .request_tenant_disposal(&t1.id, "契約終了", &requester, ev_t(&t1.id))
            .await
            .unwrap();
        let done = s
            .approve_tenant_disposal(&t1.id, &d.id, &approver, ("digest", 9_000), ev_t(&t1.id))
            .await
            .unwrap();
        assert!(
            done.counts
                .iter()
                .any(|(label, n)| label.contains("暗号鍵") && *n == 1),
            "{b}: {:?}",
            done.counts
        );
        assert_eq!(key_rows(s, &t1.id).await, 0, "{b}");
        assert_eq!(key_rows(s, &t2.id).await, 1, "{b}");
        assert!(matches!(
            blobs.read(&t1.id, &name).await,
            Err(StorageError::Integrity(_))
        ));
        // The same content uploaded again later (the registration stays): a new key, and
        // the unreadable copy is replaced rather than reused.
        assert!(blobs
            .put_file(&t1.id, &name, &src, ev_t(&t1.id))
            .await
            .unwrap());
        assert_eq!(key_rows(s, &t1.id).await, 1, "{b}");
        assert_eq!(blobs.read(&t1.id, &name).await.unwrap(), plain.as_bytes());
        blobs.remove_tenant(&t1.id).await.unwrap();
        assert!(objects.list(&t1.id).unwrap().is_empty());
        assert!(!objects.list(&t2.id).unwrap().is_empty());
        db.finish().await;
    }
}
