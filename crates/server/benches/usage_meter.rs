//! What the allowance check costs a chat request, run by hand (not a test):
//!
//! ```sh
//! cargo bench -p server --bench usage_meter -- 100
//! ```
//!
//! N members of staff (default 100) chat at the same time against one SQLite database (WAL,
//! `synchronous=FULL`, as shipped): each records a question, streams an answer for
//! `STREAM_MS` (the provider's time, simulated), stores it, and asks again; their starts are
//! spread over one answer's time, so about N requests are always in flight. Each member's
//! requests alternate between without metering (record the question, store the answer) and
//! with it (check the limits and hold room first; store the answer with its usage record and
//! counters in the same transaction; release the hold), so both see the same load. Reports
//! the database time each part takes (p50, p99) and what metering adds to a request.
//!
//! On a virtual machine the disk's fsync stalls dominate every p99; run it also with
//! `TMPDIR=/dev/shm` (the database on tmpfs) to see metering's own cost apart from them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use domain::usage::{Month, ScopeKind};
use domain::{Clock, Role, SystemClock};
use server::config::Config;
use server::usage::{reserve, Scope};
use std::sync::Arc;
use std::time::Instant;
use storage::{AnswerEnd, AuditEvent, NewTurn, NewUser, UsageRecord};

const ROUNDS: usize = 40;
const STREAM_MS: u64 = 500;

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let state = server::build_state(config, clock.clone()).await.unwrap();
    let tenant = state.default_tenant_id.clone();
    let ev = AuditEvent {
        tenant_id: tenant.clone(),
        at_ms: clock.now_ms(),
        actor_login: "bench".into(),
        ..Default::default()
    };
    let dept = state
        .store
        .ensure_department_path(&tenant, "総務部/計測課", clock.now_ms(), ev.clone())
        .await
        .unwrap();
    let parent = state
        .store
        .ensure_department_path(&tenant, "総務部", clock.now_ms(), ev.clone())
        .await
        .unwrap();
    let mut users = Vec::new();
    for i in 0..n {
        let u = state
            .store
            .create_user(
                &NewUser {
                    tenant_id: tenant.clone(),
                    login_id: format!("bench{i}"),
                    display_name: format!("計測 {i}"),
                    email: None,
                    department_id: dept.id.clone(),
                    role: Role::User,
                    password_hash: "x".into(),
                    temporary_until: None,
                    now: clock.now_ms(),
                },
                ev.clone(),
            )
            .await
            .unwrap();
        let conv = state
            .store
            .create_conversation(&tenant, &u.id, "計測", clock.now_ms())
            .await
            .unwrap();
        users.push((u, conv.id));
    }

    let mut plain_finish = Vec::new();
    let mut metered_check = Vec::new();
    let mut metered_finish = Vec::new();
    let mut plain_total = Vec::new();
    let mut metered_total = Vec::new();
    let wall = Instant::now();
    let mut tasks = Vec::new();
    for (i, (u, conv)) in users.iter().enumerate() {
        let state = state.clone();
        let tenant = tenant.clone();
        let (u, conv) = (u.clone(), conv.clone());
        let chain = vec![parent.id.clone(), dept.id.clone()];
        let ev = ev.clone();
        let delay = std::time::Duration::from_millis(STREAM_MS * i as u64 / n as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut out = Vec::new();
            for round in 0..ROUNDS {
                let metered = (round + i) % 2 == 1;
                let now = state.now();
                let month = Month::of(now);
                let scopes = vec![
                    Scope {
                        key: "tenant".into(),
                        kind: ScopeKind::Tenant,
                        name: "全体".into(),
                        limit: Some(5_000_000_000),
                    },
                    Scope {
                        key: format!("d:{}", chain[0]),
                        kind: ScopeKind::Department,
                        name: "総務部".into(),
                        limit: Some(1_000_000_000),
                    },
                    Scope {
                        key: format!("d:{}", chain[1]),
                        kind: ScopeKind::Department,
                        name: "計測課".into(),
                        limit: None,
                    },
                    Scope {
                        key: format!("u:{}", u.id),
                        kind: ScopeKind::User,
                        name: "あなた".into(),
                        limit: Some(100_000_000),
                    },
                ];
                let t0 = Instant::now();
                let mut hold = if metered {
                    Some(
                        reserve(&state, &tenant, month, &scopes, 30, false)
                            .await
                            .unwrap(),
                    )
                } else {
                    None
                };
                let check = t0.elapsed().as_secs_f64() * 1000.0;
                let turn = NewTurn {
                    sources: None,
                    tenant_id: tenant.clone(),
                    conversation_id: conv.clone(),
                    content: "来年度の予算要求の要点をまとめてください。よろしくお願いします"
                        .into(),
                    attachment_name: None,
                    attachment_text: None,
                    input_chars: 30,
                    model_id: "m".into(),
                    model_name: "計測モデル".into(),
                    provider_name: "計測".into(),
                    now,
                };
                let (_, answer) = state.store.begin_turn(&turn, ev.clone()).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(STREAM_MS)).await;
                let end = AnswerEnd {
                    status: "complete".into(),
                    content: "回答".repeat(200),
                    total_ms: 1,
                    ..Default::default()
                };
                let usage = metered.then(|| UsageRecord {
                    tenant_id: tenant.clone(),
                    month: month.key(),
                    day: i64::from(domain::usage::day_of_month(now)),
                    at: now,
                    user_id: u.id.clone(),
                    user_login: u.login_id.clone(),
                    user_name: u.display_name.clone(),
                    department_id: Some(chain[1].clone()),
                    department_path: "総務部/計測課".into(),
                    dept_chain: chain.clone(),
                    model_id: Some("m".into()),
                    model_name: "計測モデル".into(),
                    message_id: Some(answer.clone()),
                    status: "complete".into(),
                    input_chars: 30,
                    output_chars: 400,
                    counted_chars: 430,
                    ..Default::default()
                });
                let t1 = Instant::now();
                state
                    .store
                    .finish_answer(&tenant, &answer, &end, &u.id, now, usage.as_ref())
                    .await
                    .unwrap();
                if let Some(h) = hold.as_mut() {
                    h.settled(430);
                }
                drop(hold);
                let finish = t1.elapsed().as_secs_f64() * 1000.0;
                out.push((metered, check, finish));
            }
            out
        }));
    }
    for t in tasks {
        for (metered, check, finish) in t.await.unwrap() {
            if metered {
                metered_check.push(check);
                metered_finish.push(finish);
                metered_total.push(check + finish);
            } else {
                plain_finish.push(finish);
                plain_total.push(finish);
            }
        }
    }
    let (pf50, pf99) = (pct(&mut plain_finish, 0.5), pct(&mut plain_finish, 0.99));
    let (mc50, mc99) = (pct(&mut metered_check, 0.5), pct(&mut metered_check, 0.99));
    let (mf50, mf99) = (
        pct(&mut metered_finish, 0.5),
        pct(&mut metered_finish, 0.99),
    );
    let (pt50, pt99) = (pct(&mut plain_total, 0.5), pct(&mut plain_total, 0.99));
    let (mt50, mt99) = (pct(&mut metered_total, 0.5), pct(&mut metered_total, 0.99));
    println!(
        "{n} concurrent users, {} requests each per mode, answers of {STREAM_MS} ms, SQLite (WAL, synchronous=FULL); wall {:.1} s",
        ROUNDS / 2,
        wall.elapsed().as_secs_f64()
    );
    println!("  allowance check and hold          p50 {mc50:7.3} ms  p99 {mc99:7.3} ms");
    println!("  storing the answer   without      p50 {pf50:7.3} ms  p99 {pf99:7.3} ms");
    println!("                       with usage   p50 {mf50:7.3} ms  p99 {mf99:7.3} ms");
    println!("  check + store        without      p50 {pt50:7.3} ms  p99 {pt99:7.3} ms");
    println!("                       with usage   p50 {mt50:7.3} ms  p99 {mt99:7.3} ms");
    println!(
        "  added by metering                 p50 {:7.3} ms  p99 {:7.3} ms",
        mt50 - pt50,
        mt99 - pt99
    );
    let _ = clock;
}
