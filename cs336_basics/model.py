"""A from-scratch Transformer language model (CS336 "basics" architecture), with the assignment's ablations.

Token embedding -> N x [x + attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> untied LM head.
Attention is causal multi-head self-attention with interleaved rotary position embeddings (RoPE). Everything is
described by one :class:`~cs336_basics.config.ModelConfig`; its ablation switches (``norm``, ``norm_position``,
``position_embedding``, ``ffn``) default to this architecture.

Parameter names follow the CS336 conventions (``token_embeddings.weight``, ``layers.{i}.attn.q_proj.weight``,
``layers.{i}.ffn.w1.weight``, ``ln_final.weight``, ``lm_head.weight``, ...) so reference weights load as is.

Two attention paths share the same parameters:
- ``attention_impl="reference"``: our own softmax(QK^T/sqrt(d_k) + mask) V, written out op by op.
- ``attention_impl="sdpa"`` (default): ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels),
  one fused Q/K/V projection and a single RoPE call on Q and K together. Tests check both agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cs336_basics.config import ATTENTION_IMPLS, ModelConfig


# ----------------------------------------------------------------------------------------------------------------------
# Basic layers


class Linear(nn.Module):
    """y = x W^T with W of shape [out, in], no bias; init N(0, 2/(in+out)) truncated at +-3 sigma."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(nn.Module):
    """Lookup table [num_embeddings, embedding_dim]; init N(0, 1) truncated at +-3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.weight[token_ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gain, computed in float32 and cast back to the input dtype."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x)."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """Gated feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # F.silu is the fused kernel for our silu() (tests check they agree).
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SiLUFeedForward(nn.Module):
    """Ungated feed-forward w2(silu(w1 x)): the SwiGLU ablation (two matrices, so d_ff = 4 d_model matches)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)))


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embedding


class RotaryPositionalEmbedding(nn.Module):
    """Rotates each adjacent pair (x[2j], x[2j+1]) by the angle pos * theta^(-2j/d_k) (interleaved layout).

    cos/sin tables [max_seq_len, d_k/2] live in non-persistent buffers (they never enter the state_dict).
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RoPE needs an even head dimension, got d_k={d_k}")
        self.theta = theta
        self.d_k = d_k
        self.max_seq_len = max_seq_len
        inv_freq = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64, device=device) / d_k)
        angles = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        """x: [..., seq, d_k]; token_positions: integer positions broadcastable to [..., seq]."""
        return rotate_pairs(x, self.cos[token_positions], self.sin[token_positions])


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x[..., 2j], x[..., 2j+1]) of x [..., d] by angles given as cos/sin [..., d/2].

    In eager mode float32/float64 inputs take one complex multiply (a single kernel forward and backward);
    other dtypes (bf16, fp16) and torch.compile (which fuses the real version into one kernel and handles complex
    tensors poorly) use the real formulation. Tests check both against a float64 re-implementation.
    """
    pairs = x.unflatten(-1, (-1, 2))
    if (x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
            and _complex_viewable(pairs)):
        freqs = torch.complex(cos.to(x.dtype), sin.to(x.dtype))
        return torch.view_as_real(torch.view_as_complex(pairs) * freqs).flatten(-2)
    return rotate_pairs_real(x, cos, sin)


def rotate_pairs_real(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """rotate_pairs with real arithmetic: (x1 cos - x2 sin, x1 sin + x2 cos) per pair."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _complex_viewable(pairs: Tensor) -> bool:
    """view_as_complex needs a unit-stride last dim of size 2, even strides elsewhere and an even offset."""
    return (pairs.stride(-1) == 1 and pairs.storage_offset() % 2 == 0
            and all(st % 2 == 0 for st in pairs.stride()[:-1]))


# ----------------------------------------------------------------------------------------------------------------------
# Attention


def softmax(x: Tensor, dim: int) -> Tensor:
    """Numerically stable softmax: exp(x - max) / sum(exp(x - max))."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) V over [..., queries, d_k] x [..., keys, d_k]; mask True = may attend."""
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1) @ V


class KVCache:
    """Keys/values of every layer for incremental decoding, preallocated to ``max_seq_len`` positions.

    ``length`` is the number of positions stored. A model forward writes the new keys/values of each layer at
    ``[length, length + seq)`` and then advances ``length``. Keys are stored after RoPE.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_seq_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (num_layers, batch_size, num_heads, max_seq_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def reset(self) -> None:
        """Forget every stored position (the buffers are reused)."""
        self.length = 0

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [batch, heads, seq, head_dim] after the cached positions; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[-2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache full: {end} positions > max_seq_len {self.max_seq_len}; "
                             "reset the cache and re-feed a cropped context")
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, got {k.shape[0]}")
        self.keys[layer_idx, :, :, start:end] = k
        self.values[layer_idx, :, :, start:end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, n: int) -> None:
        """Count n more stored positions (TransformerLM.forward calls this once after all layers)."""
        self.length += n


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention; heads are stacked along the rows of q/k/v/output_proj.weight."""

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int | None = None, theta: float | None = None,
                 *, rope: RotaryPositionalEmbedding | None = None, layer_idx: int = 0, attention_impl: str = "sdpa",
                 device=None, dtype=None):
        """RoPE comes from ``rope`` (a table shared between layers) or is built from ``theta``; neither: no RoPE.

        ``layer_idx`` is this layer's slot in a :class:`KVCache`.
        """
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.attention_impl = attention_impl
        self.layer_idx = layer_idx
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        if rope is None and theta is not None:
            if max_seq_len is None:
                raise ValueError("RoPE needs max_seq_len")
            rope = RotaryPositionalEmbedding(theta, self.head_dim, max_seq_len, device=device)
        self.rope = rope

    def forward(self, x: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """x: [..., seq, d_model] -> [..., seq, d_model]. Positions default to 0..seq-1 (after cached ones)."""
        if self.attention_impl == "reference":
            return self._forward_reference(x, token_positions, kv_cache)
        return self._forward_sdpa(x, token_positions, kv_cache)

    def _positions(self, seq: int, token_positions: Tensor | None, kv_cache: KVCache | None, device) -> Tensor:
        if token_positions is not None:
            return token_positions
        start = kv_cache.length if kv_cache is not None else 0
        return torch.arange(start, start + seq, device=device)

    def _forward_reference(self, x: Tensor, token_positions: Tensor | None, kv_cache: KVCache | None) -> Tensor:
        seq = x.shape[-2]
        h, dh = self.num_heads, self.head_dim
        # [..., seq, h*dh] -> [..., h, seq, dh]
        q = self.q_proj(x).unflatten(-1, (h, dh)).transpose(-3, -2)
        k = self.k_proj(x).unflatten(-1, (h, dh)).transpose(-3, -2)
        v = self.v_proj(x).unflatten(-1, (h, dh)).transpose(-3, -2)
        if self.rope is not None:
            pos = self._positions(seq, token_positions, kv_cache, x.device).unsqueeze(-2)  # broadcast over heads
            cos, sin = self.rope.cos[pos], self.rope.sin[pos]
            q, k = rotate_pairs_real(q, cos, sin), rotate_pairs_real(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
        mask = _causal_mask(seq, past + seq, x.device)
        out = scaled_dot_product_attention(q, k, v, mask)
        return self.output_proj(out.transpose(-3, -2).flatten(-2))

    def _forward_sdpa(self, x: Tensor, token_positions: Tensor | None, kv_cache: KVCache | None) -> Tensor:
        *lead, seq, d = x.shape
        h, dh = self.num_heads, self.head_dim
        w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        qkv = (x @ w.T).unflatten(-1, (3, h, dh))  # [..., seq, 3, h, dh]
        # split (not slicing/select) keeps the backward a single concatenation instead of zero-fill + copy
        qk, v = qkv.split((2, 1), dim=-3)
        if self.rope is not None:
            # rotate q and k in one pass: cos/sin [..., seq, 1, 1, dh/2] broadcast over (q|k, head)
            pos = self._positions(seq, token_positions, kv_cache, x.device)
            cos = self.rope.cos[pos][..., None, None, :]
            sin = self.rope.sin[pos][..., None, None, :]
            qk = rotate_pairs(qk, cos, sin)
        q, k = qk.unbind(-3)
        v = v.squeeze(-3)
        q, k, v = q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)  # [..., h, seq, dh]
        if kv_cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
            if seq == 1:
                out = F.scaled_dot_product_attention(q, k, v)
            elif past == 0:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(seq, past + seq, x.device))
        return self.output_proj(out.transpose(-3, -2).reshape(*lead, seq, d))


def _causal_mask(num_queries: int, num_keys: int, device) -> Tensor:
    """[q, k] boolean mask where the queries are the last num_queries of num_keys positions."""
    offset = num_keys - num_queries
    qi = torch.arange(num_queries, device=device)[:, None] + offset
    ki = torch.arange(num_keys, device=device)[None, :]
    return ki <= qi


# ----------------------------------------------------------------------------------------------------------------------
# Transformer


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + ffn(ln2(.)); ``norm_position="post"``: ln1(x + attn(x)), ...

    ``norm="none"`` drops both norms; ``ffn="silu"`` swaps SwiGLU for the ungated SiLU feed-forward.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, max_seq_len: int, theta: float | None,
                 *, rope: RotaryPositionalEmbedding | None = None, layer_idx: int = 0, norm: str = "rmsnorm",
                 norm_position: str = "pre", ffn: str = "swiglu", attention_impl: str = "sdpa", device=None,
                 dtype=None):
        super().__init__()
        self.post_norm = norm_position == "post"
        self.attn = MultiHeadSelfAttention(d_model, num_heads, max_seq_len, theta, rope=rope, layer_idx=layer_idx,
                                           attention_impl=attention_impl, device=device, dtype=dtype)
        self.ln1 = _norm(norm, d_model, device, dtype)
        self.ffn = (SwiGLU if ffn == "swiglu" else SiLUFeedForward)(d_model, d_ff, device=device, dtype=dtype)
        self.ln2 = _norm(norm, d_model, device, dtype)

    def forward(self, x: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        if self.post_norm:
            x = self.ln1(x + self.attn(x, token_positions, kv_cache))
            return self.ln2(x + self.ffn(x))
        x = x + self.attn(self.ln1(x), token_positions, kv_cache)
        return x + self.ffn(self.ln2(x))


def _norm(kind: str, d_model: int, device, dtype) -> nn.Module:
    return RMSNorm(d_model, device=device, dtype=dtype) if kind == "rmsnorm" else nn.Identity()


class TransformerLM(nn.Module):
    """Decoder-only LM: returns unnormalised logits [batch, seq, vocab] for token ids [batch, seq]."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = c = config
        self.token_embeddings = Embedding(c.vocab_size, c.d_model, device=device, dtype=dtype)
        # One RoPE table shared by every layer (its buffers are non-persistent, so state_dict keys are unaffected).
        rope = (RotaryPositionalEmbedding(c.rope_theta, c.d_model // c.num_heads, c.context_length, device=device)
                if c.position_embedding == "rope" else None)
        self.layers = nn.ModuleList(
            TransformerBlock(c.d_model, c.num_heads, c.d_ff, c.context_length, None, rope=rope, layer_idx=i,
                             norm=c.norm, norm_position=c.norm_position, ffn=c.ffn,
                             attention_impl=c.attention_impl, device=device, dtype=dtype)
            for i in range(c.num_layers)
        )
        self.ln_final = _norm(c.norm, c.d_model, device, dtype)
        self.lm_head = Linear(c.d_model, c.vocab_size, device=device, dtype=dtype)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def forward(self, in_indices: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        seq = in_indices.shape[-1]
        start = kv_cache.length if kv_cache is not None else 0
        if start + seq > self.context_length:
            raise ValueError(f"sequence of {start + seq} positions exceeds context_length {self.context_length}")
        x = self.token_embeddings(in_indices)
        positions = torch.arange(start, start + seq, device=in_indices.device)
        for block in self.layers:
            x = block(x, positions, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        return self.lm_head(self.ln_final(x))

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to context_length positions."""
        c, w = self.config, self.lm_head.weight
        return KVCache(c.num_layers, batch_size, c.num_heads, c.context_length, c.d_model // c.num_heads,
                       device=w.device, dtype=w.dtype)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the token embedding table (the untied lm_head stays)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.token_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token (the standard 6N + 12 L d T estimate for training, 2N + 4 L d T forward only).

        N counts the weights that take part in a matmul: q/k/v/output projections, the feed-forward matrices
        (SwiGLU w1/w2/w3, or SiLU w1/w2) and lm_head (4 d^2 + 3 d d_ff per layer for SwiGLU, plus d * vocab), each
        costing 2 FLOPs per token forward. Attention scores and the
        weighted sum of values add 2 * 2 * T * d per layer and token with T = seq_len (default context_length),
        counted without the causal halving. Backward costs twice the forward, hence the factor 3 for training.
        """
        c = self.config
        t = c.context_length if seq_len is None else seq_len
        d = c.d_model
        ffn_matrices = 3 if c.ffn == "swiglu" else 2
        n_matmul = c.num_layers * (4 * d * d + ffn_matrices * d * c.d_ff) + d * c.vocab_size
        forward = 2 * n_matmul + 4 * c.num_layers * t * d
        return 3 * forward if training else forward
