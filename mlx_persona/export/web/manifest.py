"""``web.json``: what the chat page is told about the export folder it is installed in.

- ``dtypes``: the precisions the folder holds (the page offers only those);
- ``default_dtype``: the one it loads unless ``?dtype=`` asks (:func:`mlx_persona.export.onnx.default_dtype`:
  fp32 when the folder has it, q4 only when the export measured q4's greedy next token equal to fp32's at
  ``Q4_MIN_AGREEMENT`` of the positions), with ``q4_agreement`` / ``q4_min_agreement`` so the page can say why;
- ``persona``: the persona's name, when the export found its card (``{"name": ...}``, else null);
- ``preset``: the generation preset whose values ``generation_config.json`` holds (e.g. ``persona``), or null;
- ``title``.

It is served to the page, so it names no local path (``mlx_persona.json``, which does, is never served).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_persona.export.web.errors import WebError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WebError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError:
        raise WebError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict):
        raise WebError(f"{path}: expected a JSON object")
    return data


def _title(info: dict) -> str:
    spec = (info.get("fused") or {}).get("model_spec")
    if info.get("random_weights") and info.get("preset"):
        return f"mlx-persona chat · {info['preset']} (random weights)"
    if spec:
        return f"mlx-persona chat · {Path(str(spec)).name}"
    return "mlx-persona chat"


def matching_preset(generation: dict) -> str | None:
    """The name of the preset whose ``generation_config.json`` keys all have these values, or None."""
    from mlx_persona.sampling import PRESETS

    for name, config in PRESETS.items():
        if all(generation.get(k) == v for k, v in config.to_hf_generation_config().items()):
            return name
    return None


def page_manifest(web: Path, dtypes: list[str]) -> dict:
    """``web.json``'s content (module doc) for the export folder `web`, which holds `dtypes`."""
    from mlx_persona.export.onnx import Q4_MIN_AGREEMENT, default_dtype

    info = _read_json(web / "mlx_persona.json")
    onnx = info.get("onnx") if isinstance(info.get("onnx"), dict) else {}
    agreement = (onnx.get("q4_agreement") or {}).get("next_token")
    agreement = float(agreement) if isinstance(agreement, (int, float)) else None
    persona = info.get("persona") if isinstance(info.get("persona"), dict) else {}
    name = persona.get("name") if isinstance(persona.get("name"), str) else None
    return {"dtypes": dtypes, "default_dtype": default_dtype(dtypes, agreement), "q4_agreement": agreement,
            "q4_min_agreement": onnx.get("q4_min_agreement", Q4_MIN_AGREEMENT), "title": _title(info),
            "persona": {"name": name} if name else None,
            "preset": matching_preset(_read_json(web / "generation_config.json"))}
