"""Multiple-choice benchmarks scored by log-likelihood, as lm-evaluation-harness scores them: HellaSwag and any
JSONL of (context, choices, label).

Each choice is the continuation " " + choice after the context. Its tokens are those of context + continuation past
the context's own tokens (the harness's _encode_pair: trailing spaces of the context move into the continuation), and
its score is the sum of the log-probabilities of those tokens, each given everything before it (the last block_size
tokens when the item is longer). An empty context is the end-of-text token, when the tokenizer has one.

    acc            the choice with the highest summed log-likelihood is the label
    acc_norm       the highest log-likelihood divided by the choice's length in characters (the harness's acc_norm)
    acc_per_token  the highest mean log-likelihood per token (llm.c's and nanochat's HellaSwag number)

HellaSwag rows are the dataset's own (ctx_a, ctx_b or ctx, activity_label, endings, label), preprocessed as the
harness does: "activity_label: ctx_a Ctx_b", with WikiHow's "[title]" and other bracketed markers removed.
"""

import itertools
import re
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from engine.data import Tokenizer
from engine.errors import UserError
from engine.schemas import MAX_TASK_LINE, ChoiceItem, HellaSwagRow, check, parse_json

TASKS = ("hellaswag", "choice")


@dataclass
class Item:
    context: str
    choices: list[str]
    label: int


def hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(row: dict) -> Item:
    """An Item from one of HellaSwag's rows (checked first against engine/schemas.py HellaSwagRow)."""
    split = row.get("ctx_a") is not None and row.get("ctx_b") is not None
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize() if split else row["ctx"]
    context = hellaswag_text(f"{row['activity_label']}: {ctx}" if row.get("activity_label") else ctx)
    return Item(context, [hellaswag_text(e) for e in row["endings"]], int(row["label"]))


def read_items(task: str, path: str | None, limit: int | None = None) -> list[Item]:
    """The task's items from a JSONL file: HellaSwag's own rows, or {"context", "choices", "label"} for choice.
    HellaSwag without a file is its validation split from the Hugging Face hub (Rowan/hellaswag, 10,042 items)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use {' or '.join(TASKS)}")
    if path is None:
        if task != "hellaswag":
            raise UserError(
                "the choice task needs its JSONL of context, choices, label: --task_file (--eval_task_file in train.py)"
            )
        try:
            import datasets

            rows = datasets.load_dataset("Rowan/hellaswag", split="validation")
        except Exception as e:  # offline, or the hub refused: say how to go on without it
            raise UserError(
                f"HellaSwag from the hub failed ({type(e).__name__}); download hellaswag_val.jsonl and give "
                "--task_file=hellaswag_val.jsonl"
            ) from None
        rows = itertools.islice(rows, limit)
        return [hellaswag_item(check(HellaSwagRow, row, f"Rowan/hellaswag row {n}")) for n, row in enumerate(rows, 1)]
    schema = HellaSwagRow if task == "hellaswag" else ChoiceItem
    fields = "ctx/ctx_a, endings, label" if task == "hellaswag" else "context, choices, label"
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for n in itertools.count(1):
                line = f.readline(MAX_TASK_LINE + 1)  # bounded: a file of one endless line is not read whole
                if not line:
                    break
                if len(line) > MAX_TASK_LINE:
                    raise UserError(f"{path}:{n}: longer than {MAX_TASK_LINE >> 20} MiB; each line is one item")
                if not line.strip():
                    continue
                where, fix = f"{path}:{n}", f"each line needs {fields}"
                row = check(schema, parse_json(line, where, fix), where, fix)
                items.append(hellaswag_item(row) if task == "hellaswag" else Item(**row))
                if limit is not None and len(items) >= limit:
                    break
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read --task_file={path} ({e.strerror})") from None
    if not items:
        raise UserError(f"{path} holds no items")
    return items


def encode_pair(encode, context: str, continuation: str, eot_id: int | None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    if not head and eot_id is not None:
        return [eot_id], whole
    return head, whole[len(head) :]


@torch.no_grad()
def choice_logprobs(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 8, autocast=None):
    """The summed log-probability and token count of each (context, continuation) request. Call under eval()."""
    device = model.lm_head.weight.device
    block = model.config.block_size
    out = []
    for i in range(0, len(requests), batch_size):
        group = requests[i : i + batch_size]
        rows = [(ctx + cont)[-(block + 1) :] for ctx, cont in group]  # the last block_size inputs and the target
        x = torch.zeros(len(rows), max(len(r) for r in rows) - 1, dtype=torch.long)
        for r, ids in enumerate(rows):
            x[r, : len(ids) - 1] = torch.tensor(ids[:-1])  # right-padded: causal attention never reads the padding
        with autocast() if autocast else torch.no_grad():
            logits, _ = model(x.to(device), all_logits=True)
        logp = F.log_softmax(logits.float(), dim=-1)
        for r, ((_, cont), ids) in enumerate(zip(group, rows, strict=True)):
            n = min(len(cont), len(ids) - 1)  # a continuation longer than block_size scores its last tokens
            targets = torch.tensor(ids[-n:], device=device)
            picked = logp[r, len(ids) - 1 - n : len(ids) - 1].gather(1, targets[:, None])
            out.append((picked.sum().item(), n))
    return out


def score(model, items: list[Item], encode, eot_id: int | None, batch_size: int = 8, autocast=None, progress=None):
    """{"acc", "acc_norm", "acc_per_token", "items"} over `items`, and each item's per-choice summed log-likelihoods."""
    requests = [encode_pair(encode, item.context, " " + choice, eot_id) for item in items for choice in item.choices]
    chunks = range(0, len(requests), batch_size * 8)  # chunk by chunk, so a progress bar can move
    scores = []
    for i in progress(chunks) if progress else chunks:
        scores += choice_logprobs(model, requests[i : i + batch_size * 8], batch_size, autocast)
    correct = {"acc": 0, "acc_norm": 0, "acc_per_token": 0}
    per_item, k = [], 0
    for item in items:
        ll = scores[k : k + len(item.choices)]
        k += len(item.choices)
        per_item.append([s for s, _ in ll])
        picks = {
            "acc": max(range(len(ll)), key=lambda j: ll[j][0]),
            "acc_norm": max(range(len(ll)), key=lambda j: ll[j][0] / max(1, len(item.choices[j]))),
            "acc_per_token": max(range(len(ll)), key=lambda j: ll[j][0] / ll[j][1]),
        }
        for name, pick in picks.items():
            correct[name] += pick == item.label
    return {name: c / len(items) for name, c in correct.items()} | {"items": len(items)}, per_item


def load_task(name: str, path: str | None, limit: int | None, data_meta: dict) -> tuple:
    """(items, encode, eot_id) of a benchmark for a run (train.py --eval_task), encoded with its dataset's tokenizer;
    read and checked before the run touches anything."""
    tokenizer = Tokenizer(data_meta)
    return read_items(name, path, limit), tokenizer.encode, tokenizer.eot_id


def task_record(model, name: str, task: tuple, batch_size: int, autocast, it: int) -> dict:
    """A benchmark's accuracies at iteration it, as a log record. Every rank scores every item (the same forward
    passes on each, which FSDP's all-gathers need), so all agree without a collective."""
    items, encode, eot_id = task
    model.eval()
    result, _ = score(model, items, encode, eot_id, batch_size, autocast)
    model.train()
    return {"iter": it, f"{name}_acc": result["acc"], f"{name}_acc_norm": result["acc_norm"], "task_items": len(items)}
