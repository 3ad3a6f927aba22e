"""Sequence-to-sequence data for encoder-decoders (arch=encoder_decoder), as T5 is trained (Raffel et al. 2020).

A seq2seq dataset (prepare/seq2seq.py) holds each split's sources one after another (<split>.bin, with
<split>.starts.bin: where each begins, then the end) and their targets likewise (<split>.target.bin,
<split>.target_starts.bin). Two special tokens, recorded in meta.json's "seq2seq": "<pad>" (padding, and the
decoder's start token, as T5's) and "</s>" (the end of a source or a target). Their ids follow the text's
vocabulary, or are a tokenizer.json's own when it has both (T5's SentencePiece vocabulary: 0 and 1).

A batch draws batch_size pairs from its key (training: seed, iteration, global micro-step, rollbacks; evaluation:
seed and batch number), so resume is exact and W ranks read what one process reads. Its rows are `source </s>` and
`target </s>`, each cut to block_size (the </s> kept) and padded: the source with <pad> (kept out of attention), the
target with -1 (out of the loss). The loss is the mean cross-entropy over the target tokens of the global batch.

Pretraining without pairs (SpanCorruption, train.py --objective=span_corruption) makes them from ordinary token files
as T5 does (Raffel et al. 2020, section 3.1.4): in a window of block_size - 1 tokens, 15% of the tokens, in spans of
mean length 3, are each replaced in the source by a sentinel (<extra_id_0>, <extra_id_1>, ...); the target is each
sentinel followed by the span it hides, then </s>. The spans are drawn from the batch's key, as the masks of an
encoder's batches. The 100 sentinels take the ids after <pad> and </s> (or a tokenizer.json's own <extra_id_N>).
"""

from dataclasses import dataclass

import numpy as np
import torch

from engine.data import TokenData, get_batch, to_device
from engine.tokenization import special_token_ids

SPECIAL = ("<pad>", "</s>")
SENTINELS = tuple(f"<extra_id_{i}>" for i in range(100))  # span corruption's, as T5's
NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0  # T5's span corruption: the share of tokens corrupted, the mean span length


def special_tokens(text_vocab_size: int, tokenizer_json: str | None = None, sentinels: bool = False) -> dict[str, int]:
    """<pad> and </s> (and with sentinels the 100 <extra_id_N>): a tokenizer.json's own when it has them all as added
    tokens (T5's), else the ids after the text's vocabulary, in that order."""
    return special_token_ids(SPECIAL + (SENTINELS if sentinels else ()), text_vocab_size, tokenizer_json)


def rows(sequences: list, end: int, fill: int, block_size: int) -> torch.Tensor:
    """(len(sequences), block_size) int64: each sequence of token ids then `end`, cut to block_size (the end kept),
    then `fill`."""
    out = torch.full((len(sequences), block_size), fill, dtype=torch.long)
    for r, ids in enumerate(sequences):
        ids = np.append(np.asarray(ids[: block_size - 1], dtype=np.int64), end)
        out[r, : len(ids)] = torch.from_numpy(ids)
    return out


def pairs_of(data: TokenData, split: str, picks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The source and target token ids of the split's pairs numbered picks."""
    out = []
    for part in ("", "target_"):
        tokens, starts = data.memmap(split, f"{part}file"), data.memmap(split, f"{part}starts_file")
        out.append([np.asarray(tokens[starts[i] : starts[i + 1]]) for i in picks])
    return out[0], out[1]


@dataclass(frozen=True)
class Pairs:
    """An encoder-decoder's batches: what Masking is to a masked-language model (train.py and
    engine/batch_schedule.py use either through batch() and count())."""

    data: TokenData  # its train split is what count() reads
    special: dict[str, int]  # <pad> and </s> (special_tokens)

    def picks(self, split: str, batch_size: int, key: tuple[int, ...]) -> np.ndarray:
        n = len(self.data.memmap(split, "starts_file")) - 1
        return np.random.default_rng(list(key)).integers(0, n, size=batch_size)

    def batch(self, data: TokenData, split: str, batch_size: int, block_size: int, key: tuple[int, ...], device: str):
        """(x (B, block_size) the sources, y (B, block_size) the targets, -1 after their end) on device."""
        sources, targets = pairs_of(data, split, self.picks(split, batch_size, key))
        pad, end = self.special["<pad>"], self.special["</s>"]
        x, y = rows(sources, end, pad, block_size), rows(targets, end, -1, block_size)
        return to_device(x, device), to_device(y, device)

    def count(self, batch_size: int, block_size: int, key: tuple[int, ...]) -> int:
        """The target tokens (</s> included) of the training batch of `key`, from the target starts alone."""
        starts = self.data.memmap("train", "target_starts_file")
        lengths = starts[1:] - starts[:-1]
        return int(np.minimum(lengths[self.picks("train", batch_size, key)] + 1, block_size).sum())


def span_lengths(n_tokens: int, key: tuple[int, ...], n_rows: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """T5's random spans for n_rows windows of n_tokens, from the key alone: (noise span lengths (n_rows, spans),
    the kept runs before each (n_rows, spans), and the noise and span counts, the same for every row). Each is a
    random split of the noise (and of the kept) tokens into `spans` positive parts."""
    noise = max(1, min(n_tokens - 1, round(n_tokens * NOISE_DENSITY)))
    spans = max(1, min(len(SENTINELS), round(noise / MEAN_SPAN)))
    seed = int(np.random.SeedSequence([*key, 0x5350414E]).generate_state(1, dtype=np.uint64)[0] >> 1)
    generator = torch.Generator().manual_seed(seed)

    def split(total: int) -> torch.Tensor:  # (n_rows, spans) positive parts summing to total: cuts at sorted points
        cuts = torch.rand(n_rows, total - 1, generator=generator).argsort(dim=1)[:, : spans - 1].sort(dim=1).values
        edges = torch.cat([torch.zeros(n_rows, 1, dtype=torch.long), cuts + 1, torch.full((n_rows, 1), total)], 1)
        return edges.diff(dim=1)

    return split(noise), split(n_tokens - noise), noise, spans


@dataclass(frozen=True)
class SpanCorruption:
    """An encoder-decoder's pretraining batches on plain token files: T5's span corruption (the module docstring)."""

    special: dict[str, int]  # <pad>, </s> and the sentinels (special_tokens(..., sentinels=True))

    def corrupt(self, windows: torch.Tensor, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources, targets) for windows (B, n) of token ids: the kept runs with a sentinel for each noise span, then
        </s>; and each sentinel followed by its span, then </s>. Each (B, n + 1 - noise + spans) and (B, noise +
        spans + 1): the same in every row."""
        noise_lengths, kept_lengths, _, spans = span_lengths(windows.size(1), key, windows.size(0))
        sentinel = [self.special[name] for name in SENTINELS[:spans]]
        sources, targets = [], []
        for row, noise, kept in zip(windows.tolist(), noise_lengths.tolist(), kept_lengths.tolist(), strict=True):
            source, target, at = [], [], 0
            for i in range(spans):  # a kept run, then a noise span (T5 starts with kept text)
                source += row[at : at + kept[i]] + [sentinel[i]]
                target += [sentinel[i]] + row[at + kept[i] : at + kept[i] + noise[i]]
                at += kept[i] + noise[i]
            sources.append(source + [self.special["</s>"]])
            targets.append(target + [self.special["</s>"]])
        return torch.tensor(sources), torch.tensor(targets)

    def batch(self, data: TokenData, split: str, batch_size: int, block_size: int, key: tuple[int, ...], device: str):
        """(sources, targets), each padded to (B, block_size), of windows of block_size - 1 tokens drawn from key."""
        windows, _ = get_batch(data, split, batch_size, block_size - 1, key, "cpu")
        sources, targets = self.corrupt(windows, key)
        x = torch.full((batch_size, block_size), self.special["<pad>"], dtype=torch.long)
        y = torch.full((batch_size, block_size), -1, dtype=torch.long)
        x[:, : sources.size(1)], y[:, : targets.size(1)] = sources, targets
        return to_device(x, device), to_device(y, device)

    def count(self, batch_size: int, block_size: int, key: tuple[int, ...]) -> int:
        """Every row's target has noise + spans + 1 tokens."""
        _, _, noise, spans = span_lengths(block_size - 1, key, 1)
        return batch_size * (noise + spans + 1)
