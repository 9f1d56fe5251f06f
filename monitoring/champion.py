"""The champion being monitored, as read from the registry, and the config a rerun starts from.

Pure (pydantic and the manifest file): the task module reads the registry and fills
:class:`ChampionInfo`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel

from ringflow.training.config import PipelineConfig, with_overrides
from ringflow.training.manifest import Manifest

CHAMPION = "champion"
"""The registry alias of the model in production."""


class ChampionInfo(BaseModel):
    model_name: str
    version: str
    model_uri: str
    """Pinned to the version (``models:/name/3``): the alias may move while we monitor."""
    training_run_id: str | None = None
    manifest_path: str | None = None
    test_roc_auc: float | None = None
    tags: dict[str, str] = {}
    training_config: dict[str, Any] | None = None
    """``config/pipeline_config.json`` of the training run (None when it cannot be read)."""
    decision_threshold: float = 0.5
    """The threshold logged with the model (chosen on its validation data) for accuracy/F1."""


def rerun_base_config(cfg: PipelineConfig, champion: ChampionInfo) -> PipelineConfig:
    """The champion's own training config (so a rerun changes only what the plan says), with
    this deployment's monitoring thresholds, registry and schedules."""
    if not champion.training_config:
        return cfg
    try:
        base = PipelineConfig.model_validate(champion.training_config)
    except ValueError:
        return cfg
    return with_overrides(
        base,
        {
            "monitoring": cfg.monitoring.model_dump(mode="json"),
            "registry": cfg.registry.model_dump(mode="json"),
            "schedules": cfg.schedules.model_dump(mode="json"),
        },
    )


def champion_test_end(cfg: PipelineConfig, champion: ChampionInfo) -> dt.date:
    """Exclusive end of the champion's test window: from its manifest when it is on this machine,
    else from its training config."""
    if champion.manifest_path:
        try:
            return dt.date.fromisoformat(Manifest.load(champion.manifest_path).windows["test"].end[:10])
        except (FileNotFoundError, KeyError, ValueError):
            pass
    base = rerun_base_config(cfg, champion)
    return base.data.windows.test.end
