"""The GPT language model: GPT-2's architecture in one readable file.

Reading order: GPTConfig, then the blocks bottom-up (LayerNorm, CausalSelfAttention, MLP, Block), then GPT
(init, forward, generation, loading Hugging Face GPT-2 weights).

Shape legend used in the comments:
    B batch size, T time (sequence length), C n_embd, nh n_head, hs head size (C // nh), V vocab size.

References:
    [1] Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
    [2] Vaswani et al. 2017, "Attention Is All You Need".
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum context length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, as GPT-2; False is a little better and faster

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # softmax(q k^T / sqrt(hs)) v with a causal mask [2]; SDPA picks flash/memory-efficient kernels when it can
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation of GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block [1]: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as GPT-2: the output projection is the token embedding matrix.
        self.transformer.wte.weight = self.lm_head.weight
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
        """Parameter count; position embeddings are left out by default, as in the GPT-2/Chinchilla convention.
        Token embeddings count once: they are shared with lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):
        """idx (B, T) int64 token ids; targets (B, T) int64 or None, -1 marks positions to ignore.

        Returns (logits, loss) in every mode: logits (B, T, V) for every position, and loss the mean
        cross-entropy over the non-ignored targets (a 0-dim tensor), or None when targets is None.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size: int):
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) with a smaller block_size."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6N for the weights plus attention's 12 * L * C * T,
        from the PaLM paper's appendix B (Chowdhery et al. 2022)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None):
        """Extend idx (B, T) by max_new_tokens tokens, feeding predictions back in. temperature=0 is greedy.
        The context is cropped to the last block_size tokens. Call under model.eval()."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_dir: str, override_args: dict | None = None) -> "GPT":
        """Load GPT-2 weights from a Hugging Face-format directory (config.json + model.safetensors) or a hub
        name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded with huggingface_hub). override_args may set
        dropout and a smaller block_size. transformers is not needed."""
        from safetensors.torch import load_file

        override_args = dict(override_args or {})
        if not set(override_args) <= {"dropout", "block_size"}:
            raise ValueError(f"only dropout and block_size can be overridden, got {sorted(override_args)}")
        if os.path.isdir(name_or_dir):
            directory = name_or_dir
        else:
            from huggingface_hub import snapshot_download

            directory = snapshot_download(name_or_dir, allow_patterns=["config.json", "model.safetensors"])
        with open(os.path.join(directory, "config.json")) as f:
            hf = json.load(f)
        if hf.get("model_type") != "gpt2":
            raise ValueError(f"{name_or_dir}: model_type {hf.get('model_type')!r} is not supported (gpt2 is)")
        config = GPTConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=override_args.get("dropout", 0.0),
            bias=True,
        )
        model = cls(config)
        sd_hf = {
            k.removeprefix("transformer."): v
            for k, v in load_file(os.path.join(directory, "model.safetensors")).items()
        }
        sd_hf = {k: v for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # buffers
        sd = model.state_dict()
        # HF GPT-2 stores these Linear layers as Conv1D with (in, out) weights: transpose into nn.Linear's (out, in).
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for key in sd:
            src = "wte.weight" if key == "lm_head.weight" else key.removeprefix("transformer.")
            if src not in sd_hf:
                raise ValueError(f"{name_or_dir}: weight {src} missing from model.safetensors")
            w = sd_hf[src].t() if key.endswith(conv1d) else sd_hf[src]
            if w.shape != sd[key].shape:
                raise ValueError(f"{name_or_dir}: {src} has shape {tuple(w.shape)}, expected {tuple(sd[key].shape)}")
            sd[key].copy_(w)
        if "block_size" in override_args:
            model.crop_block_size(override_args["block_size"])
        return model


def sample_next_token(logits, temperature: float = 1.0, top_k=None, top_p=None):
    """Pick one token per row from logits (B, V): greedy when temperature is 0, otherwise sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (nucleus sampling, Holtzman et al. 2019). Returns (B, 1) int64."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        logits[drop_sorted.scatter(1, sorted_idx, drop_sorted)] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)
