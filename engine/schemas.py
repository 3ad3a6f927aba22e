"""The shape of every file this code reads but may not have written, checked before anything uses it.

A dataset's meta.json, a checkpoint's meta.json and state.pt, a Hugging Face config.json, a tokenizer.json, a task
file and a nanoGPT ckpt.pt may come from another version of this code, another program, a damaged disk or someone
hostile. Each reader parses the file (read_json; torch.load with weights_only=True), then check()s it against its
pydantic model here before using any of it. A value of the wrong type, shape, name or size is one UserError line,
`<file>: <field>: <problem>`, instead of a crash deep in the model, a Rust panic in the tokenizers library or a
write to a path the file chose.

The models are strict where a wrong value would crash or mislead later (types, ranges, ids within the vocabulary,
sizes bounded so arithmetic on them stays exact, file names that cannot leave their directory, regexes that cannot
backtrack without end) and lenient where older files of ours lack newer fields (those default). Keys a model does
not name are ignored, as the readers always have; a checkpoint's model_config is the exception (a key this code does
not know is a newer version's, refused by engine/checkpoint.py). Every check is cheap: they run on every load.
"""

import json
import math
import reprlib
import sys
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from engine import chat
from engine.errors import UserError

DATASET_FORMAT = "nanogpt-tokens/1"  # the token-file contract's name and version (engine/data.py)
MAX_SIZE = 2**53  # model sizes and counts: exact in a float64, so every product of them stays a finite number
MAX_JSON_BYTES = 16 << 20  # meta.json, config.json: a chars list of a million characters is 4 MiB
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json: Llama 3's is 9 MB, Gemma 3's 33 MB
MAX_TASK_LINE = 1 << 20  # one item of a task file: a HellaSwag row is under 2 kB
MAX_PATTERN = 1024  # a tokenizer regex: GPT-2's is 80 characters, o200k's 330
MAX_NESTING = 32  # a tokenizer component inside Sequence components: real ones nest 2 deep


class SchemaError(UserError, ValueError):
    """An untrusted file without the shape its reader needs. A ValueError too, so code that treats an unreadable file
    as absent (the val loss of each checkpoint, when picking the best) treats this one so."""


# --- reading and checking -----------------------------------------------------------------------------------------


def read_text(path: str, limit: int, fix: str = "") -> str:
    """The UTF-8 text of the file at `path`, at most `limit` bytes. Any failure is one SchemaError line, ending with
    `fix`, what to do about it."""
    fix = f"; {fix}" if fix else ""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)  # a file that grows while it is read is still bounded
    except OSError as e:
        raise SchemaError(f"cannot read {_printable(path)} ({e.strerror or type(e).__name__}){fix}") from None
    if len(raw) > limit:
        raise SchemaError(f"{_printable(path)}: larger than {limit >> 20} MiB, more than it can hold{fix}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(f"{_printable(path)}: not UTF-8 text (byte {e.start}){fix}") from None


def read_json(path: str, fix: str = "", limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of the file at `path`, at most `limit` bytes of UTF-8. Any failure is one SchemaError line."""
    return parse_json(read_text(path, limit, fix), path, fix)


def parse_json(text: str, file: str, fix: str = "") -> Any:
    """The parsed JSON `text` of `file`. NaN and Infinity parse (Python writes them); deep nesting and huge integers
    are one SchemaError line."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an int of 4,300+ digits, nesting past the stack
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SchemaError(f"{_printable(file)}: invalid JSON ({detail})" + (f"; {fix}" if fix else "")) from None


def check(schema: type[BaseModel], value: Any, file: str, fix: str = "") -> Any:
    """`value` itself (parsed from `file`) when it has the shape of `schema`, else a SchemaError line naming the file,
    the field and the problem (the first one found), followed by `fix`, what to do about it."""
    try:
        schema.model_validate(value)
    except ValidationError as e:
        raise SchemaError(describe(e.errors()[0], file, fix)) from None
    except RecursionError:  # a structure nested past Python's stack, in a field typed Any
        raise SchemaError(f"{_printable(file)}: nested too deeply" + (f"; {fix}" if fix else "")) from None
    return value


def describe(error: dict, file: str, fix: str = "") -> str:
    """One line from one of pydantic's errors: `<file>: <field path>: <problem> (found <value>)[; <fix>]`."""
    path = ".".join(label(part) for part in error["loc"])
    problem = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    field, sep, rest = problem.partition(": ")
    if error["type"] == "value_error" and sep and field and not any(c.isspace() for c in field):
        path, problem = ".".join(part for part in (path, field) if part), rest  # a model's check names its field
    problem = problem[:1].lower() + problem[1:]
    if error["type"] not in ("value_error", "assertion_error", "missing") and "input" in error:
        problem += f" (found {short(error['input'])})"
    line = ": ".join(part for part in (_printable(file), path, problem) if part)
    return f"{line}; {fix}" if fix else line


_REPR = reprlib.Repr()  # (keyword arguments need Python 3.12)
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel, _REPR.maxlong = 40, 40, 4, 3, 2, 40


def short(value: Any) -> str:
    """A value as it appears in a message: short, on one line, and cheap however large the value is."""
    if _is_tensor(value):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int too long to print
        text = f"an int of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def label(part: str | int) -> str:
    """A field path's part: names as they are, keys from the file short and printable."""
    text = str(part)
    return text if text.isprintable() and len(text) <= 40 else short(text)


def _printable(file: str) -> str:
    return file if file.isprintable() else repr(file)


# --- the field types shared by the files ----------------------------------------------------------------------------


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(f"should be a finite number, not {x}")
    return x


def _plain_name(name: str) -> str:
    """A file or directory name inside the directory that names it: never a path that leads elsewhere."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or len(name) > 255:
        raise ValueError(f"should be a plain file or directory name (no separators, not '.' or '..'), not {name!r}")
    return name


def _whole_number(value: Any) -> Any:
    """HellaSwag's labels are strings of digits ("1"): as the number they spell."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 9:
        return int(value)
    return value


def _is_tensor(x: Any) -> bool:
    """Whether x is a torch.Tensor, without importing torch (the prepare scripts never load it): there is no tensor
    before torch is imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor(t: Any) -> Any:
    if not _is_tensor(t):
        raise ValueError(f"should be a tensor, not {short(t)}")
    return t


def _tensor_or_number(x: Any) -> Any:
    if not (_is_tensor(x) or isinstance(x, (int, float))) or isinstance(x, bool):
        raise ValueError(f"should be a tensor or a number, not {short(x)}")
    return x


Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]
Count = Annotated[int, Field(ge=0, le=MAX_SIZE)]
TokenId = Annotated[int, Field(ge=0, lt=2**32)]  # uint32 token files hold ids below 2**32
Finite = Annotated[float, AfterValidator(_finite)]
Loss = float  # as recorded: +inf stands for "none measured yet", NaN for an evaluation of a diverging run
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
PlainName = Annotated[str, AfterValidator(_plain_name)]
Text = Annotated[str, Field(max_length=1 << 16)]
Tensor = Annotated[Any, AfterValidator(_tensor)]
TensorOrNumber = Annotated[Any, AfterValidator(_tensor_or_number)]


class Shape(BaseModel):
    """The base of every model: JSON types exactly (no "3" for 3, no true for 1), other keys ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", arbitrary_types_allowed=True)


# --- a dataset's meta.json (prepare/ writes it; engine/data.py reads it) ----------------------------------------------


class ChatEntry(Shape):
    """A chat dataset's template and its special tokens' ids (engine/chat.py)."""

    template: Literal[chat.TEMPLATE]
    special: dict[str, TokenId]

    @model_validator(mode="after")
    def _the_template_tokens(self):
        if set(self.special) != set(chat.SPECIAL):
            raise ValueError(f"special: should name {', '.join(chat.SPECIAL)}, not {short(list(self.special))}")
        if len(set(self.special.values())) != len(self.special):
            raise ValueError("special: two tokens share an id")
        return self


class ClassifyEntry(Shape):
    """A classification dataset's labels (prepare/classify.py), in label-index order: distinct, and at least two."""

    labels: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=1000)]], Field(min_length=2, max_length=1 << 16)
    ]

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: lists a label twice")
        return self


class Seq2SeqEntry(Shape):
    """A seq2seq dataset's special tokens (engine/seq2seq.py): <pad> and </s>, two ids."""

    special: dict[str, TokenId]

    @model_validator(mode="after")
    def _both(self):
        if set(self.special) != {"<pad>", "</s>"} or len(set(self.special.values())) != 2:
            raise ValueError("special: should give <pad> and </s> two ids")
        return self


class SplitEntry(Shape):
    file: PlainName
    tokens: Count
    sha256: Sha256 | None = None
    documents: Count | None = None
    trained_tokens: Count | None = None  # chat splits, and their two files (absent, or a name: never null)
    mask_file: PlainName = Field(default=None)
    starts_file: PlainName = Field(default=None)
    mask_sha256: Sha256 | None = None
    starts_sha256: Sha256 | None = None
    labels_file: PlainName = Field(default=None)  # classification splits
    labels_sha256: Sha256 | None = None
    target_file: PlainName = Field(default=None)  # seq2seq splits: the targets (the sources are file, starts_file)
    target_starts_file: PlainName = Field(default=None)
    target_tokens: Count | None = None
    target_sha256: Sha256 | None = None
    target_starts_sha256: Sha256 | None = None


def _ids_in_vocabulary(vocab_size: int | None, eot_id: int | None, chat_entry: ChatEntry | None) -> None:
    """The end-of-text and chat token ids a tokenizer entry records are ids of its vocabulary, the chat tokens' the
    last ones."""
    if vocab_size is None:
        return
    if eot_id is not None and eot_id >= vocab_size:
        raise ValueError(f"eot_id: {eot_id} is outside the vocabulary of {vocab_size}")
    for token, i in chat_entry.special.items() if chat_entry else ():
        if i >= vocab_size:
            raise ValueError(f"chat.special.{token}: {i} is outside the vocabulary of {vocab_size}")
    if chat_entry and chat_entry.special != chat.special_ids(vocab_size - len(chat.SPECIAL)):
        # engine/chat.py gives them the last ids, in its order: an id among the base vocabulary's would not decode
        raise ValueError(f"chat.special: should be the last {len(chat.SPECIAL)} ids of the vocabulary, in order")


def _char_vocabulary(chars: str | None, vocab_size: int | None, *entries) -> None:
    """A character vocabulary, with the chat or seq2seq tokens (entries: ChatEntry or Seq2SeqEntry, or None), makes
    up the whole vocabulary: an id past it would not decode."""
    if chars is None:
        raise ValueError("chars: required for the char tokenizer")
    specials = sum(len(entry.special) for entry in entries if entry)
    if vocab_size is not None and vocab_size != len(chars) + specials:
        raise ValueError(
            f"vocab_size: {vocab_size}, but chars holds {len(chars)} characters and {specials} special tokens"
        )


class DatasetMeta(Shape):
    """data/<name>/meta.json, as prepare/token_writer.py writes it (engine/data.py's docstring lists the fields)."""

    format: Literal[DATASET_FORMAT]
    tokenizer: Annotated[str, Field(min_length=1, max_length=256)]
    tokenizer_hash: Text | None = None
    tokenizer_file: PlainName = "tokenizer.json"
    vocab_size: Annotated[int, Field(ge=1, le=2**32)]
    dtype: Literal["uint16", "uint32"]
    eot_id: TokenId | None = None
    chars: str | None = None
    chat: ChatEntry | None = None
    classify: ClassifyEntry | None = None
    seq2seq: Seq2SeqEntry | None = None
    source: str | None = None
    special_tokens: list[Text] | None = None
    splits: Annotated[dict[str, SplitEntry], Field(max_length=64)]
    tokenizer_json: None = None  # read from tokenizer_file at load, never taken from meta.json

    @model_validator(mode="after")
    def _consistent(self):
        if self.vocab_size > {"uint16": 2**16, "uint32": 2**32}[self.dtype]:
            raise ValueError(f"vocab_size: {self.vocab_size} does not fit {self.dtype}")
        _ids_in_vocabulary(self.vocab_size, self.eot_id, self.chat)
        if sum(x is not None for x in (self.chat, self.classify, self.seq2seq)) > 1:
            raise ValueError("chat, classify, seq2seq: a dataset is conversations, labelled texts or pairs: one")
        for token, i in self.seq2seq.special.items() if self.seq2seq else ():
            if i >= self.vocab_size:
                raise ValueError(f"seq2seq.special.{token}: {i} is outside the vocabulary of {self.vocab_size}")
        if self.tokenizer == "char":
            _char_vocabulary(self.chars, self.vocab_size, self.chat, self.seq2seq)
            if len(set(self.chars)) != len(self.chars):  # prepare lists each once: the ids of one would differ
                raise ValueError("chars: lists a character twice")
        return self


# --- a checkpoint's meta.json and state.pt (engine/checkpoint.py) ---------------------------------------------------


class DataFingerprint(Shape):
    """meta.json's "data": what the checkpoint was trained on, enough to rebuild its tokenizer (TokenData.fingerprint;
    older and imported checkpoints hold fewer of the keys)."""

    tokenizer: Annotated[str, Field(min_length=1, max_length=256)]
    tokenizer_hash: Text | None = None
    vocab_size: Annotated[int, Field(ge=1, le=2**32)] | None = None
    dtype: Literal["uint16", "uint32"] | None = None
    eot_id: TokenId | None = None
    chars: str | None = None
    chat: ChatEntry | None = None
    classify: ClassifyEntry | None = None
    seq2seq: Seq2SeqEntry | None = None
    source: str | None = None
    tokenizer_json: Annotated[str, Field(max_length=MAX_TOKENIZER_BYTES)] | None = None  # checked when it is built
    data_dir: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        _ids_in_vocabulary(self.vocab_size, self.eot_id, self.chat)
        if self.tokenizer == "char":
            _char_vocabulary(self.chars, self.vocab_size, self.chat, self.seq2seq)
        if self.tokenizer == "tokenizer.json" and not self.tokenizer_json:
            raise ValueError("tokenizer_json: required for a tokenizer.json tokenizer")
        return self


class LoraEntry(Shape):
    """meta.json's "lora" (engine/train_state.py start_lora): the adapters, and the frozen base saved once beside the
    checkpoint. Checkpoints before new_rows_from trained the whole embedding, named in trainable."""

    rank: Annotated[int, Field(ge=1, le=1 << 16)]
    alpha: Finite
    targets: Annotated[list[Literal["attn", "mlp"]], Field(min_length=1, max_length=2)]
    trainable: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=64)] = []
    new_rows_from: Count | None = None
    base: Annotated[str, Field(pattern=r"^lora-base-[0-9a-f]{16}$")]  # a directory beside the checkpoint, by hash
    base_sha256: Sha256
    base_from: str | None = None


class SavedTrainConfig(Shape):
    """meta.json's "train_config": compared key by key on resume; these few are computed with."""

    batch_size: Size | None = None
    gradient_accumulation_steps: Size | None = None
    block_size: Size | None = None
    dataset: str | None = None
    ema_decay: Annotated[float, Field(ge=0, lt=1)] | None = None


class CheckpointMeta(Shape):
    """<checkpoint>/meta.json (engine/checkpoint.py save_checkpoint, TrainState.save). model_config is checked field by
    field against GPTConfig by ModelConfig."""

    model_config_: Annotated[dict[str, Any], Field(alias="model_config")]
    train_config: SavedTrainConfig
    data: DataFingerprint
    iter_num: Count = 0
    val_loss: Loss | None = None
    train_loss: Loss | None = None
    rollbacks: Count = 0
    lora: LoraEntry | None = None
    code_version: str | None = None
    saved_at: str | None = None
    imported_from: str | None = None


class ModelConfig(Shape):
    """A checkpoint's model_config: GPTConfig's fields, typed and bounded (GPTConfig checks how they combine, and
    engine/memory.py check_fits whether the model fits). A key this code does not know is refused before this runs."""

    block_size: Size
    vocab_size: Size
    n_layer: Size
    n_head: Size
    n_embd: Size
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    bias: bool = True
    pos_embedding: str = "learned"
    rope_theta: Finite = 10000.0
    norm: str = "layernorm"
    norm_position: str = "pre"
    norm_eps: Finite = 1e-5
    mlp: str = "gelu_tanh"
    mlp_hidden: Size | None = None
    n_kv_head: Size | None = None
    qk_norm: bool = False
    tie_embeddings: bool = True
    n_expert: Annotated[int, Field(ge=0, le=1 << 16)] = 0
    n_expert_active: Annotated[int, Field(ge=1, le=1 << 16)] = 2
    moe_shared_expert: bool = False
    moe_aux_loss_coef: Finite = 0.01
    arch: str = "decoder"
    n_dec_layer: Size | None = None
    rel_buckets: Annotated[int, Field(ge=4, le=1 << 16)] = 32
    rel_max_distance: Annotated[int, Field(ge=2, le=1 << 24)] = 128
    attn_scale: bool = True
    n_labels: Annotated[int, Field(ge=0, le=1 << 16)] = 0
    pad_id: Annotated[int, Field(ge=0, le=2**32)] | None = None


def _params_listed(group: dict) -> dict:
    params = group.get("params")
    if not isinstance(params, list) or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in params):
        raise ValueError("params: should be a list of parameter names or indices")
    return group


class OptimizerState(Shape):
    """One optimizer's state dict, keyed by parameter name (engine/fsdp.py optimizer_state) or, in older checkpoints
    and nanoGPT's, by parameter index."""

    state: dict[str | int, dict[str, TensorOrNumber]]
    param_groups: list[Annotated[dict[str, Any], AfterValidator(_params_listed)]]


def _scaler(state: dict) -> None:
    """torch.amp.GradScaler.state_dict() of a float16 run, whose load_state_dict reads every key; {} (a disabled
    scaler's) otherwise."""
    kinds = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int}
    for key, kind in (kinds | {"_growth_tracker": int} if state else {}).items():
        value = state.get(key)
        if not isinstance(value, (kind, int)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"scaler.{key}: should be a finite {kind.__name__}, not {short(value)}")


def _ema_average(average: dict) -> None:
    """The weight average: parameter names to float tensors, and its update count under "#updates" (engine/ema.py)."""
    for name, t in average.items():
        if not _is_tensor(t):
            raise ValueError(f"ema.{label(name)}: should be a tensor, not {short(t)}")
        if name == "#updates":
            if t.dim() or t.is_floating_point() or t.is_complex() or str(t.dtype) == "torch.bool" or int(t) < 0:
                raise ValueError(f"ema.#updates: should be a count (a non-negative integer scalar), not {short(t)}")
        elif not t.is_floating_point():
            raise ValueError(f"ema.{label(name)}: should be a float tensor, not {t.dtype}")


class TrainingState(Shape):
    """<checkpoint>/state.pt (engine/train_state.py TrainState.save): the optimizers, the scaler, the loop's counters,
    the weight average."""

    optimizers: Annotated[list[OptimizerState], Field(max_length=8)]
    scaler: dict[str, Any]
    iter_num: Count
    best_val_loss: Loss
    tokens: Count | None = None
    progress: Annotated[float, Field(ge=0, le=MAX_SIZE)] | None = None
    skipped_steps: Count | None = None
    rollbacks: Count | None = None
    lr_scale: Annotated[float, Field(gt=0, le=1)] | None = None
    recent_losses: list[Finite] | None = None
    bad_steps: Count | None = None
    clipped_steps: Count | None = None
    ema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _scaler_and_average(self):
        _scaler(self.scaler)
        if self.ema is not None:
            _ema_average(self.ema)
        return self


# --- a Hugging Face config.json (engine/hf_interop.py) -------------------------------------------------------------


class GPT2HFConfig(Shape):
    """transformers' GPT2Config as config.json holds it: the fields engine/hf_interop.py maps onto GPTConfig."""

    n_positions: Size
    vocab_size: Size
    n_layer: Size
    n_head: Size
    n_embd: Size
    n_inner: Size | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: Finite = 1e-5
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False


class RopeParameters(Shape):
    rope_theta: Finite
    rope_type: str = "default"


class LlamaHFConfig(Shape):
    """transformers' LlamaConfig as config.json holds it: the fields engine/hf_interop.py maps onto GPTConfig."""

    max_position_embeddings: Size
    vocab_size: Size
    num_hidden_layers: Size
    num_attention_heads: Size
    hidden_size: Size
    intermediate_size: Size
    num_key_value_heads: Size | None = None
    head_dim: Size | None = None
    rope_theta: Finite = 10000.0
    rope_parameters: RopeParameters | None = None
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    rms_norm_eps: Finite = 1e-6
    tie_word_embeddings: bool = False


class T5HFConfig(Shape):
    """transformers' T5Config as config.json holds it: the fields engine/hf_interop.py maps onto GPTConfig."""

    vocab_size: Size
    d_model: Size
    d_kv: Size
    d_ff: Size
    num_layers: Size
    num_decoder_layers: Size | None = None
    num_heads: Size
    relative_attention_num_buckets: Annotated[int, Field(ge=4, le=1 << 16)] = 32
    relative_attention_max_distance: Annotated[int, Field(ge=2, le=1 << 24)] = 128
    layer_norm_epsilon: Finite = 1e-6
    feed_forward_proj: Text = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: TokenId | None = None
    n_positions: Size | None = None

    @model_validator(mode="after")
    def _buckets_fit(self):
        if self.relative_attention_max_distance < self.relative_attention_num_buckets:
            raise ValueError("relative_attention_max_distance: smaller than relative_attention_num_buckets")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id: {self.pad_token_id} is outside the vocabulary of {self.vocab_size}")
        return self


class BertHFConfig(Shape):
    """transformers' BertConfig as config.json holds it: the fields engine/hf_interop.py maps onto GPTConfig."""

    max_position_embeddings: Size
    vocab_size: Size
    num_hidden_layers: Size
    num_attention_heads: Size
    hidden_size: Size
    intermediate_size: Size
    hidden_act: str = "gelu"
    layer_norm_eps: Finite = 1e-12
    type_vocab_size: Annotated[int, Field(ge=0, le=1 << 16)] = 2
    position_embedding_type: str = "absolute"
    tie_word_embeddings: bool = True
    is_decoder: bool = False
    architectures: Annotated[list[Text], Field(max_length=16)] | None = None
    id2label: Annotated[dict[str, Annotated[str, Field(max_length=1000)]], Field(max_length=1 << 16)] | None = None
    num_labels: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
    problem_type: Text | None = None
    pad_token_id: TokenId | None = None

    @model_validator(mode="after")
    def _labels_numbered(self):
        if self.id2label is not None and sorted(self.id2label) != sorted(str(i) for i in range(len(self.id2label))):
            raise ValueError("id2label: its keys should number the labels 0, 1, 2, ... (as strings)")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id: {self.pad_token_id} is outside the vocabulary of {self.vocab_size}")
        return self


# --- task files (engine/tasks.py) ---------------------------------------------------------------------------------


class ChoiceItem(Shape):
    """One line of a choice task file. Other keys are refused, as Item(**row) always refused them."""

    model_config = ConfigDict(extra="forbid")

    context: str
    choices: Annotated[list[str], Field(min_length=2, max_length=1024)]
    label: int

    @model_validator(mode="after")
    def _label_in_range(self):
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label: {self.label} for {len(self.choices)} choices (0 to {len(self.choices) - 1})")
        return self


class HellaSwagRow(Shape):
    """One row of HellaSwag as the dataset ships it: ctx_a and ctx_b (or ctx), endings, label (a string of digits)."""

    ctx_a: str | None = None
    ctx_b: str | None = None
    ctx: str | None = None
    activity_label: str | None = None
    endings: Annotated[list[str], Field(min_length=2, max_length=1024)]
    label: Annotated[int, BeforeValidator(_whole_number)]

    @model_validator(mode="after")
    def _complete(self):
        if (self.ctx_a is None or self.ctx_b is None) and self.ctx is None:
            raise ValueError("ctx_a and ctx_b, or ctx: required")
        if not 0 <= self.label < len(self.endings):
            raise ValueError(f"label: {self.label} for {len(self.endings)} choices (0 to {len(self.endings) - 1})")
        return self


# --- nanoGPT's ckpt.pt (prepare/from_nanogpt.py) -------------------------------------------------------------------


class NanoModelArgs(Shape):
    """nanoGPT's model_args: its GPTConfig's fields."""

    n_layer: Size
    n_head: Size
    n_embd: Size
    block_size: Size
    bias: bool
    vocab_size: Size
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


class NanoMetaPkl(Shape):
    """nanoGPT's data/<name>/meta.pkl of a character dataset: its token files are uint16, so at most 65,536 ids."""

    vocab_size: Annotated[int, Field(ge=1, le=2**16)]
    itos: dict[int, str]
    stoi: dict[str, int] | None = None


class NanoConfig(Shape):
    """nanoGPT's config: its train.py's globals. The dataset names data/<dataset>/, so it is a plain name."""

    dataset: PlainName | None = None


def _loss_or_scalar(x: Any) -> Any:
    number = isinstance(x, (int, float)) and not isinstance(x, bool)
    scalar = _is_tensor(x) and x.numel() == 1 and x.is_floating_point()
    if not (number or scalar):
        raise ValueError(f"should be a number, not {short(x)}")
    return x


class NanoCheckpoint(Shape):
    """nanoGPT's ckpt.pt as its train.py saves it. best_val_loss is a 0-d tensor there (estimate_loss' mean)."""

    model: Annotated[dict[str, Tensor], Field(min_length=1)]
    model_args: NanoModelArgs
    optimizer: dict[str, Any] | None = None
    iter_num: Count = 0
    best_val_loss: Annotated[Any, AfterValidator(_loss_or_scalar)] = math.inf
    config: NanoConfig | None = None


# --- tokenizer.json (engine/tokenization.py) -----------------------------------------------------------------------
# The `tokenizers` library turns most malformed files into an exception, but panics (a Rust panic, printed to stderr
# with its backtrace whether or not Python catches it) on a few, and aborts the process on others: a padding length
# of 2**40 allocates it. Its regexes run on Oniguruma, a backtracking engine: a pattern such as (a+)+$ meets
# Oniguruma's retry limit on a line of 30 letters, and the library panics mid-encode. So the structure is checked
# here first, and regexes are held to a shape that cannot backtrack exponentially (regex_problem).


def _merge(value: Any) -> Any:
    """A BPE merge: "a b" in older files, ["a", "b"] in newer ones; either as a pair."""
    if isinstance(value, str) and value.count(" ") == 1:
        return tuple(value.split(" "))
    if isinstance(value, list):
        return tuple(value)
    return value


Merge = Annotated[tuple[str, str], BeforeValidator(_merge)]
Vocab = Annotated[dict[str, TokenId], Field(max_length=1 << 24)]


class BPEModel(Shape):
    type: Literal["BPE"]
    vocab: Vocab
    merges: Annotated[list[Merge], Field(max_length=1 << 24)] = []
    dropout: Annotated[float, Field(ge=0, le=1)] | None = None
    unk_token: str | None = None
    continuing_subword_prefix: str | None = None
    end_of_word_suffix: str | None = None

    @model_validator(mode="after")
    def _merges_of_the_vocabulary(self):
        prefix = self.continuing_subword_prefix or ""
        for n, (a, b) in enumerate(self.merges):
            if a not in self.vocab or b not in self.vocab:
                raise ValueError(f"merges.{n}: merges {short(a)} and {short(b)}, which are not both in the vocab")
            if not b.startswith(prefix):  # the library cuts the prefix off b by length: it panics on a shorter b
                raise ValueError(f"merges.{n}: {short(b)} does not start with the continuing_subword_prefix")
        return self


class WordLevelModel(Shape):
    type: Literal["WordLevel"]
    vocab: Vocab
    unk_token: str | None = None


class WordPieceModel(Shape):
    type: Literal["WordPiece"]
    vocab: Vocab
    unk_token: str
    max_input_chars_per_word: Annotated[int, Field(ge=1, le=1 << 20)] = 100


def _pairs(value: Any) -> Any:
    """Unigram's vocab: [token, score] pairs, as tuples."""
    return [tuple(x) if isinstance(x, list) else x for x in value] if isinstance(value, list) else value


class UnigramModel(Shape):
    type: Literal["Unigram"]
    vocab: Annotated[list[tuple[str, Finite]], Field(max_length=1 << 24), BeforeValidator(_pairs)]
    unk_id: TokenId | None = None

    @model_validator(mode="after")
    def _unk_in_vocabulary(self):
        if self.unk_id is not None and self.unk_id >= len(self.vocab):
            raise ValueError(f"unk_id: {self.unk_id} is outside the vocab of {len(self.vocab)}")
        return self


class AddedToken(Shape):
    id: TokenId
    content: Annotated[str, Field(min_length=1, max_length=1024)]
    special: bool = False


class TokenizerJson(Shape):
    """A Hugging Face tokenizer.json: the fields the library reads, held to what cannot crash it. Components
    (normalizer, pre_tokenizer, post_processor, decoder) are open-ended: they are walked for regexes and for the
    binary Precompiled normalizer, which the library cannot parse safely and is refused. This code encodes whole texts,
    so truncation and padding must be off."""

    version: str | None = None
    truncation: None = None
    padding: None = None
    added_tokens: Annotated[list[AddedToken], Field(max_length=1 << 16)] = []
    normalizer: dict[str, Any] | None = None
    pre_tokenizer: dict[str, Any] | None = None
    post_processor: dict[str, Any] | None = None
    decoder: dict[str, Any] | None = None
    model: Annotated[BPEModel | WordLevelModel | WordPieceModel | UnigramModel, Field(discriminator="type")]

    @model_validator(mode="after")
    def _ids_and_components(self):
        vocab = self.model.vocab
        unk = getattr(self.model, "unk_token", None)
        if unk is not None and unk not in vocab:  # the library fails at the first unknown character otherwise
            raise ValueError(f"model.unk_token: {short(unk)} is not in the vocab")
        if isinstance(vocab, dict):
            ids = set(vocab.values())
            if len(ids) != len(vocab):
                raise ValueError("model.vocab: two tokens share an id")
        else:
            vocab, ids = {token: i for i, (token, _) in enumerate(vocab)}, set(range(len(vocab)))
        size = len(vocab) + sum(1 for t in self.added_tokens if t.content not in vocab)
        if ids and max(ids) >= size:
            raise ValueError(f"model.vocab: id {max(ids)} is outside the {size} tokens the file defines")
        for n, token in enumerate(self.added_tokens):
            if token.id >= size or vocab.get(token.content, token.id) != token.id:
                raise ValueError(f"added_tokens.{n}: id {token.id} of {short(token.content)} is not its own")
        for name in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
            problem = component_problem(getattr(self, name), size)
            if problem:
                raise ValueError(f"{name}{problem}")
        return self


def component_problem(component: dict | None, size: int) -> str | None:
    """What in a tokenizer component (and the components it holds) could hang or crash the library, as
    `<path inside>: <problem>`, or None. Walked without recursion: nesting is data here."""
    stack = [(component, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_NESTING:
            return f"{path}: nested more than {MAX_NESTING} deep"
        if isinstance(node, dict):
            if node.get("type") == "Precompiled":
                return f"{path}: a Precompiled normalizer (a binary table the library cannot check) is not accepted"
            if "Regex" in node:
                problem = regex_problem(node["Regex"])
                if problem:
                    return f"{path}.Regex: {problem}"
            for key in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [token, id]
                pair = node.get(key)
                if isinstance(pair, list) and len(pair) == 2 and not _id_within(pair[1], size):
                    return f"{path}.{key}: id {short(pair[1])} is outside the {size} tokens"
            ids = node.get("ids")  # TemplateProcessing's special tokens
            if isinstance(ids, list) and not all(_id_within(i, size) for i in ids):
                return f"{path}.ids: {short(ids)} holds an id outside the {size} tokens"
            stack += [(value, f"{path}.{label(key)}", depth + 1) for key, value in node.items()]
        elif isinstance(node, list):
            stack += [(value, f"{path}.{n}", depth + 1) for n, value in enumerate(node)]
    return None


def _id_within(i: Any, size: int) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size


def regex_problem(pattern: Any) -> str | None:
    """Why an Oniguruma pattern could backtrack without end or crash the library, or None. The rule, which GPT-2's,
    Llama 3's and GPT-4o's split patterns meet: at most MAX_PATTERN characters; no backreference, subexpression
    call, conditional, absent operator or callout; no repeated group (*, +, {n,}, {n,m} with m > 1) holding a
    quantifier or an alternation, the shape of every exponential case ((a+)+, (a|aa)*); and at most two unbounded
    quantifiers in each top-level alternative, which bounds the backtracking of one match to the square of its
    length."""
    if not isinstance(pattern, str):
        return f"should be a string, not {short(pattern)}"
    if len(pattern) > MAX_PATTERN:
        return f"{len(pattern)} characters long, more than {MAX_PATTERN}"
    groups = [[False, False]]  # per open group: holds a quantifier, holds an alternation
    closed = None  # what the group that just closed held, while the next character may quantify it
    unbounded, i = 0, 0
    while i < len(pattern):
        c, previous = pattern[i], closed
        closed = None
        if c == "\\":
            escaped = pattern[i + 1 : i + 2]
            if escaped and (escaped in "123456789kg"):
                return f"a backreference or subexpression call (\\{escaped}) is not accepted"
            i += 2
            if escaped in ("p", "P", "x", "o") and pattern[i : i + 1] == "{":  # \p{L}, \x{263a}: a name, not a count
                i = pattern.find("}", i) + 1 or len(pattern)
            continue
        if c == "[":
            i = _class_end(pattern, i)
            continue
        if c == "(":
            kind = pattern[i + 1 : i + 3]
            if kind in ("?(", "?~", "?{") or kind[:1] == "*":
                return f"the construct ({kind} (a conditional, absent operator or callout) is not accepted"
            if kind == "?#":
                i = pattern.find(")", i) + 1 or len(pattern)
                continue
            groups.append([False, False])
            i += 1
            if kind[:1] == "?":  # (?:, (?=, (?!, (?<=, (?<!, (?>, (?i:, (?<name>: the '?' is not a quantifier
                i += 1
            continue
        if c == ")":
            if len(groups) > 1:
                closed = groups.pop()
                groups[-1][0] |= closed[0]
                groups[-1][1] |= closed[1]
            i += 1
            continue
        if c == "|":
            groups[-1][1] = True
            unbounded = 0 if len(groups) == 1 else unbounded
            i += 1
            continue
        repeat = _quantifier(pattern, i)
        if repeat is None:
            i += 1
            continue
        length, repeats, endless = repeat
        if repeats and previous is not None and (previous[0] or previous[1]):
            return "a repeated group holds a quantifier or an alternation (nested repetition backtracks exponentially)"
        unbounded += endless
        if unbounded > 2:
            return "more than two unbounded quantifiers in one alternative"
        groups[-1][0] = True
        i += length
        if pattern[i : i + 1] in ("?", "+"):  # lazy or possessive
            i += 1
    return None


def _quantifier(pattern: str, i: int) -> tuple[int, bool, bool] | None:
    """The quantifier at pattern[i] as (its length, whether it repeats more than once, whether it is unbounded), or
    None when pattern[i] is not one ('{' without a count is a literal in Oniguruma)."""
    c = pattern[i]
    if c == "?":
        return 1, False, False
    if c in "*+":
        return 1, True, True
    if c != "{":
        return None
    end = pattern.find("}", i)
    low, comma, high = pattern[i + 1 : end].partition(",") if end > 0 else ("x", "", "")
    if not (low.isdigit() or (comma and not low)) or not (high.isdigit() or not high):
        return None
    if not comma:
        return end - i + 1, int(low) > 1, False
    return end - i + 1, not high or int(high) > 1, not high


def _class_end(pattern: str, i: int) -> int:
    """The index just past the character class opening at pattern[i] (classes nest in Oniguruma: [a-z&&[^aeiou]])."""
    depth, i = 0, i
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth += 1
            i += 1
            if pattern[i : i + 1] == "^":
                i += 1
            if pattern[i : i + 1] == "]":  # a ']' first in a class is itself
                i += 1
            continue
        if c == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(pattern)


# --- a scaling law tools/plan.py --fit wrote (tools/plan.py --law reads it) -------------------------------------------


class ScalingLawEntry(Shape):
    """L(N, D) = E + A / N^alpha + B / D^beta (engine/scaling_law.py): every constant finite and positive."""

    E: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    A: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    B: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    alpha: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]
    beta: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]


class ScalingLawFile(Shape):
    law: ScalingLawEntry
