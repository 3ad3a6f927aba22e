"""Score any text with a model: loss, perplexity and bits per byte, with a sliding window over long text.

    python tools/evaluate.py --out_dir=out-shakespeare-char --text=data/shakespeare_char/input.txt
    python tools/evaluate.py --out_dir=out-shakespeare-char --tokens=data/shakespeare_char/val.bin --stride=64
    python tools/evaluate.py --init_from=gpt2 --text=essay.txt --surprisal=essay.jsonl   # per-token surprisal
    python tools/evaluate.py --init_from=path/to/hf_dir --tokens=data/openwebtext/val.bin --max_tokens=1000000
    python tools/evaluate.py --init_from=gpt2 --task=hellaswag --task_file=hellaswag_val.jsonl  # benchmark accuracy
    python tools/evaluate.py --out_dir=out --task=choice --task_file=my_questions.jsonl   # context, choices, label

--task scores a multiple-choice benchmark by log-likelihood as lm-evaluation-harness does (see engine/tasks.py) and
prints acc, acc_norm and the item count.

Every token after the first is scored once, predicted from the tokens before it. Text longer than block_size is read
in windows of block_size tokens that start every `stride` tokens (default block_size // 2); each window scores only
the tokens no earlier window scored, so every token gets at least block_size - stride tokens of context (all of it
near the start). This is the sliding-window perplexity of Hugging Face's "Perplexity of fixed-length models" guide;
stride = block_size gives plain non-overlapping chunks (faster, less context). A text file is scored as a document:
when the tokenizer has an end-of-text token, it is put before the text as context, so the first token is scored too.

    loss           mean negative log-likelihood of the scored tokens, in nats per token
    perplexity     exp(loss)
    bits per byte  loss * tokens / bytes / ln 2, bytes being the UTF-8 bytes of the scored tokens' text (end-of-text
                   markers count 0: they are document boundaries, not text). Unlike loss, it compares across
                   tokenizers.

--surprisal=FILE writes one JSON line per scored token: {"token": id, "text": its text, "surprisal_bits": -log2 p}.

An encoder (a run trained with --arch=encoder) has no next-token likelihoods. For --text it reports the
pseudo-log-likelihood (Salazar et al. 2020, "Masked Language Model Scoring"): the text is read in chunks of
block_size - 2 tokens, each as `[CLS] chunk [SEP]`, and every token of a chunk is masked in turn and scored by the
encoder's probability of it there ([CLS] and [SEP] never are); `pseudo-perplexity` is exp of minus its mean. For
--tokens it reports the masked-token loss and accuracy of training (engine/masking.py's 15% masks, drawn from a fixed
seed so that two runs compare) over windows of the split. A classifier (fine-tuned on prepare/classify.py's labelled
texts) is scored on every text of such a split, --tokens=data/<name>/val.bin: loss, accuracy and each label's count.

An encoder-decoder is scored on test pairs, --pairs=FILE (JSON lines {"source": ..., "target": ...}): each source's
greedy prediction, `exact match` (the share equal to the reference), `chrF` (character n-gram F-score, sacreBLEU's
default) and the target tokens' loss; --predictions=FILE writes each source, reference and prediction.
"""

import contextlib
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python tools/x.py works too
import engine.interrupts  # first: Ctrl-C is one line and exit 130 from here on, imports included  # noqa: F401

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from engine import seq2seq
from engine.classify import encoder_rows, texts_of
from engine.configurator import parse_config
from engine.data import Tokenizer, load_data
from engine.errors import UserError, run_cli
from engine.files import check_output, replacing
from engine.generate import Sampling, transduce
from engine.inference import load_for_inference, read_text
from engine.masking import Masking
from engine.memory import check_scoring_fits
from engine.runtime import setup_runtime
from engine.tasks import TASKS, read_items, score
from model import GPT


@dataclass
class EvaluateConfig:
    init_from: str = "resume"  # resume (from out_dir), gpt2, gpt2-medium, gpt2-large, gpt2-xl or a HF directory
    out_dir: str = "out"  # training output directory to load from when init_from=resume
    checkpoint: str = "latest"  # which checkpoint in out_dir: latest or best (lowest val loss)
    text: str | None = None  # a UTF-8 text file to score
    tokens: str | None = None  # or a prepared token file, e.g. data/shakespeare_char/val.bin (its meta.json beside it)
    pairs: str | None = None  # or an encoder-decoder's test pairs: a JSONL file of {"source": ..., "target": ...}
    predictions: str | None = None  # with pairs: write each source, reference and prediction to this JSONL file
    max_new_tokens: int = 256  # with pairs: the longest prediction, in tokens
    task: str | None = None  # or a multiple-choice benchmark: hellaswag, or choice (context, choices, label)
    task_file: str | None = None  # the task's JSONL (hellaswag: the dataset's rows; none = the hub's validation split)
    max_items: int | None = None  # score only the first this many task items; none = all
    max_tokens: int | None = None  # score only the first this many tokens; none = all
    stride: int | None = None  # sliding-window step in tokens, 1..block_size; none = block_size // 2
    batch_size: int = 4  # windows per forward pass
    surprisal: str | None = None  # write per-token surprisal as JSON lines to this file
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bf16 if supported, else fp16 on CUDA, fp32 elsewhere), float32, bfloat16, float16
    tokenizer_dir: str | None = None  # offline GPT-2 tokenizer: a directory with vocab.bpe and encoder.json
    weights: str = "raw"  # raw, or ema: the moving average of a run trained with --ema_decay

    def __post_init__(self):
        if sum(x is not None for x in (self.text, self.tokens, self.task, self.pairs)) != 1:
            raise ValueError("give exactly one of --text=FILE, --tokens=FILE, --pairs=FILE and --task=hellaswag|choice")
        if self.predictions is not None and self.pairs is None:
            raise ValueError("--predictions needs --pairs=FILE (an encoder-decoder's test pairs)")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task_file is not None and self.task is None:
            raise ValueError("--task_file needs --task=hellaswag or --task=choice")
        if self.batch_size < 1 or (self.stride is not None and self.stride < 1):
            raise ValueError("batch_size and stride must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError("max_tokens must be >= 2 (the first token is context)")


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over n tokens, whose n - 1 targets are t[j + 1] for j = 0..n-2. Each window is (begin, end,
    new): inputs t[begin:end] predict targets begin..end-1, of which new..end-1 are scored there for the first time."""
    if not 1 <= stride <= block_size:
        raise UserError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    out, begin, done = [], 0, 0
    while done < n - 1:
        end = min(begin + block_size, n - 1)
        out.append((begin, end, done))  # begin <= done because stride <= block_size
        done, begin = end, begin + stride
    return out


@torch.no_grad()
def token_nll(
    model: GPT, ids: torch.Tensor, stride: int, batch_size: int = 4, autocast=contextlib.nullcontext
) -> torch.Tensor:
    """Negative log-likelihood in nats, float32 (n - 1,), of each of ids[1:] (int64, (n,)) given the tokens before it
    within its sliding window. Call under eval()."""
    device = model.lm_head.weight.device
    nll = torch.empty(len(ids) - 1)
    plan = windows(len(ids), model.config.block_size, stride)
    for i in range(0, len(plan), batch_size):
        group = plan[i : i + batch_size]
        x = torch.zeros(len(group), max(end - begin for begin, end, _ in group), dtype=torch.long)
        for row, (begin, end, _) in enumerate(group):
            x[row, : end - begin] = ids[begin:end]  # right-padded: causal attention never reads the padding
        with autocast():
            logits, _ = model(x.to(device), all_logits=True)  # (rows, T, V)
        for row, (begin, end, new) in enumerate(group):
            scored = logits[row, new - begin : end - begin].float()  # (end - new, V)
            targets = ids[new + 1 : end + 1].to(device)
            nll[new:end] = F.cross_entropy(scored, targets, reduction="none").cpu()
    return nll


def text_bytes(tokenizer: Tokenizer, ids) -> int:
    """UTF-8 bytes of the text tokens stand for; end-of-text markers count 0."""
    unique, counts = np.unique(np.asarray(ids), return_counts=True)
    return int(
        sum(
            c * len(tokenizer.token_bytes(int(t))) for t, c in zip(unique, counts, strict=True) if t != tokenizer.eot_id
        )
    )


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """Nats per token -> bits per UTF-8 byte of the same text."""
    return loss * tokens / n_bytes / math.log(2)


def read_tokens(path: str, tokenizer: Tokenizer, tokenizer_dir: str | None):
    """(tokens, chat): the tokens of a prepared split, e.g. data/x/val.bin, checked against the model's tokenizer,
    and for a chat split (prepare/chat.py) its (mask, conversation starts), else None."""
    checked, split = read_split(path, tokenizer, tokenizer_dir)
    tokens = checked.memmap(split)
    if not checked.chat:
        return tokens, None
    return tokens, (np.array(checked.memmap(split, "mask_file")), np.array(checked.memmap(split, "starts_file")))


def read_split(path: str, tokenizer: Tokenizer, tokenizer_dir: str | None):
    """(the dataset, checked, and the name of its split whose token file `path` is), the split prepared with the
    model's tokenizer."""
    data_dir, file = os.path.split(path)
    data = load_data(data_dir or ".", 1, splits=())
    split = next((s for s, info in data.meta["splits"].items() if info["file"] == file), None)
    if split is None:
        raise UserError(f"{path} is not a split listed in {os.path.join(data_dir, 'meta.json')}")
    checked = load_data(data_dir or ".", 1, splits=(split,))  # checks the split, and keeps reading what it checked
    theirs = Tokenizer(data.meta, tokenizer_dir)
    hashes = {theirs.hash, tokenizer.hash} - {None}
    other_bpe = theirs.name == "tokenizer.json" and len(hashes) > 1  # two trained BPEs of one name, not the same
    if theirs.name != tokenizer.name or getattr(theirs, "itos", None) != getattr(tokenizer, "itos", None) or other_bpe:
        raise UserError(f"{path} was tokenized with {theirs.name}, not the model's {tokenizer.name} vocabulary")
    return checked, split


def chat_nll(model: GPT, tokens, mask, starts, stride: int, batch_size: int, autocast) -> torch.Tensor:
    """The negative log-likelihoods of a chat split's assistant tokens (the ones training learns), each conversation
    scored on its own from its first token."""
    out = []
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        ids = torch.from_numpy(np.asarray(tokens[a:b], dtype=np.int64))
        nll = token_nll(model, ids, stride, batch_size, autocast)
        out.append(nll[torch.from_numpy(mask[a + 1 : b] == 1)])
    return torch.cat(out)


@torch.no_grad()
def pseudo_nll(model: GPT, ids: torch.Tensor, special: dict, batch_size: int, autocast) -> torch.Tensor:
    """Minus the pseudo-log-likelihood, in nats, of each of ids (int64, (n,)): chunks of block_size - 2 tokens read
    as `[CLS] chunk [SEP]`, each token masked in turn (one row per token) and scored by the encoder's log-probability
    of it there, over its whole vocabulary. Call under eval()."""
    device, chunk = model.lm_head.weight.device, model.config.block_size - 2
    nll = torch.empty(len(ids))
    rows = [(begin, i) for begin in range(0, len(ids), chunk) for i in range(begin, min(begin + chunk, len(ids)))]
    for g in range(0, len(rows), batch_size):
        group = rows[g : g + batch_size]
        width = max(min(begin + chunk, len(ids)) - begin for begin, _ in group) + 2
        x = torch.full((len(group), width), special["[PAD]"], dtype=torch.long)
        for row, (begin, i) in enumerate(group):
            end = min(begin + chunk, len(ids))
            x[row, : end - begin + 2] = torch.cat(
                [torch.tensor([special["[CLS]"]]), ids[begin:end], torch.tensor([special["[SEP]"]])]
            )
            x[row, i - begin + 1] = special["[MASK]"]
        with autocast():
            logits, _ = model(x.to(device), padding_mask=(x != special["[PAD]"]).to(device))
        at = torch.tensor([i - begin + 1 for begin, i in group], device=device)
        scored = logits[torch.arange(len(group), device=device), at].float()  # (rows, V)
        nll[[i for _, i in group]] = F.cross_entropy(
            scored, ids[[i for _, i in group]].to(device), reduction="none"
        ).cpu()
    return nll


@torch.no_grad()
def masked_scores(model: GPT, tokens, masking: Masking, batch_size: int, max_tokens: int | None, autocast) -> tuple:
    """(masked-token loss, accuracy, masked tokens scored) of training's masking over consecutive windows of tokens,
    masks drawn from a fixed seed: the same for every model and run."""
    device, width = model.lm_head.weight.device, model.config.block_size - 2
    n = min(len(tokens), max_tokens or len(tokens)) // width
    if n == 0:
        raise UserError(f"fewer than {width} tokens: not one window of block_size - 2 to score")
    total = torch.zeros(3)  # loss sum, count, right
    for b, first in enumerate(range(0, n, batch_size)):
        rows = range(first, min(first + batch_size, n))
        text = torch.from_numpy(
            np.stack([np.asarray(tokens[r * width : (r + 1) * width], dtype=np.int64) for r in rows])
        )
        x, y = masking.mask(text, (0, 2, b))
        with autocast():
            logits, loss = model(x.to(device), y.to(device), reduction="sum")
        chosen = y.to(device) >= 0
        right = (logits.argmax(-1) == y.to(device))[chosen].sum()
        total += torch.stack([loss.float().cpu(), chosen.sum().cpu().float(), right.cpu().float()])
    return (total[0] / total[1]).item(), (total[2] / total[1]).item(), int(total[1])


@torch.no_grad()
def label_scores(model: GPT, data, split: str, batch_size: int, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(each text's label log-probabilities (N, n_labels), its true label (N,)) over every text of a classification
    split, in order, each read as `[CLS] text [SEP]` as in training."""
    n, device = len(data.memmap(split, "starts_file")) - 1, model.transformer.wte.weight.device
    out = []
    for first in tqdm(range(0, n, batch_size), desc="labelling", unit="batch"):
        texts = texts_of(data, split, range(first, min(n, first + batch_size)))
        with autocast():
            logits = model(encoder_rows(texts, model.special, model.config.block_size).to(device))[0]
        out.append(F.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out), torch.from_numpy(np.array(data.memmap(split, "labels_file")))


def evaluate_classifier(cfg: EvaluateConfig, model: GPT, tokenizer, rt) -> dict:
    """A classifier's scores on every text of a classification split: loss and accuracy, and each label's recall."""
    if cfg.tokens is None:
        raise UserError("a classifier is scored on labelled texts: --tokens=data/<name>/val.bin (prepare/classify.py)")
    data, split = read_split(cfg.tokens, tokenizer, cfg.tokenizer_dir)
    if not data.classify or data.classify["labels"] != model.labels:
        raise UserError(f"{cfg.tokens} is not labelled with the classifier's labels ({', '.join(model.labels)})")
    logp, labels = label_scores(model.eval(), data, split, cfg.batch_size, rt.autocast)
    loss = F.nll_loss(logp, labels).item()
    right = logp.argmax(-1) == labels
    print(f"scored {len(labels):,} texts of {cfg.tokens}")
    print(f"loss {loss:.6f} nats/text")
    print(f"accuracy {right.float().mean().item():.6f}")
    recall = {}
    for k, name in enumerate(model.labels):
        of = labels == k
        recall[name] = right[of].float().mean().item() if of.any() else None
        print(f"  {name}: {int(of.sum()):,} texts, {int(right[of].sum()):,} right")
    return {"loss": loss, "accuracy": right.float().mean().item(), "recall": recall}


def evaluate_encoder(cfg: EvaluateConfig, model: GPT, tokenizer, rt) -> dict:
    """An encoder's scores: pseudo-perplexity of --text, masked-token loss and accuracy of --tokens."""
    if cfg.task is not None or cfg.surprisal:
        raise UserError(f"{model.source} is an encoder: --task and --surprisal score a decoder's next tokens")
    if not model.special:
        raise UserError(f"{model.source} is an encoder without its special tokens recorded; use a run of train.py")
    if model.config.n_labels:
        return evaluate_classifier(cfg, model, tokenizer, rt)
    model.eval()
    if cfg.text is not None:
        ids = torch.tensor(tokenizer.encode(read_text(cfg.text, "text file"))[: cfg.max_tokens], dtype=torch.long)
        if len(ids) == 0:
            raise UserError(f"{cfg.text} holds no text to score")
        nll = pseudo_nll(model, ids, model.special, cfg.batch_size, rt.autocast)
        pll = -nll.sum().item()
        print(f"scored {len(ids):,} tokens in chunks of {model.config.block_size - 2}, each masked in turn")
        print(f"pseudo-log-likelihood {pll:.6f} nats ({-pll / len(ids):.6f} per token)")
        print(f"pseudo-perplexity {math.exp(-pll / len(ids)):.6f}")
        return {"pseudo_log_likelihood": pll, "pseudo_perplexity": math.exp(-pll / len(ids))}
    tokens, chat = read_tokens(cfg.tokens, tokenizer, cfg.tokenizer_dir)
    if chat is not None:
        raise UserError(f"{cfg.tokens} is a chat split, for decoders; score an encoder on plain token files")
    masking = Masking(tokenizer.vocab_size, special=model.special)
    loss, accuracy, count = masked_scores(model, tokens, masking, cfg.batch_size, cfg.max_tokens, rt.autocast)
    print(f"scored {count:,} masked tokens ({masking.probability:.0%} of windows of {model.config.block_size - 2})")
    print(f"masked-token loss {loss:.6f} nats/token")
    print(f"masked-token accuracy {accuracy:.6f}")
    return {"loss": loss, "accuracy": accuracy}


def chrf(hypotheses: list[str], references: list[str], order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation") as sacreBLEU computes it by
    default: character n-grams of orders 1..order with whitespace removed, matched within each pair (clipped counts;
    none of an order whose reference has none) and summed over the corpus; precision and recall averaged over the
    orders both sides have n-grams of; their F-beta (beta 2: recall counts twice), times 100."""
    totals = [[0, 0, 0] for _ in range(order)]  # per order: hypothesis n-grams, reference n-grams, matches
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        h, r = "".join(hypothesis.split()), "".join(reference.split())
        for n, total in enumerate(totals, 1):
            hc, rc = (Counter(t[i : i + n] for i in range(len(t) - n + 1)) for t in (h, r))
            if rc:  # (a pair whose reference has no n-gram of this order adds none of the hypothesis's)
                total[0], total[1], total[2] = (
                    total[0] + hc.total(),
                    total[1] + rc.total(),
                    total[2] + (hc & rc).total(),
                )
    kept = [(m / nh, m / nr) for nh, nr, m in totals if nh > 0 and nr > 0]
    if not kept:
        return 0.0
    precision, recall = (sum(x) / len(kept) for x in zip(*kept, strict=True))
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


PAIR_KEYS = ("source", "target")  # a --pairs line's


def evaluate_pairs(cfg: EvaluateConfig, model: GPT, tokenizer, rt) -> dict:
    """An encoder-decoder on test pairs: each source's greedy prediction (up to </s>), the exact-match share and chrF
    against the references, and the target tokens' loss under teacher forcing (</s> included)."""
    if model.config.arch != "encoder_decoder" or not model.special:
        raise UserError(f"--pairs scores an encoder-decoder's predictions; {model.source} is not one of our runs'")
    rows = []
    for n, line in enumerate(read_text(cfg.pairs, "pairs file").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError as e:
            raise UserError(f"{cfg.pairs}:{n}: not valid JSON ({e}); fix or remove that line") from None
        if row is not None and not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in PAIR_KEYS)):
            raise UserError(f'{cfg.pairs}:{n}: not a JSON object with string "source" and "target"')
        rows += [row] if row is not None else []
    if not rows:
        raise UserError(f"{cfg.pairs} holds no pairs")
    end, pad, block = model.special["</s>"], model.special["<pad>"], model.config.block_size
    predictions, nll, count = [], 0.0, 0
    model.eval()
    for first in tqdm(range(0, len(rows), cfg.batch_size), desc="transducing", unit="batch"):
        batch = rows[first : first + cfg.batch_size]
        source = seq2seq.rows([tokenizer.encode(r["source"]) for r in batch], end, pad, block).to(rt.device)
        target = seq2seq.rows([tokenizer.encode(r["target"]) for r in batch], end, -1, block).to(rt.device)
        with torch.no_grad(), rt.autocast():
            nll += model(source, target, reduction="sum")[1].item()
            steps = transduce(
                model, source, cfg.max_new_tokens, Sampling(temperature=0), end, vocab_size=tokenizer.vocab_size
            )
            outputs = torch.cat(list(steps), dim=1).tolist()
        count += int((target >= 0).sum())
        for output in outputs:
            predictions.append(
                tokenizer.decode([t for t in output[: output.index(end) if end in output else None] if t != pad])
            )
    references = [r["target"] for r in rows]
    exact = sum(p == r for p, r in zip(predictions, references, strict=True)) / len(rows)
    score, loss = chrf(predictions, references), nll / count
    print(f"scored {len(rows):,} pairs of {cfg.pairs} (greedy predictions)")
    print(f"exact match {exact:.6f}")
    print(f"chrF {score:.4f}")
    print(f"loss {loss:.6f} nats/target token")
    if cfg.predictions:
        with replacing(cfg.predictions) as f:  # whole or not at all
            for row, prediction in zip(rows, predictions, strict=True):
                line = {"source": row["source"], "reference": row["target"], "prediction": prediction}
                f.write((json.dumps(line) + "\n").encode("utf-8"))
        print(f"wrote each source, reference and prediction to {cfg.predictions}")
    return {"exact_match": exact, "chrf": score, "loss": loss, "predictions": predictions}


def main(argv=None):
    cfg = parse_config(EvaluateConfig, argv, usage=__doc__)
    if cfg.surprisal:
        check_output(cfg.surprisal, "--surprisal", inputs=(cfg.text, cfg.tokens))
    if cfg.predictions:
        check_output(cfg.predictions, "--predictions", inputs=(cfg.pairs,))
    rt = setup_runtime(cfg.device, cfg.dtype)
    model, tokenizer = load_for_inference(
        cfg.init_from, cfg.out_dir, cfg.checkpoint, cfg.tokenizer_dir, weights=cfg.weights
    )
    model.to(rt.device)
    if cfg.pairs is not None or model.config.arch == "encoder_decoder":
        if cfg.pairs is None:
            raise UserError(f"{model.source} is an encoder-decoder: score it on test pairs, --pairs=FILE")
        return evaluate_pairs(cfg, model, tokenizer, rt)
    if model.config.arch == "encoder":  # its scores are of masked tokens, not of next tokens
        return evaluate_encoder(cfg, model, tokenizer, rt)
    if cfg.task is not None:
        items = read_items(cfg.task, cfg.task_file, cfg.max_items)
        check_scoring_fits(model.config, rt.device, min(cfg.batch_size, 4 * len(items)), rt.dtype.itemsize)
        bar = lambda chunks: tqdm(chunks, desc=f"scoring {cfg.task}", unit="chunk")  # noqa: E731
        result, _ = score(model.eval(), items, tokenizer.encode, tokenizer.eot_id, cfg.batch_size, rt.autocast, bar)
        print(
            f"{cfg.task}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} ({result['items']:,} items; "
            f"acc_per_token {result['acc_per_token']:.4f}, llm.c's variant)"
        )
        return result
    if cfg.text is not None:
        ids = tokenizer.encode(read_text(cfg.text, "text file"))
        if tokenizer.eot_id is not None:
            ids = [tokenizer.eot_id, *ids]  # a document starts after an end-of-text token, as in training data
    else:
        ids, chat = read_tokens(cfg.tokens, tokenizer, cfg.tokenizer_dir)
        if chat is not None:  # the masked loss: what fine-tuning on the split minimises
            block_size = model.config.block_size
            windows = len(ids) // (cfg.stride or max(1, block_size // 2)) + 1
            check_scoring_fits(model.config, rt.device, min(cfg.batch_size, windows), rt.dtype.itemsize)
            nll = chat_nll(model, ids, *chat, cfg.stride or max(1, block_size // 2), cfg.batch_size, rt.autocast)
            loss = nll.mean().item()
            print(f"scored the {len(nll):,} assistant tokens of {len(chat[1]) - 1:,} conversations (the chat mask)")
            print(f"loss {loss:.6f} nats/token")
            print(f"perplexity {math.exp(loss):.6f}")
            return
    ids = torch.from_numpy(np.asarray(ids[: cfg.max_tokens], dtype=np.int64))
    if len(ids) < 2:
        raise UserError("fewer than 2 tokens: nothing to score")
    if int(ids.max()) >= model.config.vocab_size:
        raise UserError(f"token id {int(ids.max())} is outside the model's vocabulary of {model.config.vocab_size}")
    block_size = model.config.block_size
    stride = cfg.stride or max(1, block_size // 2)
    check_scoring_fits(model.config, rt.device, min(cfg.batch_size, len(ids) // stride + 1), rt.dtype.itemsize)

    nll = token_nll(model, ids, stride, cfg.batch_size, rt.autocast)
    targets = ids[1:]
    loss, n_bytes = nll.mean().item(), text_bytes(tokenizer, targets.numpy())
    print(f"scored {len(nll):,} tokens ({n_bytes:,} bytes) with block_size {block_size}, stride {stride}")
    print(f"loss {loss:.6f} nats/token")
    print(f"perplexity {math.exp(loss):.6f}")
    print(f"bits per byte {bits_per_byte(loss, len(nll), n_bytes):.6f}" if n_bytes else "bits per byte: no text")
    if cfg.surprisal:
        with replacing(cfg.surprisal) as f:  # whole or not at all; a full disk is one line
            for token, value in zip(targets.tolist(), nll.tolist(), strict=True):
                text = tokenizer.token_bytes(token).decode("utf-8", errors="replace")
                row = {"token": token, "text": text, "surprisal_bits": value / math.log(2)}
                f.write((json.dumps(row) + "\n").encode("utf-8"))
        print(f"wrote per-token surprisal to {cfg.surprisal}")


if __name__ == "__main__":
    run_cli(main)
