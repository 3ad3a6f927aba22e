"""Export a trained checkpoint as a Hugging Face directory that transformers.AutoModelForCausalLM loads.

    python export_hf.py --out_dir=out-shakespeare-char --hf_dir=hf-shakespeare-char
    python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('hf-shakespeare-char')"

GPT-2-style models (learned positions, LayerNorm with bias, GELU/ReLU MLP, multi-head attention) are written in the
GPT-2 layout, Llama-style ones (RoPE, RMSNorm, SwiGLU, any n_kv_head) in the Llama layout; other combinations
(ALiBi, sinusoidal or no positions, post-norm, QK-norm, MoE) are refused. The tokenizer is not exported: a
GPT-2-BPE model uses the `gpt2` tokenizer; a character model's vocabulary is in the checkpoint's meta.json.
"""

from dataclasses import dataclass

from checkpoint import find_checkpoint, load_weights, read_meta
from configurator import parse_config
from errors import UserError, run_cli
from hf_interop import UnsupportedModel, save_hf
from model import GPT, GPTConfig


@dataclass
class ExportConfig:
    out_dir: str = "out"  # training output directory holding the checkpoint
    checkpoint: str = "latest"  # latest or best (lowest val loss), or a checkpoint directory given as out_dir
    hf_dir: str = "hf_model"  # directory to write config.json and model.safetensors into


def main(argv=None):
    cfg = parse_config(ExportConfig, argv, usage=__doc__)
    path = find_checkpoint(cfg.out_dir, cfg.checkpoint)
    meta = read_meta(path)
    model = GPT(GPTConfig(**(meta["model_config"] | {"dropout": 0.0})))
    load_weights(path, model)
    try:
        layout = save_hf(model, cfg.hf_dir, eos_token_id=meta["data"].get("eot_id"))
    except UnsupportedModel as e:
        raise UserError(f"cannot export {path}: {e}") from None
    print(f"wrote {path} to {cfg.hf_dir} in the Hugging Face {layout} layout")


if __name__ == "__main__":
    run_cli(main)
