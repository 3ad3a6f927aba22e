"""Masked-language-model batches for encoders (arch=encoder), as BERT trains them (Devlin et al. 2019, section 3.1).

An encoder reads `[CLS] tokens [SEP]`: a window of block_size - 2 tokens of the token files between the two. Of the
text tokens (never [CLS] or [SEP]) each is chosen with probability mlm_probability (15%); a chosen token is the target
at its position, and in the input becomes [MASK] (80% of the chosen), a random token of the text's vocabulary (10%),
or stays itself (10%). The loss is the cross-entropy at the chosen positions. Every draw comes from the batch's key
(training: seed, iteration, global micro-step, rollbacks; evaluation: seed and batch number), so a resumed run masks
what an uninterrupted one masks, and W ranks mask what one process masks.

The special tokens take the ids after the text's vocabulary (special_tokens): for GPT-2's BPE 50257 to 50260, inside
the padded 50304; for a character vocabulary or our own BPE the next four ids. A tokenizer.json that has all four
itself (BERT's WordPiece vocabularies) keeps its own ids. The model's vocabulary holds them.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.data import get_batch, to_device
from engine.tokenization import added_token_ids, special_token_ids

SPECIAL = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens: [MASK], a random token; the rest stay themselves


def special_tokens(text_vocab_size: int, tokenizer_json: str | None = None) -> dict[str, int]:
    """The encoder's special tokens, in SPECIAL's order: a tokenizer.json's own when it has all four
    (tokenizer_json: its text, as a dataset's meta records it), else the ids after the text's vocabulary."""
    return special_token_ids(SPECIAL, text_vocab_size, tokenizer_json)


def own_special_tokens(tokenizer_json: str | None) -> dict[str, int] | None:
    """A tokenizer.json's [CLS], [SEP], [MASK] and [PAD] ids when it has all four as added tokens, else None."""
    return added_token_ids(tokenizer_json, SPECIAL)


def token_ids_needed(text_vocab_size: int, arch: str, tokenizer_json: str | None = None) -> int:
    """The ids a model of `arch` needs for a dataset of text_vocab_size: an encoder's special tokens too."""
    if arch != "encoder":
        return text_vocab_size
    return max(text_vocab_size, 1 + max(special_tokens(text_vocab_size, tokenizer_json).values()))


@dataclass(frozen=True)
class Masking:
    text_vocab_size: int  # the dataset's vocabulary: random replacements come from it
    probability: float = 0.15  # mlm_probability
    special: dict[str, int] = field(default=None)  # none = special_tokens(text_vocab_size): the ids after it

    def __post_init__(self):
        if self.special is None:
            object.__setattr__(self, "special", special_tokens(self.text_vocab_size))

    def draws(self, key: tuple[int, ...], shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """(chosen, replacement draw, random ids) for `shape` text tokens, from the key alone."""
        seed = int(np.random.SeedSequence([*key, 0x4D4C4D]).generate_state(1, dtype=np.uint64)[0] >> 1)
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.rand(shape, generator=generator) < self.probability
        how = torch.rand(shape, generator=generator)
        random_ids = torch.randint(0, self.text_vocab_size, shape, generator=generator)
        return chosen, how, random_ids

    def mask(self, text: torch.Tensor, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, n + 2), for text (B, n) CPU token ids: `[CLS] text [SEP]` with the chosen
        tokens replaced, and the chosen tokens' ids as targets (-1 elsewhere, [CLS] and [SEP] included)."""
        chosen, how, random_ids = self.draws(key, tuple(text.shape))
        inputs = torch.where(chosen & (how < MASK_SHARE), self.special["[MASK]"], text)
        inputs = torch.where(chosen & (how >= MASK_SHARE) & (how < MASK_SHARE + RANDOM_SHARE), random_ids, inputs)
        targets = torch.where(chosen, text, -1)
        B = text.size(0)
        cls, sep = torch.full((B, 1), self.special["[CLS]"]), torch.full((B, 1), self.special["[SEP]"])
        none = torch.full((B, 1), -1)
        return torch.cat([cls, inputs, sep], 1), torch.cat([none, targets, none], 1)

    def batch(self, data, split: str, batch_size: int, block_size: int, key: tuple[int, ...], device: str):
        """The masked batch of `key`: (x, y), each (B, block_size) on device."""
        text, _ = get_batch(data, split, batch_size, block_size - 2, key, "cpu")
        x, y = self.mask(text, key)
        return to_device(x, device), to_device(y, device)

    def count(self, batch_size: int, block_size: int, key: tuple[int, ...]) -> int:
        """How many targets the batch of `key` has (the tokens chosen), without reading any data."""
        return int(self.draws(key, (batch_size, block_size - 2))[0].sum())
