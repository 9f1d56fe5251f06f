"""The registered model: an MLflow pyfunc that carries its preprocessing.

``mlflow.pyfunc.load_model("models:/flights-delay@champion").predict(raw_rows)`` takes a pandas
frame with the source columns (extra columns are ignored) and returns delay probabilities.
A ``pt2`` torch export would load back as a bare GraphModule with no preprocessing, which is not
what a user can call on raw rows.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

TRAINING_PACKAGE = Path(__file__).resolve().parent


class DelayModel(mlflow.pyfunc.PythonModel):
    """Preprocessor + TabularNet, loaded from the run's output files."""

    def load_context(self, context) -> None:
        from training.model import load_model

        self.net, self.preprocessor = load_model(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from training.model import predict_proba

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return np.asarray(predict_proba(self.net, self.preprocessor, frame), dtype=np.float64)


def signature_for(feature_columns: list[str]) -> ModelSignature:
    """Feature columns must be present; their dtype is not pinned.

    Raw sources carry ints where the training frame has floats (flights' ``hour``), and MLflow's
    schema enforcement refuses int64 -> float64; the model's own preprocessing coerces types, so
    the signature only requires the columns.
    """
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), c) for c in feature_columns]),
        outputs=Schema([TensorSpec(np.dtype("float64"), (-1,), "delay_probability")]),
    )


# What the model's code (this package, shipped as code) imports when it loads and predicts.
MODEL_DISTRIBUTIONS = ["mlflow", "torch", "numpy", "pandas", "pyarrow", "pydantic", "pydantic-settings",
                       "pyyaml", "cloudpickle"]


def model_requirements() -> list[str]:
    """Pinned to this environment's versions.

    Stated, not inferred: MLflow's inference imports the model in a subprocess (5 s of every
    evaluation here) and got it wrong: it listed ``ringflow`` (not on any index) and left out torch.
    """
    from importlib.metadata import version

    return [f"{d}=={version(d).split('+')[0]}" for d in MODEL_DISTRIBUTIONS]


def log_delay_model(model_dir: Path, feature_columns: list[str], input_example: pd.DataFrame):
    """Log the pyfunc model into the active run; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=DelayModel(),
        artifacts={"model_dir": str(model_dir)},
        # ship the model code with the model so it loads where ringflow is not installed
        code_paths=[str(TRAINING_PACKAGE)],
        signature=signature_for(feature_columns),
        input_example=input_example[feature_columns],
        pip_requirements=model_requirements(),
    )
