"""Building blocks shared by every layer: dense, embedding, RMSNorm, rotary embedding, SwiGLU MLP,
grouped-query attention and the pre-norm transformer block.

Parameters carry logical axis names in their `logical_axes` metadata ("embed", "heads", "kv_heads",
"mlp", "vocab", "retrieval", "head_dim", "norm"); train/ maps them onto mesh axes. Parameter attribute
names follow the original PyTorch modules so that interop is a mechanical rename (hsa_jax/interop.py).
Activations run in the dtype of their input; parameters are cast to it at use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def scoped(name: str):
    """Decorator: the function's ops carry jax.named_scope(name) in their op names, in the forward and
    the backward pass, so a profile can say which part of the model a kernel belongs to
    (benchmarks/train_step.py; XProf's op names). The scopes are the categories of that breakdown."""
    def wrap(f):
        @functools.wraps(f)
        def scoped_f(*args, **kwargs):
            with jax.named_scope(name):
                return f(*args, **kwargs)
        return scoped_f
    return wrap


def param(rngs: nnx.Rngs | None, shape, std: float | None, *, axes, dtype=jnp.float32):
    """An nnx.Param drawn from N(0, std) (ones when std is None), tagged with logical axes."""
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel is (in, out): the transpose of torch's Linear weight."""

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str, str], std: float, rngs: nnx.Rngs,
                 bias: bool = False, dtype=jnp.float32):
        self.kernel = param(rngs, (d_in, d_out), std, axes=axes, dtype=dtype)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype), logical_axes=axes[1:]) if bias else None

    @scoped("dense")
    def __call__(self, x):
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, std: float, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedding = param(rngs, (vocab, dim), std, axes=("vocab", "embed"), dtype=dtype)

    def __call__(self, ids, dtype):
        return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)

    @scoped("lm_head")
    def attend(self, h):
        """Tied LM head: h @ embedding^T."""
        return jnp.dot(h, self.embedding[...].astype(h.dtype).T)


class RMSNorm(nnx.Module):
    """Liger/Qwen2 "llama" RMSNorm: statistics in fp32, normalised x cast back to the input dtype, then
    scaled by the weight. Normalises the last axis (`dim` wide: the hidden size, or a head dim)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, axis_name: str = "norm"):
        self.weight = param(None, (dim,), None, axes=(axis_name,), dtype=dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


def rope_cos_sin(positions_NxT, head_dim: int, theta: float, dtype):
    """Rotate-half (NeoX) rotary tables: cos/sin of p * theta^(-2i/hd), duplicated to hd; the angles
    are fp32 and the tables are cast to the activation dtype, as the original does. -> (N|1, T, hd)."""
    inv_freq = jnp.asarray(1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)),
                           jnp.float32)
    angle = positions_NxT.astype(jnp.float32)[..., None] * inv_freq  # (N, T, hd/2)
    emb = jnp.concatenate([angle, angle], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_NxTxHxD, cos_NxTxD, sin_NxTxD):
    half = x_NxTxHxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_NxTxHxD[..., half:], x_NxTxHxD[..., :half]], axis=-1)
    return x_NxTxHxD * cos_NxTxD[:, :, None, :] + rotated * sin_NxTxD[:, :, None, :]


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, *, std: float, rngs: nnx.Rngs, dtype=jnp.float32):
        self.gate_proj = Dense(dim, hidden, axes=("embed", "mlp"), std=std, rngs=rngs, dtype=dtype)
        self.up_proj = Dense(dim, hidden, axes=("embed", "mlp"), std=std, rngs=rngs, dtype=dtype)
        self.down_proj = Dense(hidden, dim, axes=("mlp", "embed"), std=std, rngs=rngs, dtype=dtype)

    @scoped("mlp")
    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# (mesh, mesh axes of the batch dim) while a sharded step is traced; None otherwise.
_BATCH_SHARDING = contextvars.ContextVar("batch_sharding", default=None)


@contextlib.contextmanager
def batch_sharded(mesh, batch_axes):
    """While tracing under this context, `shard_batch` pins activations to batch-only sharding."""
    token = _BATCH_SHARDING.set((mesh, batch_axes))
    try:
        yield
    finally:
        _BATCH_SHARDING.reset(token)


def shard_batch(x):
    """Constrains x to be split over its leading (batch) axis only, when a sharded step is traced."""
    spec = _BATCH_SHARDING.get()
    if spec is None:
        return x
    mesh, axes = spec
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes)))


def attention_backend(dtype, head_dim: int, seq_len: int) -> str | None:
    """cuDNN flash attention on GPU for 16-bit inputs of a length cuDNN takes (multiples of 64; the
    chunk encoder's S+1 tokens are short and take XLA, as do fp32 parity runs). The default of
    jax.nn.dot_product_attention is XLA, which materialises the full T x T logits."""
    usable = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
              and seq_len % 64 == 0)
    return "cudnn" if usable and jax.default_backend() == "gpu" else None


class Attention(nnx.Module):
    """Grouped-query attention with per-head q/k RMSNorm applied before RoPE.

    window=W: causal sliding window, query t sees keys t-W..t (W+1 keys, flash-attn window_size=(W, 0));
    window=None: bidirectional (the chunk encoder). Query head h reads kv head h // (heads/kv_heads).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, *, norm_eps: float,
                 qkv_bias: bool, o_bias: bool, std: float, rngs: nnx.Rngs, dtype=jnp.float32):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = Dense(dim, heads * head_dim, axes=("embed", "heads"), std=std, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.k_proj = Dense(dim, kv_heads * head_dim, axes=("embed", "kv_heads"), std=std, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.v_proj = Dense(dim, kv_heads * head_dim, axes=("embed", "kv_heads"), std=std, rngs=rngs, bias=qkv_bias, dtype=dtype)
        self.o_proj = Dense(heads * head_dim, dim, axes=("heads", "embed"), std=std, rngs=rngs, bias=o_bias, dtype=dtype)
        self.q_norm = RMSNorm(head_dim, norm_eps, dtype=dtype, axis_name="head_dim")
        self.k_norm = RMSNorm(head_dim, norm_eps, dtype=dtype, axis_name="head_dim")

    def project_qkv(self, u_NxTxD, cos, sin):
        """-> q (N,T,heads,hd), k and v (N,T,kv_heads,hd), with q/k normed and rotated."""
        N, T, _ = u_NxTxD.shape
        q = self.q_norm(self.q_proj(u_NxTxD).reshape(N, T, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(u_NxTxD).reshape(N, T, self.kv_heads, self.head_dim))
        v = self.v_proj(u_NxTxD).reshape(N, T, self.kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, u_NxTxD, cos, sin, window: int | None):
        # cuDNN's partitioner needs q, k and v sharded alike (FSDP can leave them differently split).
        q, k, v = (shard_batch(x) for x in self.project_qkv(u_NxTxD, cos, sin))
        with jax.named_scope("attn_core"):
            a = jax.nn.dot_product_attention(
                q, k, v, is_causal=window is not None,
                local_window_size=None if window is None else (window, 0),
                implementation=attention_backend(q.dtype, self.head_dim, q.shape[1]))
        return self.o_proj(a.reshape(*u_NxTxD.shape[:2], self.heads * self.head_dim))


@scoped("attn_core")
def sliding_window_attention(q_NxLxHxD, k_NxMxHkvxD, v_NxMxHkvxD, window: int, *, start=0, slopes_H=None,
                             block: int = 0):
    """Causal sliding-window attention, banded: the query at position p sees the keys at p-window .. p.

    q: L queries at positions start .. start+L-1 (`start` may be traced). k, v: M = Wp + L keys at
    positions start-Wp .. start+L-1: Wp earlier keys in chronological order (a decode cache's ring; 0 for a
    plain forward), then the queries' own keys. Keys at negative positions are ignored. With `slopes_H`,
    the ALiBi bias -m_h (p - j) is added to the scaled logits (docs/model_math.md "DRT self-attention").
    Query head h reads kv head h // (H / Hkv).

    Queries go in blocks of `block` (0: one block of L), each against only its block + W' keys
    (W' = max(Wp, min(window, L-1))), so memory and work are O(L (block + W')) rather than O(L^2). Logits
    and softmax in fp32; returns (N, L, H, D) in q's dtype."""
    N, L, H, D = q_NxLxHxD.shape
    Hkv = k_NxMxHkvxD.shape[2]
    G = H // Hkv
    Wp = k_NxMxHkvxD.shape[1] - L
    front = max(0, min(window, L - 1) - Wp)  # zero keys in front (negative positions: masked)
    W = Wp + front  # keys before the first query
    Bq = min(block, L) if block > 0 else L
    nb = -(-L // Bq)
    pad_q = nb * Bq - L
    q = jnp.pad(q_NxLxHxD, ((0, 0), (0, pad_q), (0, 0), (0, 0))).reshape(N, nb, Bq, Hkv, G, D)
    # Block b reads the key rows b*Bq .. b*Bq + Bq + W - 1 (positions start - W + row).
    kv_pad = ((0, 0), (front, pad_q), (0, 0), (0, 0))
    rows_nbxK = jnp.arange(nb)[:, None] * Bq + jnp.arange(Bq + W)[None, :]
    k = jnp.pad(k_NxMxHkvxD, kv_pad)[:, rows_nbxK]  # (N, nb, Bq+W, Hkv, D)
    v = jnp.pad(v_NxMxHkvxD, kv_pad)[:, rows_nbxK]
    x = jnp.einsum("nbqegd,nbjed->nbegqj", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    dist_QxK = W + jnp.arange(Bq)[:, None] - jnp.arange(Bq + W)[None, :]  # p - j, the same in every block
    key_pos_nbxK = start - W + rows_nbxK
    ok = (dist_QxK >= 0)[None] & (dist_QxK <= window)[None] & (key_pos_nbxK >= 0)[:, None, :]  # (nb, Bq, Bq+W)
    if slopes_H is not None:
        bias_HxQxK = -jnp.asarray(slopes_H, jnp.float32)[:, None, None] * dist_QxK[None].astype(jnp.float32)
        x = x + bias_HxQxK.reshape(Hkv, G, Bq, Bq + W)[None, None]
    x = jnp.where(ok[None, :, None, None], x, -jnp.inf)
    p = jax.nn.softmax(x, axis=-1).astype(v.dtype)
    o = jnp.einsum("nbegqj,nbjed->nbqegd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(N, nb * Bq, H, D)[:, :L].astype(q_NxLxHxD.dtype)


ENCODER_NORM_EPS = 1e-6  # both originals build their chunk encoder from a fresh LlamaConfig: eps 1e-6 ...
ENCODER_ROPE_THETA = 1e4  # ... and rope_theta 10000, whatever the model's own settings


class TransformerBlock(nnx.Module):
    """Pre-norm block: h += attn(RMS(h)); h += MLP(dropout(RMS(h))). Serves as the SWA decoder layer
    (window=W) and as the chunk-encoder layer (window=None); the original names both the same way."""

    def __init__(self, attn: Attention, mlp: SwiGLU, dim: int, norm_eps: float, *, dropout: float = 0.0,
                 dtype=jnp.float32):
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(dim, norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps, dtype=dtype)
        self.dropout = dropout

    def __call__(self, h_NxTxD, cos, sin, window: int | None, dropout_rng=None, attend=None):
        """attend(attn, u) -> attention output: replaces self_attn(u, cos, sin, window), e.g. by attention
        over a decoding cache; the residual and MLP rules stay here."""
        u = self.input_layernorm(h_NxTxD)
        h = h_NxTxD + (self.self_attn(u, cos, sin, window) if attend is None else attend(self.self_attn, u))
        z = self.post_attention_layernorm(h)
        if self.dropout and dropout_rng is not None:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.dropout, z.shape)
            z = jnp.where(keep, z / (1.0 - self.dropout), 0).astype(z.dtype)
        return h + self.mlp(z)


def scan_blocks(blocks, h, body, *, remat: bool, collect: bool, scan: bool = True):
    """Runs h through `blocks` in order, by default as ONE jax.lax.scan over their stacked parameters,
    so that the program holds a single copy of the block and compile time does not grow with depth.

    blocks: modules of one structure (a shared GraphDef; their parameter values differ). The parameter
    tree is untouched: the stack is built from the per-block parameters inside the traced function
    (a sharded parameter stays sharded, the new leading axis is not), and gradients flow back through
    it to each block's own parameters.
    body(block, h) -> (h', y): one block's step; y is what `collect` keeps.
    remat: recompute each block in the backward pass instead of keeping its activations.
    scan=False: the same steps unrolled (one program copy per block: compile time grows with depth,
    but XLA may schedule across blocks; MaxText's scan_layers=False).
    -> (h after the last block, every block's y stacked on a new leading axis if collect else None).
    """
    (graphdef, first), *rest = (nnx.split(block) for block in blocks)
    if any(g != graphdef for g, _ in rest):
        raise ValueError("scan_blocks needs blocks of one structure (identical GraphDefs)")
    states = [first, *(state for _, state in rest)]

    def step(h, state):
        h, y = body(nnx.merge(graphdef, state), h)
        return h, (y if collect else None)

    if not scan or len(states) == 1:
        step = jax.checkpoint(step) if remat else step
        ys = []
        for state in states:
            h, y = step(h, state)
            ys.append(y)
        return h, (jax.tree.map(lambda *y: jnp.stack(y), *ys) if collect else None)
    # Inside a scan the recomputation cannot be CSE'd with the forward pass anyway (jax.checkpoint docs).
    step = jax.checkpoint(step, prevent_cse=False) if remat else step
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    return jax.lax.scan(step, h, stacked)


class ChunkEncoder(nnx.Module):
    """The chunk encoder of both families: bidirectional transformer blocks over one chunk (RoPE at
    positions 0..P-1, theta ENCODER_ROPE_THETA) and a final RMSNorm. The family builds the blocks (its
    own attention flavour); parameters are `layers.<i>.*` and `norm.weight`, as in both originals."""

    def __init__(self, blocks: list[TransformerBlock], dim: int, head_dim: int, *, dtype):
        self.layers = nnx.List(blocks)
        self.norm = RMSNorm(dim, ENCODER_NORM_EPS, dtype=dtype)
        self.head_dim = head_dim

    @scoped("chunking")
    def __call__(self, x_BxPxD, dropout_rng=None):
        """x (B, P, D): B independent chunks -> (B, P, D). dropout_rng: the blocks' MLP-input dropout."""
        positions = jnp.arange(x_BxPxD.shape[1])[None]
        cos, sin = rope_cos_sin(positions, self.head_dim, ENCODER_ROPE_THETA, x_BxPxD.dtype)
        for i, layer in enumerate(self.layers):
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            x_BxPxD = layer(x_BxPxD, cos, sin, window=None, dropout_rng=rng)
        return self.norm(x_BxPxD)
