//! Gemma 3 over quantized GGUF weights, written here rather than taken from
//! `candle_transformers::models::quantized_gemma3` (0.11), which differs from the model and
//! from llama.cpp in ways that change answers and memory:
//! - the feed-forward activation is GELU (tanh approximation), not SiLU;
//! - a sliding-window layer sees the last `window` positions including its own
//!   (`query - key < window`, as llama.cpp and Transformers), also while generating: its
//!   attention cache keeps only that window;
//! - rotary tables cover the context actually used (not 131,072 positions per layer:
//!   about 2 GB for an 18-layer model), one table per frequency, shared by the layers;
//! - the token-embedding table stays quantized and rows are expanded when looked up (an
//!   f32 copy of a 262,144-token table is 671 MB; rounding it to f16 changes answers).
//!
//! With these, greedy output follows llama.cpp token for token on the demo model wherever
//! the two best candidates are not within rounding of each other (llama.cpp keeps its
//! attention cache in f16 and sums in another order; see tests/local_demo.rs).

use candle_core::quantized::gguf_file::Content;
use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

#[derive(Clone)]
struct Rope {
    sin: Tensor,
    cos: Tensor,
}

impl Rope {
    fn new(head_dim: usize, base: f32, positions: usize, dev: &Device) -> Result<Rope> {
        let inv: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let inv = Tensor::new(inv.as_slice(), dev)?;
        let t = Tensor::arange(0u32, positions as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?;
        let freqs = t.matmul(&inv.reshape((1, head_dim / 2))?)?;
        Ok(Rope {
            sin: freqs.sin()?,
            cos: freqs.cos()?,
        })
    }

    fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (_, _, seq, _) = x.dims4()?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

#[derive(Clone)]
struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// `Some(w)` for a sliding-window layer.
    window: Option<usize>,
    rope: Rope,
    scale: f64,
    /// Keys and values so far, with the position of the first one.
    cache: Option<(Tensor, Tensor, usize)>,
}

impl Layer {
    fn attention(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, seq, _) = x.dims3()?;
        let q = self
            .wq
            .forward(x)?
            .reshape((b, seq, self.n_head, self.head_dim))?
            .transpose(1, 2)?;
        let k = self
            .wk
            .forward(x)?
            .reshape((b, seq, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?;
        let v = self
            .wv
            .forward(x)?
            .reshape((b, seq, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self
            .rope
            .apply(&self.q_norm.forward(&q.contiguous()?)?, pos)?;
        let k = self
            .rope
            .apply(&self.k_norm.forward(&k.contiguous()?)?, pos)?;

        let (k, v, first) = match self.cache.take() {
            Some((ck, cv, first)) if pos > 0 => (
                Tensor::cat(&[&ck, &k], 2)?,
                Tensor::cat(&[&cv, &v], 2)?,
                first,
            ),
            _ => (k, v, pos),
        };
        let n_keys = k.dim(2)?;
        // What later positions can still see: a sliding layer keeps its window only.
        let keep = match self.window {
            Some(w) if n_keys > w => w,
            _ => n_keys,
        };
        self.cache = Some((
            k.narrow(2, n_keys - keep, keep)?,
            v.narrow(2, n_keys - keep, keep)?,
            first + n_keys - keep,
        ));

        let rep = self.n_head / self.n_kv_head;
        let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
        let mut w = (q.matmul(&k.t()?)? * self.scale)?;
        let needs_mask = seq > 1 || self.window.is_some_and(|win| n_keys > win);
        if needs_mask {
            let mut mask = Vec::with_capacity(seq * n_keys);
            for i in 0..seq {
                let qp = pos + i;
                for j in 0..n_keys {
                    let kp = first + j;
                    let visible = kp <= qp && self.window.is_none_or(|win| qp - kp < win);
                    mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            let mask = Tensor::from_vec(mask, (1, 1, seq, n_keys), x.device())?;
            w = w.broadcast_add(&mask)?;
        }
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        let out = w
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, seq, self.n_head * self.head_dim))?;
        self.wo.forward(&out)
    }

    fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let h = self.attn_norm.forward(x)?;
        let h = self.attention(&h, pos)?;
        let x = (self.post_attn_norm.forward(&h)? + x)?;
        let h = self.ffn_norm.forward(&x)?;
        let h = (self.gate.forward(&h)?.gelu()? * self.up.forward(&h)?)?;
        let h = self.down.forward(&h)?;
        self.post_ffn_norm.forward(&h)? + x
    }
}

#[derive(Clone)]
pub struct Gemma3 {
    embed: Embed,
    embed_scale: f64,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
}

impl Gemma3 {
    /// `positions`: the longest prompt plus answer this instance will see.
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &Content,
        r: &mut R,
        dev: &Device,
        positions: usize,
    ) -> Result<Gemma3> {
        let arch = ["gemma3", "gemma2", "gemma"]
            .into_iter()
            .find(|p| {
                ct.metadata
                    .contains_key(&format!("{p}.attention.head_count"))
            })
            .unwrap_or("gemma3");
        let get = |k: &str| {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("{arch}.{k} is missing")))
        };
        let n_head = get("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = get("attention.head_count_kv")?.to_u32()? as usize;
        let n_layer = get("block_count")?.to_u32()? as usize;
        let n_embd = get("embedding_length")?.to_u32()? as usize;
        let head_dim = get("attention.key_length")?.to_u32()? as usize;
        let eps = get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let window = get("attention.sliding_window")?.to_u32()? as usize;
        let pattern = get("attention.sliding_window_type")
            .and_then(|v| v.to_u32())
            .map_or(6, |v| v as usize)
            .max(1);
        let base = get("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(1e6);
        let local_base = get("rope.local_freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(1e4);
        // llama.cpp: the 27B model scales by the hidden size per head, the others by the
        // key length.
        let scale = if n_layer == 62 {
            1.0 / ((n_embd / n_head) as f64).sqrt()
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        let global_rope = Rope::new(head_dim, base, positions, dev)?;
        let local_rope = Rope::new(head_dim, local_base, positions, dev)?;

        let mut t = |name: &str| ct.tensor(r, name, dev);
        let embed_q = t("token_embd.weight")?;
        let embed = if dev.is_cpu() {
            Embed::Rows {
                q: Arc::new(embed_q),
                n_embd,
            }
        } else {
            Embed::Full(embed_q.dequantize(dev)?)
        };
        let norm = RmsNorm::from_qtensor(t("output_norm.weight")?, eps)?;
        let output = match t("output.weight") {
            Ok(w) => QMatMul::from_qtensor(w)?,
            // Tied weights: the embedding table is also the output projection.
            Err(_) => QMatMul::from_qtensor(t("token_embd.weight")?)?,
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            let mut q = |n: &str| t(&format!("{p}.{n}.weight"));
            let sliding = (i + 1) % pattern != 0;
            layers.push(Layer {
                wq: QMatMul::from_qtensor(q("attn_q")?)?,
                wk: QMatMul::from_qtensor(q("attn_k")?)?,
                wv: QMatMul::from_qtensor(q("attn_v")?)?,
                wo: QMatMul::from_qtensor(q("attn_output")?)?,
                q_norm: RmsNorm::from_qtensor(q("attn_q_norm")?, eps)?,
                k_norm: RmsNorm::from_qtensor(q("attn_k_norm")?, eps)?,
                attn_norm: RmsNorm::from_qtensor(q("attn_norm")?, eps)?,
                post_attn_norm: RmsNorm::from_qtensor(q("post_attention_norm")?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(q("ffn_norm")?, eps)?,
                post_ffn_norm: RmsNorm::from_qtensor(q("post_ffw_norm")?, eps)?,
                gate: QMatMul::from_qtensor(q("ffn_gate")?)?,
                up: QMatMul::from_qtensor(q("ffn_up")?)?,
                down: QMatMul::from_qtensor(q("ffn_down")?)?,
                n_head,
                n_kv_head,
                head_dim,
                window: sliding.then_some(window),
                rope: if sliding {
                    local_rope.clone()
                } else {
                    global_rope.clone()
                },
                scale,
                cache: None,
            });
        }
        Ok(Gemma3 {
            embed,
            embed_scale: (n_embd as f64).sqrt(),
            layers,
            norm,
            output,
        })
    }

    /// Logits of the last position, for `tokens` (batch 1) starting at position `pos`.
    pub fn forward(&mut self, tokens: &Tensor, pos: usize) -> Result<Tensor> {
        let (_, seq) = tokens.dims2()?;
        let ids = tokens.flatten_all()?.to_vec1::<u32>()?;
        let mut x = (self.embed.lookup(&ids, tokens.device())?.unsqueeze(0)? * self.embed_scale)?;
        for layer in &mut self.layers {
            x = layer.forward(&x, pos)?;
        }
        let x = self.norm.forward(&x.i((.., seq - 1, ..))?)?;
        self.output.forward(&x)
    }

    pub fn clear_cache(&mut self) {
        for l in &mut self.layers {
            l.cache = None;
        }
    }
}

#[derive(Clone)]
enum Embed {
    /// Quantized rows, expanded on lookup (CPU).
    Rows {
        q: Arc<QTensor>,
        n_embd: usize,
    },
    Full(Tensor),
}

impl Embed {
    fn lookup(&self, ids: &[u32], dev: &Device) -> Result<Tensor> {
        match self {
            Embed::Full(t) => t.index_select(&Tensor::new(ids, dev)?, 0),
            Embed::Rows { q, n_embd } => {
                let dtype = q.dtype();
                let row = n_embd / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let rows = ids
                    .iter()
                    .map(|&id| {
                        let at = id as usize * row;
                        let bytes = data.get(at..at + row).ok_or_else(|| {
                            candle_core::Error::Msg(format!("token {id} is outside the vocabulary"))
                        })?;
                        let storage = QStorage::from_data(Cow::Borrowed(bytes), dev, dtype)?;
                        QTensor::new(storage, (1, *n_embd))?.dequantize(dev)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
        }
    }
}
