//! llama.cpp as the reference for yakuba's local engine (see Cargo.toml).
//!
//!   llama-ref MODEL tokenize TEXT [special]   token ids (no BOS), special tokens parsed if asked
//!   llama-ref MODEL generate IDS N            greedy: N token ids after the comma-separated IDS,
//!                                             with prompt and generation speed
//!
//! Output is one JSON object on stdout.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: llama-ref MODEL tokenize TEXT [special] | MODEL generate IDS N");
        std::process::exit(2);
    }
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, &args[1], &LlamaModelParams::default())?;
    let vocab = model.vocab();
    match args[2].as_str() {
        "tokenize" => {
            let special = args.get(4).is_some_and(|a| a == "special");
            let ids: Vec<i32> = vocab
                .tokenize(args[3].as_bytes(), false, special)
                .into_iter()
                .map(|t| t.0)
                .collect();
            println!("{}", serde_json::json!({ "ids": ids }));
        }
        "generate" => {
            let prompt: Vec<i32> = args[3]
                .split(',')
                .map(|s| s.trim().parse())
                .collect::<Result<_, _>>()?;
            let n: usize = args[4].parse()?;
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as i32;
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new((prompt.len() + n + 8) as u32))
                .with_n_batch(prompt.len().max(512) as u32)
                .with_n_threads(threads)
                .with_n_threads_batch(threads);
            let mut ctx = model.new_context(&backend, params)?;
            let mut batch = LlamaBatch::new(prompt.len().max(512), 1);
            for (i, t) in prompt.iter().enumerate() {
                batch.add(LlamaToken(*t), i as i32, &[0], i + 1 == prompt.len())?;
            }
            let t0 = Instant::now();
            ctx.decode(&mut batch)?;
            let prefill = t0.elapsed().as_secs_f64();
            let mut sampler = LlamaSampler::greedy();
            let mut out = Vec::new();
            let t1 = Instant::now();
            let mut pos = prompt.len() as i32;
            for _ in 0..n {
                let next = sampler.sample(&ctx, batch.n_tokens() - 1);
                out.push(next.0);
                if vocab.is_eog(next) {
                    break;
                }
                batch.clear();
                batch.add(next, pos, &[0], true)?;
                pos += 1;
                ctx.decode(&mut batch)?;
            }
            let decode = t1.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "ids": out,
                    "prompt_tokens": prompt.len(),
                    "prompt_tok_s": prompt.len() as f64 / prefill,
                    "generated": out.len(),
                    "gen_tok_s": out.len() as f64 / decode,
                })
            );
        }
        other => {
            eprintln!("unknown command {other}");
            std::process::exit(2);
        }
    }
    Ok(())
}
