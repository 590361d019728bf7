//! Alert rules over the audit log (S8): brute force on an account or from an address,
//! bulk exports outside office hours, a user's volume far above their usual, and a sign-in
//! from an address never seen for the account. Pure functions over a sequence of events
//! and what is known from before it, so the rules can be replayed in tests and rerun over
//! the same events without raising an alert twice (each alert has a stable key).

use std::collections::{BTreeMap, HashMap, HashSet};

/// Failed sign-ins that make an alert, and the window they must fall in.
pub const FAILED_SIGNINS: usize = 10;
pub const FAILED_WINDOW_MS: i64 = 5 * 60_000;
/// Office hours in JST, weekdays: exports outside them are reported.
pub const OFFICE_START_HOUR: u32 = 8;
pub const OFFICE_END_HOUR: u32 = 19;
/// A day's characters far above usual: at least this many times the mean of the previous
/// days, and at least the floor (small numbers are not worth an alert).
pub const VOLUME_FACTOR: f64 = 5.0;
pub const VOLUME_FLOOR: u64 = 30_000;
/// Days of history a user must have before "usual" means anything.
pub const VOLUME_MIN_ACTIVE_DAYS: usize = 5;
pub const VOLUME_HISTORY_DAYS: usize = 28;

/// The exports that move records in bulk.
pub const EXPORT_ACTIONS: &[&str] = &[
    "log.export",
    "audit.export",
    "users.export",
    "tenant.export",
];

/// One audit record as the rules see it.
#[derive(Clone, Debug, Default)]
pub struct Event {
    pub seq: i64,
    pub at_ms: i64,
    pub actor_id: Option<String>,
    pub actor_login: String,
    pub ip: String,
    pub action: String,
    pub result: String,
    /// Characters sent, for `chat.send`.
    pub input_chars: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    FailedSigninsAccount,
    FailedSigninsAddress,
    OffHoursExport,
    VolumeSpike,
    NewAddress,
}

impl Rule {
    pub const ALL: [Rule; 5] = [
        Rule::FailedSigninsAccount,
        Rule::FailedSigninsAddress,
        Rule::OffHoursExport,
        Rule::VolumeSpike,
        Rule::NewAddress,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Rule::FailedSigninsAccount => "signin_failures_account",
            Rule::FailedSigninsAddress => "signin_failures_address",
            Rule::OffHoursExport => "offhours_export",
            Rule::VolumeSpike => "volume_spike",
            Rule::NewAddress => "new_address",
        }
    }

    pub fn parse(s: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.code() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            Rule::FailedSigninsAccount => "同じアカウントへのログイン失敗の多発",
            Rule::FailedSigninsAddress => "同じアドレスからのログイン失敗の多発",
            Rule::OffHoursExport => "勤務時間外の一括出力",
            Rule::VolumeSpike => "普段より極端に多い利用",
            Rule::NewAddress => "初めてのアドレスからのログイン",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub rule: Rule,
    /// The account (login id) or address the alert is about.
    pub subject: String,
    /// With rule and subject, what makes the alert unique: a rerun finds the same key.
    pub window_key: String,
    /// When the event that raised it happened.
    pub at_ms: i64,
    pub summary: String,
    /// The audit records it rests on.
    pub seqs: Vec<i64>,
}

/// What is known from before the events analysed.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Addresses each account (by user id) has signed in from before.
    pub known_addresses: HashMap<String, HashSet<String>>,
    /// Characters each user (by user id) sent on each of the previous days, oldest first,
    /// days without use as zero.
    pub daily_chars: HashMap<String, Vec<u64>>,
}

fn jst(at_ms: i64) -> chrono::DateTime<chrono::FixedOffset> {
    use chrono::TimeZone;
    crate::time::to_jst(at_ms).unwrap_or_else(|| {
        chrono::FixedOffset::east_opt(0)
            .and_then(|z| z.timestamp_millis_opt(0).single())
            .unwrap_or_default()
    })
}

/// Outside 08:00–19:00 JST on a weekday, or any time on Saturday and Sunday.
pub fn outside_office_hours(at_ms: i64) -> bool {
    use chrono::{Datelike, Timelike};
    let t = jst(at_ms);
    let weekend = matches!(t.weekday(), chrono::Weekday::Sat | chrono::Weekday::Sun);
    weekend || t.hour() < OFFICE_START_HOUR || t.hour() >= OFFICE_END_HOUR
}

/// The hour (JST) an alert falls in: at most one alert per rule and subject an hour.
fn hour_key(at_ms: i64) -> String {
    jst(at_ms).format("%Y-%m-%dT%H").to_string()
}

fn day_key(at_ms: i64) -> String {
    jst(at_ms).format("%Y-%m-%d").to_string()
}

/// Runs every rule over `events` (in audit order).
pub fn analyse(events: &[Event], history: &History) -> Vec<Alert> {
    let mut out = Vec::new();
    failed_signins(events, Rule::FailedSigninsAccount, &mut out);
    failed_signins(events, Rule::FailedSigninsAddress, &mut out);
    off_hours_exports(events, &mut out);
    volume(events, history, &mut out);
    new_addresses(events, history, &mut out);
    // A rerun over overlapping events may find a window twice; keep the first.
    let mut seen = HashSet::new();
    out.retain(|a| seen.insert((a.rule, a.subject.clone(), a.window_key.clone())));
    out
}

fn failed_signins(events: &[Event], rule: Rule, out: &mut Vec<Alert>) {
    let mut by: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.action == "auth.login" && e.result == "failure")
    {
        let key = match rule {
            Rule::FailedSigninsAccount => e.actor_login.trim().to_lowercase(),
            _ => e.ip.clone(),
        };
        if !key.is_empty() && key != "-" {
            by.entry(key).or_default().push(e);
        }
    }
    for (subject, list) in by {
        let mut start = 0;
        let mut after = 0; // events up to here are in an alert already
        for end in 0..list.len() {
            while list[end].at_ms - list[start].at_ms > FAILED_WINDOW_MS {
                start += 1;
            }
            let from = start.max(after);
            if end + 1 - from >= FAILED_SIGNINS {
                let window = &list[from..=end];
                let summary = match rule {
                    Rule::FailedSigninsAccount => format!(
                        "ログインID「{subject}」へのログインが5分間に{}回失敗しました（パスワードの総当たりのおそれ）。",
                        window.len()
                    ),
                    _ => {
                        let accounts: HashSet<&str> =
                            window.iter().map(|e| e.actor_login.as_str()).collect();
                        format!(
                            "アドレス {subject} からのログインが5分間に{}回失敗しました（対象のログインID {}件）。",
                            window.len(),
                            accounts.len()
                        )
                    }
                };
                out.push(Alert {
                    rule,
                    subject: subject.clone(),
                    window_key: hour_key(list[end].at_ms),
                    at_ms: list[end].at_ms,
                    summary,
                    seqs: window.iter().map(|e| e.seq).collect(),
                });
                after = end + 1;
            }
        }
    }
}

fn off_hours_exports(events: &[Event], out: &mut Vec<Alert>) {
    for e in events.iter().filter(|e| {
        EXPORT_ACTIONS.contains(&e.action.as_str())
            && e.result == "success"
            && outside_office_hours(e.at_ms)
    }) {
        out.push(Alert {
            rule: Rule::OffHoursExport,
            subject: e.actor_login.clone(),
            window_key: e.seq.to_string(),
            at_ms: e.at_ms,
            summary: format!(
                "{} が勤務時間外（{}）に一括出力（{}）を行いました。",
                e.actor_login,
                crate::time::format_jst(e.at_ms),
                e.action
            ),
            seqs: vec![e.seq],
        });
    }
}

fn volume(events: &[Event], history: &History, out: &mut Vec<Alert>) {
    // (user, day) → (login, characters, events)
    let mut days: BTreeMap<(String, String), (String, u64, Vec<&Event>)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.action == "chat.send") {
        let Some(user) = &e.actor_id else { continue };
        let d = days
            .entry((user.clone(), day_key(e.at_ms)))
            .or_insert_with(|| (e.actor_login.clone(), 0, Vec::new()));
        d.1 += e.input_chars;
        d.2.push(e);
    }
    for ((user, day), (login, chars, list)) in days {
        let Some(prior) = history.daily_chars.get(&user) else {
            continue;
        };
        let active = prior.iter().filter(|c| **c > 0).count();
        if active < VOLUME_MIN_ACTIVE_DAYS || prior.is_empty() {
            continue;
        }
        let mean = prior.iter().sum::<u64>() as f64 / prior.len() as f64;
        if chars >= VOLUME_FLOOR && chars as f64 >= mean * VOLUME_FACTOR {
            // The event that crossed the line.
            let mut run = 0u64;
            let mut at = list.last().map(|e| e.at_ms).unwrap_or_default();
            for e in &list {
                run += e.input_chars;
                if run >= VOLUME_FLOOR && run as f64 >= mean * VOLUME_FACTOR {
                    at = e.at_ms;
                    break;
                }
            }
            out.push(Alert {
                rule: Rule::VolumeSpike,
                subject: login.clone(),
                window_key: day,
                at_ms: at,
                summary: format!(
                    "{login} の{}の入力は{}字で、過去{}日の平均（1日{}字）の{:.1}倍です。",
                    jst(at).format("%Y年%-m月%-d日"),
                    chars,
                    prior.len(),
                    mean.round() as u64,
                    chars as f64 / mean.max(1.0)
                ),
                seqs: list.iter().map(|e| e.seq).collect(),
            });
        }
    }
}

fn new_addresses(events: &[Event], history: &History, out: &mut Vec<Alert>) {
    let mut known = history.known_addresses.clone();
    for e in events
        .iter()
        .filter(|e| e.action == "auth.login" && e.result == "success")
    {
        let Some(user) = &e.actor_id else { continue };
        let seen = known.entry(user.clone()).or_default();
        // An account's first sign-in has nothing to compare with.
        if !seen.is_empty() && !seen.contains(&e.ip) {
            out.push(Alert {
                rule: Rule::NewAddress,
                subject: e.actor_login.clone(),
                window_key: e.ip.clone(),
                at_ms: e.at_ms,
                summary: format!(
                    "{} がこれまで使われたことのないアドレス {} からログインしました。",
                    e.actor_login, e.ip
                ),
                seqs: vec![e.seq],
            });
        }
        seen.insert(e.ip.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-04-01 (Wed) 10:00 JST.
    const T0: i64 = 1_775_005_200_000;
    const MIN: i64 = 60_000;

    fn ev(seq: i64, at: i64, login: &str, ip: &str, action: &str, result: &str) -> Event {
        Event {
            seq,
            at_ms: at,
            actor_id: Some(format!("id-{login}")),
            actor_login: login.into(),
            ip: ip.into(),
            action: action.into(),
            result: result.into(),
            input_chars: 0,
        }
    }

    #[test]
    fn ten_failures_in_five_minutes_on_one_account() {
        // Nine in five minutes: nothing. The tenth inside the window: one alert.
        let mut events: Vec<Event> = (0..9)
            .map(|i| {
                ev(
                    i,
                    T0 + i * 30_000,
                    "tanaka",
                    "10.0.0.1",
                    "auth.login",
                    "failure",
                )
            })
            .collect();
        assert!(analyse(&events, &History::default()).is_empty());
        events.push(ev(
            9,
            T0 + 4 * MIN,
            "Tanaka",
            "10.0.0.1",
            "auth.login",
            "failure",
        ));
        let alerts = analyse(&events, &History::default());
        let acct: Vec<_> = alerts
            .iter()
            .filter(|a| a.rule == Rule::FailedSigninsAccount)
            .collect();
        assert_eq!(acct.len(), 1, "{alerts:?}");
        assert_eq!(acct[0].subject, "tanaka");
        assert_eq!(acct[0].seqs.len(), 10);
        assert!(alerts.iter().any(|a| a.rule == Rule::FailedSigninsAddress));
        // Spread over more than five minutes: nothing.
        let slow: Vec<Event> = (0..12)
            .map(|i| ev(i, T0 + i * MIN, "sato", "10.0.0.2", "auth.login", "failure"))
            .collect();
        assert!(analyse(&slow, &History::default()).is_empty());
        // Successful sign-ins do not count.
        let ok: Vec<Event> = (0..12)
            .map(|i| ev(i, T0 + i, "sato", "10.0.0.2", "auth.login", "success"))
            .collect();
        assert!(analyse(&ok, &History::default())
            .iter()
            .all(|a| a.rule != Rule::FailedSigninsAccount));
    }

    #[test]
    fn spraying_many_accounts_from_one_address() {
        let events: Vec<Event> = (0..10)
            .map(|i| {
                ev(
                    i,
                    T0 + i * 1000,
                    &format!("user{i}"),
                    "192.0.2.7",
                    "auth.login",
                    "failure",
                )
            })
            .collect();
        let alerts = analyse(&events, &History::default());
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].rule, Rule::FailedSigninsAddress);
        assert_eq!(alerts[0].subject, "192.0.2.7");
        assert!(alerts[0].summary.contains("10件"));
    }

    #[test]
    fn rerun_over_the_same_events_gives_the_same_keys() {
        let events: Vec<Event> = (0..25)
            .map(|i| {
                ev(
                    i,
                    T0 + i * 1000,
                    "suzuki",
                    "10.0.0.3",
                    "auth.login",
                    "failure",
                )
            })
            .collect();
        let a = analyse(&events, &History::default());
        let b = analyse(&events[5..], &History::default());
        let keys = |v: &[Alert]| -> HashSet<(Rule, String, String)> {
            v.iter()
                .map(|a| (a.rule, a.subject.clone(), a.window_key.clone()))
                .collect()
        };
        assert_eq!(keys(&a), keys(&b));
    }

    #[test]
    fn exports_outside_office_hours() {
        let night = T0 + 12 * 60 * MIN; // 22:00 JST
        let saturday = T0 + 3 * 24 * 60 * MIN; // Saturday 10:00
        let events = vec![
            ev(1, T0, "admin", "10.0.0.9", "log.export", "success"),
            ev(2, night, "admin", "10.0.0.9", "log.export", "success"),
            ev(3, saturday, "admin", "10.0.0.9", "audit.export", "success"),
            ev(4, night, "admin", "10.0.0.9", "log.view", "success"),
        ];
        let alerts = analyse(&events, &History::default());
        let seqs: Vec<i64> = alerts.iter().map(|a| a.seqs[0]).collect();
        assert_eq!(seqs, [2, 3], "{alerts:?}");
        assert!(alerts[0].summary.contains("22:00"), "{}", alerts[0].summary);
        assert!(!outside_office_hours(T0 - 2 * 60 * MIN)); // 08:00
        assert!(outside_office_hours(T0 - 2 * 60 * MIN - 1)); // 07:59:59.999
        assert!(outside_office_hours(T0 + 9 * 60 * MIN)); // 19:00
    }

    #[test]
    fn volume_far_above_usual() {
        let mut h = History::default();
        h.daily_chars
            .insert("id-ito".into(), vec![2_000; VOLUME_HISTORY_DAYS]);
        let send = |seq: i64, chars: u64| Event {
            input_chars: chars,
            ..ev(
                seq,
                T0 + seq * MIN,
                "ito",
                "10.0.0.4",
                "chat.send",
                "success",
            )
        };
        // 9,000 characters: four and a half times usual, under the floor anyway.
        assert!(analyse(&[send(1, 9_000)], &h).is_empty());
        // 40,000 characters in four requests: twenty times usual.
        let events: Vec<Event> = (1..=4).map(|i| send(i, 10_000)).collect();
        let alerts = analyse(&events, &h);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].rule, Rule::VolumeSpike);
        assert_eq!(alerts[0].at_ms, T0 + 3 * MIN); // the third crossed 30,000
        assert!(
            alerts[0].summary.contains("20.0倍"),
            "{}",
            alerts[0].summary
        );
        // A heavy user doing a heavy day: not an alert.
        h.daily_chars
            .insert("id-ito".into(), vec![20_000; VOLUME_HISTORY_DAYS]);
        assert!(analyse(&events, &h).is_empty());
        // No usual yet (fewer than five active days): not an alert.
        let mut fresh = vec![0; VOLUME_HISTORY_DAYS];
        fresh[27] = 100;
        h.daily_chars.insert("id-ito".into(), fresh);
        assert!(analyse(&events, &h).is_empty());
    }

    #[test]
    fn sign_in_from_a_new_address() {
        let mut h = History::default();
        h.known_addresses
            .insert("id-kato".into(), ["10.0.0.5".to_string()].into());
        let events = vec![
            ev(1, T0, "kato", "10.0.0.5", "auth.login", "success"),
            ev(2, T0 + MIN, "kato", "203.0.113.9", "auth.login", "success"),
            ev(
                3,
                T0 + 2 * MIN,
                "kato",
                "203.0.113.9",
                "auth.login",
                "success",
            ),
            // A first sign-in ever: nothing to compare with.
            ev(4, T0, "newbie", "10.0.0.6", "auth.login", "success"),
            // A failed attempt from elsewhere is not a sign-in.
            ev(5, T0, "kato", "198.51.100.1", "auth.login", "failure"),
        ];
        let alerts = analyse(&events, &h);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].rule, Rule::NewAddress);
        assert_eq!(alerts[0].window_key, "203.0.113.9");
        assert_eq!(alerts[0].seqs, [2]);
    }
}
