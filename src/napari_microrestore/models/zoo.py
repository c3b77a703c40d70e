"""The model zoo: model cards (YAML), weights (safetensors, sha256-checked), user models.

A model card is one YAML file per model::

    id: tem-burst-fast                 # unique; the CLI's --model and the GUI picker use it
    title: Fast TEM burst deblur + denoise
    task: burst-deblur                 # burst-deblur | single-deblur | defocus | sstem | sr2x
    architecture: burst-fast           # a key of models.ARCHITECTURES, or classical:<method>
    kwargs: {...}                      # constructor arguments
    input:
      frames: {min: 3, max: 7, default: 5}   # burst models; single-image models: 1
      channels: 1
      normalisation: mean-std          # how the engine normalises (see engine.restore)
      multiple: 8                      # H, W padded to a multiple of this
      scale: 1                         # output pixels per input pixel
      register: true                   # burst models: register frames first
      motion_axis: vertical            # burst nets: the stage motion they learned (or any)
      ensemble: none                   # self-ensemble restore() runs: none | flips | dihedral
    weights: {file: tem-burst-fast.safetensors, sha256: <hex>, dtype: float16}
    training: {data: [...], licence: ..., command: ..., device: ..., notes: ...}
    metrics: {command: ..., split: ..., values: {...}}
    description: ...

Cards live in the package's ``zoo/`` folder (shipped models) and in the user's model folder
(fine-tuned models; ``$MICRORESTORE_MODELS`` or the platform's data folder). Weights are only
ever read with safetensors (no pickle), after their sha256 matched the card.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..core.errors import InputError
from ..core.io import write_bytes

PACKAGE_ZOO = Path(__file__).resolve().parent.parent / "zoo"
TASKS = ("burst-deblur", "single-deblur", "defocus", "sstem", "sr2x")
_CARD_SUFFIXES = (".yaml", ".yml")


def user_model_dir() -> Path:
    """Folder of the user's own (fine-tuned) models; not created here."""
    env = os.environ.get("MICRORESTORE_MODELS")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "napari-microrestore" / "models"


# the self-ensembles restore() can run (engine.restore.ENSEMBLES says what each one does)
ENSEMBLE_NAMES = ("none", "flips", "dihedral")


@dataclass
class ModelCard:
    id: str
    task: str
    architecture: str
    path: Path                     # the card file
    title: str = ""
    kwargs: dict = field(default_factory=dict)
    input: dict = field(default_factory=dict)
    weights: Optional[dict] = None
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    description: str = ""
    source: str = "zoo"            # "zoo" (shipped) or "user"

    # ---- input spec with defaults ---------------------------------------------------------
    @property
    def is_classical(self) -> bool:
        return self.architecture.startswith("classical:")

    @property
    def is_burst(self) -> bool:
        """Takes a raw burst (registered by the engine): burst nets and the 3-frame baseline."""
        return self.task in ("burst-deblur", "single-deblur")

    @property
    def frames(self) -> dict:
        f = self.input.get("frames", 1)
        if isinstance(f, int):
            return {"min": f, "max": f, "default": f}
        return {"min": int(f.get("min", 1)), "max": int(f.get("max", 1)),
                "default": int(f.get("default", f.get("min", 1)))}

    @property
    def motion_axis(self) -> Optional[str]:
        """The stage-motion orientation a learned burst net expects: ``"vertical"`` (every net
        trained here: the simulated stage moves along the columns, and
        :func:`~napari_microrestore.engine.restore.restore` rotates a burst until its motion
        does, see :mod:`~napari_microrestore.core.orient`), or None when the card says
        ``input: {motion_axis: any}`` (a net trained on every direction) and for classical
        methods and non-burst tasks."""
        if not self.is_burst or self.is_classical:
            return None
        axis = str(self.input.get("motion_axis", "vertical"))
        if axis not in ("vertical", "any"):
            raise InputError(f"model card {self.id}: input.motion_axis must be 'vertical' or "
                             f"'any'; got {axis!r}")
        return None if axis == "any" else axis

    @property
    def ensemble(self) -> str:
        """The self-ensemble ``restore`` uses by default (``input.ensemble``: "none",
        "flips" or "dihedral"; see :data:`~napari_microrestore.engine.restore.ENSEMBLES`)."""
        name = str(self.input.get("ensemble", "none"))
        if name not in ENSEMBLE_NAMES:
            raise InputError(f"model card {self.id}: input.ensemble must be one of "
                             f"{', '.join(ENSEMBLE_NAMES)}; got {name!r}")
        return name

    @property
    def multiple(self) -> int:
        return int(self.input.get("multiple", 1))

    @property
    def scale(self) -> int:
        return int(self.input.get("scale", 1))

    @property
    def weights_path(self) -> Optional[Path]:
        if not self.weights:
            return None
        return (self.path.parent / self.weights["file"]).resolve()

    def summary(self) -> dict:
        """One row of the zoo table: id, task, inputs, scale, training data, metrics."""
        fr = self.frames
        inputs = (f"{fr['min']}-{fr['max']} frames" if fr["max"] > 1 else "1 image")
        if self.task == "sstem":
            inputs = "section stack"
        data = self.training.get("data", [])
        if isinstance(data, list):
            data = ", ".join(str(d) for d in data)
        vals = self.metrics.get("values", {}) if isinstance(self.metrics, dict) else {}
        return {"id": self.id, "task": self.task, "inputs": inputs, "scale": self.scale,
                "training data": data or "-", "metrics": _fmt_metrics(vals), "source": self.source}

    def to_yaml_dict(self) -> dict:
        d = {"id": self.id, "title": self.title, "task": self.task,
             "architecture": self.architecture, "kwargs": self.kwargs, "input": self.input,
             "weights": self.weights, "training": self.training, "metrics": self.metrics,
             "description": self.description}
        return {k: v for k, v in d.items() if v not in (None, "", {})}


def _fmt_metrics(vals: dict) -> str:
    parts = []
    for k, v in vals.items():
        parts.append(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts) if parts else "-"


def read_card(path: Path | str, *, source: str = "zoo") -> ModelCard:
    """Parse and validate one model card (YAML, safe loader)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read model card {path}: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"model card {path} is not a YAML mapping")
    missing = [k for k in ("id", "task", "architecture") if not raw.get(k)]
    if missing:
        raise InputError(f"model card {path} lacks {', '.join(missing)}")
    if raw["task"] not in TASKS:
        raise InputError(f"model card {path}: unknown task {raw['task']!r}; known: {TASKS}")
    weights = raw.get("weights")
    if not str(raw["architecture"]).startswith("classical:"):
        if not (isinstance(weights, dict) and weights.get("file") and weights.get("sha256")):
            raise InputError(f"model card {path} needs weights: {{file, sha256}}")
    known = set(ModelCard.__dataclass_fields__) - {"path", "source"}
    return ModelCard(path=path, source=source,
                     **{k: v for k, v in raw.items() if k in known})


def list_cards(extra_dirs: Optional[list[Path]] = None) -> list[ModelCard]:
    """All cards: the shipped zoo, then the user's folder (and ``extra_dirs``).

    A user card whose id collides with an earlier one is skipped (shipped ids win), and a
    broken card in the user's folder is skipped rather than hiding every other model.
    """
    cards: list[ModelCard] = []
    seen: set[str] = set()
    dirs = [(PACKAGE_ZOO, "zoo"), (user_model_dir(), "user")]
    dirs += [(Path(d), "user") for d in (extra_dirs or [])]
    for folder, source in dirs:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() not in _CARD_SUFFIXES:
                continue
            try:
                card = read_card(p, source=source)
            except InputError:
                if source == "zoo":
                    raise
                continue
            if card.id in seen:
                continue
            seen.add(card.id)
            cards.append(card)
    return cards


def get_card(model_id: str, extra_dirs: Optional[list[Path]] = None) -> ModelCard:
    """The card with this id, or a path to a card file."""
    p = Path(model_id)
    if p.suffix.lower() in _CARD_SUFFIXES and p.is_file():
        return read_card(p, source="user")
    cards = list_cards(extra_dirs)
    for c in cards:
        if c.id == model_id:
            return c
    raise InputError(
        f"unknown model {model_id!r}; available: {', '.join(c.id for c in cards) or 'none'}"
    )


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_weights(card: ModelCard) -> Path:
    """Path of the card's weights after checking that the file exists and its sha256 matches."""
    wp = card.weights_path
    if wp is None:
        raise InputError(f"model {card.id} has no weights")
    if not wp.is_file():
        raise InputError(f"weights of model {card.id} not found: {wp}")
    digest = sha256_file(wp)
    if digest != str(card.weights["sha256"]).lower():
        raise InputError(
            f"weights of model {card.id} ({wp.name}) fail their checksum: sha256 {digest[:12]}... "
            f"but the card says {str(card.weights['sha256'])[:12]}...; the file is corrupt or "
            "was replaced"
        )
    return wp


def load_model(card: ModelCard, *, device: str = "cpu") -> Any:
    """Build the card's network and load its verified weights (float32, eval mode)."""
    from safetensors.torch import load_file

    from . import build

    if card.is_classical:
        raise InputError(f"model {card.id} is a classical method and has no network")
    wp = verify_weights(card)
    net = build(card.architecture, card.kwargs)
    state = load_file(str(wp), device="cpu")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"weights of model {card.id} do not fit its architecture: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return net.to(device).eval()


def save_model(net: Any, card: ModelCard | dict, folder: Path | str, *,
               dtype: str = "float16") -> ModelCard:
    """Save ``net``'s weights (safetensors) and its card (YAML) into ``folder``, atomically.

    ``card`` gives id, task, architecture, kwargs, input, training, metrics; the weights entry
    (file, sha256, dtype) is filled in here. Returns the card as read back from disk.
    """
    import torch
    from safetensors.torch import save as st_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = card.to_yaml_dict() if isinstance(card, ModelCard) else dict(card)
    model_id = str(d["id"])
    if not model_id or any(c in model_id for c in "/\\:") or model_id.startswith("."):
        raise InputError(f"model id {model_id!r} must be a plain name (no / \\ : or leading .)")
    tdtype = {"float16": torch.float16, "float32": torch.float32,
              "bfloat16": torch.bfloat16}[dtype]
    state = {k: (v.detach().to("cpu", tdtype) if v.is_floating_point() else v.detach().cpu())
             .contiguous() for k, v in net.state_dict().items()}
    blob = st_save(state)
    wfile = f"{model_id}.safetensors"
    write_bytes(folder / wfile, blob)
    d["weights"] = {"file": wfile, "sha256": hashlib.sha256(blob).hexdigest(), "dtype": dtype}
    card_path = folder / f"{model_id}.yaml"
    write_bytes(card_path, yaml.safe_dump(d, sort_keys=False).encode("utf-8"))
    return read_card(card_path, source="user")
