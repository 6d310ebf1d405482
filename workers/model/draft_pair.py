"""A target checkpoint and a draft made of its lower layers, with controlled agreement.

Random weights make two independent models disagree on nearly every token, so speculative
decoding could not be measured honestly with them. Here the target's upper layers write
residuals scaled by `upper_scale` (their attention and MLP output projections are scaled), and
the draft is the target's first `draft_layers` layers with the same embeddings, final norm and
head. A small scale makes the upper layers nearly the identity: the draft agrees with the
target often; a large one makes them disagree. Production pairs are real models of one family
(for example a 1B draft for an 8B target), not this construction.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from workers.model.make_model import make_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def make_draft_pair(
    out_dir: str | Path,
    preset: str = "small",
    draft_layers: int = 2,
    upper_scale: float = 0.1,
    seed: int = 0,
    **overrides,
) -> tuple[Path, Path]:
    """Writes `out_dir/target` and `out_dir/draft`; returns their paths."""
    out = Path(out_dir)
    target = make_model(out / "target", preset, seed=seed, **overrides)
    config = json.loads((target / "config.json").read_text())
    layers = config["num_hidden_layers"]
    if not 1 <= draft_layers < layers:
        raise ValueError(f"draft_layers must be in [1, {layers - 1}], got {draft_layers}")
    weights = load_file(str(target / "model.safetensors"))
    for name in list(weights):
        parts = name.split(".")
        upper = len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= draft_layers
        if upper and name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = weights[name] * upper_scale
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})

    draft = out / "draft"
    draft.mkdir(parents=True, exist_ok=True)
    kept = {
        name: tensor
        for name, tensor in weights.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < draft_layers
    }
    save_file(kept, str(draft / "model.safetensors"), metadata={"format": "pt"})
    (draft / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": draft_layers}, indent=2)
    )
    for name in TOKENIZER_FILES:
        if (target / name).is_file():
            shutil.copy(target / name, draft / name)
    return target, draft
