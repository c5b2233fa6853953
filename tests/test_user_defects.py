"""Defects a new user found: a speed-dependent benchmark check, ``output_dir`` naming a file, a
training split of one label, ``device`` checked where the config is only read, and a ServerApp
that answered a bad run config with a traceback. Each is one line naming the problem now."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_helpers import (InProcessGrid, keep_process_settings, node_configs,  # noqa: E402,F401
                            run_server_app, tiny_experiment, write_task, write_toml)

from fedpeptao.cli import main as cli_main  # noqa: E402
from fedpeptao.config import ConfigError, load_config  # noqa: E402
from fedpeptao.data.dataset import DataError  # noqa: E402
from fedpeptao.data.tasks import load_splits  # noqa: E402
from fedpeptao.flower.client_app import app as client_app  # noqa: E402
from fedpeptao.flower.settings import ServerSettings  # noqa: E402
from fedpeptao.utils.device import DeviceError, resolve_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_run(task: Path, *extra: str) -> list[str]:
    """``fedpeptao run`` overrides for a seconds-long run on a tiny random BERT."""
    return ["model.name=tiny-bert", f"data.task={task}", "tuning.num_prompt_tokens=3", "model.max_length=24",
            "federated.num_clients=2", "federated.clients_per_round=2", "federated.rounds=1", "client.epochs=1",
            "progress=false", "checkpoint.every=0", *extra]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# -- 1. the GPU benchmark's CPU check asserts nothing about speed --------------------------------------

BUSY_MACHINE_TABLE = """device: CPU (tiny models); bf16 backbone, fp32 trainables; random weights (model.random_init)
                 model  execution batched  s/round examples/s  TFLOP/s peak GiB
          tiny-roberta sequential   False    812.4        0.0    0.000      nan
          tiny-roberta    batched    True    951.0        0.0    0.000      nan
tiny-roberta: batched / sequential examples/s = 0.85
            tiny-llama sequential   False    799.9        0.0    0.000      nan
            tiny-llama    batched    True    903.2        0.0    0.000      nan
tiny-llama: batched / sequential examples/s = 0.89
"""


def test_the_tiny_benchmark_check_passes_on_a_machine_too_busy_to_show_a_rate(tmp_path, monkeypatch):
    import test_benchmarks

    def busy_run(*args, task_dir=None):
        return subprocess.CompletedProcess(args, 0, stdout=BUSY_MACHINE_TABLE, stderr="")

    monkeypatch.setattr(test_benchmarks, "run_script", busy_run)
    test_benchmarks.test_gpu_benchmark_runs_its_table_at_tiny_size(tmp_path)  # rates of 0.000 are no failure


def test_the_benchmark_prints_a_small_rate_as_nonzero():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    assert float(gpu.rate(2.1e-5, 8, 3)) == pytest.approx(2.1e-5) and len(gpu.rate(2.1e-5, 8, 3)) == 8
    assert gpu.rate(45.678, 8, 3) == "  45.678" and gpu.rate(0.0, 8, 3) == "   0.000"
    assert gpu.rate(123.45, 10, 1) == "     123.5" and float(gpu.rate(0.01, 10, 1)) == 0.01


# -- 2. output_dir naming a file --------------------------------------------------------------------

def test_output_dir_that_is_a_file_is_refused_naming_the_key(tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("not a folder\n")
    for value in (file, file / "runs"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"output_dir={value}"])
        assert str(err.value).startswith("output_dir: ") and str(file) in str(err.value)
        assert "\n" not in str(err.value)
    # a folder, existing or not yet, is fine
    assert load_config(None, [f"output_dir={tmp_path}"]).output_dir == str(tmp_path)
    assert load_config(None, [f"output_dir={tmp_path / 'new' / 'runs'}"]).output_dir == str(tmp_path / "new" / "runs")


def test_cli_run_with_output_dir_a_file_prints_one_line(tmp_path, capsys):
    file = tmp_path / "results.txt"
    file.write_text("not a folder\n")
    task = write_task(tmp_path / "task")
    assert cli_main(["run", *tiny_run(task, f"output_dir={file}")]) == 2
    assert one_line(capsys.readouterr().err).startswith("config error: output_dir: ")
    assert file.read_text() == "not a folder\n"


def test_the_fedpeptao_command_with_output_dir_a_file_prints_no_traceback(tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("not a folder\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([str(Path(sys.executable).parent / "fedpeptao"), "run", f"output_dir={file}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith("config error: output_dir: ")


# -- 3. a training split of a single label ----------------------------------------------------------

def single_label_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["a great film", "wonderful acting", "i loved it", "a joyful delight", "brilliant and warm",
            "beautifully shot", "smart and funny", "a triumph"]
    for name, times in (("train.tsv", 3), ("test.tsv", 1)):
        lines = ["sentence\tlabel"] + [f"{text} {i}\t1" for i in range(times) for text in rows]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_a_training_split_of_one_label_is_refused(tmp_path):
    task = single_label_task(tmp_path / "task")
    cfg = load_config(None, [f"data.task={task}"])
    with pytest.raises(DataError) as err:
        load_splits(cfg.data, cfg.seed)
    message = str(err.value)
    assert message.startswith("data: the training split") and "single label ('1')" in message
    assert "at least two" in message and "\n" not in message


def test_a_cap_that_leaves_one_label_is_refused_naming_it(tmp_path):
    task = write_task(tmp_path / "task")
    cfg = load_config(None, [f"data.task={task}"])
    train, _, _ = load_splits(cfg.data, cfg.seed)  # both labels: accepted
    assert sorted(set(train.labels.tolist())) == [0, 1]
    cfg = load_config(None, [f"data.task={task}", "data.max_train_examples=1"])
    with pytest.raises(DataError, match=r"single label .* after data\.max_train_examples=1; "):
        load_splits(cfg.data, cfg.seed)


def test_cli_run_on_one_label_prints_one_line_instead_of_accuracy_one(tmp_path, capsys):
    task = single_label_task(tmp_path / "task")
    out = tmp_path / "runs"
    assert cli_main(["run", *tiny_run(task, f"output_dir={out}")]) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err).startswith("error: data: the training split")
    assert "test accuracy" not in captured.out and not out.exists()


# -- 4. device: its form in the config, its presence where the model is placed ----------------------

def test_a_config_for_a_gpu_is_read_on_a_machine_without_one(tmp_path):
    assert load_config(None, ["device=cuda"]).device == "cuda"
    assert load_config(None, ["device=cuda:3"]).device == "cuda:3"
    assert load_config(None, ["device=mps"]).device == "mps"
    # the Flower ServerApp host reads the clients' config
    settings = ServerSettings.from_run_config({"overrides": "device=cuda", "output-dir": str(tmp_path / "out")}, 1)
    assert settings.experiment.device == "cuda"
    # a malformed name is still refused while parsing, in one line naming the key
    for bad in ("gpu0", "cuda:x", "CUDA", "cuda0"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"device={bad}"])
        assert str(err.value).startswith("device: expected auto, cpu, cuda, cuda:N or mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_placing_a_model_on_a_missing_gpu_is_one_line():
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda")
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith("device: cuda requested but CUDA is not available on this machine")
    assert "\n" not in str(err.value)
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_run_on_a_missing_gpu_prints_one_line(tmp_path, capsys):
    task = write_task(tmp_path / "task")
    out = tmp_path / "runs"
    assert cli_main(["run", *tiny_run(task, f"output_dir={out}", "device=cuda")]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: device: cuda requested but CUDA is not available")
    assert not out.exists()


# -- 5. the ServerApp refuses a bad run config in one line ------------------------------------------

@pytest.fixture
def server_setup(tmp_path, keep_process_settings):  # noqa: F811
    task = write_task(tmp_path / "task")
    config = write_toml(tmp_path / "experiment.toml", tiny_experiment(task))
    grid = InProcessGrid(client_app, node_configs(tmp_path, 2))
    return grid, config, tmp_path / "out"


def server_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("fedpeptao") and r.levelno >= logging.ERROR]


@pytest.mark.parametrize("overrides, expected", [
    ("federated.rounds=abc", "config error: federated.rounds: "),
    ("seed=1; federated.roundz=3", "config error: federated.roundz: unknown key"),
    ("output_dir=" + __file__, "config error: output_dir: "),
])
def test_server_app_logs_one_line_for_a_bad_override(server_setup, caplog, overrides, expected):
    grid, config, out = server_setup
    with caplog.at_level(logging.INFO, logger="fedpeptao"):
        run_server_app(grid, config, out, overrides=overrides)  # returns: no exception reaches Flower
    errors = server_errors(caplog)
    assert len(errors) == 1 and errors[0].getMessage().startswith(expected), [r.getMessage() for r in errors]
    assert "\n" not in errors[0].getMessage() and errors[0].exc_info is None
    assert not grid.sent and not out.exists()


def test_server_app_logs_one_line_for_a_missing_config_file(server_setup, caplog, tmp_path):
    grid, _, out = server_setup
    missing = tmp_path / "nowhere" / "experiment.toml"
    with caplog.at_level(logging.INFO, logger="fedpeptao"):
        run_server_app(grid, missing, out)
    errors = server_errors(caplog)
    assert [r.getMessage() for r in errors] == [f"config error: config file not found: {missing}"]
    assert errors[0].exc_info is None and not grid.sent and not out.exists()


def test_server_app_logs_one_line_for_a_bad_run_config_knob(server_setup, caplog):
    grid, config, out = server_setup
    with caplog.at_level(logging.INFO, logger="fedpeptao"):
        run_server_app(grid, config, out, **{"round-timeout": "soon"})
    errors = server_errors(caplog)
    assert [r.getMessage() for r in errors] == ["config error: run config 'round-timeout': expected a number, "
                                                "got 'soon'"]
    assert not grid.sent and not out.exists()
