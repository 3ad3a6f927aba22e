r"""Sample text from a trained model, GPT-2, or a Hugging Face directory, with a KV cache; or, from an encoder (a
run trained with --arch=encoder), fill in each [MASK] of the prompt; from a classifier, label the text; from an
encoder-decoder, transduce the source.

    python sample.py --out_dir=out-shakespeare-char                       # newest checkpoint in out_dir
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=3
    python sample.py --out_dir=out --start=FILE:prompt.txt --temperature=0 # greedy, prompt from a file
    python sample.py --out_dir=out --num_samples=1 --stream=True --stop='\n\n'  # print as it goes, stop at a blank line
    python sample.py --out_dir=out-bert --start="To be, or not to [MASK]."  # an encoder: the top_k fillers
    python sample.py --out_dir=out-reviews --start=FILE:reviews.txt        # a classifier: a label for each line
    python sample.py --help                                                # every option

Options are SampleConfig's fields below, set by preset files and then --key=value. The samples of one run are
generated as one batch; each is printed followed by a line of dashes, as nanoGPT does.
"""

import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import sys
from dataclasses import dataclass

import torch

from engine import chat, seq2seq
from engine.classify import encoder_rows
from engine.configurator import parse_config
from engine.errors import UserError, run_cli
from engine.generate import Decoder, Sampling, StreamDecoder, cut_at_stop, transduce
from engine.inference import load_for_inference, read_prompt
from engine.memory import check_sampling_fits
from engine.runtime import seed_everything, setup_runtime


@dataclass
class SampleConfig:
    init_from: str = "resume"  # resume (from out_dir), gpt2, gpt2-medium, gpt2-large, gpt2-xl or a HF directory
    out_dir: str = "out"  # training output directory to load from when init_from=resume
    checkpoint: str = "latest"  # which checkpoint in out_dir: latest or best (lowest val loss)
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 10  # samples to draw, as one batch
    max_new_tokens: int = 500  # tokens generated per sample
    temperature: float = 0.8  # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
    top_k: int | None = 200  # keep only the k most likely tokens; none = all (an encoder: fillers shown, default 5)
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p; none = all
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely; none = all
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (CTRL's penalty); 1 = off
    stop: str | None = None  # stop string(s), several separated by |; output is cut at the first; \n escapes work
    kv_cache: bool = True  # cache keys and values (fast); False recomputes the whole context for every token
    stream: bool = False  # print tokens as they are produced (one sample at a time: needs num_samples=1)
    seed: int = 1337  # same seed, same device, same text
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bf16 if supported, else fp16 on CUDA, fp32 elsewhere), float32, bfloat16, float16
    compile: bool = False  # static-shape decoding through torch.compile (CUDA graphs on CUDA); slow to start
    tokenizer_dir: str | None = None  # offline GPT-2 tokenizer: a directory with vocab.bpe and encoder.json
    weights: str = "raw"  # raw, or ema: the moving average of a run trained with --ema_decay
    chat: bool = False  # chat with a model fine-tuned on a chat dataset: one user turn per line of stdin
    system: str | None = None  # with chat: the system message that opens the conversation

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or none, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or none, got {self.top_p}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] or none, got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.stream and self.num_samples != 1:
            raise ValueError("stream=True prints one sample as it is produced: set num_samples=1")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        parse_stops(self.stop)  # a bad escape is an error now, not after the model has loaded


def parse_stops(stop: str | None) -> list[str]:
    """The stop strings of --stop: split at |, with backslash escapes (\\n, \\t, \\u2014) decoded and any other
    character, non-ASCII ones included, kept as it is."""
    if not stop:
        return []
    try:
        return [s.encode("latin-1", "backslashreplace").decode("unicode_escape") for s in stop.split("|")]
    except UnicodeDecodeError as e:
        raise ValueError(f"stop={stop!r} has a bad escape ({e.reason}); write \\\\ for a backslash") from None


def main(argv=None):
    cfg = parse_config(SampleConfig, argv, usage=__doc__)
    rt = setup_runtime(cfg.device, cfg.dtype)
    seed_everything(cfg.seed)

    model, tokenizer = load_for_inference(
        cfg.init_from, cfg.out_dir, cfg.checkpoint, cfg.tokenizer_dir, rt.print0, cfg.weights
    )
    # Inference runs in the compute dtype itself rather than under autocast: the KV cache takes the model's dtype,
    # and a compiled step does not re-cast every weight on every token.
    model.eval().to(rt.device, rt.dtype)
    check_sampling_fits(model.config, rt.device, 1 if cfg.chat else cfg.num_samples, rt.dtype.itemsize)

    if cfg.chat:
        converse(cfg, model, tokenizer, rt)
        return
    if model.config.n_labels:
        classify(cfg, model, tokenizer, rt)
        return
    if model.config.arch == "encoder_decoder":
        transduce_lines(cfg, model, tokenizer, rt)
        return
    if model.config.arch == "encoder":
        fill_mask(cfg, model, tokenizer, rt)
        return
    prompt = read_prompt(cfg.start)
    ids = tokenizer.encode(prompt)
    if not ids:
        if tokenizer.eot_id is None:
            raise UserError("the prompt is empty; give some text with --start")
        ids = [tokenizer.eot_id]  # an empty prompt starts a new document
    # what was loaded, and a prompt that does not fit, on stderr: stdout holds only the samples
    print(f"sampling {model.source}", file=sys.stderr)
    if len(ids) > model.config.block_size:
        block = model.config.block_size
        print(f"note: the prompt is {len(ids)} tokens; the model sees its last {block}", file=sys.stderr)
    x = torch.tensor(ids, dtype=torch.long, device=rt.device)[None].repeat(cfg.num_samples, 1)  # (num_samples, T)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty)
    stops = parse_stops(cfg.stop)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    decoder = Decoder(model, cfg.kv_cache, cfg.compile)
    steps = decoder.generate(x, cfg.max_new_tokens, sampling, generator, vocab_size=tokenizer.vocab_size)

    if cfg.stream:
        stream(steps, tokenizer, prompt, stops)
        return
    if stops:  # each token is read as it comes, to stop once every sample has hit a stop string
        new = [[] for _ in range(cfg.num_samples)]
        for token in steps:
            for row, t in zip(new, token[:, 0].tolist(), strict=True):
                row.append(t)
            if all(cut_at_stop(tokenizer.decode(row), stops)[1] for row in new):
                break
    else:  # no host sync per token: the tokens are read once at the end
        new = torch.cat([x[:, :0], *steps], dim=1).tolist()
    for row in new:
        print(prompt + cut_at_stop(tokenizer.decode(row), stops)[0])
        print("---------------")


def converse(cfg: SampleConfig, model, tokenizer, rt) -> None:
    """A conversation on stdin/stdout: each line is a user turn, answered (streamed) in the context of everything
    said so far, rendered with the chat template the model was trained with. The reply ends at the template's end
    token or after max_new_tokens; an empty line or end of input ends the conversation."""
    if not tokenizer.chat:
        raise UserError(
            f"{model.source} was not trained on chat data (no chat template in it): fine-tune it on a dataset from "
            "prepare/chat.py, or sample without --chat"
        )
    print(f"chatting with {model.source} (an empty line ends)", file=sys.stderr)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    decoder = Decoder(model, cfg.kv_cache, cfg.compile)
    end = tokenizer.special[chat.END]
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().rstrip("\n")
        if not line.strip():
            return
        try:
            ids, dropped = chat.prompt_ids(
                [*messages, {"role": "user", "content": line}],
                tokenizer.encode,
                tokenizer.special,
                model.config.block_size,
            )
        except UserError as e:  # e.g. a character outside a character-level vocabulary: say so, keep talking
            print(f"error: {e}; say it another way", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        if dropped:
            print(
                f"note: the conversation outgrew block_size; its {dropped} oldest message(s) are left out",
                file=sys.stderr,
            )
        x = torch.tensor(ids, dtype=torch.long, device=rt.device)[None]
        pieces, reply = StreamDecoder(tokenizer.token_bytes), []
        for token in decoder.generate(x, cfg.max_new_tokens, sampling, generator, vocab_size=tokenizer.vocab_size):
            t = token[0, 0].item()
            if t == end:
                break
            reply.append(t)
            print(pieces.push(t), end="", flush=True)
        print(pieces.flush(), flush=True)
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})


def fill_mask(cfg: SampleConfig, model, tokenizer, rt) -> None:
    """An encoder's answer to a prompt with [MASK] in it: `[CLS] prompt [SEP]` read at once, and for each [MASK] one
    line of the top_k most likely text tokens (never a special one) with their probabilities under the model."""
    if not model.special:
        raise UserError(f"{model.source} is an encoder without its special tokens recorded; use a run of train.py")
    prompt = read_prompt(cfg.start)
    pieces = prompt.split("[MASK]")
    if len(pieces) == 1:
        raise UserError('the prompt has no [MASK] to fill in; write [MASK] where a token is missing, e.g. "to [MASK]"')
    ids = [model.special["[CLS]"]]
    for i, piece in enumerate(pieces):
        ids += tokenizer.encode(piece) + ([model.special["[MASK]"]] if i < len(pieces) - 1 else [])
    ids.append(model.special["[SEP]"])
    if len(ids) > model.config.block_size:
        raise UserError(
            f"the prompt is {len(ids)} tokens with [CLS] and [SEP]; the encoder reads {model.config.block_size}"
        )
    print(f"filling in {len(pieces) - 1} [MASK] with {model.source}", file=sys.stderr)
    x = torch.tensor(ids, dtype=torch.long, device=rt.device)[None]
    with torch.no_grad():
        logits = model(x)[0][0].float()  # (T, V): every position's
    text = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)  # the ids a blank may take: text's
    text[: tokenizer.vocab_size] = True
    text[list(model.special.values())] = False  # a special token fills no blank (nor does padding of the vocabulary)
    k = min(cfg.top_k if cfg.top_k is not None and "top_k" in getattr(cfg, "given", ()) else 5, int(text.sum()))
    for n, position in enumerate(i for i, t in enumerate(ids) if t == model.special["[MASK]"]):
        probs = torch.softmax(logits[position], dim=-1)  # the model's distribution (transformers' fill-mask's too)
        top = torch.topk(probs.masked_fill(~text, -1.0), k)
        fillers = " | ".join(
            f"{tokenizer.decode([t])!r} {p:.4f}" for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        print(f"[MASK] {n + 1}: {fillers}")


def classify(cfg: SampleConfig, model, tokenizer, rt, batch_size: int = 64) -> None:
    """A classifier's answer: for --start, or for each line of --start=FILE:, one line `label<TAB>probability` (the
    most likely label; a blank input line gets a blank output line). Each text is read as `[CLS] text [SEP]`, as in
    training; one longer than the model reads is cut, and said on stderr."""
    if not (model.special and model.labels):
        raise UserError(f"{model.source} is a classifier without its labels or special tokens recorded")
    texts = read_prompt(cfg.start).splitlines() if cfg.start.startswith("FILE:") else [cfg.start]
    ids = [tokenizer.encode(text) if text.strip() else [] for text in texts]
    print(f"labelling {len(texts)} text(s) with {model.source}", file=sys.stderr)
    cut = sum(len(i) > model.config.block_size - 2 for i in ids)
    if cut:
        print(f"note: {cut} text(s) longer than {model.config.block_size - 2} tokens are cut there", file=sys.stderr)
    for first in range(0, len(texts), batch_size):
        rows = encoder_rows(ids[first : first + batch_size], model.special, model.config.block_size).to(rt.device)
        with torch.no_grad():
            probs = torch.softmax(model(rows)[0].float(), dim=-1)  # (B, n_labels)
        best, label = probs.max(dim=-1)
        for n, (p, k) in enumerate(zip(best.tolist(), label.tolist(), strict=True)):
            print(f"{model.labels[k]}\t{p:.4f}" if texts[first + n].strip() else "")


def transduce_lines(cfg: SampleConfig, model, tokenizer, rt, batch_size: int = 64) -> None:
    """An encoder-decoder's output for --start, or one line for each line of --start=FILE: (a blank one for a blank
    one): each source read as `source </s>`, encoded once, its output decoded with the KV and cross-attention caches
    up to </s> or max_new_tokens, with the sampling controls, cut at the first --stop string; with --stream printed as
    it comes, one source at a time."""
    if not model.special:
        raise UserError(f"{model.source} is an encoder-decoder without its <pad> and </s> recorded")
    texts = read_prompt(cfg.start).splitlines() if cfg.start.startswith("FILE:") else [cfg.start]
    end, pad, stops = model.special["</s>"], model.special["<pad>"], parse_stops(cfg.stop)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repetition_penalty)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    print(f"transducing {len(texts)} source(s) with {model.source}", file=sys.stderr)
    batch_size = 1 if cfg.stream else batch_size
    for first in range(0, len(texts), batch_size):
        sources = [tokenizer.encode(text) for text in texts[first : first + batch_size]]
        rows = seq2seq.rows(sources, end, pad, model.config.block_size).to(rt.device)
        steps = transduce(
            model, rows, cfg.max_new_tokens, sampling, end, generator, cfg.kv_cache, tokenizer.vocab_size, cfg.compile
        )
        if cfg.stream:  # whole UTF-8 characters only, holding back what could begin a stop string
            pieces, text, shown = StreamDecoder(tokenizer.token_bytes), "", 0
            hold = max((len(stop) for stop in stops), default=1) - 1
            for token in (t for t in (step[0, 0].item() for step in steps) if t != pad):
                text, stopped = cut_at_stop(text + pieces.push(token) if token != end else text, stops)
                safe = len(text) if stopped or token == end else max(shown, len(text) - hold)
                print(text[shown:safe], end="", flush=True)
                shown = safe
                if stopped or token == end:
                    break
            print(flush=True)
            continue
        outputs = torch.cat(list(steps), dim=1).tolist()
        for text, output in zip(texts[first : first + batch_size], outputs, strict=True):
            ids = [t for t in output[: output.index(end) if end in output else None] if t != pad]
            print(cut_at_stop(tokenizer.decode(ids), stops)[0] if text.strip() else "")


def stream(steps, tokenizer, prompt: str, stops: list[str]) -> None:
    """Print one sample's text as tokens arrive: whole UTF-8 characters only, holding back a tail that could be the
    start of a stop string."""
    print(prompt, end="", flush=True)
    decoder, text, shown = StreamDecoder(tokenizer.token_bytes), "", 0
    hold = max((len(s) for s in stops), default=1) - 1
    for token in steps:
        text += decoder.push(token[0, 0].item())
        text, stopped = cut_at_stop(text, stops)
        safe = len(text) if stopped else max(shown, len(text) - hold)
        print(text[shown:safe], end="", flush=True)
        shown = safe
        if stopped:
            break
    else:
        text += decoder.flush()
        print(text[shown:], end="")
    print("\n---------------")


if __name__ == "__main__":
    run_cli(main)
