"""The reference the batch is compared with: the champion's training rows, sampled.

Pure (the manifest's files or the configured source; no Prefect, no MLflow).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pandas as pd
from pydantic import BaseModel, ConfigDict

from ringflow.monitoring.batch import CHUNK_ROWS, label_rows
from ringflow.monitoring.reports import sample_rows
from ringflow.monitoring.sampling import RowSample
from ringflow.training.config import PipelineConfig
from ringflow.training.data import in_window, read_source, validate_contract
from ringflow.training.manifest import Manifest, ShardEntry
from ringflow.training.preprocess import Preprocessor

if TYPE_CHECKING:
    import pyarrow as pa


class Reference(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    frame: pd.DataFrame
    preprocessor: Preprocessor
    schema_: dict[str, str]
    origin: str


def reference_from_manifest(manifest: Manifest, key: bytes | None, rows: int) -> Reference:
    """``rows`` rows sampled from the manifest's train shards (an equal share from each), each
    shard read row group by row group: the train window of a big dataset is never one frame."""
    per_shard = math.ceil(rows / max(len(manifest.shards), 1))
    parts = []
    for shard in manifest.shards:
        sample = RowSample(per_shard, seed=shard.index)
        for batch in _row_groups(manifest, shard, key):
            sample.add(batch.to_pandas())
        parts.append(sample.frame())
    frame = pd.concat(parts, ignore_index=True)
    train = manifest.windows["train"]
    return _sampled(
        frame,
        rows,
        preprocessor=manifest.read_preprocessor(),
        schema_=dict(manifest.schema_),
        origin=f"manifest {manifest.path} (train {train.start}..{train.end})",
    )


def _row_groups(manifest: Manifest, shard: ShardEntry, key: bytes | None) -> Iterator[pa.RecordBatch]:
    """The shard's record batches, read from disk row group by row group (a plain shard: 125 MB at
    30x the flights, never all held); an encrypted shard is decrypted whole in memory."""
    batches: Iterator[pa.RecordBatch] = manifest.open(shard, key, stream=True).iter_batches(batch_size=CHUNK_ROWS)
    return batches


def reference_from_source(base: PipelineConfig, rows: int) -> Reference:
    """The training window of ``base`` read from its source (the manifest is not on this machine)."""
    w = base.data.windows.train
    src = validate_contract(read_source(base.data), base.data)
    frame = label_rows(src[in_window(src, base.data, w.start, w.end)], base)
    pre = Preprocessor.fit(frame, base.data.numeric_features, base.data.categorical_features)
    return _sampled(
        frame,
        rows,
        preprocessor=pre,
        schema_={str(c): str(t) for c, t in frame.dtypes.items()},
        origin=f"source {base.data.source} window {w}",
    )


def _sampled(
    frame: pd.DataFrame, rows: int, *, preprocessor: Preprocessor, schema_: dict[str, str], origin: str
) -> Reference:
    return Reference(
        frame=sample_rows(frame, rows, seed=0).reset_index(drop=True),
        preprocessor=preprocessor,
        schema_=schema_,
        origin=origin,
    )
