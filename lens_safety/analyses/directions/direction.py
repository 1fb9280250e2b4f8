"""The refusal direction itself: :class:`RefusalDirection`, its hash, model check and save/load."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ...core import store
from ...core.errors import InputError, ModelMismatchError
from ...core.validation import check_int
from ...model.loading import SafetyModel

__all__ = ["RefusalDirection", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


@dataclass
class RefusalDirection:
    """A refusal direction of one model: the raw difference of means at (``layer``, ``position``).

    ``vector`` is float32 ``[d_model]``: ``mean(harmful) - mean(harmless)`` of residual layer
    ``layer`` (0 = embedding output, l = raw output of block l-1) at template position
    ``position`` (negative; -1 = last token). Ablation uses :attr:`unit`; addition adds
    ``coeff * vector`` (so ``coeff=1`` moves the mean harmless activation to the mean harmful one).
    ``meta`` records how it was made (data hashes, selection scores).

    >>> import torch
    >>> d = RefusalDirection(torch.tensor([3.0, 4.0]), layer=1, position=-1, model_name="m",
    ...                      weights_hash="h", n_layers=2)
    >>> d.norm, d.unit.tolist()
    (5.0, [0.6000000238418579, 0.800000011920929])
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    position: int
    model_name: str
    weights_hash: str
    n_layers: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vector)
        if v.dim() != 1:
            raise InputError(f"A direction is one vector [d_model]; got shape {tuple(v.shape)}.")
        v = v.detach().float().cpu()
        if not bool(torch.isfinite(v).all()):
            raise InputError("The direction has NaN or infinite entries; recompute it from finite activations.")
        if float(v.norm()) == 0.0:
            raise InputError("The direction is the zero vector: the two prompt sets have the same mean there "
                             "(e.g. the embedding layer at a template token). Pick another layer or position.")
        self.vector = v
        self.n_layers = int(self.n_layers)
        self.layer = check_int(self.layer, "layer", low=0, high=self.n_layers, kind="a residual layer")
        self.position = check_int(self.position, "position", high=-1, kind="a negative integer",
                                  hint="-1 = last template token")

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    @property
    def unit(self) -> Float[Tensor, " d_model"]:
        """The direction scaled to unit length (what ablation projects out)."""
        return self.vector / self.vector.norm()

    @property
    def hash(self) -> str:
        """A content hash: vector, layer, position and model."""
        h = store.sha256_json({"layer": self.layer, "position": self.position, "weights_hash": self.weights_hash})
        return hashlib.sha256(h.encode() + self.vector.numpy().tobytes()).hexdigest()

    def __repr__(self) -> str:
        return (f"RefusalDirection(layer={self.layer}, position={self.position}, norm={self.norm:.3g}, "
                f"d_model={self.d_model}, model={self.model_name!r})")

    def check_model(self, model: SafetyModel) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` is the model this direction came from."""
        if not isinstance(model, SafetyModel):
            raise InputError(f"model must be a SafetyModel (from ls.load_model), got {type(model).__name__}.")
        if self.d_model != model.d_model or self.n_layers != model.n_layers:
            raise ModelMismatchError(
                f"The direction has d_model={self.d_model} and {self.n_layers} layers, but {model.name} has "
                f"d_model={model.d_model} and {model.n_layers} layers: it was made with another model.")
        model.check_compatible(self.weights_hash, self.d_model, what=f"refusal direction ({self.model_name})")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tensors.safetensors`` + ``meta.json`` into ``directory`` atomically."""
        return store.write_artifact(directory, kind="RefusalDirection", schema_version=SCHEMA_VERSION,
                                    meta=self._meta(), tensors={"vector": self.vector})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RefusalDirection:
        """Load what :meth:`save` wrote (verified by sha256; :class:`CacheError` if not)."""
        tensors, meta = store.read_artifact(directory, kind="RefusalDirection", schema_version=SCHEMA_VERSION)
        return cls._from_meta(tensors["vector"], meta)

    def _meta(self) -> dict[str, Any]:
        """Everything but the vector, as saved in ``meta.json``."""
        return {"model_name": self.model_name, "weights_hash": self.weights_hash, "layer": self.layer,
                "position": self.position, "n_layers": self.n_layers, "d_model": self.d_model,
                "hash": self.hash, "meta": self.meta}

    @classmethod
    def _from_meta(cls, vector: Tensor, meta: dict[str, Any]) -> RefusalDirection:
        return cls(vector, meta["layer"], meta["position"], meta["model_name"], meta["weights_hash"],
                   meta["n_layers"], dict(meta.get("meta", {})))


def _as_direction(direction: Any) -> RefusalDirection:
    """``direction`` itself, or the chosen direction of a :class:`DirectionSelection` (read as its
    ``.direction``, so this module need not import the selection's)."""
    if isinstance(direction, RefusalDirection):
        return direction
    chosen = getattr(direction, "direction", None)
    if isinstance(chosen, RefusalDirection):
        return chosen
    raise InputError(f"Expected a RefusalDirection (or a DirectionSelection with a chosen direction), got "
                     f"{type(direction).__name__}.")

