"""Gemma 3's chat format and a small byte-level BPE tokenizer that speaks it.

The built-in tiny model needs a tokenizer that behaves like Gemma's where it matters to the rest of
the project (special token ids, the chat template, lossless decoding) but is small and can be trained
in a second from the project's own data, so that nothing has to be downloaded.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "GEMMA_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "train_tokenizer",
    "save_tokenizer",
    "unwrap_tokenizer",
    "make_config_portable",
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

# Ids 0..5 in this order: Gemma's own pad/eos/bos/unk ids, then the two turn markers.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# The byte alphabet alone takes 256 ids; below this the trainer cannot even represent every byte.
_MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer carrying Gemma's special tokens and chat template.

    Byte-level pre-tokenization with a byte-level decoder and no normalizer makes decoding lossless:
    `decode(encode(s)) == s` for any text. No BOS/EOS is added when encoding; the chat template writes
    `<bos>` itself, as Gemma's does. Training is deterministic for the same texts.

    Args:
        texts: training text (for example every message of the training conversations).
        vocab_size: target vocabulary size including the 256 byte tokens and the 6 special tokens;
            the result is smaller when the texts do not support that many merges.

    Returns:
        A `PreTrainedTokenizerFast` with bos/eos/pad/unk set and `chat_template` set to
        `GEMMA_CHAT_TEMPLATE`. Its `save_pretrained` also writes the template into
        `tokenizer_config.json` and keeps the folder loadable by transformers 4 (see
        `make_config_portable`).

    Raises:
        ValueError: if `vocab_size` is too small to hold the byte alphabet and the special tokens.
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {_MIN_VOCAB_SIZE} (256 bytes + 6 special tokens), got {vocab_size}"
        )
    backend = _train_backend(texts, vocab_size)
    return _wrap(backend)


def _train_backend(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train the raw `tokenizers` BPE model (special tokens first so they get ids 0..5)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # add_prefix_space=False: a leading space would break lossless round trips and Gemma adds none.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[_special(t) for t in SPECIAL_TOKENS],
        # Every byte is in the vocabulary even if the texts never use it, so nothing maps to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # A list (not a generator) so the same texts give the same counts however the iterable behaves.
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
    _check_special_ids(tok)
    return tok


def _special(content: str) -> AddedToken:
    """A special token that is matched verbatim and never split or stripped."""
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _check_special_ids(tok: Tokenizer) -> None:
    """Fail loudly if the trainer did not put the special tokens at ids 0..5 (the model relies on it)."""
    got = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens got ids {got}, expected 0..{len(SPECIAL_TOKENS) - 1}")


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained backend for transformers/mlx-lm and make its saves carry the chat template."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA_CHAT_TEMPLATE,
        # Cleanup would rewrite " ." as "." and break lossless decoding.
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    _patch_save_pretrained(hf)
    return hf


def _patch_save_pretrained(hf: PreTrainedTokenizerFast) -> None:
    """Make this instance's `save_pretrained` write a portable `tokenizer_config.json`.

    Patching the instance (not subclassing) keeps the saved `tokenizer_class` a stock transformers
    class, so `AutoTokenizer` reloads it anywhere. See `make_config_portable` for what is rewritten.
    """
    original = hf.save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = original(save_directory, *args, **kwargs)
        make_config_portable(save_directory, self.chat_template)
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
        None. The folder holds the usual files, with `tokenizer_config.json` rewritten by
        `make_config_portable`.
    """
    hf = unwrap_tokenizer(tokenizer)
    hf.save_pretrained(str(directory))
    make_config_portable(directory, hf.chat_template)


def make_config_portable(directory: str | Path, chat_template: str | None = None) -> dict:
    """Rewrite a saved `tokenizer_config.json` so that transformers 4 and 5, mlx-lm and transformers.js load it.

    transformers 5 writes the template only to `chat_template.jinja` (transformers.js reads it from
    the config), lists extra special tokens as a list under `extra_special_tokens` (transformers 4
    expects a dict there and crashes on a list) and names the class `TokenizersBackend` (unknown to
    transformers 4, which the ONNX export environment pins). transformers 5 reads the rewritten
    form identically.

    Args:
        directory: a folder written by `save_pretrained`.
        chat_template: the template to write; defaults to the folder's `chat_template.jinja`.

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
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return config
