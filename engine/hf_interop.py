"""Hugging Face interop: read GPT-2, Llama and BERT checkpoints in Hugging Face format, and write ours in it.

A Hugging Face directory holds config.json and model.safetensors. GPT-2 (model_type "gpt2") stores its Linear
layers as Conv1D with (in, out) weights, transposed here; Llama (model_type "llama") maps to the switches
pos_embedding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head, tie_embeddings; BERT (model_type "bert",
BertForMaskedLM) to arch="encoder" with post-norm, an embedding norm and the MLM head, its token-type embeddings
folded into the position embeddings (type 0: every token's type in a single-segment input);
BertForSequenceClassification to a classifier (n_labels, its pooler and classifier as our ClassifierHead, id2label
as the labels). transformers is not needed.
"""

import difflib
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine import chat
from engine.checkpoint import save_safetensors
from engine.errors import UserError
from engine.memory import check_fits
from engine.schemas import BertHFConfig, GPT2HFConfig, LlamaHFConfig, T5HFConfig, check, read_json, short
from model import GPT, GPTConfig

GPT2_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# transformers' activation names (GPT-2's activation_function, BERT's hidden_act) -> our mlp, and back
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


class UnsupportedModel(UserError, ValueError):
    """The config cannot be read from, or written to, a Hugging Face format; the message says why (one line from
    the entry scripts)."""


def resolve(name_or_dir: str) -> str:
    """A local directory as is; a hub name downloaded (config.json and model.safetensors only) to the HF cache.
    Anything else (a typo of resume, a directory that does not exist, the hub out of reach) is one line."""
    choices = f"scratch, resume, a GPT-2 name ({', '.join(GPT2_HUB_NAMES)}) or a Hugging Face directory"
    if os.path.isdir(name_or_dir):
        if not os.path.isfile(os.path.join(name_or_dir, "config.json")):
            raise UserError(f"--init_from={name_or_dir} has no config.json; it should be {choices}")
        return name_or_dir
    if not name_or_dir.strip():
        raise UserError(f"--init_from is empty; give {choices}")
    if name_or_dir not in GPT2_HUB_NAMES and "/" not in name_or_dir:  # not a hub name: a typo of a word we know
        near = difflib.get_close_matches(name_or_dir, ["scratch", "resume", *GPT2_HUB_NAMES], n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise UserError(f"--init_from={name_or_dir} is not a directory or a known model; {hint}give {choices}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_dir, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline, no such repo, no permission: huggingface_hub has a dozen error types
        raise UserError(
            f"--init_from={name_or_dir} is no local directory, and the Hugging Face hub did not provide it "
            f"({type(e).__name__}); offline, download it elsewhere and pass its directory"
        ) from None


def from_pretrained(name_or_dir: str, override_args: dict | None = None) -> GPT:
    """A GPT with GPT-2 or Llama weights from a Hugging Face-format directory (config.json + model.safetensors) or a
    hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded with huggingface_hub): nanoGPT's
    GPT.from_pretrained, kept here with the rest of the Hugging Face code. override_args may set dropout and a
    smaller block_size. transformers is not needed."""
    override_args = dict(override_args or {})
    if not set(override_args) <= {"dropout", "block_size"}:
        raise ValueError(f"only dropout and block_size can be overridden, got {sorted(override_args)}")
    config, state_dict = load_hf(name_or_dir)
    config.dropout = override_args.get("dropout", 0.0)
    model = GPT(config)
    model.labels = (
        bert_labels(read_json(os.path.join(resolve(name_or_dir), "config.json"))) if config.n_labels else None
    )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # names or shapes that config.json does not imply
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise UserError(f"the weights in {name_or_dir} do not fit its config.json: {detail}") from None
    if "block_size" in override_args:
        model.crop_block_size(override_args["block_size"])
    return model


def load_hf(name_or_dir: str) -> tuple[GPTConfig, dict]:
    """(GPTConfig, state dict with our names) from a Hugging Face GPT-2 or Llama directory or hub name."""
    directory = resolve(name_or_dir)
    file = os.path.join(directory, "config.json")
    hf = read_json(file)
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    readers = {"gpt2": (GPT2HFConfig, _gpt2_config), "llama": (LlamaHFConfig, _llama_config)}
    readers |= {"bert": (BertHFConfig, _bert_config), "t5": (T5HFConfig, _t5_config)}
    if not isinstance(kind, str) or kind not in readers:
        raise UnsupportedModel(
            f"{name_or_dir}: model_type {short(kind)} is not supported (gpt2, llama, bert and t5 are)"
        )
    check(readers[kind][0], hf, file)  # types and sizes, before any arithmetic
    try:
        config = readers[kind][1](hf)
    except UnsupportedModel as e:
        raise UnsupportedModel(f"{file}: {e}") from None
    except ValueError as e:  # GPTConfig's: the sizes do not combine (n_embd not divisible by n_head, ...)
        raise UserError(f"{file}: not a valid {kind} config ({e})") from None
    try:
        check_fits(config, "cpu")  # absurd sizes in config.json are refused before the weights are read
    except UserError as e:
        raise UserError(f"{file}: {e}") from None
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        raise UserError(f"{directory} has no model.safetensors (only safetensors weights are read)")
    try:
        weights = load_file(path)
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        if kind == "gpt2":
            return config, _gpt2_state_dict(weights, config.n_layer)
        if kind == "bert":
            return config, _bert_state_dict(weights, config)
        if kind == "t5":
            return config, _t5_state_dict(weights, config)
        return config, _llama_state_dict(weights, config)
    except KeyError as e:
        raise UserError(f"{path} lacks the tensor {e.args[0]} that its config.json implies") from None


def _gpt2_config(hf: dict) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    mlp = ACTIVATIONS.get(act)
    if mlp is None:
        raise UnsupportedModel(f"GPT-2 activation {act!r} is not supported")
    # Attention variants that compute another function than ours. reorder_and_upcast_attn only computes the same
    # scores in float32, which our float32 softmax (SDPA) already does, so it is accepted.
    if not hf.get("scale_attn_weights", True):
        raise UnsupportedModel("GPT-2 with scale_attn_weights=false (no 1/sqrt(head size) scaling) is not supported")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedModel("GPT-2 with scale_attn_by_inverse_layer_idx=true is not supported")
    return GPTConfig(
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        bias=True,
        mlp=mlp,
        mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _gpt2_state_dict(weights: dict, n_layer: int) -> dict:
    sd = {}
    for key, w in weights.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older checkpoints
            continue
        if key == "lm_head.weight":
            sd[key] = w
            continue
        sd["transformer." + key] = w.t().contiguous() if key.endswith(_CONV1D) else w
    if "lm_head.weight" not in sd:  # tied: lm_head is wte
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def _llama_config(hf: dict) -> GPTConfig:
    n_head, n_embd = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
        raise UnsupportedModel("Llama head_dim different from hidden_size / num_attention_heads is not supported")
    # transformers >= 5 writes rope_parameters; older versions rope_theta and rope_scaling
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0), "rope_type": "default"}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise UnsupportedModel("Llama RoPE scaling (rope_type other than default) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"Llama hidden_act {hf.get('hidden_act')!r} is not supported (silu is)")
    bias = hf.get("attention_bias", False)
    if hf.get("mlp_bias", False) != bias:
        raise UnsupportedModel("Llama with attention_bias != mlp_bias is not supported")
    return GPTConfig(
        block_size=hf["max_position_embeddings"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=n_embd,
        bias=bias,
        pos_embedding="rope",
        rope_theta=rope["rope_theta"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        mlp_hidden=hf["intermediate_size"],
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


# our name -> Llama's name, per layer ({i}) and global
_LLAMA_LAYER = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.c_proj.bias": "self_attn.o_proj.bias",
    "mlp.c_gate.weight": "mlp.gate_proj.weight",
    "mlp.c_gate.bias": "mlp.gate_proj.bias",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_fc.bias": "mlp.up_proj.bias",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
    "mlp.c_proj.bias": "mlp.down_proj.bias",
}
_LLAMA_GLOBAL = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _llama_state_dict(weights: dict, config: GPTConfig) -> dict:
    sd = {ours: weights[theirs] for ours, theirs in _LLAMA_GLOBAL.items() if theirs in weights}
    if "lm_head.weight" not in sd:  # tied
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        for our_key, their_key in _LLAMA_LAYER.items():
            if hf + their_key in weights:
                sd[ours + our_key] = weights[hf + their_key]
        # q, k, v are one fused matrix here: query heads, then key heads, then value heads
        for part in ("weight", "bias"):
            names = [f"{hf}self_attn.{p}_proj.{part}" for p in "qkv"]
            if all(n in weights for n in names):
                sd[f"{ours}attn.c_attn.{part}"] = torch.cat([weights[n] for n in names], dim=0)
    return sd


def _bert_config(hf: dict) -> GPTConfig:
    mlp = ACTIVATIONS.get(hf.get("hidden_act", "gelu"))
    if mlp is None:
        raise UnsupportedModel(f"BERT hidden_act {hf.get('hidden_act')!r} is not supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModel("BERT with relative position embeddings is not supported (absolute is)")
    if hf.get("is_decoder", False):
        raise UnsupportedModel("BERT as a decoder (is_decoder=true) is not supported: it is an encoder here")
    labels = {}
    if "BertForSequenceClassification" in (hf.get("architectures") or ()):  # a classifier: one label per text
        labels = bert_labels(hf)
        if len(labels) < 2 or hf.get("problem_type") not in (None, "single_label_classification"):
            raise UnsupportedModel(
                f"BertForSequenceClassification with {len(labels)} label(s), problem_type "
                f"{hf.get('problem_type')!r}: only single-label classification over 2 or more labels is supported"
            )
        labels = {"n_labels": len(labels), "pad_id": hf.get("pad_token_id") or 0}
    return GPTConfig(
        **labels,
        arch="encoder",
        block_size=hf["max_position_embeddings"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        bias=True,
        norm_position="post",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        mlp=mlp,
        mlp_hidden=hf["intermediate_size"],
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def bert_labels(hf: dict) -> list[str]:
    """A BertForSequenceClassification config's labels in index order: id2label's (transformers' default names,
    LABEL_0..., when it has none)."""
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


# our name -> BERT's, per layer ({i}) and global; q, k and v are fused into c_attn
_BERT_LAYER = {
    "attn.c_proj": "attention.output.dense",
    "ln_1": "attention.output.LayerNorm",
    "mlp.c_fc": "intermediate.dense",
    "mlp.c_proj": "output.dense",
    "ln_2": "output.LayerNorm",
}
_BERT_GLOBAL = {
    "transformer.wte": "bert.embeddings.word_embeddings",
    "transformer.ln_e": "bert.embeddings.LayerNorm",
    "mlm_head.dense": "cls.predictions.transform.dense",
    "mlm_head.norm": "cls.predictions.transform.LayerNorm",
    "lm_head": "cls.predictions.decoder",
    "classifier.dense": "bert.pooler.dense",  # a classifier's head (BertForSequenceClassification)
    "classifier.out": "classifier",
}


def _bert_state_dict(weights: dict, config: GPTConfig) -> dict:
    sd = {}
    for ours, theirs in _BERT_GLOBAL.items():
        for part in ("weight", "bias"):
            if f"{theirs}.{part}" in weights:
                sd[f"{ours}.{part}"] = weights[f"{theirs}.{part}"]
    if not config.n_labels:
        sd.setdefault("lm_head.bias", weights["cls.predictions.bias"])
        if "lm_head.weight" not in sd:  # tied: the output layer is the word embedding
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
    # every token is of type 0 in one segment: its type embedding is a constant, added to every position's
    types = weights.get("bert.embeddings.token_type_embeddings.weight")
    position = weights["bert.embeddings.position_embeddings.weight"]
    sd["transformer.wpe.weight"] = position + types[0] if types is not None else position
    for i in range(config.n_layer):
        hf, ours = f"bert.encoder.layer.{i}.", f"transformer.h.{i}."
        for our_key, their_key in _BERT_LAYER.items():
            for part in ("weight", "bias"):
                sd[f"{ours}{our_key}.{part}"] = weights[f"{hf}{their_key}.{part}"]
        for part in ("weight", "bias"):
            qkv = [weights[f"{hf}attention.self.{p}.{part}"] for p in ("query", "key", "value")]
            sd[f"{ours}attn.c_attn.{part}"] = torch.cat(qkv, dim=0)
    return sd


def _t5_config(hf: dict) -> GPTConfig:
    """T5 (original: ReLU MLP, tied output scaled by d_model^-0.5) and T5 v1.1 (gated GELU, untied output)."""
    ff = hf.get("feed_forward_proj", "relu")
    mlp = {"relu": "relu", "gated-gelu": "geglu"}.get(ff)
    if mlp is None:
        raise UnsupportedModel(f"T5 feed_forward_proj {ff!r} is not supported (relu and gated-gelu are)")
    if hf["d_kv"] * hf["num_heads"] != hf["d_model"]:
        raise UnsupportedModel(
            f"T5 with d_kv * num_heads ({hf['d_kv']} * {hf['num_heads']}) != d_model is not supported"
        )
    tie = hf.get("tie_word_embeddings", True)
    if hf.get("scale_decoder_outputs", tie) != tie:
        raise UnsupportedModel("T5 whose output scale (scale_decoder_outputs) differs from its weight tying")
    return GPTConfig(
        arch="encoder_decoder",
        block_size=hf.get("n_positions") or 512,  # T5 has no position table: the longest input we will build
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_layers"],
        n_dec_layer=hf.get("num_decoder_layers") or hf["num_layers"],
        n_head=hf["num_heads"],
        n_embd=hf["d_model"],
        bias=False,
        pos_embedding="t5",
        rel_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128),
        attn_scale=False,
        norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        mlp=mlp,
        mlp_hidden=hf["d_ff"],
        tie_embeddings=tie,
        pad_id=hf.get("pad_token_id") or 0,
    )


# our name -> T5's, per layer ({i}): the encoder's blocks, the decoder's (with cross-attention); MLPs by kind
_T5_SELF = {"ln_1": "layer.0.layer_norm", "attn.c_proj": "layer.0.SelfAttention.o"}
_T5_CROSS = {"ln_c": "layer.1.layer_norm", "cross.c_q": "layer.1.EncDecAttention.q"}
_T5_CROSS |= {"cross.c_proj": "layer.1.EncDecAttention.o"}
_T5_MLP = {"relu": {"c_fc": "wi", "c_proj": "wo"}, "geglu": {"c_gate": "wi_0", "c_fc": "wi_1", "c_proj": "wo"}}
_T5_GLOBAL = {"transformer.ln_f": "encoder.final_layer_norm", "decoder.ln_f": "decoder.final_layer_norm"}
_T5_GLOBAL |= {
    "transformer.rel_bias": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
    "decoder.rel_bias": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias",
}


def _t5_names(config: GPTConfig) -> dict[str, str]:
    """Every weight's name, ours -> T5's, but the fused attention projections (c_attn, c_kv) and the embeddings."""
    names = {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in _T5_GLOBAL.items()}
    for stack, n, cross in (("transformer", config.n_layer, False), ("decoder", config.n_dec_layer, True)):
        hf_stack = "encoder" if stack == "transformer" else "decoder"
        mlp_layer = 2 if cross else 1
        for i in range(n):
            layers = _T5_SELF | (_T5_CROSS if cross else {}) | {"ln_2": f"layer.{mlp_layer}.layer_norm"}
            layers |= {f"mlp.{o}": f"layer.{mlp_layer}.DenseReluDense.{t}" for o, t in _T5_MLP[config.mlp].items()}
            for ours, theirs in layers.items():
                names[f"{stack}.h.{i}.{ours}.weight"] = f"{hf_stack}.block.{i}.{theirs}.weight"
    return names


def _t5_state_dict(weights: dict, config: GPTConfig) -> dict:
    sd = {ours: weights[theirs] for ours, theirs in _t5_names(config).items()}
    sd["transformer.wte.weight"] = weights["shared.weight"]
    sd["lm_head.weight"] = weights["shared.weight"] if config.tie_embeddings else weights["lm_head.weight"]
    for stack, n in (("encoder", config.n_layer), ("decoder", config.n_dec_layer)):
        ours = "transformer" if stack == "encoder" else "decoder"
        for i in range(n):
            attn = f"{stack}.block.{i}.layer.0.SelfAttention."
            sd[f"{ours}.h.{i}.attn.c_attn.weight"] = torch.cat([weights[f"{attn}{p}.weight"] for p in "qkv"])
            if stack == "decoder":
                cross = f"{stack}.block.{i}.layer.1.EncDecAttention."
                sd[f"decoder.h.{i}.cross.c_kv.weight"] = torch.cat([weights[f"{cross}{p}.weight"] for p in "kv"])
    return sd


def _t5_export(sd: dict, config: GPTConfig) -> tuple[dict, dict]:
    """(config.json, weights) of an encoder-decoder in T5ForConditionalGeneration's layout: _t5_state_dict's map
    backwards."""
    hf_config = {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": config.vocab_size,
        "d_model": config.n_embd,
        "d_kv": config.head_size,
        "d_ff": config.mlp_hidden,
        "num_layers": config.n_layer,
        "num_decoder_layers": config.n_dec_layer,
        "num_heads": config.n_head,
        "relative_attention_num_buckets": config.rel_buckets,
        "relative_attention_max_distance": config.rel_max_distance,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": config.norm_eps,
        "feed_forward_proj": {"relu": "relu", "geglu": "gated-gelu"}[config.mlp],
        "tie_word_embeddings": config.tie_embeddings,
        "scale_decoder_outputs": config.tie_embeddings,
        "is_encoder_decoder": True,
        "pad_token_id": config.pad_id,
        "decoder_start_token_id": config.pad_id,
        "n_positions": config.block_size,
    }
    weights = {theirs: sd[ours] for ours, theirs in _t5_names(config).items()}
    weights["shared.weight"] = sd["transformer.wte.weight"]
    if not config.tie_embeddings:
        weights["lm_head.weight"] = sd["lm_head.weight"]
    C, kv = config.n_embd, config.n_kv_head * config.head_size
    for stack, n in (("encoder", config.n_layer), ("decoder", config.n_dec_layer)):
        ours = "transformer" if stack == "encoder" else "decoder"
        for i in range(n):
            attn = f"{stack}.block.{i}.layer.0.SelfAttention."
            for p, w in zip("qkv", sd[f"{ours}.h.{i}.attn.c_attn.weight"].split([C, kv, kv]), strict=True):
                weights[f"{attn}{p}.weight"] = w
            if stack == "decoder":
                cross = f"{stack}.block.{i}.layer.1.EncDecAttention."
                for p, w in zip("kv", sd[f"decoder.h.{i}.cross.c_kv.weight"].split(kv), strict=True):
                    weights[f"{cross}{p}.weight"] = w
    return hf_config, weights


def hf_format(config: GPTConfig) -> str:
    """Which Hugging Face layout can hold this config: "gpt2" or "llama" for a decoder, "bert" for an encoder;
    UnsupportedModel, naming what each layout lacks, if none."""
    c = config
    if c.arch == "encoder_decoder":
        t5 = [
            ("pos_embedding", c.pos_embedding == "t5", "t5"),
            ("norm", c.norm == "rmsnorm", "rmsnorm"),
            ("norm_position", c.norm_position == "pre", "pre"),
            ("mlp", c.mlp in ("relu", "geglu"), "relu or geglu"),
            ("bias", not c.bias, "False"),
            ("attn_scale", not c.attn_scale, "False"),
            ("n_kv_head", c.n_kv_head == c.n_head, f"n_head ({c.n_head})"),
            ("qk_norm", not c.qk_norm, "False"),
            ("n_expert", not c.n_expert, "0"),
        ]
        unmet = _unmet(c, t5)
        if unmet:
            raise UnsupportedModel(
                f"this encoder-decoder does not fit T5's Hugging Face layout: it would need {', '.join(unmet)}"
            )
        return "t5"
    if c.arch == "encoder":
        bert = [
            ("pos_embedding", c.pos_embedding == "learned", "learned"),
            ("norm", c.norm == "layernorm", "layernorm"),
            ("norm_position", c.norm_position == "post", "post"),
            ("mlp", c.mlp in HF_ACTIVATION, "gelu, gelu_tanh or relu"),
            ("n_kv_head", c.n_kv_head == c.n_head, f"n_head ({c.n_head})"),
            ("qk_norm", not c.qk_norm, "False"),
            ("n_expert", not c.n_expert, "0"),
        ]
        unmet = _unmet(c, bert)
        if unmet:
            raise UnsupportedModel(
                f"this encoder does not fit BERT's Hugging Face layout: it would need {', '.join(unmet)}"
            )
        return "bert"
    if c.n_expert:
        raise UnsupportedModel("Mixture of Experts models have no GPT-2 or Llama Hugging Face layout")
    gpt2 = [
        ("pos_embedding", c.pos_embedding == "learned", "learned"),
        ("norm", c.norm == "layernorm", "layernorm"),
        ("norm_position", c.norm_position == "pre", "pre"),
        ("mlp", c.mlp in HF_ACTIVATION, "gelu_tanh, gelu or relu"),
        ("n_kv_head", c.n_kv_head == c.n_head, f"n_head ({c.n_head})"),
        ("qk_norm", not c.qk_norm, "False"),
    ]
    llama = [
        ("pos_embedding", c.pos_embedding == "rope", "rope"),
        ("norm", c.norm == "rmsnorm", "rmsnorm"),
        ("norm_position", c.norm_position == "pre", "pre"),
        ("mlp", c.mlp == "swiglu", "swiglu"),
        ("qk_norm", not c.qk_norm, "False"),
    ]
    unmet = {}
    for layout, rules in (("gpt2", gpt2), ("llama", llama)):
        unmet[layout] = _unmet(c, rules)
        if not unmet[layout]:
            return layout
    raise UnsupportedModel(
        f"this architecture fits neither Hugging Face layout: GPT-2 would need {', '.join(unmet['gpt2'])}; "
        f"Llama would need {', '.join(unmet['llama'])}"
    )


def _unmet(config: GPTConfig, rules: list[tuple[str, bool, str]]) -> list[str]:
    """A layout's rules (switch, whether the model meets it, what the layout wants) the model does not meet, as
    "switch=wanted (this model: its value)"."""
    return [f"{name}={want} (this model: {getattr(config, name)})" for name, ok, want in rules if not ok]


# every file save_hf writes (an export's directory holds these and nothing else)
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def save_hf(
    model,
    directory: str,
    eos_token_id: int | None = None,
    tokenizer=None,
    tokenizer_vocab: int | None = None,
    chat_template: str | None = None,
    labels: list[str] | None = None,
) -> str:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors) in the GPT-2 or Llama layout
    that transformers.AutoModelForCausalLM loads. eos_token_id is the end-of-text token, if the vocabulary has one
    (written explicitly: transformers' defaults would make generate stop at an ordinary token). tokenizer, a
    `tokenizers.Tokenizer` of tokenizer_vocab ids, is written beside it (tokenizer.json), so AutoTokenizer and
    pipeline() work; generation_config.json suppresses the ids past it (a vocabulary rounded up for speed), as
    sample.py never samples them. A model without biases is written in the GPT-2 layout with zero biases, which
    computes the same function. A classifier's labels (index order) become config.json's id2label. Returns the
    layout."""
    config = model.config
    kind = hf_format(config)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if kind == "bert":
        hf_config, weights = _bert_export(sd, config, labels)
    elif kind == "t5":
        hf_config, weights = _t5_export(sd, config)
    elif kind == "gpt2":
        if not config.bias:
            sd |= _zero_biases(sd, config)
        hf_config = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_ctx": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.mlp_hidden,
            "activation_function": HF_ACTIVATION[config.mlp],
            "layer_norm_epsilon": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
        weights = {}
        for key, w in sd.items():
            if key == "lm_head.weight":
                if not config.tie_embeddings:
                    weights[key] = w
                continue
            name = key.removeprefix("transformer.")
            weights["transformer." + name] = w.t() if name.endswith(_CONV1D) else w
    else:
        hf_config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd,
            "intermediate_size": config.mlp_hidden,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head,
            "head_dim": config.head_size,
            "max_position_embeddings": config.block_size,
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
            "hidden_act": "silu",
            "attention_bias": config.bias,
            "mlp_bias": config.bias,
            "tie_word_embeddings": config.tie_embeddings,
        }
        weights = {theirs: sd[ours] for ours, theirs in _LLAMA_GLOBAL.items()}
        if config.tie_embeddings:
            del weights["lm_head.weight"]
        hs, nh, nkv = config.head_size, config.n_head, config.n_kv_head
        for i in range(config.n_layer):
            hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
            for our_key, their_key in _LLAMA_LAYER.items():
                if ours + our_key in sd:
                    weights[hf + their_key] = sd[ours + our_key]
            for part in ("weight", "bias"):
                if f"{ours}attn.c_attn.{part}" in sd:
                    q, k, v = sd[f"{ours}attn.c_attn.{part}"].split([nh * hs, nkv * hs, nkv * hs], dim=0)
                    for name, w in zip("qkv", (q, k, v), strict=True):
                        weights[f"{hf}self_attn.{name}_proj.{part}"] = w
    # GPT-2 begins documents with its end-of-text token; a chat model's conversations begin with a role token
    bos = eos_token_id if kind == "gpt2" and chat_template is None else None
    hf_config |= {"bos_token_id": bos, "eos_token_id": eos_token_id}
    pad = config.pad_id if kind == "t5" else eos_token_id  # T5's decoder starts at <pad>
    os.makedirs(directory, exist_ok=True)
    save_safetensors(
        {k: v.contiguous() for k, v in weights.items()},
        os.path.join(directory, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config | {"torch_dtype": "float32"}, f, indent=2)
    generation = {"bos_token_id": bos, "eos_token_id": eos_token_id, "pad_token_id": pad}
    generation |= {"decoder_start_token_id": config.pad_id} if kind == "t5" else {}
    if tokenizer_vocab is not None and tokenizer_vocab < config.vocab_size:
        generation["suppress_tokens"] = list(range(tokenizer_vocab, config.vocab_size))
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
        eos = tokenizer.id_to_token(eos_token_id) if eos_token_id is not None else None
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.block_size,
            "clean_up_tokenization_spaces": False,  # decode gives the text back exactly
            "eos_token": eos,
            "bos_token": eos if bos is not None else None,
            # special-token strings written in text encode as text, as in training (transformers registers the eos
            # token as special again); a chat template's own tokens must match, so chat exports rely on <|endoftext|>
            # being an ordinary vocabulary entry there (tools/export_hf.py)
            "split_special_tokens": chat_template is None,
        }
        if kind == "t5":
            tokenizer_config |= {"pad_token": tokenizer.id_to_token(config.pad_id), "split_special_tokens": False}
        if kind == "bert":  # the fill-mask pipeline finds [MASK] written in the text, as sample.py does
            tokenizer_config |= {"mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
            tokenizer_config |= {"pad_token": "[PAD]", "split_special_tokens": False}
        if chat_template is not None:  # tokenizer.apply_chat_template renders conversations as training did
            tokenizer_config["chat_template"] = chat_template
            tokenizer_config["additional_special_tokens"] = list(chat.SPECIAL)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f, indent=2)
    return kind


def _bert_export(sd: dict, config: GPTConfig, labels: list[str] | None = None) -> tuple[dict, dict]:
    """(config.json, weights) of an encoder in BertForMaskedLM's layout, or a classifier (with its labels) in
    BertForSequenceClassification's: _bert_state_dict's map backwards, with token-type embeddings of zeros (every
    token of type 0 adds nothing) and zeros for biases the model trained without (BERT's layout always has them)."""
    hf_config = {
        "model_type": "bert",
        "architectures": ["BertForSequenceClassification" if config.n_labels else "BertForMaskedLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": config.mlp_hidden,
        "hidden_act": HF_ACTIVATION[config.mlp],
        "max_position_embeddings": config.block_size,
        "type_vocab_size": 2,
        "layer_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "position_embedding_type": "absolute",
    }
    zeros = lambda name, size: sd.get(name, torch.zeros(size))  # noqa: E731
    C = config.n_embd
    weights = {}
    for ours, theirs in _BERT_GLOBAL.items():
        if f"{ours}.weight" not in sd:  # a classifier's MLM head, an MLM model's classifier
            continue
        weights[f"{theirs}.weight"] = sd[f"{ours}.weight"]
        if ours not in ("transformer.wte", "lm_head"):
            weights[f"{theirs}.bias"] = zeros(f"{ours}.bias", sd[f"{ours}.weight"].size(0))
    if config.n_labels:
        names = labels or [f"LABEL_{i}" for i in range(config.n_labels)]
        hf_config |= {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
        hf_config |= {"pad_token_id": config.pad_id, "problem_type": "single_label_classification"}
    else:
        if config.tie_embeddings:
            del weights["cls.predictions.decoder.weight"]
        weights["cls.predictions.bias"] = sd["lm_head.bias"]
    weights["bert.embeddings.position_embeddings.weight"] = sd["transformer.wpe.weight"]
    weights["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(2, C)
    for i in range(config.n_layer):
        hf, ours = f"bert.encoder.layer.{i}.", f"transformer.h.{i}."
        for our_key, their_key in _BERT_LAYER.items():
            size = config.mlp_hidden if our_key == "mlp.c_fc" else C
            weights[f"{hf}{their_key}.weight"] = sd[f"{ours}{our_key}.weight"]
            weights[f"{hf}{their_key}.bias"] = zeros(f"{ours}{our_key}.bias", size)
        q, k, v = sd[f"{ours}attn.c_attn.weight"].split(C, dim=0)
        biases = zeros(f"{ours}attn.c_attn.bias", 3 * C).split(C)
        for name, w, b in zip(("query", "key", "value"), (q, k, v), biases, strict=True):
            weights[f"{hf}attention.self.{name}.weight"], weights[f"{hf}attention.self.{name}.bias"] = w, b
    return hf_config, weights


def _zero_biases(sd: dict, config: GPTConfig) -> dict:
    """The biases GPT-2's layout always has, as zeros, for a model trained without them."""
    zeros = {}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        for name, size in (
            ("ln_1.bias", config.n_embd),
            ("attn.c_attn.bias", 3 * config.n_embd),
            ("attn.c_proj.bias", config.n_embd),
            ("ln_2.bias", config.n_embd),
            ("mlp.c_fc.bias", config.mlp_hidden),
            ("mlp.c_proj.bias", config.n_embd),
        ):
            zeros[h + name] = torch.zeros(size)
    zeros["transformer.ln_f.bias"] = torch.zeros(config.n_embd)
    return {k: v for k, v in zeros.items() if k not in sd}
