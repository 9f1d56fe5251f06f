"""The registered model: an MLflow pyfunc that carries its preprocessing, logged from code.

The model is ``training/pyfunc_model.py`` (MLflow "models from code": the file, not a pickled
object). Its signature types every input column, which is what ``mlflow models serve`` parses
requests with: numeric features are ``double`` (JSON and CSV integers are accepted and converted;
a value that is not a number is a 400, in JSON naming the column), everything else is ``string``
(categoricals, and timestamps as ISO-8601 text). ``signature_for`` is the one place that decides
a column's type.

In Python, ``predict_rows(model, frame)`` scores raw rows: it picks the columns the model declares
and converts them to the declared types (MLflow's own schema check refuses an int64 column where
the signature says double, e.g. flights' ``hour`` as read from the source).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, Schema, TensorSpec

TRAINING_PACKAGE = Path(__file__).resolve().parent
MODEL_CODE = TRAINING_PACKAGE / "pyfunc_model.py"
OUTPUT_NAME = "delay_probability"


def column_type(values: pd.Series) -> DataType:
    """``double`` for numbers (ints, floats, booleans), ``string`` for the rest.

    Not ``long`` for integer columns: a missing value turns them into floats, which MLflow would
    then refuse; not ``datetime`` for timestamps: MLflow refuses time-zone-aware values and the
    CSV parser cannot read a datetime dtype, while ISO text works in JSON, CSV and Python.
    """
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_datetime64_any_dtype(values):
        return DataType.double
    return DataType.string


def signature_for(feature_columns: list[str], example: pd.DataFrame) -> ModelSignature:
    """Input: each of ``feature_columns`` with the type of its values in ``example`` (rows as the
    model is trained on them); output: one delay probability per row."""
    missing = [c for c in feature_columns if c not in example.columns]
    if missing:
        raise ValueError(f"the input example lacks the model's columns {missing}")
    return ModelSignature(
        inputs=Schema([ColSpec(column_type(example[c]), c) for c in feature_columns]),
        outputs=Schema([TensorSpec(np.dtype("float64"), (-1,), OUTPUT_NAME)]),
    )


def _as_text(values: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values):
        text = values.map(lambda t: t.isoformat(), na_action="ignore")
    else:
        text = values.astype("string")
    return text.astype(object).where(values.notna(), None)


def conform(frame: pd.DataFrame, signature: ModelSignature) -> pd.DataFrame:
    """The declared columns of ``frame``, converted to the declared types where that loses nothing.

    Integers become floats and timestamps ISO text; values that are not numbers are left alone so
    that MLflow's schema check names the column. Columns the signature does not declare are
    dropped; declared columns the frame lacks are left to MLflow's check (it names them).
    """
    out = {}
    for spec in signature.inputs.inputs:
        if spec.name not in frame.columns:
            continue
        values = frame[spec.name]
        if spec.type == DataType.double and values.dtype.kind in "iub":
            values = values.astype("float64")
        elif spec.type == DataType.string and values.dtype != object:
            values = _as_text(values)
        out[spec.name] = values
    return pd.DataFrame(out, index=frame.index)


def predict_rows(model, frame: pd.DataFrame) -> np.ndarray:
    """Delay probabilities of a loaded pyfunc ``model`` for raw rows (source columns and dtypes)."""
    signature = model.metadata.signature
    rows = conform(frame, signature) if signature is not None and signature.inputs is not None else frame
    return np.asarray(model.predict(rows), dtype=np.float64).ravel()


def model_columns(model, available, fallback: list[str] | None = None) -> list[str]:
    """The columns a loaded pyfunc ``model`` declares that are ``available`` (a champion may have
    been trained on other features; the timestamp is declared when it derives calendar features);
    ``fallback`` when none of them is."""
    declared = model.metadata.get_input_schema().input_names()
    return [c for c in declared if c in available] or list(fallback or [])


# What the model's code (this package, shipped as code) imports when it loads and predicts.
MODEL_DISTRIBUTIONS = ["mlflow", "torch", "numpy", "pandas", "pyarrow", "pydantic", "pydantic-settings",
                       "pyyaml", "cloudpickle"]


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


def log_delay_model(model_dir: Path, feature_columns: list[str], input_example: pd.DataFrame):
    """Log the pyfunc model (from code) into the active run; returns MLflow's ModelInfo.

    ``input_example``: a few rows as the model is trained on them; they type the signature.
    """
    signature = signature_for(feature_columns, input_example)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={"model_dir": str(model_dir)},
        # ship the model code with the model so it loads where ringflow is not installed
        code_paths=[str(shipped_code(model_dir.parent / "code"))],
        signature=signature,
        input_example=conform(input_example, signature),
        pip_requirements=model_requirements(),
    )
