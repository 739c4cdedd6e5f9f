"""The tokenizer of a GGUF export, as llama.cpp reads a Gemma tokenizer.

llama.cpp runs Gemma's SentencePiece model itself (``tokenizer.ggml.model = "llama"``: SentencePiece
BPE by piece score, byte fallback): the file carries every piece of ``tokenizer.model`` with its score
and type, padded with unused ``[PADn]`` pieces up to the embedding's rows, and no space prefix (Gemma's
model adds none). Piece types: SentencePiece's control, unknown, unused and byte pieces keep theirs;
the other tokens ``tokenizer.json`` adds (Gemma's reserved ids) are control tokens when transformers marks
them special (``<bos>``, ``<start_of_turn>``, ...; llama.cpp matches them in text only when asked to
parse special tokens, as ``llama-cli`` does with a chat template) and user-defined ones otherwise
(always matched, like transformers' non-special added tokens).

Special ids: bos, eos, unk and pad from the tokenizer, ``<end_of_turn>`` as end of turn (llama.cpp
ends generation at eos and at the end-of-turn token), ``add_bos_token`` as the tokenizer behaves, and
the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_persona.export.errors import ExportError

__all__ = ["add_vocab", "vocab_pieces"]

END_OF_TURN = "<end_of_turn>"
_UNUSED_SCORE = -10000.0


def vocab_pieces(folder: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and token types for llama.cpp, from ``tokenizer.model`` and ``tokenizer.json``.

    Args:
        folder: a Hugging Face folder holding Gemma's ``tokenizer.model``.
        n_vocab: the embedding's rows (the list is padded to it with unused pieces).

    Returns:
        ``(tokens, scores, token_types)``, each of length `n_vocab`.

    Raises:
        ExportError: no ``tokenizer.model``, or more pieces than embedding rows.
    """
    import gguf
    import sentencepiece as spm

    path = folder / "tokenizer.model"
    if not path.is_file():
        raise ExportError(f"{folder}: no tokenizer.model (Gemma's SentencePiece model); llama.cpp's Gemma "
                          "tokenizer is built from it")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    if n > n_vocab:
        raise ExportError(f"{path}: {n} pieces but the embedding has only {n_vocab} rows")
    kind = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [_UNUSED_SCORE] * n_vocab
    types = [int(kind.UNUSED)] * n_vocab
    for i in range(n):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = sp.get_score(i)
        types[i] = int(kind.UNKNOWN if sp.is_unknown(i) else kind.CONTROL if sp.is_control(i)
                       else kind.UNUSED if sp.is_unused(i) else kind.BYTE if sp.is_byte(i) else kind.NORMAL)
    for tid, content, special in _added_tokens(folder):
        if tid < n_vocab:
            if tid < n and tokens[tid] != content.encode("utf-8"):
                raise ExportError(f"{folder}: tokenizer.json adds {content!r} as id {tid}, which tokenizer.model "
                                  f"calls {tokens[tid].decode('utf-8', 'replace')!r}; the two files disagree")
            tokens[tid] = content.encode("utf-8")
            if tid >= n or types[tid] == kind.NORMAL:  # SentencePiece's control and unknown pieces stay so
                types[tid] = int(kind.CONTROL if special else kind.USER_DEFINED)
    return tokens, scores, types


def _added_tokens(folder: Path) -> list[tuple[int, str, bool]]:
    """``(id, content, special)`` of the tokens ``tokenizer.json`` adds (none without the file)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [(int(t["id"]), str(t["content"]), bool(t.get("special"))) for t in data.get("added_tokens", [])]


def add_vocab(writer, folder: Path, tokenizer, n_vocab: int) -> dict:
    """Writes the tokenizer, its special ids and the chat template into a `gguf.GGUFWriter`.

    Args:
        writer: the writer, before its header is written.
        folder: the model folder (``tokenizer.model``, ``tokenizer.json``).
        tokenizer: the folder's transformers tokenizer (special ids, behaviour, chat template).
        n_vocab: the embedding's rows.

    Returns:
        The special ids written: ``{"bos": 2, "eos": 1, "eot": 106, ...}`` and the ``add_bos`` flag.
    """
    from mlx_persona.data.tokenizer import GEMMA_CHAT_TEMPLATE, bos_eos_flags

    tokens, scores, types = vocab_pieces(folder, n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id, "eot": tokenizer.convert_tokens_to_ids(END_OF_TURN)}
    eot = ids["eot"]
    if eot is None or eot == ids["unk"] or not 0 <= eot < n_vocab or tokens[eot] != END_OF_TURN.encode():
        raise ExportError(f"{folder}: the tokenizer has no {END_OF_TURN} token; this is not a Gemma chat tokenizer")
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id),
                     ("eot", writer.add_eot_token_id)):
        if ids[key] is not None:
            add(int(ids[key]))
    flags = bos_eos_flags(tokenizer)
    writer.add_add_bos_token(bool(flags.get("add_bos_token")))
    writer.add_add_eos_token(bool(flags.get("add_eos_token")))
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is the chat template
        template = template.get("default")
    writer.add_chat_template(template or GEMMA_CHAT_TEMPLATE)
    return {**ids, "add_bos": bool(flags.get("add_bos_token"))}
