"""Config: file + overrides, one-line errors naming the key, before any work."""

import pytest

from fedpeptao.cli import main
from fedpeptao.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[method]\nname = "fedpeptao"\n[federated]\nrounds = 7\n')
    cfg = load_config(path, ["federated.rounds=3", "client.lr=0.01", "method.ratio=0.5", "model.label_words=[bad, good]"])
    assert cfg.method.name == "fedpeptao" and cfg.tuning.name == "deep_prompt"
    assert cfg.federated.rounds == 3 and cfg.client.lr == 0.01
    assert cfg.method.ratio == 0.5 and cfg.model.label_words == ["bad", "good"]


def test_method_and_tuning_settings_are_typed(tmp_path):
    cfg = load_config(None, ["method.name=moon", "method.tau=0.2", "tuning.name=lora", "tuning.r=4"])
    assert (cfg.method.mu, cfg.method.tau, cfg.tuning.r) == (1.0, 0.2, 4)
    assert load_config(None, ["method.mu=0.1", "method.name=fedprox"]).method.mu == 0.1


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federated:\n  num_clients: 4\n  clients_per_round: 2\n")
    assert load_config(path).federated.num_clients == 4


@pytest.mark.parametrize("override, key", [
    ("federated.rounds=0", "federated.rounds"),
    ("federated.rounds=many", "federated.rounds"),
    ("client.optimizer=rmsprop", "client.optimizer"),
    ("federated.nonsense=1", "federated.nonsense"),
    ("method.ratio=1.5", "method.ratio"),
    ("method.mu=-1", "method.mu: not a setting of fedpeptao"),
    ("federated.clients_per_round=500", "federated"),
    ("data.alpha=-1", "data.alpha"),
    ("algorithm=fedsgd", "algorithm: moved to method.name"),
    ("method.name=fedsgd", "method.name: unknown method"),
    ("tuning.r=0", "tuning.r: not a setting of deep_prompt"),
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
