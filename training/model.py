"""The tabular model: an embedding per categorical column plus an MLP, one logit out.

With ``ensemble_size`` k > 1 the net holds k members trained at once (TabM-style, Gorishniy et
al. 2024): k MLPs batched as stacked weights, each trained with its own loss on the same batch;
:meth:`TabularNet.forward` still returns one logit per row, that of the members' mean probability.

Importable without Horovod or Prefect: evaluation, the registered pyfunc model and monitoring
load and score it with plain PyTorch.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np
import pandas as pd
import torch
from torch import nn

from ringflow.training.config import ModelConfig
from ringflow.training.manifest import atomic_write_bytes
from ringflow.training.preprocess import Preprocessor, indicator_name

MODEL_FILE = "model.pt"
PREPROCESSOR_FILE = "preprocessor.json"
DEFAULT_THRESHOLD = 0.5


class Arch(TypedDict):
    """The architecture of a :class:`TabularNet` (its constructor's arguments), saved in model.pt
    and in every checkpoint so the net can be rebuilt from the file alone."""

    num_numeric: int
    cardinalities: list[int]
    embedding_dim: int
    hidden_sizes: list[int]
    dropout: float
    additive_numeric: NotRequired[list[int]]
    """Absent in files saved before the additive inputs existed (every input deep, as then)."""
    additive_categorical: NotRequired[list[int]]
    ensemble_size: NotRequired[int]
    """Absent in files saved before the ensemble existed, and for a single net (k = 1)."""
    ensemble_levels: NotRequired[bool]
    """True: every member has its own additive levels and linear terms (absent: shared)."""
    numeric_embedding: NotRequired[str]
    """``plr`` or ``plr_lite``; absent in files saved before it existed and for ``none``."""
    embedded_numeric: NotRequired[list[int]]
    embedding_frequencies: NotRequired[int]
    embedding_sigma: NotRequired[float]
    numeric_embedding_dim: NotRequired[int]


class MemberLinear(nn.Module):
    """k independent linear layers applied at once: input [n, d] (the same rows for every
    member) or [n, k, d] (one input per member) -> [n, k, out]. Each member's weights are
    initialised as ``nn.Linear``'s."""

    def __init__(self, k: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        self.weight = nn.Parameter(torch.empty(k, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(k, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return torch.einsum("nd,kdo->nko", x, self.weight) + self.bias
        return torch.einsum("nkd,kdo->nko", x, self.weight) + self.bias


class PeriodicEmbedding(nn.Module):
    """PLR embeddings of numeric inputs (Gorishniy et al. 2022, as their ``rtdl_num_embeddings``
    package's ``PeriodicEmbeddings``): each input x of [n, f] becomes
    ReLU(Linear([cos(2 pi c x), sin(2 pi c x)])) over its own k trainable frequencies c,
    initialised from N(0, sigma) truncated at 3 sigma -> [n, f, dim]. Not ``lite``: every input
    has its own Linear (2k -> dim, ``MemberLinear`` over the inputs); ``lite``: one shared."""

    def __init__(self, num_inputs: int, frequencies: int, sigma: float, dim: int, lite: bool = False):
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"the frequencies' sigma must be positive, got {sigma}")
        self.frequencies = nn.Parameter(torch.empty(num_inputs, frequencies))
        nn.init.trunc_normal_(self.frequencies, 0.0, sigma, -3 * sigma, 3 * sigma)
        self.linear = nn.Linear(2 * frequencies, dim) if lite else MemberLinear(num_inputs, 2 * frequencies, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 2 * math.pi * self.frequencies * x.unsqueeze(-1)  # [n, f, k]
        out: torch.Tensor = torch.relu(self.linear(torch.cat([torch.cos(z), torch.sin(z)], dim=-1)))
        return out


def mean_probability_logit(member_logits: torch.Tensor) -> torch.Tensor:
    """[n, k] member logits -> [n]: the logit of the members' mean probability, computed in log
    space (log p - log(1 - p) of the mean) so confident members do not round to 0 or 1."""
    if member_logits.shape[1] == 1:
        return member_logits[:, 0]
    f = nn.functional.logsigmoid
    return torch.logsumexp(f(member_logits), dim=1) - torch.logsumexp(f(-member_logits), dim=1)


class TabularNet(nn.Module):
    """Embeddings of the categorical inputs and the numeric inputs into an MLP, one logit out.

    Inputs listed as *additive* (``additive_numeric`` / ``additive_categorical``: positions in
    the preprocessor's numeric and categorical inputs) bypass the MLP: each category adds a
    learnt level to the logit and each numeric a linear term, so the MLP cannot combine them
    with the other inputs. Trained on winter months, the MLP otherwise learns carrier x weather
    and route x weather effects that do not carry over to summer (docs/results/model-quality.md).

    ``ensemble_size`` k > 1: k members (TabM-style) share the embeddings of the deep inputs and
    each has its own MLP (``MemberLinear`` layers) and, with ``ensemble_levels``, its own additive
    levels and linear terms (otherwise the members share them). :meth:`member_logits` gives the
    members' logits for training (:meth:`training_loss`: the mean of the members' losses);
    :meth:`forward`, used for scoring, the logit of their mean probability. k = 1 is the single
    network, with the same parameter names as before the ensemble existed.

    ``numeric_embedding`` ``plr`` / ``plr_lite``: the deep numeric inputs listed in
    ``embedded_numeric`` enter the MLP as their :class:`PeriodicEmbedding` (``numeric_embedding_dim``
    values each) instead of their standardised value; ``none`` (the default) is the network as
    before, with the same arch and parameters.
    """

    def __init__(
        self,
        num_numeric: int,
        cardinalities: list[int],
        embedding_dim: int,
        hidden_sizes: list[int],
        dropout: float = 0.0,
        additive_numeric: list[int] | None = None,
        additive_categorical: list[int] | None = None,
        ensemble_size: int = 1,
        ensemble_levels: bool = False,
        numeric_embedding: str = "none",
        embedded_numeric: list[int] | None = None,
        embedding_frequencies: int = 48,
        embedding_sigma: float = 0.01,
        numeric_embedding_dim: int = 24,
    ):
        super().__init__()
        k = int(ensemble_size)
        if k < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        additive_numeric = sorted(int(i) for i in additive_numeric or [])
        additive_categorical = sorted(int(i) for i in additive_categorical or [])
        # Kept so the architecture can be rebuilt from the saved file alone (files saved before
        # the additive inputs existed lack them: every input deep, as then).
        self.arch = Arch(
            num_numeric=int(num_numeric),
            cardinalities=[int(c) for c in cardinalities],
            embedding_dim=int(embedding_dim),
            hidden_sizes=[int(h) for h in hidden_sizes],
            dropout=float(dropout),
        )
        if additive_numeric or additive_categorical:
            self.arch["additive_numeric"] = additive_numeric
            self.arch["additive_categorical"] = additive_categorical
        if k > 1:  # a single net's arch stays as before, so its old files and checkpoints match
            self.arch["ensemble_size"] = k
            if ensemble_levels:
                self.arch["ensemble_levels"] = True
        if numeric_embedding not in ("none", "plr", "plr_lite"):
            raise ValueError(f"numeric_embedding must be none, plr or plr_lite, got {numeric_embedding!r}")
        embedded = sorted(int(i) for i in embedded_numeric or []) if numeric_embedding != "none" else []
        if set(embedded) & set(additive_numeric) or any(not 0 <= i < num_numeric for i in embedded):
            raise ValueError(f"embedded_numeric {embedded} must be deep numeric inputs (of {num_numeric})")
        if numeric_embedding != "none":  # absent for none: today's files and checkpoints match
            self.arch["numeric_embedding"] = numeric_embedding
            self.arch["embedded_numeric"] = embedded
            self.arch["embedding_frequencies"] = int(embedding_frequencies)
            self.arch["embedding_sigma"] = float(embedding_sigma)
            self.arch["numeric_embedding_dim"] = int(numeric_embedding_dim)
        self.ensemble_size = k
        # outputs per additive level / linear term: one per member, or one shared by all
        own = k if ensemble_levels and k > 1 else 1
        self.deep_numeric = [i for i in range(num_numeric) if i not in additive_numeric]
        # the deep numeric inputs that enter as their value (all of them without an embedding)
        self.plain_numeric = [i for i in self.deep_numeric if i not in embedded]
        self.embedded_numeric = embedded
        self.numeric_embedding = (
            PeriodicEmbedding(
                len(embedded), embedding_frequencies, embedding_sigma, numeric_embedding_dim,
                lite=numeric_embedding == "plr_lite",
            )
            if embedded
            else None
        )  # fmt: skip
        self.deep_categorical = [j for j in range(len(cardinalities)) if j not in additive_categorical]
        self.additive_numeric, self.additive_categorical = additive_numeric, additive_categorical
        self.embeddings = nn.ModuleList(nn.Embedding(cardinalities[j], embedding_dim) for j in self.deep_categorical)
        levels = [nn.Embedding(cardinalities[j], own) for j in additive_categorical]
        for level in levels:
            nn.init.zeros_(level.weight)  # every category starts at the average
        self.levels = nn.ModuleList(levels)
        self.linear = nn.Linear(len(additive_numeric), own) if additive_numeric else None
        layers: list[nn.Module] = []
        width = (
            len(self.plain_numeric) + numeric_embedding_dim * len(embedded) + embedding_dim * len(self.deep_categorical)
        )
        for h in hidden_sizes:
            layers += [nn.Linear(width, h) if k == 1 else MemberLinear(k, width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1) if k == 1 else MemberLinear(k, width, 1))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def for_preprocessor(cls, pre: Preprocessor, cfg: ModelConfig) -> TabularNet:
        """The network for ``pre``'s inputs: an input is additive when every source column it is
        derived from is in ``cfg.additive_features`` (the route origin+dest when both are). With
        ``cfg.numeric_embedding``, every deep numeric input but the missing-value indicators
        (0/1: an embedding of two values is a linear input) is embedded."""
        additive = set(cfg.additive_features)
        numeric = [i for i, src in enumerate(pre.numeric_input_sources) if set(src) <= additive]
        categorical = [j for j, src in enumerate(pre.categorical_input_sources) if set(src) <= additive]
        indicators = {indicator_name(c) for c in pre.missing_indicators}
        embedded = [
            i for i, name in enumerate(pre.numeric_inputs) if i not in numeric and name not in indicators
        ]  # fmt: skip
        return cls(
            len(pre.numeric_inputs),
            pre.cardinalities,
            cfg.embedding_dim,
            cfg.hidden_sizes,
            cfg.dropout,
            additive_numeric=numeric,
            additive_categorical=categorical,
            ensemble_size=cfg.ensemble_size,
            ensemble_levels=cfg.ensemble_levels,
            numeric_embedding=cfg.numeric_embedding,
            embedded_numeric=embedded,
            embedding_frequencies=cfg.numeric_embedding_frequencies,
            embedding_sigma=cfg.numeric_embedding_sigma,
            numeric_embedding_dim=cfg.numeric_embedding_dim,
        )

    def param_groups(self, weight_decay: float, level_weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the additive category levels decay with
        ``level_weight_decay`` (pulled towards the average unless many rows hold them up), the
        rest with ``weight_decay``."""
        levels = list(self.levels.parameters())
        ids = {id(p) for p in levels}
        rest = [p for p in self.parameters() if id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest, "weight_decay": weight_decay}]
        if levels:
            groups.append({"params": levels, "weight_decay": level_weight_decay})
        return groups

    def member_logits(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        """-> the members' logits, shape [n, k] (k = ``ensemble_size``; [n, 1] for a single net)."""
        if self.numeric_embedding is None:
            parts = [x_num if not self.additive_numeric else x_num[:, self.deep_numeric]]
        else:
            embedded = self.numeric_embedding(x_num[:, self.embedded_numeric]).flatten(1)
            parts = [x_num[:, self.plain_numeric], embedded]
        parts += [emb(x_cat[:, j]) for j, emb in zip(self.deep_categorical, self.embeddings, strict=True)]
        # [n, 1] from nn.Linear (k = 1), [n, k, 1] from MemberLinear
        logits: torch.Tensor = self.mlp(torch.cat(parts, dim=1)).reshape(len(x_num), self.ensemble_size)
        # levels and linear terms: [n, 1] (shared, broadcast over the members) or [n, k]
        for j, level in zip(self.additive_categorical, self.levels, strict=True):
            logits = logits + level(x_cat[:, j])
        if self.linear is not None:
            logits = logits + self.linear(x_num[:, self.additive_numeric])
        return logits

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        """-> logits of shape [n]: the logit of the members' mean probability (a single net's logit)."""
        return mean_probability_logit(self.member_logits(x_num, x_cat))

    def training_loss(self, x_num: torch.Tensor, x_cat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss the ranks minimise: the mean over the members of each member's binary
        cross-entropy (mean over the rows) on the same batch; a single net's BCE for k = 1.
        Each member learns on its own (as in a deep ensemble), not the ensemble's logit."""
        logits = self.member_logits(x_num, x_cat)
        return nn.functional.binary_cross_entropy_with_logits(logits, y.unsqueeze(1).expand_as(logits))


def save_model(
    path: str | Path,
    net: TabularNet,
    preprocessor: Preprocessor,
    model_cfg: ModelConfig | None = None,
    decision_threshold: float | None = None,
) -> Path:
    """Write ``model.pt`` (architecture + weights + decision threshold) and ``preprocessor.json``
    into directory ``path``.

    Both files are written atomically, so a reader never sees half a model.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    payload: dict[str, Any] = {"arch": net.arch, "state_dict": net.state_dict()}
    if model_cfg is not None:
        payload["model_config"] = model_cfg.model_dump(mode="json")
    if decision_threshold is not None:
        payload["decision_threshold"] = float(decision_threshold)
    torch.save(payload, buf)
    atomic_write_bytes(out / MODEL_FILE, buf.getvalue())
    preprocessor.save(out / PREPROCESSOR_FILE)
    return out / MODEL_FILE


def load_model(path: str | Path) -> tuple[TabularNet, Preprocessor]:
    """Load ``(net, preprocessor)`` from a directory written by :func:`save_model` (or a model.pt
    path whose directory also holds preprocessor.json). The net is in eval mode."""
    p = Path(path)
    d = p if p.is_dir() else p.parent
    model_file = d / MODEL_FILE if p.is_dir() else p
    if not model_file.is_file() or not (d / PREPROCESSOR_FILE).is_file():
        raise FileNotFoundError(f"{d} must hold {MODEL_FILE} and {PREPROCESSOR_FILE} (written by save_model)")
    payload = torch.load(model_file, map_location="cpu", weights_only=True)
    net = TabularNet(**payload["arch"])
    net.load_state_dict(payload["state_dict"])
    net.eval()
    return net, Preprocessor.load(d / PREPROCESSOR_FILE)


def read_decision_threshold(path: str | Path) -> float:
    """The probability above which the model in ``path`` (a directory written by :func:`save_model`
    or its model.pt) predicts a delay; 0.5 for models saved before the threshold was chosen on
    validation data."""
    p = Path(path)
    payload = torch.load(p / MODEL_FILE if p.is_dir() else p, map_location="cpu", weights_only=True)
    return float(payload.get("decision_threshold", DEFAULT_THRESHOLD))


@torch.no_grad()
def predict_logits(net: TabularNet, x_num: np.ndarray, x_cat: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    was_training = net.training
    net.eval()
    out = [
        net(torch.from_numpy(x_num[i : i + batch_size]), torch.from_numpy(x_cat[i : i + batch_size])).double().numpy()
        for i in range(0, len(x_num), batch_size)
    ]
    net.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


def predict_proba(net: TabularNet, preprocessor: Preprocessor, df: pd.DataFrame) -> np.ndarray:
    """Delay probabilities (float64, shape [n]) for raw rows with the source feature columns."""
    x_num, x_cat = preprocessor.transform(df)
    proba: np.ndarray = 1.0 / (1.0 + np.exp(-predict_logits(net, x_num, x_cat)))
    return proba
