"""Datasets logged to MLflow runs (training lineage, test window, monitoring batches)."""


def test_a_logged_dataset_s_schema_is_the_whole_frame_s(smoke_manifest):
    """The schema of a logged dataset is inferred on a sample that keeps every column's gaps;
    it must equal MLflow's inference on every row."""
    import warnings

    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    from ringflow.tasks.tracking import SCHEMA_SAMPLE_ROWS, pandas_dataset

    frame = pd.concat([smoke_manifest.read(s) for s in smoke_manifest.shards], ignore_index=True)
    frame.loc[len(frame) - 1, "carrier"] = None  # a gap only after the sample's first rows
    assert len(frame) > 5 * SCHEMA_SAMPLE_ROWS and frame["carrier"].head(SCHEMA_SAMPLE_ROWS).notna().all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fast = pandas_dataset(frame, targets=smoke_manifest.target_column, name="t")
        full = from_pandas(frame, targets=smoke_manifest.target_column, name="t")
        assert fast.schema == full.schema
        assert fast.profile == full.profile and fast.digest == full.digest
        assert not {c.name: c for c in fast.schema.inputs}["carrier"].required
