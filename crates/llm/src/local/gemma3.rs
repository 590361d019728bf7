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
//!   f32 copy of a 262,144-token table is 671 MB; rounding it to f16 changes answers);
//! - Q5_0 weights are held as the equivalent Q8_0 blocks, for candle's SIMD kernel;
//! - Q8_0 projections whose input length is not a multiple of 256 are padded with zero
//!   columns so that candle's AVX-512 VNNI kernels take them (generation went from 59 % to
//!   120 % of llama.cpp's speed on the demo model).
//!
//! With these, greedy output follows llama.cpp token for token on the demo model except at
//! near-ties decided by rounding (within a quarter of a logit; see tests/local_demo.rs).

use candle_core::quantized::gguf_file::Content;
use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
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

/// A quantized projection. Q8_0 weights whose input length is not a multiple of 256 get
/// zero columns up to the next one (and the input zeros to match): candle's AVX-512 VNNI
/// kernels only take such shapes, and its AVX2 fallback made the output projection alone
/// 60 % of generation time. Zeros add nothing to any dot product.
#[derive(Clone)]
struct Proj {
    mm: QMatMul,
    pad: usize,
}

impl Proj {
    fn new(q: QTensor) -> Result<Proj> {
        let (q, pad) = pad_q8_0(q)?;
        Self::shared(Arc::new(q), pad)
    }

    /// A projection over weights also used elsewhere (the tied embedding table).
    fn shared(q: Arc<QTensor>, pad: usize) -> Result<Proj> {
        Ok(Proj {
            mm: QMatMul::from_arc(q)?,
            pad,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad == 0 {
            return self.mm.forward(x);
        }
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.pad;
        }
        let zeros = Tensor::zeros(shape, x.dtype(), x.device())?;
        self.mm.forward(&Tensor::cat(&[x, &zeros], x.rank() - 1)?)
    }
}

/// Whether candle's VNNI kernels are there to take padded shapes (on AVX2 alone padding
/// would only add work).
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512vnni") || std::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn pad_q8_0(q: QTensor) -> Result<(QTensor, usize)> {
    let dims = q.shape().dims().to_vec();
    let dev = q.device();
    if q.dtype() != GgmlDType::Q8_0
        || !dev.is_cpu()
        || dims.len() != 2
        || dims[1].is_multiple_of(256)
        || !vnni()
    {
        return Ok((q, 0));
    }
    let (n, k) = (dims[0], dims[1]);
    let padded = k.div_ceil(256) * 256;
    let (nb, pb) = (k / 32, padded / 32);
    let data = q.data()?;
    if data.len() != n * nb * 34 {
        return Ok((q, 0));
    }
    let mut out = vec![0u8; n * pb * 34];
    for r in 0..n {
        out[r * pb * 34..r * pb * 34 + nb * 34]
            .copy_from_slice(&data[r * nb * 34..(r + 1) * nb * 34]);
    }
    drop(data);
    let storage = QStorage::from_data(Cow::Owned(out), &dev, GgmlDType::Q8_0)?;
    Ok((QTensor::new(storage, (n, padded))?, padded - k))
}

#[derive(Clone)]
struct Layer {
    wq: Proj,
    wk: Proj,
    wv: Proj,
    wo: Proj,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: Proj,
    up: Proj,
    down: Proj,
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
    output: Proj,
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

        let mut t = |name: &str| ct.tensor(r, name, dev).and_then(|q| fast_layout(q, dev));
        let separate_output = ct.tensor_infos.contains_key("output.weight");
        // With tied weights the table is also the output projection: one copy in memory,
        // padded for the fast kernels, its rows cut back to `n_embd` when looked up.
        let (embed_q, pad) = if separate_output {
            (t("token_embd.weight")?, 0)
        } else {
            pad_q8_0(t("token_embd.weight")?)?
        };
        let embed_q = Arc::new(embed_q);
        let embed = if dev.is_cpu() {
            Embed::Rows {
                q: embed_q.clone(),
                n_embd,
                row_len: n_embd + pad,
            }
        } else {
            Embed::Full(embed_q.dequantize(dev)?.narrow(1, 0, n_embd)?)
        };
        let norm = RmsNorm::from_qtensor(t("output_norm.weight")?, eps)?;
        let output = if separate_output {
            Proj::new(t("output.weight")?)?
        } else {
            Proj::shared(embed_q, pad)?
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("blk.{i}");
            let mut q = |n: &str| t(&format!("{p}.{n}.weight"));
            let sliding = (i + 1) % pattern != 0;
            layers.push(Layer {
                wq: Proj::new(q("attn_q")?)?,
                wk: Proj::new(q("attn_k")?)?,
                wv: Proj::new(q("attn_v")?)?,
                wo: Proj::new(q("attn_output")?)?,
                q_norm: RmsNorm::from_qtensor(q("attn_q_norm")?, eps)?,
                k_norm: RmsNorm::from_qtensor(q("attn_k_norm")?, eps)?,
                attn_norm: RmsNorm::from_qtensor(q("attn_norm")?, eps)?,
                post_attn_norm: RmsNorm::from_qtensor(q("post_attention_norm")?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(q("ffn_norm")?, eps)?,
                post_ffn_norm: RmsNorm::from_qtensor(q("post_ffw_norm")?, eps)?,
                gate: Proj::new(q("ffn_gate")?)?,
                up: Proj::new(q("ffn_up")?)?,
                down: Proj::new(q("ffn_down")?)?,
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
        /// Values stored per row (more than `n_embd` when padded with zeros).
        row_len: usize,
    },
    Full(Tensor),
}

impl Embed {
    fn lookup(&self, ids: &[u32], dev: &Device) -> Result<Tensor> {
        match self {
            Embed::Full(t) => t.index_select(&Tensor::new(ids, dev)?, 0),
            Embed::Rows { q, n_embd, row_len } => {
                let dtype = q.dtype();
                let row = row_len / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let rows = ids
                    .iter()
                    .map(|&id| {
                        let at = id as usize * row;
                        let bytes = data.get(at..at + row).ok_or_else(|| {
                            candle_core::Error::Msg(format!("token {id} is outside the vocabulary"))
                        })?;
                        let storage = QStorage::from_data(Cow::Borrowed(bytes), dev, dtype)?;
                        QTensor::new(storage, (1, *row_len))?
                            .dequantize(dev)?
                            .narrow(1, 0, *n_embd)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
        }
    }
}

/// candle has SIMD kernels for Q4_0, Q8_0 and the K-quants but multiplies Q5_0 one value
/// at a time (over a third of the demo model's time). A Q5_0 block is d × (q − 16) with
/// q − 16 in −16..15, which a Q8_0 block with the same scale holds exactly: the integer
/// dot products, and so the results, stay those of llama.cpp's Q5_0 kernel, at 34 instead
/// of 22 bytes per 32 weights.
fn fast_layout(q: QTensor, dev: &Device) -> Result<QTensor> {
    if q.dtype() != GgmlDType::Q5_0 || !dev.is_cpu() {
        return Ok(q);
    }
    let data = q.data()?;
    if data.len() % 22 != 0 {
        return Ok(q);
    }
    let mut out = Vec::with_capacity(data.len() / 22 * 34);
    for b in data.chunks_exact(22) {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        out.extend_from_slice(&b[..2]);
        let mut vals = [0i8; 32];
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            vals[j] = ((qs[j] & 0x0f) | h0) as i8 - 16;
            vals[j + 16] = ((qs[j] >> 4) | h1) as i8 - 16;
        }
        out.extend(vals.iter().map(|v| *v as u8));
    }
    let shape = q.shape().clone();
    drop(data);
    let storage = QStorage::from_data(Cow::Owned(out), dev, GgmlDType::Q8_0)?;
    QTensor::new(storage, shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(q: &QTensor) -> Vec<f32> {
        q.dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap()
    }

    #[test]
    fn q5_0_becomes_the_same_numbers_in_q8_0() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
        let q5 = QTensor::quantize(&w, GgmlDType::Q5_0).unwrap();
        let want = values(&q5);
        let q8 = fast_layout(q5, &dev).unwrap();
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        assert_eq!(values(&q8), want);
    }
}
