"""The registered model: an MLflow pyfunc that carries its preprocessing, logged from code.

The model is ``training/pyfunc_model.py`` (MLflow "models from code": the file, not a pickled
object). It takes raw rows as users have them: a numeric column may be ``int64`` (pandas reading
CSV or Parquet), ``int32``, ``float64`` (a missing value makes pandas use floats) or, from JSON
and CSV requests, numbers and text; the model itself converts and checks them
(:func:`check_rows`): a value that is not a number is an ``MlflowException`` (HTTP 400 when
served) that names the column, and so is a missing column.

Its signature therefore declares the output only. No input type would do: MLflow's schema check
(``mlflow.models.utils._enforce_mlflow_datatype``) refuses ``int64`` where a column is ``double``
(it converts ints of at most 6 bytes) and ``float64`` where it is ``long``, and a column typed
``AnyType`` makes ``mlflow models serve`` refuse every CSV request (its parser asks the schema for
pandas types). The columns the model reads, with the type of their values, are in the MLmodel's
``metadata`` (:data:`INPUT_COLUMNS`); :func:`model_columns` reads them (or, for a model logged
before, its typed signature).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PyFuncModel
from mlflow.types.schema import ColSpec, DataType, Schema, TensorSpec

TRAINING_PACKAGE = Path(__file__).resolve().parent
MODEL_CODE = TRAINING_PACKAGE / "pyfunc_model.py"
OUTPUT_NAME = "delay_probability"
INPUT_COLUMNS = "input_columns"
"""Key of the MLmodel ``metadata`` entry: the columns the model reads, in MLflow's schema format
(``Schema.to_dict()``: [{"type": "double" | "string", "name": ..., "required": true}, ...])."""


def column_type(values: pd.Series) -> DataType:
    """``double`` for numbers (ints, floats, booleans), ``string`` for the rest (categoricals,
    and timestamps as ISO-8601 text: JSON and CSV carry no datetime type)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_datetime64_any_dtype(values):
        return DataType.double
    return DataType.string


def input_schema(feature_columns: list[str], example: pd.DataFrame) -> Schema:
    """Each of ``feature_columns`` with the type of its values in ``example`` (rows as the model
    is trained on them): what the model reads, recorded in the MLmodel's metadata and used to
    write the input example, not enforced by MLflow (module docstring)."""
    missing = [c for c in feature_columns if c not in example.columns]
    if missing:
        raise ValueError(f"the input example lacks the model's columns {missing}")
    return Schema([ColSpec(column_type(example[c]), c) for c in feature_columns])


def signature_for() -> ModelSignature:
    """The output only: one delay probability per row (inputs: module docstring)."""
    return ModelSignature(outputs=Schema([TensorSpec(np.dtype("float64"), (-1,), OUTPUT_NAME)]))


def check_rows(frame: pd.DataFrame, columns: list[str], numeric: list[str]) -> pd.DataFrame:
    """``frame`` with its ``numeric`` columns as numbers, or an ``MlflowException`` (invalid
    parameter value: HTTP 400 when served) naming a column of ``columns`` that ``frame`` lacks or
    a ``numeric`` column with a value that is not a number. Integer, float and boolean columns
    are left as they are (the preprocessing casts them); text columns (JSON, CSV) are parsed."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MlflowException.invalid_parameter_value(f"the rows lack the model's input column(s) {missing}")
    parsed = {}
    for c in numeric:
        values = frame[c]
        if pd.api.types.is_numeric_dtype(values):
            continue
        numbers = pd.to_numeric(values, errors="coerce")
        bad = numbers.isna() & values.notna()
        if bad.any():
            raise MlflowException.invalid_parameter_value(
                f"column {c}: {values[bad].iloc[0]!r} is not a number ({int(bad.sum())} such value(s))"
            )
        parsed[c] = numbers.astype("float64")
    return frame.assign(**parsed) if parsed else frame


def _as_text(values: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values):
        text = values.map(lambda t: t.isoformat(), na_action="ignore")
    else:
        text = values.astype("string")
    out = text.astype(object)
    out[values.isna()] = None
    return out


def conform(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """The declared columns of ``frame``, converted to the declared types where that loses nothing.

    Integers become floats and timestamps ISO text; values that are not numbers are left alone so
    that the schema check names the column. Columns the schema does not declare are dropped;
    declared columns the frame lacks are left to the check (it names them). For models logged
    with a typed signature (before their inputs were declared in metadata), whose rows MLflow
    checks against it; and for the input example.
    """
    out = {}
    for spec in schema.inputs:
        if spec.name not in frame.columns:
            continue
        values = frame[spec.name]
        if spec.type == DataType.double and values.dtype.kind in "iub":
            values = values.astype("float64")
        elif spec.type == DataType.string and values.dtype != object:
            values = _as_text(values)
        out[spec.name] = values
    return pd.DataFrame(out, index=frame.index)


def _input_schema(model: PyFuncModel) -> Schema | None:
    """``model.metadata.get_input_schema()``, typed (MLflow's is unannotated)."""
    signature: ModelSignature | None = model.metadata.signature
    return signature.inputs if signature is not None else None


def predict_rows(model: PyFuncModel, frame: pd.DataFrame) -> np.ndarray:
    """Delay probabilities of a loaded pyfunc ``model`` for raw rows (source columns and dtypes)."""
    schema = _input_schema(model)
    rows = conform(frame, schema) if schema is not None else frame
    return np.asarray(model.predict(rows), dtype=np.float64).ravel()


def model_columns(model: PyFuncModel, available: Collection[str], fallback: list[str] | None = None) -> list[str]:
    """The columns a loaded pyfunc ``model`` declares that are ``available`` (a champion may have
    been trained on other features; the timestamp is declared when it derives calendar features);
    ``fallback`` when none of them is."""
    schema = _input_schema(model)
    if schema is not None:
        declared = [str(n) for n in schema.input_names()]  # int only for unnamed tensor inputs
    else:
        declared = [c["name"] for c in (model.metadata.metadata or {}).get(INPUT_COLUMNS, [])]
    return [c for c in declared if c in available] or list(fallback or [])


# What the model's code (this package, shipped as code) imports when it loads and predicts.
MODEL_DISTRIBUTIONS = [
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "pydantic-settings",
    "pyyaml",
    "cloudpickle",
]


PYTORCH_INDEX = "https://download.pytorch.org/whl"


def torch_index_url() -> str | None:
    """The index that serves this environment's torch build: PyTorch's own for a labelled build
    (``2.13.0+cpu`` -> ``.../whl/cpu``, ``+cu128`` -> ``.../whl/cu128``), None for PyPI's."""
    from importlib.metadata import version

    label = version("torch").partition("+")[2]
    return f"{PYTORCH_INDEX}/{label}" if label else None


def model_requirements() -> list[str]:
    """Pinned to this environment's versions, torch to its exact build and the index serving it
    (MLflow writes the ``--extra-index-url`` line into requirements.txt), so an environment built
    for the model (``mlflow models serve --env-manager virtualenv``, ``build-docker``) gets the
    build that was tested, not PyPI's multi-GB CUDA torch.

    Stated, not inferred: MLflow's inference imports the model in a subprocess (5 s of every
    evaluation here) and got it wrong: it listed ``ringflow`` (not on any index) and left out torch.
    """
    from importlib.metadata import version

    index = torch_index_url()
    pins = [f"{d}=={version(d) if d == 'torch' else version(d).split('+')[0]}" for d in MODEL_DISTRIBUTIONS]
    return ([f"--extra-index-url {index}"] if index else []) + pins


def shipped_code(scratch: Path) -> Path:
    """``scratch/ringflow/training``: this package under its import name, for ``code_paths``.

    MLflow copies a code path's folder into the model and puts its parent on ``sys.path`` at load,
    so the folder must be ``ringflow`` (a namespace package) holding ``training``, whose modules
    import each other as ``ringflow.training.*``."""
    import shutil

    root = scratch / "ringflow"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(TRAINING_PACKAGE, root / "training", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def log_delay_model(model_dir: Path, feature_columns: list[str], input_example: pd.DataFrame) -> ModelInfo:
    """Log the pyfunc model (from code) into the active run; returns MLflow's ModelInfo.

    ``input_example``: a few rows as the model is trained on them; they type the declared columns.
    """
    schema = input_schema(feature_columns, input_example)
    info: ModelInfo = mlflow.pyfunc.log_model(  # MLflow's log_model is unannotated: its documented return
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={"model_dir": str(model_dir)},
        # ship the model code with the model so it loads where ringflow is not installed
        code_paths=[str(shipped_code(model_dir.parent / "code"))],
        signature=signature_for(),
        input_example=conform(input_example, schema),
        metadata={INPUT_COLUMNS: schema.to_dict()},
        pip_requirements=model_requirements(),
    )
    return info
