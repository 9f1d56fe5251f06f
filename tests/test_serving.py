"""The registered model served the way MLflow users serve models: ``mlflow models serve`` and
``mlflow models predict`` (``--env-manager local``) on raw flights+weather rows, as JSON and CSV,
and ``mlflow.pyfunc.load_model(...).predict`` / ``mlflow.models.predict`` on frames as pandas reads
them from CSV and Parquet (int64 and int32 columns, floats, missing values).

The model comes from the real pipeline (shard -> horovodrun np=2 -> evaluate -> register) on the
smoke slice; the servers are the venv's own ``mlflow`` console script, run with the venv's bin
directory on PATH (MLflow starts ``uvicorn`` by name: the one thing README says to do).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from ringflow.training.config import load_config
from ringflow.training.data import load_flights
from ringflow.training.pyfunc import model_columns, predict_rows

pytestmark = [pytest.mark.horovod, pytest.mark.slow]

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
RAW_COLUMNS = [
    "time_hour",
    "carrier",
    "origin",
    "dest",
    "hour",
    "minute",
    "distance",
    "temp",
    "dewp",
    "humid",
    "wind_dir",
    "wind_speed",
    "wind_gust",
    "precip",
    "pressure",
    "visib",
    "year",
    "flight",
    "tailnum",
]


@pytest.fixture(scope="module")
def served_home(tmp_path_factory, prefect_harness):
    """A store whose @champion is a model the real pipeline trained and registered."""
    from ringflow.flows.training_pipeline import training_pipeline

    config = load_config(ROOT / "configs" / "smoke.yaml")
    home = tmp_path_factory.mktemp("serving") / "home"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RINGFLOW_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("RINGFLOW_DATA_KEY", raising=False)
        result = training_pipeline(config)
    assert result.model_version, "the pipeline registered no model"
    client = MlflowClient(tracking_uri=uri)
    name = config.registry.model_name
    if not result.promoted:  # the gate may keep it a challenger; serving is about a registered version
        client.set_registered_model_alias(name, "champion", result.model_version)
    return home, uri, f"models:/{name}@champion"


def _env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = uri
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_rows(n: int = 40) -> pd.DataFrame:
    """Rows as the source has them: int64 hour/minute/distance, missing weather values, ISO time,
    plus columns the model does not use."""
    rows = load_flights().query("month == 3").head(n)[RAW_COLUMNS].reset_index(drop=True)
    assert rows["hour"].dtype.kind == "i" and rows["wind_gust"].isna().any()
    return rows


@pytest.fixture(scope="module")
def server(served_home, tmp_path_factory):
    home, uri, model_uri = served_home
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=_env(uri),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow models serve never answered:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def expected(served_home):
    _, uri, model_uri = served_home
    mlflow.set_tracking_uri(uri)
    return predict_rows(mlflow.pyfunc.load_model(model_uri), _raw_rows())


def _records(rows: pd.DataFrame) -> str:
    """The rows as a JSON request body, every float exactly (pandas' to_json rounds to 10
    decimals: 17.261699999999998 -> 17.2617, a different double, which can fall on the other side
    of a quantile-bin edge of the model's features)."""
    plain = rows.astype(object).where(rows.notna(), None).to_dict(orient="records")
    return json.dumps({"dataframe_records": plain})


def _predictions(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["predictions"], dtype=np.float64).ravel()


def test_serves_raw_rows_as_json(server, expected):
    rows = _raw_rows()
    got = _predictions(
        httpx.post(
            f"{server}/invocations", content=_records(rows), headers={"Content-Type": "application/json"}, timeout=60
        )
    )
    assert got.shape == (len(rows),) and np.all((got >= 0) & (got <= 1)) and got.std() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-6)

    # integers where the source has floats are accepted too, as users type them
    typed = json.loads(rows.head(3).to_json(orient="records"))
    for r in typed:
        r["temp"], r["wind_dir"] = int(round(r["temp"])), 250
    got = _predictions(httpx.post(f"{server}/invocations", json={"dataframe_records": typed}, timeout=60))
    assert got.shape == (3,)


def test_serves_raw_rows_as_csv(server, expected):
    rows = _raw_rows()
    got = _predictions(
        httpx.post(
            f"{server}/invocations", content=rows.to_csv(index=False), headers={"Content-Type": "text/csv"}, timeout=60
        )
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_a_value_that_is_not_a_number_is_a_400_naming_the_column(server):
    rows = json.loads(_raw_rows(3).to_json(orient="records"))
    rows[1]["hour"] = "abc"
    r = httpx.post(f"{server}/invocations", json={"dataframe_records": rows}, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert "column hour" in message, message

    bad = _raw_rows(3).astype({"hour": object})
    bad.loc[1, "hour"] = "abc"
    csv = bad.to_csv(index=False)
    r = httpx.post(f"{server}/invocations", content=csv, headers={"Content-Type": "text/csv"}, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert "column hour: 'abc' is not a number" in message, message


@pytest.mark.parametrize("content_type", ["json", "csv"])
def test_mlflow_models_predict_on_raw_rows(served_home, expected, tmp_path, content_type):
    _, uri, model_uri = served_home
    rows = _raw_rows()
    path = tmp_path / f"rows.{content_type}"
    if content_type == "json":
        path.write_text(_records(rows))
    else:  # as pandas writes it: integers (hour 21) stay integers, read back as int64
        rows.to_csv(path, index=False)
    out = tmp_path / "predictions.json"
    proc = subprocess.run(
        [
            str(BIN / "mlflow"),
            "models",
            "predict",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-i",
            str(path),
            "-t",
            content_type,
            "-o",
            str(out),
        ],
        env=_env(uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.asarray(json.loads(out.read_text())["predictions"], dtype=np.float64).ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def _read_back(rows: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``rows`` written to ``path`` (.csv or .parquet) and read back by pandas, as a user has them."""
    if path.suffix == ".csv":
        rows.to_csv(path, index=False)
        return pd.read_csv(path)
    rows.to_parquet(path, index=False)
    return pd.read_parquet(path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_pyfunc_predicts_frames_as_pandas_reads_them(served_home, server, expected, tmp_path, suffix):
    """``mlflow.pyfunc.load_model(...).predict(df)`` on what ``pd.read_csv``/``pd.read_parquet``
    return (int64, int32, floats, missing values) gives the served predictions; a value that is
    not a number is refused, naming its column."""
    _, uri, model_uri = served_home
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    rows = _raw_rows()
    # MLflow checks no input type (training/pyfunc.py says why); the MLmodel lists the columns read
    declared = model.metadata.metadata["input_columns"]
    assert model.metadata.get_input_schema() is None
    assert {"name": "hour", "type": "double", "required": True} in declared
    assert model_columns(model, rows.columns) == [c["name"] for c in declared]

    frame = _read_back(rows, tmp_path / f"ints{suffix}")
    assert {frame[c].dtype.name for c in ("hour", "minute", "distance")} == {"int64"}
    assert frame["wind_gust"].dtype.name == "float64" and frame["wind_gust"].isna().any()
    np.testing.assert_allclose(np.ravel(model.predict(frame)), expected, rtol=1e-6)

    narrow = frame.astype({"hour": "int32", "minute": "int32", "distance": "float64", "wind_dir": "float32"})
    np.testing.assert_allclose(np.ravel(model.predict(narrow)), expected, rtol=1e-6)

    # a missing hour or distance makes pandas read those columns as float64
    holes = rows.astype({"hour": "float64", "distance": "float64"})
    holes.loc[[0, 7], "hour"] = np.nan
    holes.loc[3, "distance"] = np.nan
    frame = _read_back(holes, tmp_path / f"holes{suffix}")
    assert frame["hour"].dtype.name == "float64" and frame["hour"].isna().sum() == 2
    served = _predictions(
        httpx.post(
            f"{server}/invocations", content=_records(holes), headers={"Content-Type": "application/json"}, timeout=60
        )
    )
    np.testing.assert_allclose(np.ravel(model.predict(frame)), served, rtol=1e-6)
    intact = ~holes.index.isin([0, 3, 7])
    np.testing.assert_allclose(served[intact], expected[intact], rtol=1e-6)

    bad = rows.astype({"distance": str})  # a text column (Parquet stores no mix of ints and text)
    bad.loc[2, "distance"] = "abc"
    frame = _read_back(bad, tmp_path / f"bad{suffix}")
    with pytest.raises(mlflow.exceptions.MlflowException, match="column distance: 'abc' is not a number"):
        model.predict(frame)
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"lack the model's input column\(s\) \['hour'\]"):
        model.predict(rows.drop(columns=["hour"]))


def test_mlflow_models_predict_api_on_a_csv_pandas_wrote(served_home, expected, tmp_path, monkeypatch):
    """``mlflow.models.predict`` (env_manager="local") on a CSV as ``DataFrame.to_csv`` writes it
    (integers as integers, a missing hour), and on a DataFrame with int64 columns."""
    _, uri, model_uri = served_home
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    rows = _raw_rows()
    path = tmp_path / "rows.csv"
    rows.to_csv(path, index=False)
    out = tmp_path / "predictions.json"
    mlflow.models.predict(
        model_uri, input_path=str(path), content_type="csv", env_manager="local", output_path=str(out)
    )
    got = np.asarray(json.loads(out.read_text())["predictions"], dtype=np.float64).ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-6)

    out = tmp_path / "from-frame.json"
    mlflow.models.predict(model_uri, input_data=rows, content_type="json", env_manager="local", output_path=str(out))
    got = np.asarray(json.loads(out.read_text())["predictions"], dtype=np.float64).ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_mlflow_models_predict_cli_refuses_text_naming_the_column(served_home, tmp_path):
    _, uri, model_uri = served_home
    bad = _raw_rows(5).astype({"distance": object})
    bad.loc[2, "distance"] = "abc"
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    proc = subprocess.run(
        [
            str(BIN / "mlflow"),
            "models",
            "predict",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-i",
            str(path),
            "-t",
            "csv",
        ],
        env=_env(uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "column distance: 'abc' is not a number" in proc.stderr, proc.stderr[-3000:]


def test_lineage_and_system_metrics(served_home):
    """The evaluation logs the test window as a dataset input and links the test metrics to the
    model and that dataset; the training run has its host's system metrics; a monitoring run has
    its batch as a dataset input."""
    from ringflow.flows.monitoring import monitoring_flow

    home, uri, model_uri = served_home
    client = MlflowClient(tracking_uri=uri)
    config = load_config(ROOT / "configs" / "smoke.yaml")
    version = client.get_model_version_by_alias(config.registry.model_name, "champion")
    run = client.get_run(version.run_id)
    inputs = {i.dataset.name: {t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs}
    test_inputs = [n for n, tags in inputs.items() if tags.get("mlflow.data.context") == "testing"]
    assert len(test_inputs) == 1 and test_inputs[0].endswith("-test"), inputs
    test_input = next(i.dataset for i in run.inputs.dataset_inputs if i.dataset.name == test_inputs[0])

    # the version's source is the LoggedModel (models:/m-...); the alias lookup leaves model_id empty
    model = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    linked = {m.key: m for m in model.metrics or []}
    assert {"test_roc_auc", "test_log_loss"} <= set(linked), sorted(linked)
    auc = linked["test_roc_auc"]
    assert (auc.dataset_name, auc.dataset_digest) == (test_input.name, test_input.digest)
    assert auc.value == pytest.approx(run.data.metrics["test_roc_auc"])

    # MLflow system metrics of the training host, named by the host Horovod ran it on
    cpu = [k for k in run.data.metrics if k.startswith("system/") and k.endswith("/cpu_utilization_percentage")]
    assert cpu == ["system/localhost/cpu_utilization_percentage"], sorted(run.data.metrics)
    assert "system/localhost/system_memory_usage_megabytes" in run.data.metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RINGFLOW_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mon = monitoring_flow(config, batch="2013-03", trigger_rerun=False)
    batch_inputs = client.get_run(mon.monitoring_run_id).inputs.dataset_inputs
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}.get("mlflow.data.context") for i in batch_inputs}
    assert contexts == {f"{config.name}-batch-2013-03": "monitoring"}, contexts
    profile = json.loads(batch_inputs[0].dataset.profile)
    assert profile["num_rows"] == mon.rows
