"""Conversations as tokens: the chat template, its special tokens and the loss mask.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}, the format of
Hugging Face chat datasets and fine-tuning APIs. Each message is rendered as

    <|role|> content <|end|>

where <|system|>, <|user|>, <|assistant|> and <|end|> are special tokens with ids just past the base tokenizer's
vocabulary (GPT-2's: 50257..50260), so no text can spell them. Training learns only the assistant's turns: its
content and the <|end|> that closes it (the loss mask); everything else is context. A prompt for a reply ends with
<|assistant|>, and the reply ends at <|end|>.
"""

from collections.abc import Callable

TEMPLATE = "nanogpt-chat/1"  # recorded in meta.json and checkpoints: the rendering below, by name
ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL = ("<|system|>", "<|user|>", "<|assistant|>", END)


def special_ids(base_vocab_size: int) -> dict[str, int]:
    """The special tokens' ids: the first ids past the base vocabulary."""
    return {token: base_vocab_size + i for i, token in enumerate(SPECIAL)}


def check_messages(row) -> list[dict]:
    """The row's messages, or ValueError saying what is wrong with them (the caller adds the row number)."""
    messages = row.get("messages") if isinstance(row, dict) else row
    if not isinstance(messages, list) or not messages:
        raise ValueError('no messages (expected {"messages": [{"role": ..., "content": ...}, ...]})')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"message {i + 1} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"message {i + 1} ({m['role']}) has no content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: there is nothing to learn from it")
    return messages


def render(
    messages: list[dict], encode: Callable[[str], list[int]], special: dict[str, int], reply: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation; mask[i] is 1 where token i is trained on (predicted from the tokens before it):
    an assistant's content and its <|end|>. reply=True appends <|assistant|>, the prompt for the next reply."""
    ids, mask = [], []
    for m in messages:
        body = encode(m["content"])
        learned = int(m["role"] == "assistant")
        ids += [special[f"<|{m['role']}|>"], *body, special[END]]
        mask += [0] + [learned] * (len(body) + 1)
    if reply:
        ids.append(special["<|assistant|>"])
        mask.append(0)
    return ids, mask


def jinja_template() -> str:
    """The same rendering as a Hugging Face `chat_template` (Jinja), for tokenizer.apply_chat_template: with
    add_generation_prompt=True it ends with <|assistant|>, as render(reply=True) does."""
    return (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END + "' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )


def prompt_ids(
    messages: list[dict], encode: Callable[[str], list[int]], special: dict[str, int], max_len: int
) -> tuple[list[int], int]:
    """The ids asking for the next assistant reply, and how many of the oldest messages were left out to keep them
    within max_len tokens: whole turns go, so what is left still starts with a user message, as in training. A system
    message is kept; the newest message always stays, cut from the left if it alone is too long."""
    kept = list(messages)
    ids = render(kept, encode, special, reply=True)[0]
    while len(ids) > max_len:
        first = 1 if kept[0]["role"] == "system" else 0
        if len(kept) - first <= 1:
            return ids[-max_len:], len(messages) - len(kept)
        del kept[first]
        while len(kept) - first > 1 and kept[first]["role"] != "user":  # the rest of that turn
            del kept[first]
        ids = render(kept, encode, special, reply=True)[0]
    return ids, len(messages) - len(kept)
