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
finishes the requests already running, then exits (0 after SIGTERM, 130 after Ctrl-C); a second Ctrl-C stops at
once.
"""

from engine.interrupts import EXIT_INTERRUPTED, stop_now  # first: Ctrl-C while loading is one line and exit 130

import os
import signal
import socket
import sys
import threading
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
    listening = listen(cfg.host, cfg.port)
    url = f"http://{cfg.host}:{listening.getsockname()[1]}"

    # The model decodes on this, the main thread (engine/batching.py); uvicorn answers HTTP on another.
    engine = BatchEngine(model, tokenizer.vocab_size, cfg.max_batch, cfg.max_queue, cfg.compile, thread=False)
    app = build_app(engine, model, tokenizer, name, cfg.api_key)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=600)
    server = uvicorn.Server(config)

    def http():
        try:
            server.run(sockets=[listening])
        finally:  # every client has been answered or has gone: what is left has nobody to go to
            engine.close(cancel=True)

    def drain(signum, frame):
        """The first Ctrl-C or SIGTERM: refuse new connections, answer the running requests, then exit. A second
        Ctrl-C stops at once."""
        if server.should_exit and signum == signal.SIGINT:
            stop_now()
        stopping.append(signum)
        server.should_exit = True
        print(f"stopping: answering the {engine.load()['active']} running request(s) first", file=sys.stderr)

    stopping = []
    signal.signal(signal.SIGINT, drain)
    signal.signal(signal.SIGTERM, drain)
    threading.Thread(target=http, name="http", daemon=True).start()
    print(f"serving {model.source} as {name!r} on {url} (API at {url}/v1, chat page at {url}/)",
          file=sys.stderr, flush=True)  # fmt: skip
    engine.run()
    if not server.started:
        raise UserError(f"the HTTP server on {url} failed to start (its error is above)")
    print("stopped: every running request was answered", file=sys.stderr)
    if signal.SIGINT in stopping:
        sys.exit(EXIT_INTERRUPTED)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: one the system picks), or one line saying why there is none."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host"
        ) from None
    return sock


if __name__ == "__main__":
    run_cli(main)
