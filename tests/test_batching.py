"""Continuous batching (engine/batching.py) against one sequence at a time: each row of a batch at its own position
gives the full forward's logits, and requests decoded together, joining and leaving at different steps, get the
tokens sample.py's decoder gives each alone (greedy, and sampled with a seed)."""

import threading

import pytest
import torch

from engine.batching import BatchEngine, Done, Failed, Overloaded, Request, Token
from engine.generate import Decoder, Sampling
from engine.tasks import choice_logprobs
from model import GPT, GPTConfig

GREEDY = Sampling(temperature=0)


def model_of(**switches) -> GPT:
    config = GPTConfig(block_size=48, vocab_size=61, n_layer=2, n_head=4, n_embd=32, **switches)
    return GPT(config).eval()


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"pos_embedding": "sinusoidal"},
        {"pos_embedding": "rope", "n_kv_head": 2, "norm": "rmsnorm", "mlp": "swiglu"},
        {"pos_embedding": "alibi"},
        {"pos_embedding": "t5"},
        {"pos_embedding": "none", "n_kv_head": 1},
    ],
    ids=["learned", "sinusoidal", "rope-gqa", "alibi", "t5", "none-mqa"],
)
def test_each_row_at_its_own_position_gives_the_full_forward(switches):
    model = model_of(**switches)
    lengths = [5, 17, 1, 30]
    seqs = [torch.randint(0, 61, (n + 1,)) for n in lengths]
    cache = model.new_kv_cache(len(seqs))
    with torch.no_grad():
        for r, seq in enumerate(seqs):  # each prompt written alone into its row, through a view of the row
            model(seq[None, :-1], kv_cache=[layer.view(slice(r, r + 1)) for layer in cache])
        # one step for every row: two tokens each (a chunk), at its own position
        last = torch.stack([torch.cat([seq[-1:], seq[:1]]) for seq in seqs])
        logits, _ = model(last, kv_cache=cache, start_pos=torch.tensor(lengths), all_logits=True)
        for r, seq in enumerate(seqs):
            full, _ = model(torch.cat([seq, seq[:1]])[None], all_logits=True)
            torch.testing.assert_close(logits[r], full[0, -2:], rtol=1e-5, atol=1e-5)


class Collect:
    """A request's events, with an event set when it ends."""

    def __init__(self):
        self.events, self.ended = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Done, Failed)):
            self.ended.set()

    @property
    def tokens(self) -> list[int]:
        return [e.id for e in self.events if isinstance(e, Token)]

    def wait(self):
        assert self.ended.wait(120), "the request never ended"
        return self.events[-1]


def alone(model, prompt: list[int], n: int, sampling: Sampling, seed: int | None = None) -> list[int]:
    """What sample.py decodes: its Decoder, batch 1, with a generator of the seed."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.tensor(prompt)[None]
    return [t.item() for t in Decoder(model).generate(x, n, sampling, generator, vocab_size=model.config.vocab_size)]


CASES = [  # (prompt length, max_tokens, sampling, seed)
    (3, 20, GREEDY, None),
    (11, 5, GREEDY, None),
    (1, 30, Sampling(temperature=0.9, top_k=20), 7),
    (25, 12, Sampling(temperature=1.0, top_p=0.8, repetition_penalty=1.3), 3),
    (8, 17, Sampling(temperature=0, repetition_penalty=1.5), None),
    (40, 8, Sampling(temperature=0.7, min_p=0.05), 11),
]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_requests_batched_together_get_what_each_gets_alone(compile):
    model = model_of(pos_embedding="rope", n_kv_head=2)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n, *_ in CASES]
    engine = BatchEngine(model, vocab_size=61, max_batch=4, max_queue=8, compile=compile)
    try:
        collected = [Collect() for _ in CASES]
        pairs = zip(prompts, collected, CASES, strict=True)
        requests = [Request(p, n, sampling, c, seed=seed) for p, c, (_, n, sampling, seed) in pairs]
        engine.submit(*requests)  # 6 requests queued at once (so rows do share steps), 4 rows: 2 wait
        for c, prompt, (_, n, sampling, seed) in zip(collected, prompts, CASES, strict=True):
            assert c.wait() == Done("length")
            assert c.tokens == alone(model, prompt, n, sampling, seed)
        assert engine.decoded_rows > engine.steps
    finally:
        engine.close()


def test_an_end_token_stops_a_request_and_frees_its_row():
    model = model_of()
    prompt = [5, 6, 7]
    expected = alone(model, prompt, 10, GREEDY)
    engine = BatchEngine(model, vocab_size=61, max_batch=1, max_queue=0)
    try:
        c = Collect()
        engine.submit(Request(prompt, 10, GREEDY, c, end_ids=frozenset({expected[3]})))
        assert c.wait() == Done("stop")
        assert c.tokens == expected[: expected.index(expected[3])]
        assert engine.load()["active"] == 0
    finally:
        engine.close()


def holding_the_row(engine) -> tuple[Request, threading.Event]:
    """A 40-token request submitted to take the engine's one row, and the event of its first token."""
    first_token = threading.Event()
    long = Request([1, 2], 40, GREEDY, lambda e: first_token.set())
    engine.submit(long)
    return long, first_token


def test_a_cancelled_request_frees_its_row_for_the_next_and_the_queue_is_bounded():
    model = model_of()
    engine = BatchEngine(model, vocab_size=61, max_batch=1, max_queue=1)
    try:
        long, first_token = holding_the_row(engine)
        queued = Collect()
        engine.submit(Request([3], 4, GREEDY, queued))
        with pytest.raises(Overloaded):  # one decoding, one waiting: the next is refused
            engine.submit(Request([4], 4, GREEDY, Collect()))
        assert first_token.wait(120)
        long.cancel()
        assert queued.wait() == Done("length")
        assert queued.tokens == alone(model, [3], 4, GREEDY)
    finally:
        engine.close()


def test_echoed_prompt_logprobs_are_the_log_likelihoods_evaluate_computes():
    model = model_of()
    context, continuation = [4, 9, 2, 33, 12], [7, 7, 50]
    c = Collect()
    engine = BatchEngine(model, vocab_size=61, max_batch=2)
    try:
        engine.submit(Request(context + continuation, 0, GREEDY, c, logprobs=2, echo_logprobs=True))
        done = c.wait()
    finally:
        engine.close()
    assert c.tokens == [] and len(done.prompt_logprobs) == len(context + continuation) - 1
    [(expected, n)] = choice_logprobs(model, [(context, continuation)])
    got = sum(logprob for logprob, _ in done.prompt_logprobs[-len(continuation) :])
    assert n == 3 and got == pytest.approx(expected, abs=1e-5)
    for logprob, top in done.prompt_logprobs:  # the two most likely, in order; none less likely than the target
        assert len(top) == 2 and top[0][1] >= top[1][1] and logprob <= top[0][1] + 1e-6


def test_the_compiled_step_in_bfloat16_is_one_graph_and_gives_the_eager_step_s_logits():
    """The GPU path on a CPU: a bf16 model (serve.py --dtype=bfloat16 casts it), the decoding step compiled with
    static shapes: requests joining and leaving never recompile it nor break its graph, and its logits are the eager
    step's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = model_of(pos_embedding="rope", n_kv_head=2).to(torch.bfloat16)
    engine = BatchEngine(model, vocab_size=61, max_batch=4, compile=True)
    try:
        collected = [Collect() for _ in range(6)]
        for n, c in enumerate(collected):
            engine.submit(Request(list(range(1, 2 + 3 * n)), 6 + n, GREEDY, c))
        assert all(c.wait() == Done("length") for c in collected)
    finally:
        engine.close()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"] and not counters["recompiles"]
    tokens = torch.randint(0, 61, (4, 1))
    positions = torch.tensor([3, 9, 0, 20])
    with torch.no_grad():
        compiled = engine.step(tokens, engine.cache, positions)
        eager = engine._decode(tokens, engine.cache, positions)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def test_cancelled_waiting_requests_free_their_places_and_a_request_s_choices_queue_all_or_none():
    model = model_of()
    engine = BatchEngine(model, vocab_size=61, max_batch=1, max_queue=2)
    try:
        long, first_token = holding_the_row(engine)
        assert first_token.wait(120)
        gone = [Request([3], 4, GREEDY, Collect()) for _ in range(2)]
        engine.submit(*gone)
        with pytest.raises(Overloaded):  # two choices, one place: neither is queued
            engine.submit(Request([3], 4, GREEDY, Collect()), Request([3], 4, GREEDY, Collect()))
        for request in gone:  # their clients went away while they waited: their places are free again
            request.cancel()
        assert engine.load()["waiting"] == 0
        late = [Collect(), Collect()]
        engine.submit(*(Request([5], 3, GREEDY, c) for c in late))
        long.cancel()
        assert [c.wait() for c in late] == [Done("length")] * 2
    finally:
        engine.close()


def test_a_prefill_that_raises_fails_its_request_and_the_engine_goes_on(monkeypatch):
    model = model_of()
    forward = model.forward

    def exploding(idx, **kw):
        if idx.size(1) == 7:
            raise RuntimeError("out of memory (a test's)")
        return forward(idx, **kw)

    monkeypatch.setattr(model, "forward", exploding)
    engine = BatchEngine(model, vocab_size=61, max_batch=2)
    try:
        doomed, fine = Collect(), Collect()
        engine.submit(Request(list(range(7)), 5, GREEDY, doomed))
        assert isinstance(doomed.wait(), Failed) and "out of memory" in doomed.events[-1].message
        engine.submit(Request(list(range(3)), 5, GREEDY, fine))
        assert fine.wait() == Done("length") and len(fine.tokens) == 5
    finally:
        engine.close()


def test_an_end_token_is_sent_with_its_log_probability_when_they_are_asked_for():
    """A scorer (lm-evaluation-harness's echo + logprobs + max_tokens=1) reads the log-probability of whatever token
    comes next, an end-of-text one included."""
    model = model_of()
    prompt = [5, 6, 7]
    end = alone(model, prompt, 1, GREEDY)[0]
    engine = BatchEngine(model, vocab_size=61, max_batch=1)
    try:
        c = Collect()
        engine.submit(Request(prompt, 1, GREEDY, c, end_ids=frozenset({end}), logprobs=1, echo_logprobs=True))
        done = c.wait()
    finally:
        engine.close()
    assert done.reason == "stop" and len(done.prompt_logprobs) == 2
    [token] = [e for e in c.events if isinstance(e, Token)]
    assert token.id == end and token.end and token.top[0][0] == end and token.logprob == pytest.approx(token.top[0][1])
