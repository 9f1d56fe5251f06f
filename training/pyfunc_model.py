"""The code MLflow runs to build the registered model ("models from code").

``training/pyfunc.py`` logs this file as ``python_model=<path>``: MLflow stores the source, not a
cloudpickled object, and on load it executes the file; ``mlflow.models.set_model`` names the
model object. The ``training`` package travels with the model (``code_paths``), so this loads
where ringflow is not installed. Keep the file free of side effects other than ``set_model``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel, PythonModelContext


class DelayModel(PythonModel):
    """Preprocessor + TabularNet, loaded from the model's ``model_dir`` artifact."""

    def load_context(self, context: PythonModelContext) -> None:
        from ringflow.training.model import load_model

        self.net, self.preprocessor = load_model(context.artifacts["model_dir"])

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Rows as users have them (training/pyfunc.py): numbers of any width, missing values,
        text from JSON and CSV; a value that is not a number is refused, naming its column."""
        from ringflow.training.model import predict_proba
        from ringflow.training.pyfunc import check_rows

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        frame = check_rows(frame, self.preprocessor.source_columns, self.preprocessor.numeric)
        return np.asarray(predict_proba(self.net, self.preprocessor, frame), dtype=np.float64)


set_model(DelayModel())
