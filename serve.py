r"""Serve a trained model over HTTP: OpenAI's completions and chat completions API, and a chat page in the browser.

    python serve.py --out_dir=out-shakespeare-char                   # then open http://127.0.0.1:8000
    python serve.py --out_dir=out-chat --weights=ema --port=8080     # a chat run: /v1/chat/completions
    python serve.py --init_from=gpt2 --device=cuda --compile=True --api_key=secret
    python serve.py --help                                           # every option

Any OpenAI client talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="out-shakespeare-char", prompt="ROMEO:", max_tokens=50)

Concurrent requests are decoded together, each joining the running batch at the next step (engine/batching.py);
greedy decoding gives sample.py --temperature=0's text whatever a request was batched with. Ctrl-C or SIGTERM
finishes the requests already running, then exits.
"""

import engine.interrupts  # noqa: F401  (first: Ctrl-C while loading is one line and exit 130)

import os
import signal
import sys
from dataclasses import dataclass

import uvicorn

from engine.batching import BatchEngine
from engine.configurator import parse_config
from engine.errors import UserError, run_cli
from engine.inference import load_for_inference
from engine.memory import check_sampling_fits
from engine.runtime import setup_runtime
from engine.server import build_app


@dataclass
class ServeConfig:
    init_from: str = "resume"  # resume (from out_dir), gpt2, gpt2-medium, gpt2-large, gpt2-xl or a HF directory
    out_dir: str = "out"  # training output directory to load from when init_from=resume
    checkpoint: str = "latest"  # which checkpoint in out_dir: latest or best (lowest val loss)
    weights: str = "raw"  # raw, or ema: the moving average of a run trained with --ema_decay
    tokenizer_dir: str | None = None  # offline GPT-2 tokenizer: a directory with vocab.bpe and encoder.json
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bf16 if supported, else fp16 on CUDA, fp32 elsewhere), float32, bfloat16, float16
    compile: bool = False  # decode every step with static shapes through torch.compile (CUDA graphs on CUDA)
    host: str = "127.0.0.1"  # the address to listen on; 0.0.0.0 serves other machines too
    port: int = 8000
    api_key: str | None = None  # when set, /v1/ requests need the header Authorization: Bearer <api_key>
    model_name: str | None = None  # the model's id in the API; none = out_dir's name, or init_from
    max_batch: int = 16  # requests decoded together; each holds a row of the KV cache
    max_queue: int = 64  # requests waiting for a row; past that, 429 with Retry-After

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.max_batch < 1 or self.max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {self.max_batch} and {self.max_queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; give a key, or leave it out to serve without one")


def main(argv=None):
    cfg = parse_config(ServeConfig, argv, usage=__doc__)
    rt = setup_runtime(cfg.device, cfg.dtype)
    model, tokenizer = load_for_inference(
        cfg.init_from, cfg.out_dir, cfg.checkpoint, cfg.tokenizer_dir, rt.print0, cfg.weights
    )
    if model.config.arch != "decoder" or model.config.n_labels:
        raise UserError(f"{model.source} is not a decoder (arch={model.config.arch}): serve.py serves GPT models")
    model.eval().to(rt.device, rt.dtype)
    check_sampling_fits(model.config, rt.device, cfg.max_batch, rt.dtype.itemsize)
    name = cfg.model_name or (
        os.path.basename(os.path.normpath(cfg.out_dir)) if cfg.init_from == "resume" else cfg.init_from
    )
    engine = BatchEngine(model, tokenizer.vocab_size, cfg.max_batch, cfg.max_queue, cfg.compile)
    app = build_app(engine, model, tokenizer, name, cfg.api_key)
    print(f"serving {model.source} as {name!r} on http://{cfg.host}:{cfg.port} (API at /v1, chat page at /)",
          file=sys.stderr, flush=True)  # fmt: skip
    # uvicorn answers Ctrl-C and SIGTERM by refusing new connections and letting the running requests finish; then
    # it raises the signal again for the handler it found: Ctrl-C is then the usual interrupted line (exit 130), and
    # SIGTERM, a service manager's stop, a clean exit
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        uvicorn.run(
            app, host=cfg.host, port=cfg.port, log_level="info", access_log=False, timeout_graceful_shutdown=600
        )
    finally:
        engine.close()
        print("stopped: every request was answered", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
