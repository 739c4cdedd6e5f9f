"""Gemma 3's chat format and a small SentencePiece tokenizer built the way Gemma's is.

The built-in tiny model needs a tokenizer that behaves like Gemma's wherever the rest of the project
(and every tool a user hands the model to) can tell: a SentencePiece BPE model with byte fallback and
``▁`` for spaces, Gemma's reserved ids 0..106 in Gemma's order, ``add_bos_token``, a ``tokenizer.model``
beside a ``tokenizer.json`` converted from it by transformers' own Gemma code, and the chat template.
It is small and trained in a fraction of a second from the project's own data, so nothing has to be
downloaded.
"""

from __future__ import annotations

import json
import re
import tempfile
import types
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "GEMMA_CHAT_TEMPLATE",
    "RESERVED_TOKENS",
    "SPECIAL_TOKENS",
    "bos_eos_flags",
    "make_config_portable",
    "save_tokenizer",
    "train_tokenizer",
    "unwrap_tokenizer",
]

# Gemma 3's chat format. Written to render byte for byte like the official template:
#   * `bos_token` first;
#   * a leading system message is folded into the first user turn as "<system>\n\n";
#   * roles must alternate user/assistant (anything else raises);
#   * each turn is "<start_of_turn>{user|model}\n{content|trim}<end_of_turn>\n";
#   * content is a string or a list of {"type": "text", "text": ...} parts (each part trimmed);
#   * `add_generation_prompt` opens a model turn.
# Only constructs that the official template also uses appear here (no macros), so that every Jinja
# implementation that runs Gemma's template (transformers.js's included) runs this one.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set role = 'model' -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] | trim -}}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{{- item['text'] | trim -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{- raise_exception('Invalid content type') -}}"
    "{%- endif -%}"
    "{{- '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<start_of_turn>model\n' -}}"
    "{%- endif -%}"
)

# Gemma 3's reserved ids 0..106, in Gemma's order: pad/eos/bos/unk are SentencePiece's control and
# unknown pieces, the rest are user-defined pieces (always whole, never merged), the turn markers last.
RESERVED_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]",
                   *(f"<unused{i}>" for i in range(99)), "<start_of_turn>", "<end_of_turn>"]
# The reserved tokens marked special in tokenizer.json (skipped by `decode(skip_special_tokens=True)`).
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]

# The reserved ids plus the 256 byte-fallback pieces; the text's own characters need room above it.
_MIN_VOCAB_SIZE = len(RESERVED_TOKENS) + 256

# Gemma's SentencePiece trainer settings (as its tokenizer.model records them): BPE, byte fallback,
# digits split one by one, whitespace kept as it is (no dummy prefix, no collapsing, identity
# normalization) and allowed as whole pieces. The rest make training deterministic on small data.
_GEMMA_TRAINER = {
    "model_type": "bpe", "byte_fallback": True, "split_digits": True, "split_by_unicode_script": True,
    "split_by_number": True, "split_by_whitespace": True, "treat_whitespace_as_suffix": False,
    "allow_whitespace_only_pieces": True, "normalization_rule_name": "identity", "add_dummy_prefix": False,
    "remove_extra_whitespaces": False, "pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3,
    "pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>",
    "user_defined_symbols": RESERVED_TOKENS[4:], "character_coverage": 1.0, "hard_vocab_limit": False,
    "max_sentence_length": 1 << 20, "num_threads": 1, "shuffle_input_sentence": False, "minloglevel": 2,
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a SentencePiece BPE tokenizer in Gemma 3's configuration, with Gemma's chat template.

    SentencePiece trains the ``tokenizer.model``; transformers' own Gemma conversion turns it into the
    ``tokenizer.json`` model (BPE with byte fallback, spaces as ``▁``), so both files encode alike.
    Decoding is lossless: `decode(encode(s)) == s` for any text. Like Gemma's, the tokenizer adds
    ``<bos>`` when encoding with special tokens (``add_bos_token``); the chat template writes
    ``<bos>`` itself, so rendered conversations are encoded with ``add_special_tokens=False``.
    Training is deterministic for the same texts.

    Args:
        texts: training text (for example every message of the training conversations).
        vocab_size: target vocabulary size including the 107 reserved tokens and the 256 byte
            pieces; the result is smaller when the texts do not support that many merges.

    Returns:
        A transformers ``GemmaTokenizer`` with Gemma's special tokens and `chat_template` set to
        `GEMMA_CHAT_TEMPLATE`. Its `save_pretrained` writes ``tokenizer.model`` too, and a
        ``tokenizer_config.json`` holding the template that transformers 4 loads as well (see
        `make_config_portable`).

    Raises:
        ValueError: if `vocab_size` is too small to hold the reserved and byte pieces and some text.
    """
    if vocab_size <= _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be more than {_MIN_VOCAB_SIZE} ({len(RESERVED_TOKENS)} reserved tokens "
                         f"+ 256 byte pieces), got {vocab_size}")
    proto = _train_sentencepiece(texts, vocab_size)
    return _wrap(_convert(proto), proto)


def _train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """The serialized SentencePiece model (``tokenizer.model``) trained on `texts`."""
    import io

    import sentencepiece as spm

    # A list (not a generator) so the same texts give the same counts however the iterable behaves.
    sentences = [t for t in texts if t]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                       vocab_size=vocab_size, **_GEMMA_TRAINER)
    except RuntimeError as err:  # e.g. more distinct characters than the vocabulary has room for
        need = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(err))
        if need:
            raise ValueError(f"vocab_size {vocab_size} is too small for these texts: their characters, the reserved "
                             f"tokens and the byte pieces need at least {need.group(1)}") from None
        raise ValueError(f"SentencePiece could not train a {vocab_size}-token vocabulary: {err}") from None
    proto = model.getvalue()
    _check_reserved_ids(proto)
    return proto


def _check_reserved_ids(proto: bytes) -> None:
    """Fail loudly if the trainer did not put the reserved tokens at ids 0..106 (the model relies on it)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto)
    got = [sp.piece_to_id(t) for t in RESERVED_TOKENS]
    if got != list(range(len(RESERVED_TOKENS))):
        raise RuntimeError(f"reserved tokens got ids {got}, expected 0..{len(RESERVED_TOKENS) - 1}")


def _convert(proto: bytes) -> Tokenizer:
    """The ``tokenizer.json`` backend, converted from the SentencePiece model by transformers' Gemma code.

    transformers' conversion adds every user-defined piece as an added token that is not special;
    Gemma marks its control tokens, ``<mask>`` and the turn markers special.
    """
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    with tempfile.TemporaryDirectory(prefix="mlx-persona-spm-") as tmp:  # created 0700
        (Path(tmp) / "tokenizer.model").write_bytes(proto)
        converted = GemmaTokenizer.from_pretrained(tmp).backend_tokenizer
    data = json.loads(converted.to_str())
    for token in data["added_tokens"]:
        token["special"] = token["content"] in SPECIAL_TOKENS
    return Tokenizer.from_str(json.dumps(data))


def _wrap(backend: Tokenizer, proto: bytes) -> PreTrainedTokenizerFast:
    """Wrap a converted backend for transformers/mlx-lm and make its saves carry the template and model."""
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    hf = GemmaTokenizer(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA_CHAT_TEMPLATE,
        # Cleanup would rewrite " ." as "." and break lossless decoding (Gemma's config says false too).
        clean_up_tokenization_spaces=False,
        add_bos_token=True,
        add_eos_token=False,
    )
    hf.sp_model_proto = proto
    _patch_save_pretrained(hf)
    return hf


def _patch_save_pretrained(hf: PreTrainedTokenizerFast) -> None:
    """Make this instance's `save_pretrained` write ``tokenizer.model`` and a portable config.

    Patching the instance (not subclassing) keeps the saved `tokenizer_class` a stock transformers
    class, so `AutoTokenizer` reloads it anywhere. See `save_tokenizer` for what is written.
    """
    original = hf.save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = original(save_directory, *args, **kwargs)
        _finish_saved_folder(self, save_directory)
        return files

    hf.save_pretrained = types.MethodType(save_pretrained, hf)


def unwrap_tokenizer(tokenizer) -> PreTrainedTokenizerBase:
    """The transformers tokenizer behind an mlx-lm `TokenizerWrapper`, or the tokenizer itself.

    Both the wrapper and transformers' fast tokenizers have a `_tokenizer` attribute (the latter's
    is the raw `tokenizers.Tokenizer`), so only an inner transformers tokenizer counts as wrapped.

    Args:
        tokenizer: a transformers tokenizer or an mlx-lm `TokenizerWrapper`.

    Returns:
        The transformers tokenizer.
    """
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if isinstance(inner, PreTrainedTokenizerBase) else tokenizer


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """Save any HF tokenizer (or mlx-lm `TokenizerWrapper`) so every consumer can load it.

    A tokenizer reloaded with `AutoTokenizer` is a plain transformers object again; saving it through
    this function (rather than its own `save_pretrained`) keeps the folder portable.

    Args:
        tokenizer: a transformers tokenizer, or an mlx-lm `TokenizerWrapper` around one.
        directory: the output folder (created if missing).

    Returns:
        None. The folder holds the usual files, the SentencePiece ``tokenizer.model`` where the
        tokenizer has one (transformers 5 does not copy it), and `tokenizer_config.json` rewritten by
        `make_config_portable`, recording ``add_bos_token``/``add_eos_token`` as encoding behaves.
    """
    hf = unwrap_tokenizer(tokenizer)
    hf.save_pretrained(str(directory))
    _finish_saved_folder(hf, directory)


def _finish_saved_folder(hf, directory: str | Path) -> None:
    """What transformers 5's `save_pretrained` leaves out: the SentencePiece model, add_bos_token, the template."""
    directory = Path(directory)
    proto = getattr(hf, "sp_model_proto", None) or _loaded_sentencepiece(hf)
    if proto is not None:
        (directory / "tokenizer.model").write_bytes(proto)
    make_config_portable(directory, hf.chat_template, set_keys=bos_eos_flags(hf))


def _loaded_sentencepiece(hf) -> bytes | None:
    """The ``tokenizer.model`` of the local folder `hf` was loaded from, if it has one of the same size."""
    import sentencepiece as spm

    folder = Path(str(hf.name_or_path or ""))
    source = folder / "tokenizer.model" if folder.is_dir() else None
    if source is None or not source.is_file() or source.stat().st_size > 64 << 20:
        return None
    proto = source.read_bytes()
    try:
        pieces = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    except (RuntimeError, OSError):
        return None
    return proto if pieces == len(hf) else None


def bos_eos_flags(hf) -> dict:
    """``add_bos_token``/``add_eos_token`` as the tokenizer behaves (readers of the config need them).

    transformers 5 leaves them out of what it saves and ignores them when it loads a tokenizer.json
    (its post-processor decides), so a reloaded tokenizer's attributes may say False while it adds
    ``<bos>``; what encoding does is the truth.
    """
    ids = hf("a")["input_ids"]
    flags = {}
    for key, tid, got in (("add_bos_token", hf.bos_token_id, ids[:1]), ("add_eos_token", hf.eos_token_id, ids[-1:])):
        if tid is not None:
            flags[key] = got == [tid]
    return flags


def make_config_portable(directory: str | Path, chat_template: str | None = None, *,
                         set_keys: dict | None = None) -> dict:
    """Rewrite a saved `tokenizer_config.json` so that transformers 4 and 5, mlx-lm and transformers.js load it.

    transformers 5 writes the template only to `chat_template.jinja` (transformers.js reads it from
    the config), lists extra special tokens as a list under `extra_special_tokens` (transformers 4
    expects a dict there and crashes on a list) and names the class `TokenizersBackend` (unknown to
    transformers 4, which the ONNX export environment pins). transformers 5 reads the rewritten
    form identically.

    Args:
        directory: a folder written by `save_pretrained`.
        chat_template: the template to write; defaults to the folder's `chat_template.jinja`.
        set_keys: further keys to set (transformers 5 drops ``add_bos_token`` from what it saves).

    Returns:
        The config as written.
    """
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    if chat_template is None:
        jinja = directory / "chat_template.jinja"
        chat_template = jinja.read_text(encoding="utf-8") if jinja.exists() else config.get("chat_template")
    if isinstance(chat_template, str) and chat_template:
        config["chat_template"] = chat_template
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config.pop("extra_special_tokens")
        merged = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = merged + [t for t in extra if t not in merged]
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("vocab_file", None)  # a path on the machine that saved it; the file itself sits beside
    config.update(set_keys or {})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return config
