"""The GPT language model: GPT-2's architecture in one readable file, plus the switches the field moved to.

Reading order: GPTConfig, then the blocks bottom-up (norms, positions, CausalSelfAttention, MLP, MoE, Block), then
GPT (init, forward, generation, loading Hugging Face weights). With GPTConfig's defaults this is exactly GPT-2;
e.g. pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False is a Llama. The same
blocks make an encoder (arch="encoder"): bidirectional attention with a padding mask and BERT's masked-language-model
head [10]; with norm_position="post", mlp="gelu", bias=True and norm_eps=1e-12 it is exactly BERT.

Shape legend used in the comments:
    B batch size, T time (sequence length), C n_embd, nh n_head, nkv n_kv_head, hs head size (C // nh),
    H MLP hidden size, E experts, V vocab size.

References:
    [1] Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
    [2] Vaswani et al. 2017, "Attention Is All You Need" (sinusoidal positions, post-norm).
    [3] Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding" (RoPE).
    [4] Press et al. 2021, "Train Short, Test Long" (ALiBi).
    [5] Zhang & Sennrich 2019, "Root Mean Square Layer Normalization" (RMSNorm).
    [6] Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU).
    [7] So et al. 2021, "Primer" (squared ReLU).
    [8] Ainslie et al. 2023, "GQA" (grouped-query attention); Shazeer 2019 (multi-query attention).
    [9] Fedus et al. 2021, "Switch Transformers" (load-balancing loss); Shazeer et al. 2017 (top-k routing).
    [10] Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding".
    [11] Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (T5:
         relative-position buckets, unscaled attention, the encoder-decoder's layout); Shazeer 2020 [6] (gated GELU).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu_tanh", "gelu", "relu", "relu2", "swiglu", "geglu")
GATED = ("swiglu", "geglu")  # MLPs whose hidden layer is gated: act(gate(x)) * fc(x)
ARCHS = ("decoder", "encoder", "encoder_decoder")


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum context length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, as GPT-2; False is a little better and faster
    # Architecture switches; the defaults are GPT-2.
    pos_embedding: str = "learned"  # learned, sinusoidal [2], rope [3], alibi [4], t5 (bucketed bias [11]) or none
    rope_theta: float = 10000.0  # RoPE base frequency
    norm: str = "layernorm"  # layernorm or rmsnorm [5]
    norm_position: str = "pre"  # pre (GPT-2) or post (the original Transformer's Add & Norm [2])
    norm_eps: float = 1e-5
    mlp: str = "gelu_tanh"  # gelu_tanh (GPT-2), gelu (exact), relu, relu2 [7], swiglu [6] or geglu (T5 v1.1 [11])
    mlp_hidden: int | None = None  # MLP hidden size; None = 4 * n_embd (swiglu: 8/3 * n_embd, rounded up to 64)
    n_kv_head: int | None = None  # key/value heads; None = n_head, 1 = multi-query, between = grouped-query [8]
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix, as GPT-2
    n_expert: int = 0  # Mixture of Experts MLPs when > 0 [9]
    n_expert_active: int = 2  # experts each token is routed to (top-k)
    moe_shared_expert: bool = False  # one more expert that every token goes through
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss added to the training loss
    arch: str = "decoder"  # decoder: causal attention, next-token head (GPT); encoder: bidirectional, MLM head (BERT)
    # encoder_decoder (T5 [11]): an encoder stack of n_layer blocks, a decoder of n_dec_layer cross-attending to it
    n_dec_layer: int | None = None  # encoder_decoder: the decoder's blocks; None = n_layer
    rel_buckets: int = 32  # pos_embedding=t5: buckets of relative position, each a learned bias per head
    rel_max_distance: int = 128  # pos_embedding=t5: distances from this on share the last bucket
    attn_scale: bool = True  # divide attention scores by sqrt(hs); False is T5's (the scale is in its init)
    # A classifier (an encoder with labels): set by the data, not by options (FROM_DATA)
    n_labels: int = 0  # > 0: a classification head over this many labels on [CLS] replaces the MLM head [10]
    pad_id: int | None = None  # with n_labels: the [PAD] id; padded positions are kept out of attention

    FROM_DATA: ClassVar[tuple[str, ...]] = ("n_labels", "pad_id")  # (set from the dataset's special tokens)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        if not 0 <= self.moe_aux_loss_coef < math.inf:
            raise ValueError(f"moe_aux_loss_coef must be >= 0, got {self.moe_aux_loss_coef}")
        for name, allowed in (
            ("pos_embedding", POSITIONS),
            ("norm", NORMS),
            ("mlp", MLPS),
            ("norm_position", ("pre", "post")),
            ("arch", ARCHS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pos_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head size (n_embd // n_head)")
        if self.mlp_hidden is None:
            self.mlp_hidden = -(-8 * self.n_embd // 3 // 64) * 64 if self.mlp in GATED else 4 * self.n_embd
        if self.n_dec_layer is None:
            self.n_dec_layer = self.n_layer
        if self.n_dec_layer < 1 or self.rel_buckets < 4 or self.rel_max_distance < self.rel_buckets:
            raise ValueError("n_dec_layer must be >= 1, rel_buckets >= 4 and rel_max_distance >= rel_buckets")
        if self.n_expert < 0 or (self.n_expert and not 1 <= self.n_expert_active <= self.n_expert):
            raise ValueError(f"n_expert_active ({self.n_expert_active}) must be in [1, n_expert ({self.n_expert})]")
        if self.n_labels < 0 or (self.n_labels and self.arch != "encoder"):
            raise ValueError(f"n_labels ({self.n_labels}) must be 0, or > 0 for an encoder (arch=encoder)")
        if (self.n_labels or self.arch == "encoder_decoder") and not (
            self.pad_id is not None and 0 <= self.pad_id < self.vocab_size
        ):  # (an encoder-decoder's is also the decoder's start token, as T5's)
            raise ValueError(f"a classifier or an encoder-decoder needs a pad_id among its {self.vocab_size} ids")

    @classmethod
    def from_options(cls, options, dataset_vocab_size: int, **from_data) -> "GPTConfig":
        """The config named by the model keys of a run's options (train.py's share these names), with FROM_DATA's
        from the dataset (from_data). With no vocab_size there, the dataset's, rounded up to a multiple of 64: the
        matmuls run faster, and the extra ids never occur."""
        fields = {f.name: options[f.name] for f in dataclasses.fields(cls) if f.name not in cls.FROM_DATA}
        return cls(**fields | from_data | {"vocab_size": options["vocab_size"] or -(-dataset_vocab_size // 64) * 64})

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def make_norm(config: GPTConfig, ndim: int | None = None) -> nn.Module:
    ndim = ndim or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(ndim, eps=config.norm_eps)  # x / rms(x) * weight [5]
    return LayerNorm(ndim, bias=config.bias, eps=config.norm_eps)


def sinusoidal_table(block_size: int, n_embd: int) -> torch.Tensor:
    """(block_size, C) fixed positions [2]: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same)."""
    pos = torch.arange(block_size, dtype=torch.float32)[:, None]  # (T, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, n_embd, 2, dtype=torch.float32) / n_embd)  # (C/2,)
    table = torch.zeros(block_size, n_embd)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: n_embd // 2])
    return table


def rope_tables(block_size: int, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (block_size, hs), for RoPE [3] in the half-split layout Llama's weights use: dimension i is
    paired with i + hs/2, both rotated by angle p * theta^(-2i/hs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs) by position: each pair (x_i, x_{i+hs/2}) turns by its angle."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Head-specific slopes [4]: the geometric sequence 2^(-8/n), 2^(-16/n), ... (interleaved for non powers of 2)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_2(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_head - closest])


def causal_distance(q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
    """(T, k_len) query position minus key position, for queries at positions q_pos (T,) and keys at 0..k_len-1;
    negative means the key is in the future. Per-row positions q_pos (B, T) give (B, T, k_len)."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    return (q_pos[..., :, None] - k_pos).float()


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
    """(nh, T, k_len) additive attention bias: -slope * distance to each earlier key, -inf for later keys; per-row
    positions q_pos (B, T) give (B, nh, T, k_len)."""
    distance = causal_distance(q_pos, k_len).unsqueeze(-3)  # (1, T, k_len) or (B, 1, T, k_len)
    bias = -slopes.to(q_pos.device)[:, None, None] * distance  # (nh, T, k_len) or (B, nh, T, k_len)
    return bias.masked_fill(distance < 0, float("-inf"))


def t5_buckets(relative: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position, key minus query [11]: half the buckets (of each direction, when
    bidirectional) hold one small distance each, the rest distances growing logarithmically up to max_distance, past
    which all share the last. Causally, a later key (which is never attended to) falls in bucket 0."""
    if bidirectional:
        n_buckets //= 2
        buckets, distance = (relative > 0).long() * n_buckets, relative.abs()
    else:
        buckets, distance = torch.zeros_like(relative), (-relative).clamp(min=0)
    exact = n_buckets // 2
    far = (
        exact
        + (
            torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (n_buckets - exact)
        ).long()
    )
    return buckets + torch.where(distance < exact, distance, far.clamp(max=n_buckets - 1))


class KVCache:
    """One layer's keys and values, pre-allocated for `length` positions: (B, nkv, length, hs) each. The prompt is
    written in one prefill, then one position per decoding step.

    With an int start position, attention reads the filled part only (shapes grow by one each step). With a tensor
    start position the shapes are static: attention reads the whole buffer under a mask, so a compiled decoding
    step can be captured once as a CUDA graph and replayed. A (B,) tensor gives each row its own position: a batch
    of sequences of different lengths decodes together (a server's continuous batching), each row writing its own
    slot."""

    def __init__(self, batch_size: int, config: "GPTConfig", length: int, device, dtype):
        shape = (batch_size, config.n_kv_head, length, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cross = None  # an encoder-decoder's: the encoder output's keys and values, computed once per request

    def view(self, rows: slice, length: int | None = None) -> "KVCache":
        """Rows of this cache (their first `length` positions) as a cache of their own, sharing its memory: what
        is written through the view is written here."""
        part = object.__new__(KVCache)
        part.k, part.v, part.cross = self.k[rows, :, :length], self.v[rows, :, :length], None
        return part

    def update(self, start, k, v):
        """Store k, v (B, nkv, T, hs) at positions start..start+T-1 (start an int, a 0-dim tensor, or (B,) one per
        row); return the keys and values to attend to."""
        if torch.is_tensor(start) and start.dim() == 1:  # each row at its own position
            rows = torch.arange(k.size(0), device=k.device)[:, None]  # (B, 1)
            index = start[:, None] + torch.arange(k.size(2), device=k.device)  # (B, T)
            self.k[rows, :, index] = k.transpose(1, 2).to(self.k.dtype)  # indexed as (B, T, nkv, hs)
            self.v[rows, :, index] = v.transpose(1, 2).to(self.v.dtype)
            return self.k, self.v
        if torch.is_tensor(start):  # static shapes
            index = start + torch.arange(k.size(2), device=k.device)
            self.k.index_copy_(2, index, k.to(self.k.dtype))  # under autocast k may be bf16, the cache float32
            self.v.index_copy_(2, index, v.to(self.v.dtype))
            return self.k, self.v
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head attention: causal self-attention (a decoder's), bidirectional (an encoder's, causal=False), or with
    cross=True an encoder-decoder's cross-attention: queries from the decoder, keys and values from the encoder's
    output."""

    def __init__(self, config: GPTConfig, causal: bool = True, cross: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_size
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        kv = 2 * config.n_kv_head * self.hs
        if cross:  # queries from x, keys and values from the memory: two matmuls
            self.c_q = nn.Linear(config.n_embd, config.n_head * self.hs, bias=config.bias)
            self.c_kv = nn.Linear(config.n_embd, kv, bias=config.bias)
        else:  # q, k and v for all heads in one matmul: nh query heads, then nkv key heads, then nkv value heads
            self.c_attn = nn.Linear(config.n_embd, config.n_head * self.hs + kv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.hs, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.hs, eps=config.norm_eps)
        self.qk_norm = config.qk_norm
        self.causal = causal  # an encoder's queries see every key (but padding)
        self.cross = cross
        self.scale = None if config.attn_scale else 1.0  # None: SDPA's 1/sqrt(hs)

    def forward(self, x, rope=None, attn_mask=None, cache: KVCache | None = None, start: int = 0, memory=None):
        """x (B, T, C) at positions start..start+T-1; rope: (cos, sin) each (T, hs) (or (B, 1, T, hs), per row) or
        None; attn_mask: (nh or 1, T, start+T) (or with a leading B) additive or boolean mask, or None for plain
        causal attention; cache: this layer's KVCache. Cross-attention: memory (B, S, C), the encoder's output, whose
        keys and values a cache keeps (cache.cross)."""
        B, T, C = x.size()
        if self.cross:
            q = self.c_q(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
            if cache is None or cache.cross is None:
                k, v = self.c_kv(memory).split(self.n_kv_head * self.hs, 2)
                k, v = (t.view(B, -1, self.n_kv_head, self.hs).transpose(1, 2) for t in (k, v))  # (B, nkv, S, hs)
                if cache is not None:
                    cache.cross = (k, v)
            k, v = cache.cross if cache is not None else (k, v)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            y = self.attend(q, k, v, attn_mask)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        q, k, v = self.c_attn(x).split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], 2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nkv, start+T, hs): every key so far
        y = self.attend(q, k, v, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, attn_mask):
        """softmax(q k^T / sqrt(hs) + bias) v, with a causal mask [2] in a decoder; SDPA picks flash/memory-efficient
        kernels when it can. Grouped-query attention shares each key/value head among n_head / n_kv_head query heads."""
        T = q.size(2)
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled() and k.size(2) <= 256:
            # torch's CPU flash attention runs its backward slower in bfloat16 than in float32 up to ~256 keys (4.8x
            # at 64 keys of 32 dims, even at 256 of 64): short contexts train attention in float32 on CPUs
            with torch.autocast("cpu", enabled=False):
                mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
                return self.attend(q.float(), k.float(), v.float(), mask).to(torch.bfloat16)
        return F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None and T > 1,  # a single query (decoding) sees every key
            scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # fmt: skip


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        if config.mlp in GATED:
            self.c_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, C) -> (B, T, H)
        if self.kind == "swiglu":  # [6]: a SiLU-gated linear unit
            h = F.silu(self.c_gate(x)) * h
        elif self.kind == "geglu":  # [6, 11]: GELU-gated (the tanh GELU, as T5 v1.1)
            h = F.gelu(self.c_gate(x), approximate="tanh") * h
        else:
            h = activate(self.kind, h)
        return self.dropout(self.c_proj(h))  # (B, T, H) -> (B, T, C)


def activate(kind: str, h: torch.Tensor) -> torch.Tensor:
    if kind == "gelu_tanh":
        return F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation of GELU
    if kind == "relu":
        return F.relu(h)
    if kind == "relu2":
        return F.relu(h).square()  # [7]
    return F.gelu(h)  # exact GELU (BERT's)


class MoE(nn.Module):
    """Top-k routed Mixture of Experts [9]: each token goes to its n_expert_active most likely experts, whose outputs
    are mixed by the renormalised router probabilities (top-1: scaled by its probability); plus an optional shared
    expert every token uses. Records the load-balancing loss of its last forward in self.aux_loss:
    E * sum_e f_e * P_e, where f_e is the share of routing slots that went to expert e and P_e its mean router
    probability; 1.0 when perfectly balanced. And each f_e, in self.load."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.k = config.n_expert_active
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList([MLP(config) for _ in range(config.n_expert)])
        self.shared = MLP(config) if config.moe_shared_expert else None
        self.aux_loss = torch.zeros(())
        self.load = torch.zeros(config.n_expert)

    def forward(self, x):
        B, T, C = x.size()
        flat = x.reshape(B * T, C)  # (N, C), N = B * T tokens
        # The router runs in float32 even under autocast (Switch's selective precision [9]): in bf16 the softmax and
        # the top-k choice are noisy.
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = F.softmax(F.linear(flat.float(), self.router.weight.float()), dim=-1)  # (N, E)
        top_p, top_i = probs.topk(self.k, dim=-1)  # (N, k) each
        # Top-1 scales the expert's output by its router probability, as Switch does [9]: renormalised, that weight
        # would be exactly 1 and the router would get no gradient from the language-modelling loss.
        weights = (top_p if self.k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)  # (N, k)
        # On a CPU under autocast each expert's rows are padded to a multiple of 64, so its matmul shapes repeat from
        # step to step: CPUs' bf16 matmuls (oneDNN) build a kernel for every new shape, ~1.5 ms each.
        pad_to = 64 if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") else 0
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_i == e)  # the tokens routed to expert e, and in which of their k slots
            rows, w = flat[token], weights[token, slot, None]  # (n, C), (n, 1)
            if pad_to:  # zero rows at weight 0, added to token 0: exact zeros
                pad = -token.numel() % pad_to
                token, rows, w = F.pad(token, (0, pad)), F.pad(rows, (0, 0, 0, pad)), F.pad(w, (0, 0, 0, pad))
            # An expert with no tokens still runs (on an empty batch), so every parameter gets a (zero) gradient in
            # every backward: DDP and FSDP need the same gradients on every rank, whatever the routing there.
            out.index_add_(0, token, expert(rows) * w)
        share = F.one_hot(top_i, len(self.experts)).float().sum(dim=1).mean(dim=0) / self.k  # f_e, (E,)
        self.aux_loss = len(self.experts) * (share * probs.mean(dim=0)).sum()
        self.load = share.detach()  # what health telemetry logs as each expert's share of the tokens
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, C)


class Block(nn.Module):
    """Transformer block. Pre-norm [1]: x + attn(ln(x)), then x + mlp(ln(x)). Post-norm [2]: ln(x + attn(x)), then
    ln(x + mlp(x)). An encoder-decoder's decoder blocks (cross=True) cross-attend to the encoder's output (memory)
    between the two, the same way [2, 11]."""

    def __init__(self, config: GPTConfig, causal: bool | None = None, cross: bool = False):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, causal=config.arch == "decoder" if causal is None else causal)
        if cross:
            self.ln_c = make_norm(config)
            self.cross = CausalSelfAttention(config, causal=False, cross=True)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x, rope=None, attn_mask=None, cache=None, start=0, memory=None, memory_mask=None):
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, rope, attn_mask, cache, start))
            if memory is not None:
                x = self.ln_c(x + self.cross(x, None, memory_mask, cache, memory=memory))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache, start)
        if memory is not None:
            x = x + self.cross(self.ln_c(x), None, memory_mask, cache, memory=memory)
        x = x + self.mlp(self.ln_2(x))
        return x


class MLMHead(nn.Module):
    """An encoder's masked-language-model head before the output layer, as BERT's [10]: dense, activation, norm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = "gelu" if config.mlp == "swiglu" else config.mlp
        self.dense = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.norm = make_norm(config)

    def forward(self, x):
        return self.norm(activate(self.kind, self.dense(x)))


class ClassifierHead(nn.Module):
    """A classifier's head on [CLS]'s final state, as BERT's [10]: the pooler (dense, tanh), dropout, then a linear
    layer to the labels' logits."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.n_embd, config.n_labels)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.dense(x))))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos_embedding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        encoder = config.arch == "encoder"
        if encoder and config.norm_position == "post":  # BERT normalises the embeddings before the first block
            modules["ln_e"] = make_norm(config)
        if config.pos_embedding == "t5":  # a learned bias per bucket and head, shared by the stack's layers [11]
            modules["rel_bias"] = nn.Embedding(config.rel_buckets, config.n_head)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])  # (an encoder-decoder's encoder)
        # Post-norm blocks already end in a norm; pre-norm ones need a final one.
        modules["ln_f"] = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.transformer = nn.ModuleDict(modules)
        if config.arch == "encoder_decoder":  # the decoder stack: the same blocks, causal, cross-attending [2, 11]
            decoder = {k: v for k, v in modules.items() if k in ("wpe", "rel_bias")}  # positions of its own
            decoder = {k: nn.Embedding(v.num_embeddings, v.embedding_dim) for k, v in decoder.items()}
            decoder["h"] = nn.ModuleList([Block(config, causal=True, cross=True) for _ in range(config.n_dec_layer)])
            decoder["ln_f"] = make_norm(config) if config.norm_position == "pre" else nn.Identity()
            self.decoder = nn.ModuleDict(decoder)
        if config.n_labels:  # a classifier: labels from [CLS], no token logits
            self.classifier = ClassifierHead(config)
        elif encoder:
            self.mlm_head = MLMHead(config)
        if not config.n_labels:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=encoder)  # BERT's output layer has a bias
        if config.tie_embeddings and not config.n_labels:
            # Weight tying (Press & Wolf 2017), as GPT-2: the output projection is the token embedding matrix.
            self.transformer.wte.weight = self.lm_head.weight
        # Position tables are recomputed, not saved: they are functions of the config.
        if config.pos_embedding == "sinusoidal":
            # The raw table has RMS 1/sqrt(2), 35x the std-0.02 token embeddings, which it would drown. Vaswani et al.
            # [2] keep the two at the same scale (embeddings times sqrt(d_model) against a unit table); here the table
            # is scaled to the token embeddings' init std instead, so tied weights and the init stay GPT-2's.
            table = sinusoidal_table(config.block_size, config.n_embd) * (0.02 * math.sqrt(2))
            self.register_buffer("pos_table", table, persistent=False)
        elif config.pos_embedding == "rope":
            cos, sin = rope_tables(config.block_size, config.head_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif config.pos_embedding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        self.recompute_every = 0  # > 0: recompute every k-th block in the backward pass (set by train.py)
        self.apply(self._init_weights)
        # GPT-2 [1] scales the init of residual projections by 1/sqrt(N), N = 2 * n_layer residual additions,
        # so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. non_embedding leaves out the lookup tables (the Kaplan/Chinchilla convention): learned
        position embeddings, and the token embeddings too when they are not tied to lm_head (a tied matrix is also
        the output layer's weight, so it stays). Tied token embeddings count once."""
        n = sum(p.numel() for p in self.parameters())
        for stack in (self.transformer, getattr(self, "decoder", {})):
            if non_embedding and "wpe" in stack:
                n -= stack.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def forward(
        self,
        idx,
        targets=None,
        kv_cache: list[KVCache] | None = None,
        start_pos=0,
        all_logits: bool = False,
        reduction: str = "mean",
        padding_mask=None,
    ):
        """idx (B, T) int64 token ids; targets (B, T) int64 or None, -1 marks positions to ignore.
        With kv_cache (from new_kv_cache), idx holds positions start_pos..start_pos+T-1 of the sequences, whose earlier
        keys and values are in the cache: a prefill is start_pos=0 with the prompt, a decoding step T=1. start_pos
        may be a 0-dim int64 tensor: then every shape is static (see KVCache); or a (B,) int64 tensor, each row's own
        start: the rows of a batch then continue sequences of different lengths.

        Returns (logits, loss) in every mode. With targets: logits (B, T, V) and loss, the mean cross-entropy over the
        non-ignored targets (a 0-dim tensor), plus moe_aux_loss_coef times the MoE load-balancing loss in training
        mode. reduction="sum" sums instead of averaging (the MoE term scaled by the target count alike), for losses
        normalised over a whole batch whose micro-batches hold different numbers of targets (chat: only the
        assistant's tokens count); a batch without targets then gives 0, not NaN. Without targets: logits (B, 1, V)
        for the last position only, as nanoGPT (all_logits=True: (B, T, V)), and loss None.

        An encoder (arch="encoder") attends both ways and returns every position's logits; padding_mask (B, T) bool,
        True for real tokens, keeps padding out of attention (its own positions' outputs mean nothing). A classifier
        (n_labels > 0) returns the labels' logits (B, n_labels), read from [CLS]'s position (the first); its targets
        are (B,) label ids, and its padding (pad_id) is masked without a padding_mask.

        An encoder-decoder (arch="encoder_decoder") reads idx as the source (padded with pad_id) and targets (B, T) as
        the target, -1 after its end: the decoder's input is the target shifted right after a start token (pad_id, as
        T5's), teacher forcing. Returns every target position's logits and the loss. Inference runs encode() once,
        then decode() step by step.
        """
        if self.config.arch == "encoder_decoder":
            if targets is None:
                raise ValueError("an encoder-decoder's forward takes targets; generate with encode() and decode()")
            memory, keep = self.encode(idx, padding_mask)
            logits = self.decode(self.shift_right(targets), memory, keep)
            return logits, self.loss(logits, targets, reduction)
        B, T = idx.size()
        static = torch.is_tensor(start_pos)
        if not static and start_pos + T > self.config.block_size:
            raise ValueError(f"sequence length {start_pos + T} exceeds block_size {self.config.block_size}")
        per_row = static and start_pos.dim() == 1
        pos = (start_pos[:, None] if per_row else start_pos) + torch.arange(T, device=idx.device)  # (T,) or (B, T)

        # embed the tokens, then the positions: added to the embeddings, or given to attention (rope, alibi, t5)
        x, rope = self.embed(idx, pos, self.transformer)  # (B, T, C), and RoPE's (cos, sin) or None
        if "ln_e" in self.transformer:
            x = self.transformer.ln_e(x)
        if self.config.arch == "encoder":
            if padding_mask is None and self.config.n_labels:  # a classifier's batches are padded texts
                padding_mask = idx != self.config.pad_id
            mask = self.encoder_mask(pos, padding_mask, x.dtype)
        else:
            mask = self.attention_mask(pos, kv_cache[0].k.size(2) if static else start_pos + T, start_pos, x.dtype)
        x = self.transformer.drop(x)

        # the blocks
        x = self.blocks(self.transformer.h, x, rope, mask, kv_cache, start_pos)

        # the head, and the loss
        x = self.transformer.ln_f(x)
        if self.config.n_labels:
            logits = self.classifier(x[:, 0])  # (B, n_labels)
        elif self.config.arch == "encoder":
            logits = self.lm_head(self.mlm_head(x))  # (B, T, V)
        elif targets is None and not all_logits:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): inference needs only the next token's logits
        else:
            logits = self.lm_head(x)  # (B, T, V)
        return logits, self.loss(logits, targets, reduction) if targets is not None else None

    def embed(self, idx: torch.Tensor, pos: torch.Tensor, stack: nn.ModuleDict) -> tuple[torch.Tensor, tuple | None]:
        """(the tokens' embeddings with their positions added (B, T, C), RoPE's (cos, sin) each (T, hs) or None), for
        the tokens idx at positions pos (T,) of `stack` (self.transformer, or an encoder-decoder's self.decoder, whose
        learned positions are its own). Per-row positions pos (B, T) give RoPE's tables as (B, 1, T, hs)."""
        x = self.transformer.wte(idx)  # (B, T, C): one token embedding for every stack, and the output layer's
        if self.config.pos_embedding == "learned":
            x = x + stack.wpe(pos)  # (T, C) broadcast over B, or (B, T, C)
        elif self.config.pos_embedding == "sinusoidal":
            x = x + self.pos_table[pos]
        if self.config.pos_embedding != "rope":
            return x, None
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, hs) or (B, T, hs)
        return x, (cos, sin) if pos.dim() == 1 else (cos[:, None], sin[:, None])

    def blocks(self, blocks, x, rope, mask, kv_cache=None, start_pos=0, memory=None, memory_mask=None):
        """x through `blocks` (a stack's nn.ModuleList), each with its KV cache when decoding."""
        for i, block in enumerate(blocks):
            if self.recompute_every and self.training and i % self.recompute_every == 0:
                # Gradient checkpointing: keep only the block's input and recompute its activations in the backward
                # pass (Chen et al. 2016); the RNG state is replayed, so dropout masks are the same.
                x = checkpoint(block, x, rope, mask, None, 0, memory, memory_mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache[i] if kv_cache else None, start_pos, memory, memory_mask)
        return x

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The cross-entropy of logits (B, T, V), or a classifier's (B, n_labels), against targets (B, T) or (B,),
        -1 ignored; in training plus moe_aux_loss_coef times the MoE load-balancing loss (scaled by the target
        count when summing)."""
        flat = targets.reshape(-1)
        loss = F.cross_entropy(logits.reshape(flat.numel(), -1).float(), flat, ignore_index=-1, reduction=reduction)
        if self.config.n_expert and self.training:  # evaluation reports the cross-entropy alone
            scale = (flat >= 0).sum() if reduction == "sum" else 1
            loss = loss + self.config.moe_aux_loss_coef * self.moe_aux_loss() * scale
        return loss

    def encode(self, idx: torch.Tensor, padding_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """An encoder-decoder's encoder over the source idx (B, S): (its output (B, S, C), the decoder's memory; and
        which positions are real tokens (B, S) bool: padding_mask, or idx != pad_id)."""
        keep = idx != self.config.pad_id if padding_mask is None else padding_mask
        pos = torch.arange(idx.size(1), device=idx.device)
        x, rope = self.embed(idx, pos, self.transformer)
        mask = self.encoder_mask(pos, keep, x.dtype)
        x = self.blocks(self.transformer.h, self.transformer.drop(x), rope, mask)
        return self.transformer.ln_f(x), keep

    def decode(self, idx, memory, keep, kv_cache: list[KVCache] | None = None, start_pos=0) -> torch.Tensor:
        """An encoder-decoder's decoder: logits (B, T, V) of the target tokens idx (B, T) at positions start_pos..
        (as forward's, with a KV cache from new_kv_cache: its cross-attention keys and values are computed from
        memory once, at the first call), attending to memory (B, S, C) where keep (B, S) is True."""
        T, static = idx.size(1), torch.is_tensor(start_pos)
        if not static and start_pos + T > self.config.block_size:
            raise ValueError(f"target length {start_pos + T} exceeds block_size {self.config.block_size}")
        pos = start_pos + torch.arange(T, device=idx.device)
        x, rope = self.embed(idx, pos, self.decoder)
        k_len = kv_cache[0].k.size(2) if static else start_pos + T
        mask = self.attention_mask(pos, k_len, start_pos, x.dtype, self.decoder)
        x = self.blocks(
            self.decoder.h, self.transformer.drop(x), rope, mask, kv_cache, start_pos, memory, keep[:, None, None, :]
        )
        x = self.decoder.ln_f(x)
        if self.config.tie_embeddings:  # T5 [11]: the tied output layer reads the state scaled by d_model^-0.5
            x = x * self.config.n_embd**-0.5
        return self.lm_head(x)

    def shift_right(self, targets: torch.Tensor) -> torch.Tensor:
        """The decoder's input for targets (B, T): a start token (pad_id), then all but the last target (-1: pad_id)."""
        start = torch.full_like(targets[:, :1], self.config.pad_id)
        shifted = torch.cat([start, targets[:, :-1]], dim=1)
        return shifted.masked_fill(shifted < 0, self.config.pad_id)

    def relative_bias(self, table: nn.Embedding, pos: torch.Tensor, k_len: int, bidirectional: bool) -> torch.Tensor:
        """T5's attention bias [11], (nh, T, k_len), for queries at positions pos over keys 0..k_len-1 ((B, nh, T,
        k_len) for per-row positions (B, T))."""
        relative = -causal_distance(pos, k_len).long()  # key minus query
        buckets = t5_buckets(relative, bidirectional, self.config.rel_buckets, self.config.rel_max_distance)
        return table(buckets).movedim(-1, -3)  # (..., T, k_len, nh) -> (..., nh, T, k_len)

    def attention_mask(
        self, pos: torch.Tensor, k_len: int, start_pos, dtype: torch.dtype, stack: nn.ModuleDict | None = None
    ) -> torch.Tensor | None:
        """The attn_mask every block's attention gets, for queries at positions pos (from start_pos) over k_len keys:
        - ALiBi: a (nh, T, k_len) float bias, -slope * distance, with -inf on later keys (the causal mask in it);
        - T5's: its bucketed bias (nh, T, k_len) (stack's table: self.transformer's or self.decoder's), -inf on
          later keys;
        - a static-shape KV cache (start_pos a tensor): a (1, T, k_len) boolean causal mask, True = may attend,
          which also hides the buffer's unfilled slots; per-row starts (B,): (B, 1, T, k_len), each row's own;
        - queries after cached keys (start_pos > 0 and T > 1, a chunked prefill): the same mask, offset by start_pos;
        - otherwise None: SDPA's is_causal for a whole sequence (training, a prefill from 0), no mask for one decoding
          query, which may see every cached key."""
        if self.config.pos_embedding == "alibi":
            return alibi_bias(self.alibi_slopes, pos, k_len).to(dtype)
        if self.config.pos_embedding == "t5":
            bias = self.relative_bias((stack or self.transformer).rel_bias, pos, k_len, bidirectional=False)
            return bias.masked_fill(causal_distance(pos, k_len).unsqueeze(-3) < 0, float("-inf")).to(dtype)
        if torch.is_tensor(start_pos) or (start_pos > 0 and pos.size(-1) > 1):
            return (causal_distance(pos, k_len) >= 0).unsqueeze(-3)  # (1, T, k_len), or per row (B, 1, T, k_len)
        return None

    def encoder_mask(self, pos: torch.Tensor, padding_mask, dtype: torch.dtype) -> torch.Tensor | None:
        """An encoder's attn_mask: none (every query sees every key), or with padding_mask (B, T) a (B, 1, 1, T)
        boolean mask hiding padded keys; with ALiBi a (nh or B, ...) float bias, -slope * |distance|, both ways; with
        T5's positions its bias, both ways."""
        keep = padding_mask[:, None, None, :] if padding_mask is not None else None
        if self.config.pos_embedding == "t5":
            bias = self.relative_bias(self.transformer.rel_bias, pos, len(pos), bidirectional=True)  # (nh, T, T)
        elif self.config.pos_embedding == "alibi":
            bias = -self.alibi_slopes.to(pos.device)[:, None, None] * causal_distance(pos, len(pos)).abs()  # (nh, T, T)
        else:
            return keep
        return (bias if keep is None else bias.masked_fill(~keep, float("-inf"))).to(dtype)

    def new_kv_cache(self, batch_size: int, length: int | None = None, dtype=None) -> list[KVCache]:
        """Empty per-layer caches for batch_size sequences of up to `length` (default block_size) positions."""
        if self.config.arch == "encoder":
            raise ValueError("an encoder has no KV cache: it reads the whole input at once (fill-mask, not generate)")
        param = self.lm_head.weight
        length = length or self.config.block_size
        blocks = self.decoder.h if self.config.arch == "encoder_decoder" else self.transformer.h
        return [KVCache(batch_size, self.config, length, param.device, dtype or param.dtype) for _ in blocks]

    def all_blocks(self) -> list[Block]:
        """Every block: an encoder-decoder's decoder blocks after its encoder's."""
        return [*self.transformer.h, *(self.decoder.h if hasattr(self, "decoder") else ())]

    def moe_aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss of the MoE layers in the last forward (0 without MoE)."""
        losses = [module.aux_loss for module in self.modules() if isinstance(module, MoE)]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def crop_block_size(self, block_size: int):
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) with a smaller block_size."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        for stack in (self.transformer, getattr(self, "decoder", {})):
            if "wpe" in stack:  # clone: a view would keep (and make safetensors refuse) the whole original table
                stack.wpe.weight = nn.Parameter(stack.wpe.weight[:block_size].clone())
        for name in ("pos_table", "rope_cos", "rope_sin"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name)[:block_size].clone())

    def to_classifier(self, n_labels: int, pad_id: int):
        """Make a pretrained encoder a classifier over n_labels (fine-tuning, as BERT's [10]): its MLM head and output
        layer go, a new classification head comes (initialised as GPT-2's Linear layers); the blocks and embeddings
        stay. A classifier given other labels gets a new head too."""
        if self.config.arch != "encoder":
            raise ValueError("only an encoder (arch=encoder) becomes a classifier")
        for name in ("mlm_head", "lm_head", "classifier"):
            if hasattr(self, name):
                delattr(self, name)  # a tied embedding keeps its own weight
        self.config.n_labels, self.config.pad_id = n_labels, pad_id
        device = self.transformer.wte.weight.device
        self.classifier = ClassifierHead(self.config).to(device)
        self.classifier.apply(self._init_weights)

    def grow_vocab(self, vocab_size: int):
        """Add token ids up to vocab_size (e.g. a chat template's special tokens past GPT-2's 50257). The new rows
        of the embedding (and of an untied lm_head) start at the mean of the existing rows, so the new tokens begin
        as an average token rather than as noise that would dominate the logits (Hewitt 2021)."""
        if vocab_size < self.config.vocab_size:
            raise ValueError(f"cannot shrink vocab_size from {self.config.vocab_size} to {vocab_size}")
        old = self.config.vocab_size
        self.config.vocab_size = vocab_size
        grown = {}  # by the old parameter, so tied embeddings stay one parameter
        for module in (self.transformer.wte, self.lm_head):
            w = module.weight
            if id(w) not in grown:
                rows = w.data.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)
                grown[id(w)] = nn.Parameter(torch.cat([w.data, rows]).contiguous())
            module.weight = grown[id(w)]
            if getattr(module, "bias", None) is not None:  # an encoder's output bias: the new ids at its mean
                bias = module.bias.data
                module.bias = nn.Parameter(torch.cat([bias, bias.mean().expand(vocab_size - old)]))
            if isinstance(module, nn.Embedding):
                module.num_embeddings = vocab_size
            else:
                module.out_features = vocab_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6 per active weight plus attention's 12 * L * C * T,
        from the PaLM paper's appendix B (Chowdhery et al. 2022). MoE counts only the experts a token uses."""
        cfg = self.config
        n = self.num_params()
        if cfg.n_expert:
            per_expert = sum(p.numel() for p in self.transformer.h[0].mlp.experts[0].parameters())
            n -= cfg.n_layer * per_expert * (cfg.n_expert - cfg.n_expert_active)
        layers = cfg.n_layer + (2 * cfg.n_dec_layer if cfg.arch == "encoder_decoder" else 0)  # (cross-attention too)
        return 6 * n + 12 * layers * cfg.n_embd * seq_len
