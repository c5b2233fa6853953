"""Config: file + overrides, one-line errors naming the key, before any work."""

import pytest

from fedpeptao.cli import main
from fedpeptao.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('algorithm = "fedpeptao"\n[federated]\nrounds = 7\n')
    cfg = load_config(path, ["federated.rounds=3", "client.lr=0.01", "selection.ratio=0.5", "model.label_words=[bad, good]"])
    assert cfg.algorithm == "fedpeptao"
    assert cfg.federated.rounds == 3 and cfg.client.lr == 0.01
    assert cfg.selection.ratio == 0.5 and cfg.model.label_words == ["bad", "good"]


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federated:\n  num_clients: 4\n  clients_per_round: 2\n")
    assert load_config(path).federated.num_clients == 4


@pytest.mark.parametrize("override, key", [
    ("federated.rounds=0", "federated.rounds"),
    ("federated.rounds=many", "federated.rounds"),
    ("client.optimizer=rmsprop", "client.optimizer"),
    ("federated.nonsense=1", "federated.nonsense"),
    ("selection.ratio=1.5", "selection"),
    ("federated.clients_per_round=500", "federated"),
    ("data.alpha=-1", "data.alpha"),
    ("algorithm=fedsgd", "algorithm"),
])
def test_bad_values_name_the_key_in_one_line(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[federated\nrounds=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["rounds"])


def test_cli_reports_config_error_and_writes_nothing(tmp_path, capsys):
    code = main(["run", f"output_dir={tmp_path}", "federated.rounds=-2"])
    assert code == 2
    assert "federated.rounds" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
