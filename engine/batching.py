"""Continuous batching: many requests decoded together, each joining the running batch at the next step and leaving
when it is done (Yu et al. 2022, "Orca"; what vLLM and TGI call continuous batching), over our KV cache.

One thread owns the model: a thread of the engine's own, or the caller's with thread=False (serve.py gives it the
main thread: on a CPU, a step run from any other thread takes about twice as long there, through OpenMP). A request
is prefilled alone, into a free row of one shared cache (a view of that row, so the prefill is exactly sample.py's);
then every step decodes one token for every active row at once, each row at its own position (GPT.forward with a
(B,) start_pos). A finished or cancelled request frees its row at the next step: the last active row moves into it,
so the active rows are always the first n and a step reads only them, and only
as many positions as the longest of them holds. compile=True decodes every row over the whole cache instead, static
shapes through torch.compile: one graph whatever joins or leaves.

Each request keeps its own sampling settings and random generator, so what it gets does not depend on what it was
batched with: greedy decoding gives sample.py --temperature=0's tokens, and a seed sample.py --seed's.

Callers (the server's request handlers, on their own event loop) submit a Request and receive its events through
the `emit` callback they gave it, called from the engine's thread: Token, then Done (or Failed).
"""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from engine.generate import Sampling, next_token


@dataclass
class Token:
    id: int
    logprob: float | None = None  # the model's log-probability of it (with Request.logprobs)
    top: list[tuple[int, float]] | None = None  # the Request.logprobs most likely tokens and theirs
    end: bool = False  # one of Request.end_ids: no text, emitted only with logprobs (Done follows)


@dataclass
class Done:
    reason: str  # "stop" (an end token) or "length" (max_tokens)
    prompt_logprobs: list | None = (
        None  # with Request.echo_logprobs: (logprob, top) of each prompt token after the first
    )


@dataclass
class Failed:
    message: str


@dataclass
class Request:
    prompt: list[int]  # token ids, 1..block_size - max_tokens of them
    max_tokens: int
    sampling: Sampling
    emit: Callable  # called with each event, from the engine's thread
    seed: int | None = None  # None: a random one
    end_ids: frozenset = frozenset()  # tokens that end the request (not emitted)
    logprobs: int | None = None  # emit each token's log-probability and this many alternatives
    echo_logprobs: bool = False  # the prompt's own log-probabilities too (Done.prompt_logprobs)
    cancelled: bool = False  # set by the caller (a client gone): the row is freed at the next step
    ids: list[int] = field(default_factory=list)  # prompt and tokens so far
    generator: torch.Generator | None = None
    finished: str | None = None  # Done's reason, once there is one
    prompt_logprobs: list | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Overloaded(Exception):
    """max_batch requests are decoding and max_queue more are waiting."""


class ShuttingDown(Exception):
    """close() was called: no new requests."""


class BatchEngine:
    def __init__(
        self, model, vocab_size: int, max_batch: int = 16, max_queue: int = 64, compile: bool = False, thread=True
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.lm_head.weight.device
        self.cache = model.new_kv_cache(max_batch)
        self.rows: list[Request] = []  # active requests; row i of the cache is rows[i]'s
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.closing = False
        self.steps = 0  # batched decoding steps run, and rows they decoded: the mean batch is their ratio
        self.decoded_rows = 0
        self.tokens = 0  # tokens emitted
        self.step = self._decode
        if compile:
            for layer in self.cache:
                torch._dynamo.mark_static_address(layer.k)
                torch._dynamo.mark_static_address(layer.v)
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.step = torch.compile(self._decode, mode=mode, dynamic=False)
        self.static = compile
        self.thread = threading.Thread(target=self.run, name="batch-engine", daemon=True) if thread else None
        if self.thread:
            self.thread.start()

    # --- the callers' side ---------------------------------------------------------------------------------------
    def submit(self, *requests: Request) -> None:
        """Queue requests, all or none: Overloaded when there is no room for all of them beside the max_batch
        decoding and the max_queue waiting; ShuttingDown after close()."""
        with self.lock:
            if self.closing:
                raise ShuttingDown("the server is shutting down")
            self.waiting = deque(r for r in self.waiting if not r.cancelled)  # (their clients have gone)
            if len(self.rows) + len(self.waiting) + len(requests) > self.max_batch + self.max_queue:
                raise Overloaded(f"{len(self.rows)} requests are decoding and {len(self.waiting)} waiting")
            self.waiting.extend(requests)
            self.lock.notify()

    def load(self) -> dict:
        with self.lock:
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
            busy = {"active": len(self.rows), "waiting": len(self.waiting)}
            return busy | {"max_batch": self.max_batch, "max_queue": self.max_queue, "tokens_generated": self.tokens}

    def close(self, cancel: bool = False) -> None:
        """Refuse new requests; run() returns once every request already submitted is done, or at once with
        cancel=True (nobody is left to receive them); the engine's own thread is waited for."""
        with self.lock:
            self.closing = True
            for request in [*self.rows, *self.waiting] if cancel else []:
                request.cancel()
            self.lock.notify()
        if self.thread and self.thread is not threading.current_thread():
            self.thread.join()

    # --- the engine's thread -------------------------------------------------------------------------------------
    def run(self) -> None:
        """Decode until close(): what the engine's thread runs, or the caller's thread with thread=False."""
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.waiting or self.rows or self.closing)
                if self.closing and not self.waiting and not self.rows:
                    return
                joining = []
                while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            try:
                with torch.no_grad():
                    while joining:
                        if not joining[0].cancelled:
                            self._prefill(joining[0])
                        joining.pop(0)  # (after its prefill: one that raises is failed below)
                    self._leave()
                    if self.rows:
                        self._step()
                    self._leave()
            except Exception as e:  # a failing step fails its requests, not the server
                for request in {id(r): r for r in [*self.rows, *joining]}.values():
                    request.emit(Failed(f"decoding failed: {type(e).__name__}: {e}"))
                self.rows.clear()

    def _prefill(self, request: Request) -> None:
        """Write the prompt's keys and values into the next free row, alone (the path sample.py decodes with), and
        choose the first token."""
        row = len(self.rows)
        request.ids = list(request.prompt)
        if request.seed is not None or request.sampling.temperature > 0:
            seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()).item())
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.tensor(request.prompt, dtype=torch.long, device=self.device)[None]
        cache = [layer.view(slice(row, row + 1)) for layer in self.cache]
        logits, _ = self.model(x, kv_cache=cache, all_logits=request.echo_logprobs)  # (1, T or 1, V)
        logits = logits[0].float()  # (T or 1, V)
        if request.echo_logprobs:
            request.prompt_logprobs = self._logprobs(logits[:-1], request.prompt[1:], request.logprobs or 0)
        self.rows.append(request)
        if request.max_tokens == 0:  # the prompt's log-probabilities only
            request.finished = "length"
            return
        self._choose([request], logits[-1:])

    def _decode(self, tokens, cache, positions):
        logits, _ = self.model(tokens, kv_cache=cache, start_pos=positions)
        return logits[:, -1].float()

    def _step(self) -> None:
        """One token for every active row, each at its own position."""
        n = len(self.rows)
        batch = self.max_batch if self.static else n  # static: every row (the idle ones decode a token 0 at 0)
        tokens = torch.zeros(batch, 1, dtype=torch.long)
        positions = torch.zeros(batch, dtype=torch.long)
        for i, request in enumerate(self.rows):
            tokens[i, 0], positions[i] = request.ids[-1], len(request.ids) - 1
        length = None if self.static else int(positions[:n].max()) + 1  # the positions the longest row holds
        cache = self.cache if self.static else [layer.view(slice(0, n), length) for layer in self.cache]
        logits = self.step(tokens.to(self.device), cache, positions.to(self.device))
        self.steps, self.decoded_rows = self.steps + 1, self.decoded_rows + n
        self._choose(self.rows, logits[:n].clone())

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> None:
        """The next token of each request from its row of logits (n, V), emitted, with its log-probabilities when
        asked for; greedy rows together, sampled ones each with its own settings and generator (as sample.py). Ids
        from vocab_size up (a vocabulary's padding) are never chosen."""
        full, logits = logits, logits[:, : self.vocab_size]
        greedy = [
            i for i, r in enumerate(requests) if r.sampling.temperature == 0 and r.sampling.repetition_penalty == 1
        ]
        chosen = dict(zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True)) if greedy else {}
        for i, request in enumerate(requests):
            if i not in chosen:
                seen = torch.tensor(request.ids, device=self.device)[None]
                chosen[i] = next_token(logits[i : i + 1], request.sampling, seen, request.generator).item()
        for i, request in enumerate(requests):
            token = chosen[i]
            end = token in request.end_ids
            logprob, top = None, None
            if request.logprobs is not None:  # (an end token too: a scorer reads its log-probability)
                (logprob, top), *_ = self._logprobs(full[i : i + 1], [token], request.logprobs)
            if end:
                request.finished = "stop"
                if request.logprobs is not None:
                    request.emit(Token(token, logprob, top, end=True))
                continue
            request.ids.append(token)
            request.emit(Token(token, logprob, top))
            self.tokens += 1
            if len(request.ids) - len(request.prompt) >= request.max_tokens:
                request.finished = "length"

    def _logprobs(self, logits: torch.Tensor, targets: list[int], top: int) -> list[tuple[float, list]]:
        """(log-probability of each target, the `top` most likely (id, log-probability)) under logits (n, V): the
        model's own distribution over its whole vocabulary, as tools/evaluate.py scores (the alternatives are
        tokens the tokenizer can decode)."""
        logp = F.log_softmax(logits, dim=-1)
        picked = logp.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
        if not top:
            return [(p, []) for p in picked]
        best = torch.topk(logp[:, : self.vocab_size], min(top, self.vocab_size))
        pairs = [list(zip(i, v, strict=True)) for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)]
        return list(zip(picked, pairs, strict=True))

    def _leave(self) -> None:
        """Free the rows of finished and cancelled requests: the last active row moves into each freed one."""
        i = 0
        while i < len(self.rows):
            request = self.rows[i]
            if not (request.finished or request.cancelled):
                i += 1
                continue
            if not request.cancelled:
                request.emit(Done(request.finished, request.prompt_logprobs))
            last = len(self.rows) - 1
            if i != last:
                for layer in self.cache:
                    layer.k[i] = layer.k[last]
                    layer.v[i] = layer.v[last]
            self.rows[i] = self.rows[last]
            self.rows.pop()
