//! Local engine speed on the demo model against llama.cpp on the same file and prompt, in
//! one run (by hand; nothing here is a test):
//!
//!   (cd bench/llama-ref && cargo build --release)   # once, optional: the reference
//!   cargo bench -p llm --bench local_speed
//!
//! Prints prompt processing and generation tokens/s (median and worst of 5 runs, greedy,
//! 64 new tokens after a ~150-token Japanese prompt) for yakuba's engine and, when the
//! reference is built, for llama.cpp.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use llm::local::LoadedModel;
use llm::{ChatMessage, ChatRequest};

const RUNS: usize = 5;
const NEW: usize = 64;

fn stats(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0])
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model_path = std::env::var_os("YAKUBA_DEMO_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/gemma-3-270m-q4_k_m.gguf"));
    if !model_path.is_file() {
        eprintln!(
            "no model at {} (scripts/fetch-demo-model)",
            model_path.display()
        );
        return Ok(());
    }
    let t = Instant::now();
    let m = LoadedModel::load(&model_path)?;
    println!("load: {:.2} s", t.elapsed().as_secs_f64());
    let question = "次の文章を読んで、要点を三つにまとめてください。\n\
        市は令和7年度から、住民票の写しや印鑑登録証明書をコンビニエンスストアで取得できるサービスの対象を拡大します。\
        マイナンバーカードを持っている方は、全国の対応店舗で午前6時30分から午後11時まで証明書を取得できます。\
        手数料は窓口より100円安く、1通200円です。システムの保守のため、毎月第2火曜日は終日利用できません。\
        詳しくは市民課までお問い合わせください。";
    let req = ChatRequest {
        model: String::new(),
        system: None,
        messages: vec![ChatMessage::user(question)],
        max_tokens: None,
        temperature: None,
    };
    let prompt = m.prompt_tokens(&req)?;
    println!(
        "prompt: {} tokens, {NEW} new tokens, {RUNS} runs",
        prompt.len()
    );

    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut first = None;
        let mut n = 0usize;
        m.generate(&prompt, NEW, None, |_| {
            if first.is_none() {
                first = Some(start.elapsed().as_secs_f64());
            }
            n += 1;
            true
        })?;
        let total = start.elapsed().as_secs_f64();
        let first = first.unwrap_or(total);
        // The first piece arrives after the prompt pass and one sampling step.
        pp.push(prompt.len() as f64 / first);
        tg.push((NEW - 1) as f64 / (total - first));
        let _ = n;
    }
    let (pp_med, pp_worst) = stats(pp);
    let (tg_med, tg_worst) = stats(tg);
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_default();
    println!("peak RSS of this process with the model loaded and generating: {peak}");
    println!("yakuba   prompt {pp_med:7.1} tok/s (worst {pp_worst:.1})   generation {tg_med:6.1} tok/s (worst {tg_worst:.1})");

    let reference = root.join("bench/llama-ref/target/release/llama-ref");
    if !reference.is_file() {
        println!("llama.cpp: not built (cd bench/llama-ref && cargo build --release)");
        return Ok(());
    }
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..RUNS {
        let out = Command::new(&reference)
            .arg(&model_path)
            .args(["generate", &ids.join(","), &NEW.to_string()])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let field = |k: &str| v[k].as_f64().ok_or(format!("llama-ref printed no {k}"));
        pp.push(field("prompt_tok_s")?);
        tg.push(field("gen_tok_s")?);
    }
    let (lpp_med, lpp_worst) = stats(pp);
    let (ltg_med, ltg_worst) = stats(tg);
    println!("llama.cpp prompt {lpp_med:7.1} tok/s (worst {lpp_worst:.1})   generation {ltg_med:6.1} tok/s (worst {ltg_worst:.1})");
    println!(
        "yakuba / llama.cpp: prompt {:.0} %, generation {:.0} %",
        100.0 * pp_med / lpp_med,
        100.0 * tg_med / ltg_med
    );
    Ok(())
}
