"""Serving throughput: total tokens/s of serve.py's API for 1, 4 and 16 concurrent clients, next to sample.py's
single-stream decoding of the same model, random weights, character vocabulary.

    python bench/serve_throughput.py                                 # the shakespeare_char model (10.7M), CPU
    python bench/serve_throughput.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --vocab_size=50304 \
        --device=cuda --dtype=bfloat16                              # GPT-2 124M shapes on a GPU

First sample.py's decoder (engine/generate.py Decoder, batch 1, KV cache) generates new_tokens alone, in this
process. Then the server (serve.py's BatchEngine and FastAPI app under uvicorn, on a free localhost port, in this
process) answers `clients` threads, each sending requests_per_client completions of new_tokens tokens over HTTP
(sampled at temperature 0.8, each with its own seed), all at once: the table gives the tokens generated per second
of wall time over all clients, what each client got, and the mean number of rows each decoding step ran.
"""

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python bench/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import httpx
import torch
import uvicorn

from engine.batching import BatchEngine
from engine.configurator import parse_config
from engine.data import Tokenizer
from engine.errors import UserError, run_cli
from engine.generate import Decoder, Sampling
from engine.runtime import DTYPES
from engine.server import build_app
from model import GPT, GPTConfig


@dataclass
class ServeThroughputConfig:
    clients: str = "1,4,16"  # comma-separated numbers of concurrent clients
    new_tokens: int = 200  # tokens per request
    requests_per_client: int = 2
    max_batch: int = 16  # the server's rows
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    vocab_size: int = 65
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False  # the server's static-shape compiled decoding step


def single_stream(model, n: int, device: str) -> float:
    """sample.py's decoder alone: tokens/s for n new tokens from a one-token prompt, after a warm-up."""
    x = torch.zeros(1, 1, dtype=torch.long, device=device)
    decoder = Decoder(model)
    sampling = Sampling(temperature=0.8)
    for _ in decoder.generate(x, 8, sampling):
        pass
    t0 = time.perf_counter()
    for token in decoder.generate(x, n, sampling):
        token.item()  # each token read as it comes, as a streaming server or sample.py --stream does
    return n / (time.perf_counter() - t0)


def start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    """uvicorn serving app on a free localhost port, in a thread of this process; and its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # (a benchmark's start-up, not a test: polling is fine here)
        if not thread.is_alive():
            raise UserError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def main(argv=None):
    cfg = parse_config(ServeThroughputConfig, argv, usage=__doc__)
    clients = [int(c) for c in cfg.clients.split(",")]
    if any(c < 1 for c in clients) or cfg.new_tokens < 1 or cfg.new_tokens + 1 > cfg.block_size:
        raise UserError("clients must be >= 1 and 1 <= new_tokens < block_size")
    torch.manual_seed(0)
    config = GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd)  # fmt: skip
    model = GPT(config).eval().to(cfg.device, DTYPES[cfg.dtype])
    chars = "".join(chr(32 + i) for i in range(cfg.vocab_size))
    tokenizer = Tokenizer({"tokenizer": "char", "chars": chars})
    print(f"{model.num_params() / 1e6:.1f}M parameters, {cfg.device}, {cfg.dtype}, {torch.get_num_threads()} threads; "
          f"{cfg.new_tokens} tokens per request")  # fmt: skip
    alone = single_stream(model, cfg.new_tokens, cfg.device)

    # as serve.py: the engine decodes on the main thread, HTTP and the clients run on others
    engine = BatchEngine(model, tokenizer.vocab_size, cfg.max_batch, max(clients), cfg.compile, thread=False)
    server, http_thread, url = start_server(build_app(engine, model, tokenizer, "bench"))
    failed = []
    driver = threading.Thread(target=drive, args=(cfg, clients, url, engine, alone, failed))
    driver.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        http_thread.join()
        driver.join()
    if failed:
        raise failed[0]


def drive(cfg, clients: list[int], url: str, engine, alone: float, failed: list) -> None:
    """The clients, each number of them in turn, and the table; then the engine is closed."""
    body = {"model": "bench", "prompt": " ", "max_tokens": cfg.new_tokens, "temperature": 0.8}

    def client(seed: int) -> int:
        done = 0
        with httpx.Client(timeout=None) as http:
            for r in range(cfg.requests_per_client):
                out = http.post(f"{url}/v1/completions", json=body | {"seed": seed * 1000 + r})
                out.raise_for_status()
                done += out.json()["usage"]["completion_tokens"]
        return done

    try:
        httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 8}, timeout=None).raise_for_status()  # warm-up
        print(f"{'':<34}{'tokens/s':>10}{'per client':>12}{'x alone':>9}{'rows/step':>11}")
        print(f"{'sample.py decoder, one stream':<34}{alone:>10.0f}{alone:>12.0f}{1:>9.2f}{1:>11.1f}")
        for n in clients:
            steps, rows = engine.steps, engine.decoded_rows
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                tokens = sum(pool.map(client, range(n)))
            rate = tokens / (time.perf_counter() - t0)
            mean_rows = (engine.decoded_rows - rows) / max(1, engine.steps - steps)
            label = f"serve.py, {n} concurrent client{'s' if n > 1 else ''}"
            print(f"{label:<34}{rate:>10.0f}{rate / n:>12.0f}{rate / alone:>9.2f}{mean_rows:>11.1f}")
    except Exception as e:  # (raised again on the main thread)
        failed.append(e)
    finally:
        engine.close()


if __name__ == "__main__":
    run_cli(main)
