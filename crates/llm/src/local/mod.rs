//! The local engine: GGUF models run by yakuba itself with candle, behind the same
//! streaming interface as the cloud providers, so a closed network needs no model server.
//!
//! - [`inspect`] reads only the header: GGUF or not, complete or truncated, which family.
//! - Models load once per file (kept while the file is unchanged) on a blocking thread.
//! - Generation runs on blocking threads, at most `max_concurrent` at a time; the rest wait
//!   in a first-come queue and learn their place through [`Progress::Queued`].
//! - Dropping the receiver stops generation before the next token.

mod gemma3;
mod spm;
mod template;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::{quantized_llama, quantized_qwen2, quantized_qwen3};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::error::{ErrorKind, LlmError};
use crate::types::{ChatRequest, StreamEnd};

pub use template::{ChatFormat, Segment};

/// Families the engine runs (the GGUF `general.architecture`).
pub const SUPPORTED_ARCHITECTURES: [&str; 4] = ["gemma3", "qwen2", "qwen3", "llama"];

/// What a waiting or starting request is doing before its first token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for a free slot; 1 means next.
    Queued { position: usize },
    /// The model file is being read into memory (first use, or the file changed).
    Loading,
    /// The prompt is being processed.
    Started,
}

/// Engine-wide limits, set once at start-up by [`configure`].
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Answers generated at the same time (each uses all CPU cores); the rest queue.
    pub max_concurrent: usize,
    /// Upper bound on prompt plus answer tokens, below the model's own context length,
    /// to keep the memory of one answer bounded.
    pub max_context: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            max_concurrent: 1,
            max_context: 8192,
        }
    }
}

/// Sets the engine's limits. Only the first call counts (the engine is per process, as
/// the memory and cores it uses are); later calls return `false`.
pub fn configure(settings: Settings) -> bool {
    let mut set = false;
    ENGINE.get_or_init(|| {
        set = true;
        Engine::new(settings)
    });
    set
}

static ENGINE: OnceLock<Engine> = OnceLock::new();

fn engine() -> &'static Engine {
    ENGINE.get_or_init(|| Engine::new(Settings::default()))
}

/// What the header of a GGUF file says, for admins and for choosing how to run it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    pub context_length: usize,
    pub file_bytes: u64,
    pub tensor_count: usize,
    pub tokenizer: String,
    pub chat_format: ChatFormat,
    /// The file carries a chat template: converted from an instruction-tuned model.
    /// Without one it is (almost always) a pre-trained base model that continues text
    /// rather than following instructions.
    pub has_chat_template: bool,
}

impl ModelInfo {
    pub fn instruction_tuned(&self) -> bool {
        self.has_chat_template
    }
}

fn file_error(detail: impl Into<String>) -> LlmError {
    LlmError::new(ErrorKind::ModelFile, detail)
}

/// Reads and checks the header of a GGUF file: that it is one, that no tensor lies past
/// its end (a truncated download), and that its architecture is one the engine runs.
pub fn inspect(path: &Path) -> Result<ModelInfo, LlmError> {
    let (info, _) = read_header(path)?;
    Ok(info)
}

fn read_header(path: &Path) -> Result<(ModelInfo, Content), LlmError> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            file_error(format!("モデルファイル {shown} が見つかりません"))
        }
        std::io::ErrorKind::PermissionDenied => {
            file_error(format!("モデルファイル {shown} を読む権限がありません"))
        }
        _ => file_error(format!("モデルファイル {shown} を開けません: {e}")),
    })?;
    if !meta.is_file() {
        return Err(file_error(format!("{shown} はファイルではありません")));
    }
    let mut f = File::open(path)
        .map_err(|e| file_error(format!("モデルファイル {shown} を開けません: {e}")))?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(file_error(format!(
            "{shown} は GGUF 形式のモデルファイルではありません（先頭が GGUF ではありません）"
        )));
    }
    f.rewind()
        .map_err(|e| file_error(format!("モデルファイル {shown} を読めません: {e}")))?;
    let mut reader = BufReader::new(f);
    let ct = Content::read(&mut reader).map_err(|e| {
        file_error(format!(
            "{shown} の GGUF ヘッダーが壊れているか途中で切れています: {}",
            first_line(&e)
        ))
    })?;
    let mut data_end = ct.tensor_data_offset;
    for t in ct.tensor_infos.values() {
        let elems = t.shape.elem_count() as u64;
        let bytes = elems / t.ggml_dtype.block_size() as u64 * t.ggml_dtype.type_size() as u64;
        data_end = data_end.max(ct.tensor_data_offset + t.offset + bytes);
    }
    if data_end > meta.len() {
        return Err(file_error(format!(
            "{shown} は途中で切れています（{} バイト必要なところ {} バイトしかありません）。ダウンロードをやり直してください",
            data_end,
            meta.len()
        )));
    }
    let text = |k: &str| match ct.metadata.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let architecture = text("general.architecture")
        .ok_or_else(|| file_error(format!("{shown} に general.architecture がありません")))?;
    if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
        return Err(file_error(format!(
            "{shown} のアーキテクチャ「{architecture}」には対応していません（対応: {}）",
            SUPPORTED_ARCHITECTURES.join(", ")
        )));
    }
    let context_length = ct
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
        .unwrap_or(2048) as usize;
    let tokenizer = text("tokenizer.ggml.model").unwrap_or_default();
    let template = text("tokenizer.chat_template");
    let info = ModelInfo {
        chat_format: ChatFormat::detect(&architecture, &tokenizer, template.as_deref()),
        architecture,
        name: text("general.name"),
        context_length,
        file_bytes: meta.len(),
        tensor_count: ct.tensor_infos.len(),
        tokenizer,
        has_chat_template: template.is_some(),
    };
    Ok((info, ct))
}

/// Tokenizer of a loaded model: SentencePiece from the GGUF metadata, or byte-level BPE
/// (from the metadata, or a `tokenizer.json` beside the file).
enum Tok {
    Spm(Box<spm::Spm>),
    Hf {
        tok: Box<tokenizers::Tokenizer>,
        /// Texts of special tokens, to keep them from being recognised in user text.
        specials: Vec<String>,
    },
}

impl Tok {
    fn token_id(&self, text: &str) -> Option<u32> {
        match self {
            Tok::Spm(s) => s.token_id(text),
            Tok::Hf { tok, .. } => tok.token_to_id(text),
        }
    }

    fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, LlmError> {
        match self {
            Tok::Spm(s) => Ok(s.encode(text, parse_special)),
            Tok::Hf { tok, specials } => {
                let enc = |t: &str| {
                    tok.encode_fast(t, false)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(|e| LlmError::new(ErrorKind::Upstream, format!("tokenizer: {e}")))
                };
                if parse_special {
                    return enc(text);
                }
                // The BPE tokenizer always recognises its special tokens; cut each one
                // that appears in user text after its first character so it stays text.
                let mut cuts: Vec<usize> = Vec::new();
                for s in specials {
                    for (at, _) in text.match_indices(s.as_str()) {
                        cuts.push(at + s.chars().next().map_or(1, char::len_utf8));
                    }
                }
                if cuts.is_empty() {
                    return enc(text);
                }
                cuts.sort_unstable();
                cuts.dedup();
                let mut out = Vec::new();
                let mut from = 0;
                for c in cuts.into_iter().chain([text.len()]) {
                    if c > from {
                        out.extend(enc(&text[from..c])?);
                        from = c;
                    }
                }
                Ok(out)
            }
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tok::Spm(s) => s.decode(ids),
            Tok::Hf { tok, .. } => tok.decode(ids, true).unwrap_or_default(),
        }
    }
}

fn build_tokenizer(path: &Path, ct: &Content) -> Result<Tok, LlmError> {
    let beside = [
        path.with_extension("tokenizer.json"),
        path.with_file_name("tokenizer.json"),
    ];
    if let Some(json) = beside.iter().find(|p| p.is_file()) {
        let tok = tokenizers::Tokenizer::from_file(json)
            .map_err(|e| file_error(format!("{} を読み込めません: {e}", json.display())))?;
        let specials = special_texts(&tok);
        return Ok(Tok::Hf {
            tok: Box::new(tok),
            specials,
        });
    }
    let kind = match ct.metadata.get("tokenizer.ggml.model") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(file_error("GGUF にトークナイザーの情報がありません")),
    };
    match kind.as_str() {
        "llama" => {
            let arr = |k: &str| -> Result<&Vec<Value>, LlmError> {
                match ct.metadata.get(k) {
                    Some(Value::Array(a)) => Ok(a),
                    _ => Err(file_error(format!("GGUF に {k} がありません"))),
                }
            };
            let tokens = arr("tokenizer.ggml.tokens")?
                .iter()
                .map(|v| v.to_string().cloned().unwrap_or_default())
                .collect();
            let scores = arr("tokenizer.ggml.scores")?
                .iter()
                .map(|v| v.to_f32().unwrap_or(0.0))
                .collect();
            let types = arr("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| v.to_i32().unwrap_or(spm::TYPE_NORMAL))
                .collect();
            let unk = meta_u32(ct, "tokenizer.ggml.unknown_token_id");
            let add_space_prefix = match ct.metadata.get("tokenizer.ggml.add_space_prefix") {
                Some(v) => v.to_bool().unwrap_or(true),
                None => true,
            };
            spm::Spm::new(tokens, scores, types, unk, add_space_prefix)
                .map(|t| Tok::Spm(Box::new(t)))
                .map_err(|e| file_error(format!("トークナイザーを作れません: {e}")))
        }
        "gpt2" => {
            // llama.cpp names Llama 3's pre-tokenizer "llama-bpe"; candle 0.11 knows it only
            // as "llama3" and would otherwise split like GPT-2 (a space before every word).
            let renamed;
            let ct = match ct.metadata.get("tokenizer.ggml.pre") {
                Some(Value::String(p)) if p == "llama-bpe" => {
                    let mut metadata = ct.metadata.clone();
                    metadata.insert("tokenizer.ggml.pre".into(), Value::String("llama3".into()));
                    renamed = Content {
                        magic: ct.magic,
                        metadata,
                        tensor_infos: HashMap::new(),
                        tensor_data_offset: 0,
                    };
                    &renamed
                }
                _ => ct,
            };
            let tok = tokenizers::Tokenizer::from_gguf(ct)
                .map_err(|e| file_error(format!("トークナイザーを作れません: {e}")))?;
            let specials = special_texts(&tok);
            Ok(Tok::Hf {
                tok: Box::new(tok),
                specials,
            })
        }
        other => Err(file_error(format!(
            "トークナイザーの種類「{other}」には対応していません"
        ))),
    }
}

/// candle's errors may carry a backtrace after the message; admins need the message.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The texts of a BPE tokenizer's special tokens.
fn special_texts(tok: &tokenizers::Tokenizer) -> Vec<String> {
    tok.get_added_tokens_decoder()
        .values()
        .filter(|t| t.special)
        .map(|t| t.content.clone())
        .collect()
}

fn meta_u32(ct: &Content, key: &str) -> Option<u32> {
    let v = ct.metadata.get(key)?;
    v.to_u32()
        .ok()
        .or_else(|| v.to_i32().ok().map(|x| x as u32))
        .or_else(|| v.to_u64().ok().map(|x| x as u32))
}

enum Weights {
    Gemma3(gemma3::Gemma3),
    Qwen2(quantized_qwen2::ModelWeights),
    Qwen3(quantized_qwen3::ModelWeights),
    Llama(quantized_llama::ModelWeights),
}

impl Weights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Gemma3(m) => m.forward(x, pos),
            Weights::Qwen2(m) => m.forward(x, pos),
            Weights::Qwen3(m) => m.forward(x, pos),
            Weights::Llama(m) => m.forward(x, pos),
        }
    }

    /// Forgets the previous answer's attention cache.
    fn reset(&mut self) {
        match self {
            Weights::Gemma3(m) => m.clear_cache(),
            Weights::Qwen2(m) => m.clear_kv_cache(),
            Weights::Qwen3(m) => m.clear_kv_cache(),
            Weights::Llama(m) => m.clear_kv_cache(),
        }
    }

    /// Another instance sharing the same weights in memory, when the family allows it.
    fn share(&self) -> Option<Weights> {
        match self {
            Weights::Gemma3(m) => Some(Weights::Gemma3(m.clone())),
            Weights::Qwen3(m) => Some(Weights::Qwen3(m.clone())),
            Weights::Llama(m) => Some(Weights::Llama(m.clone())),
            Weights::Qwen2(_) => None,
        }
    }
}

fn device() -> Device {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => {
                tracing::warn!(error = %e, "CUDA is not available; the local model runs on the CPU")
            }
        }
    }
    Device::Cpu
}

fn load_weights(path: &Path, info: &ModelInfo, ct: Content) -> Result<Weights, LlmError> {
    let f = File::open(path).map_err(|e| {
        file_error(format!(
            "モデルファイル {} を開けません: {e}",
            path.display()
        ))
    })?;
    let mut r = BufReader::new(f);
    let dev = device();
    let bad = |e: candle_core::Error| {
        file_error(format!(
            "モデル {} を読み込めません: {}",
            path.display(),
            first_line(&e)
        ))
    };
    Ok(match info.architecture.as_str() {
        "gemma3" => {
            let positions = info.context_length.min(engine().settings.max_context);
            Weights::Gemma3(gemma3::Gemma3::from_gguf(&ct, &mut r, &dev, positions).map_err(bad)?)
        }
        "qwen2" => {
            Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(ct, &mut r, &dev).map_err(bad)?)
        }
        "qwen3" => {
            Weights::Qwen3(quantized_qwen3::ModelWeights::from_gguf(ct, &mut r, &dev).map_err(bad)?)
        }
        "llama" => {
            Weights::Llama(quantized_llama::ModelWeights::from_gguf(ct, &mut r, &dev).map_err(bad)?)
        }
        other => {
            return Err(file_error(format!(
                "アーキテクチャ「{other}」には対応していません"
            )))
        }
    })
}

/// A model in memory: its tokenizer, its format and idle instances of its weights (each
/// with its own attention cache).
pub struct LoadedModel {
    path: PathBuf,
    pub info: ModelInfo,
    tok: Tok,
    bos: Option<u32>,
    add_bos: bool,
    stops: Vec<u32>,
    idle: Mutex<Vec<Weights>>,
    device: Device,
}

impl LoadedModel {
    /// Loads the file (seconds; call on a blocking thread).
    pub fn load(path: &Path) -> Result<LoadedModel, LlmError> {
        let (info, ct) = read_header(path)?;
        let tok = build_tokenizer(path, &ct)?;
        let bos = meta_u32(&ct, "tokenizer.ggml.bos_token_id");
        let add_bos = match ct.metadata.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v.to_bool().unwrap_or(false),
            None => tok_is_spm(&tok),
        };
        let mut stops: Vec<u32> = info
            .chat_format
            .stop_markers()
            .iter()
            .filter_map(|t| tok.token_id(t))
            .collect();
        if let Some(eos) = meta_u32(&ct, "tokenizer.ggml.eos_token_id") {
            stops.push(eos);
        }
        stops.sort_unstable();
        stops.dedup();
        let weights = load_weights(path, &info, ct)?;
        Ok(LoadedModel {
            path: path.to_path_buf(),
            info,
            tok,
            bos,
            add_bos,
            stops,
            idle: Mutex::new(vec![weights]),
            device: device(),
        })
    }

    /// Token ids of the chat prompt, BOS included where the template has one.
    pub fn prompt_tokens(&self, req: &ChatRequest) -> Result<Vec<u32>, LlmError> {
        let bos_text = if self.add_bos || matches!(self.info.chat_format, ChatFormat::Llama3 { .. })
        {
            self.bos.map(|b| self.tok.decode_special(b))
        } else {
            None
        };
        let today = today_english();
        let segments = template::render(
            self.info.chat_format,
            req.system.as_deref(),
            &req.messages,
            bos_text.as_deref(),
            &today,
        );
        self.encode_segments(&segments)
    }

    pub fn encode_segments(&self, segments: &[Segment]) -> Result<Vec<u32>, LlmError> {
        let mut ids = Vec::new();
        for s in segments {
            match s {
                Segment::Markup(t) => ids.extend(self.tok.encode(t, true)?),
                Segment::Text(t) => ids.extend(self.tok.encode(t, false)?),
            }
        }
        Ok(ids)
    }

    /// Token ids of plain text (no special tokens recognised, no BOS).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        self.tok.encode(text, false)
    }

    pub fn detokenize(&self, ids: &[u32]) -> String {
        self.tok.decode(ids)
    }

    /// Teacher-forced: after `prompt` and each prefix of `continuation`, the engine's best
    /// next token with its logit, and the logit of the continuation's own next token. For
    /// comparing the engine with a reference (llama.cpp) where near-ties decide.
    pub fn score(
        &self,
        prompt: &[u32],
        continuation: &[u32],
    ) -> Result<Vec<(u32, f32, f32)>, LlmError> {
        let fail = |e: candle_core::Error| LlmError::new(ErrorKind::Upstream, e.to_string());
        let mut weights = self.take()?;
        let mut out = Vec::new();
        let mut input = prompt.to_vec();
        let mut pos = 0;
        for &want in continuation {
            let x = Tensor::new(input.as_slice(), &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(fail)?;
            let logits: Vec<f32> = weights
                .forward(&x, pos)
                .and_then(|l| l.squeeze(0))
                .and_then(|l| l.to_vec1())
                .map_err(fail)?;
            let (best, top) =
                logits.iter().enumerate().fold(
                    (0, f32::MIN),
                    |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
                );
            out.push((best as u32, top, logits[want as usize]));
            pos += input.len();
            input = vec![want];
        }
        self.give_back(weights);
        Ok(out)
    }

    fn take(&self) -> Result<Weights, LlmError> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = idle.pop() {
            return Ok(w);
        }
        if let Some(first) = idle.first().and_then(Weights::share) {
            return Ok(first);
        }
        drop(idle);
        // Every instance is busy and the family cannot share weights: read the file again.
        let (info, ct) = read_header(&self.path)?;
        load_weights(&self.path, &info, ct)
    }

    fn give_back(&self, mut w: Weights) {
        w.reset();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(w);
    }

    /// Generates greedily (or with `temperature`) from `prompt`, calling `emit` with each
    /// piece of text as soon as it forms complete characters. `emit` returning `false`
    /// stops generation (the user left). Runs on the calling (blocking) thread.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        temperature: Option<f32>,
        mut emit: impl FnMut(&str) -> bool,
    ) -> Result<StreamEnd, LlmError> {
        let mut weights = self.take()?;
        let result = self.run(&mut weights, prompt, max_new, temperature, &mut emit);
        self.give_back(weights);
        result
    }

    fn run(
        &self,
        weights: &mut Weights,
        prompt: &[u32],
        max_new: usize,
        temperature: Option<f32>,
        emit: &mut dyn FnMut(&str) -> bool,
    ) -> Result<StreamEnd, LlmError> {
        let fail = |e: candle_core::Error| {
            LlmError::new(
                ErrorKind::Upstream,
                format!("ローカルモデルの推論に失敗しました: {}", first_line(&e)),
            )
        };
        let sampling = match temperature {
            Some(t) if t > 0.0 => Sampling::TopP {
                p: 0.95,
                temperature: f64::from(t),
            },
            _ => Sampling::ArgMax,
        };
        let mut sampler = LogitsProcessor::from_sampling(seed(), sampling);
        let input = Tensor::new(prompt, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(fail)?;
        let mut logits = weights
            .forward(&input, 0)
            .and_then(|l| l.squeeze(0))
            .map_err(fail)?;
        let mut out: Vec<u32> = Vec::new();
        let mut shown = 0usize;
        let mut finish = "length";
        while out.len() < max_new {
            let next = sampler.sample(&logits).map_err(fail)?;
            if self.stops.contains(&next) {
                finish = "stop";
                break;
            }
            out.push(next);
            let text = self.tok.decode(&out);
            // Hold back a character whose bytes are still arriving.
            if !text.ends_with('\u{FFFD}') && text.len() > shown {
                if !emit(&text[shown..]) {
                    return Err(LlmError::cancelled());
                }
                shown = text.len();
            }
            if out.len() >= max_new {
                break;
            }
            let input = Tensor::new(&[next], &self.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(fail)?;
            logits = weights
                .forward(&input, prompt.len() + out.len() - 1)
                .and_then(|l| l.squeeze(0))
                .map_err(fail)?;
        }
        let text = self.tok.decode(&out);
        if text.len() > shown && !emit(&text[shown..]) {
            return Err(LlmError::cancelled());
        }
        Ok(StreamEnd {
            finish_reason: Some(finish.to_string()),
            input_tokens: Some(prompt.len() as u64),
            output_tokens: Some(out.len() as u64),
        })
    }
}

fn tok_is_spm(t: &Tok) -> bool {
    matches!(t, Tok::Spm(_))
}

impl Tok {
    /// The text of a special token as the template writes it (`<bos>`).
    fn decode_special(&self, id: u32) -> String {
        match self {
            Tok::Spm(s) => s.token_text(id).to_string(),
            Tok::Hf { tok, .. } => tok.id_to_token(id).unwrap_or_default(),
        }
    }
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(299_792_458)
}

/// `30 Nov 2026`, as Llama 3.1+ templates write today's date.
fn today_english() -> String {
    let days = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!("{d:02} {} {y}", MONTHS[(mo - 1) as usize])
}

/// File identity for the model cache: a replaced file is loaded again.
type Stamp = (u64, Option<SystemTime>);
/// A model loaded once, whoever asks for it first.
type ModelCell = Arc<tokio::sync::OnceCell<Arc<LoadedModel>>>;

struct Engine {
    settings: Settings,
    slots: Arc<Semaphore>,
    waiting: Mutex<VecDeque<u64>>,
    queue_changed: watch::Sender<u64>,
    tickets: AtomicU64,
    models: Mutex<HashMap<PathBuf, (Stamp, ModelCell)>>,
}

impl Engine {
    fn new(settings: Settings) -> Engine {
        let settings = Settings {
            max_concurrent: settings.max_concurrent.max(1),
            max_context: settings.max_context.max(256),
        };
        Engine {
            slots: Arc::new(Semaphore::new(settings.max_concurrent)),
            settings,
            waiting: Mutex::new(VecDeque::new()),
            queue_changed: watch::channel(0).0,
            tickets: AtomicU64::new(0),
            models: Mutex::new(HashMap::new()),
        }
    }

    /// A loaded model for `path`, loading it (once, whoever asks at the same time) when
    /// it is not in memory or the file changed since.
    async fn model(&self, path: &Path) -> Result<(Arc<LoadedModel>, bool), LlmError> {
        let meta = std::fs::metadata(path).map_err(|_| {
            file_error(format!(
                "モデルファイル {} が見つかりません",
                path.display()
            ))
        })?;
        let stamp: Stamp = (meta.len(), meta.modified().ok());
        let cell = {
            let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
            let entry = models
                .entry(path.to_path_buf())
                .or_insert_with(|| (stamp, Arc::default()));
            if entry.0 != stamp {
                *entry = (stamp, Arc::default());
            }
            entry.1.clone()
        };
        let fresh = !cell.initialized();
        let owned = path.to_path_buf();
        let model = cell
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || LoadedModel::load(&owned))
                    .await
                    .map_err(|e| LlmError::new(ErrorKind::Upstream, e.to_string()))?
                    .map(Arc::new)
            })
            .await?
            .clone();
        Ok((model, fresh))
    }
}

/// Removes a waiting ticket from the queue however the wait ends (a slot, or the user
/// leaving), and tells the others that they moved up.
struct InQueue<'a> {
    engine: &'a Engine,
    ticket: u64,
}

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        let mut w = self
            .engine
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        w.retain(|t| *t != self.ticket);
        drop(w);
        self.engine.queue_changed.send_modify(|n| *n += 1);
    }
}

/// Streams a chat answer from the GGUF file at `path` through the shared engine.
pub(crate) async fn stream(
    path: &str,
    req: &ChatRequest,
    tx: mpsc::Sender<String>,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<StreamEnd, LlmError> {
    let eng = engine();
    let report = |p: Progress| {
        if let Some(s) = &progress {
            let _ = s.try_send(p);
        }
    };
    // Wait for a slot, first come first served, telling the user their place.
    let ticket = eng.tickets.fetch_add(1, Ordering::Relaxed);
    let permit = {
        let guard = InQueue {
            engine: eng,
            ticket,
        };
        eng.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(ticket);
        let mut changes = eng.queue_changed.subscribe();
        eng.queue_changed.send_modify(|n| *n += 1);
        let mut last = 0;
        let permit = loop {
            let position = {
                let w = eng.waiting.lock().unwrap_or_else(|p| p.into_inner());
                w.iter().position(|t| *t == ticket).map_or(1, |i| i + 1)
            };
            // Only worth saying when someone is ahead or generating.
            if position != last && (position > 1 || eng.slots.available_permits() == 0) {
                report(Progress::Queued { position });
                last = position;
            }
            tokio::select! {
                biased;
                () = tx.closed() => return Err(LlmError::cancelled()),
                p = eng.slots.clone().acquire_owned() => break p.map_err(|_| LlmError::cancelled())?,
                _ = changes.changed() => {}
            }
        };
        drop(guard);
        permit
    };

    let path = PathBuf::from(path.trim());
    let loading = {
        let models = eng.models.lock().unwrap_or_else(|p| p.into_inner());
        !models.get(&path).is_some_and(|(_, c)| c.initialized())
    };
    if loading {
        report(Progress::Loading);
    }
    let (model, _) = tokio::select! {
        biased;
        () = tx.closed() => return Err(LlmError::cancelled()),
        m = eng.model(&path) => m?,
    };
    let limit = model.info.context_length.min(eng.settings.max_context);
    let req = req.clone();
    report(Progress::Started);
    // Tokenizing a long prompt (passages of documents) is CPU work too: all of it runs on
    // the blocking thread that holds the slot.
    let job = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let prompt = model.prompt_tokens(&req)?;
        if prompt.len() >= limit {
            return Err(LlmError::new(
                ErrorKind::ContextLength,
                format!(
                    "入力が {} トークンあり、このモデルで扱える {} トークンを超えています",
                    prompt.len(),
                    limit
                ),
            ));
        }
        let room = limit - prompt.len();
        let max_new = req.max_tokens.map_or(room, |m| (m as usize).min(room));
        model.generate(&prompt, max_new, req.temperature, |piece| {
            tx.blocking_send(piece.to_string()).is_ok()
        })
    });
    job.await.map_err(|e| {
        LlmError::new(
            ErrorKind::Upstream,
            format!("ローカルモデルの処理が異常終了しました: {e}"),
        )
    })?
}

/// Loads the model at `path` (if not yet in memory) and checks that it produces a token.
pub(crate) async fn test(path: &str) -> Result<(), LlmError> {
    let (tx, mut rx) = mpsc::channel(16);
    let req = ChatRequest {
        model: String::new(),
        system: None,
        messages: vec![crate::types::ChatMessage::user("ping")],
        max_tokens: Some(2),
        temperature: None,
    };
    let drain = async { while rx.recv().await.is_some() {} };
    let (r, ()) = tokio::join!(stream(path, &req, tx, None), drain);
    r.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_date() {
        let d = today_english();
        assert_eq!(d.split(' ').count(), 3, "{d}");
        assert!(d.len() >= 10);
    }

    #[test]
    fn not_a_gguf() {
        let dir = std::env::temp_dir().join(format!("yakuba-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("model.gguf");
        std::fs::write(&p, b"PK\x03\x04 this is a zip, not a model").unwrap();
        let e = inspect(&p).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ModelFile);
        assert!(
            e.detail.contains("GGUF 形式のモデルファイルではありません"),
            "{e}"
        );
        std::fs::write(&p, b"").unwrap();
        assert!(inspect(&p).unwrap_err().detail.contains("GGUF 形式"));
        // A header that promises more than the file holds.
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend(5u64.to_le_bytes());
        h.extend(1_000_000u64.to_le_bytes());
        std::fs::write(&p, &h).unwrap();
        let e = inspect(&p).unwrap_err();
        assert!(e.detail.contains("壊れているか途中で切れています"), "{e}");
        let e = inspect(&dir.join("missing.gguf")).unwrap_err();
        assert!(e.detail.contains("見つかりません"), "{e}");
        let e = inspect(&dir).unwrap_err();
        assert!(e.detail.contains("ファイルではありません"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
