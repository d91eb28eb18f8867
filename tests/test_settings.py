"""Settings: environment and Flower configs in, clear errors naming the variable out."""

import re
from pathlib import Path

import pytest

from zk0.settings import NodeSettings, ServerSettings, SettingsError
from zk0.settings_names import check_env_names


def test_defaults_are_valid():
    s = ServerSettings.load()
    assert s.num_rounds >= 1 and s.proximal_mu >= 0


def test_environment_is_read_with_zk0_prefix(monkeypatch):
    monkeypatch.setenv("ZK0_PROXIMAL_MU", "0.25")
    monkeypatch.setenv("ZK0_NUM_ROUNDS", "7")
    s = ServerSettings.load()
    assert s.proximal_mu == 0.25 and s.num_rounds == 7


def test_flower_config_outranks_environment_and_empty_means_unset(monkeypatch):
    monkeypatch.setenv("ZK0_PROXIMAL_MU", "0.25")
    s = ServerSettings.from_flower_config({"proximal-mu": 0.5, "num-rounds": "", "unrelated": 1})
    assert s.proximal_mu == 0.5
    assert s.num_rounds == ServerSettings.model_fields["num_rounds"].default


def test_round_trip_through_flower_config():
    s = ServerSettings.load(proximal_mu=0.1, eval_dataset="/data/eval", num_rounds=4)
    again = ServerSettings.from_flower_config(s.to_flower_config())
    assert again == s


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("ZK0_PROXIMAL_MU", "-0.1", "greater than or equal to 0"),
        ("ZK0_PROXIMAL_MU", "lots", "valid number"),
        ("ZK0_NUM_ROUNDS", "0", "greater than or equal to 1"),
        ("ZK0_EVAL_EVERY", "0", "greater than or equal to 1"),
        ("ZK0_CHECKPOINT_EVERY", "-2", "greater than or equal to 1"),
        ("ZK0_FRACTION_TRAIN", "1.5", "less than or equal to 1"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, env, value, needle):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as err:
        ServerSettings.load()
    assert env in str(err.value) and needle in str(err.value) and repr(value) in str(err.value)


def test_eval_and_checkpoint_cadence():
    s = ServerSettings.load(num_rounds=5, eval_every=2, checkpoint_every=2)
    assert [r for r in range(6) if s.is_eval_round(r)] == [0, 2, 4, 5]
    assert [r for r in range(6) if s.is_checkpoint_round(r)] == [2, 4, 5]


def test_node_needs_a_dataset():
    with pytest.raises(SettingsError, match="ZK0_DATASET"):
        NodeSettings.load()
    node = NodeSettings.from_flower_config({"dataset": "/data/so100/", "heldout-episodes": 3})
    assert node.display_name == "so100" and node.heldout_episodes == 3


def test_node_partitions_come_in_pairs():
    with pytest.raises(SettingsError, match="partition-id and num-partitions"):
        NodeSettings.load(dataset="x/y", partition_id=1)
    with pytest.raises(SettingsError, match="smaller than num-partitions"):
        NodeSettings.load(dataset="x/y", partition_id=2, num_partitions=2)


def test_unknown_zk0_variable_is_rejected():
    check_env_names({"ZK0_PROXIMAL_MU", "ZK0_NODE_3_DATASET", "HF_TOKEN"})
    with pytest.raises(SettingsError, match="ZK0_PROXIMAL_MUU"):
        check_env_names({"ZK0_PROXIMAL_MUU"})
    with pytest.raises(SettingsError, match="ZK0_NODE_1_DATSET"):
        check_env_names({"ZK0_NODE_1_DATSET"})


def test_env_example_is_a_valid_env_file_for_zk0_local():
    """.env.example holds Compose-only variables too (ZK0_IMAGE, ZK0_NODE_<i>_GPU, ...): all accepted."""
    from pathlib import Path

    from dotenv import dotenv_values

    names = set(dotenv_values(Path(__file__).parents[1] / ".env.example"))
    assert {"ZK0_IMAGE", "ZK0_NODE_0_GPU", "ZK0_DATASETS_DIR", "ZK0_TLS_DIR", "ZK0_PROXIMAL_MU"} <= names
    check_env_names(names)
    with pytest.raises(SettingsError, match="ZK0_NODE_0_GPUS"):
        check_env_names({"ZK0_NODE_0_GPUS"})


def test_empty_variable_means_unset(monkeypatch):
    monkeypatch.setenv("ZK0_NUM_ROUNDS", "")  # what Compose passes for `ZK0_NUM_ROUNDS: ${ZK0_NUM_ROUNDS:-}`
    assert ServerSettings.load().num_rounds == ServerSettings.model_fields["num_rounds"].default


def test_pyproject_declares_every_server_setting_as_run_config():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "app" / "pyproject.toml").read_text())
    keys = set(pyproject["tool"]["flwr"]["app"]["config"])
    # Plus what only `zk0 local --simulation` sets: the env-file's nodes that virtual SuperNodes take in turn.
    assert keys == {name.replace("_", "-") for name in ServerSettings.model_fields} | {"sim-nodes"}


ROOT = Path(__file__).resolve().parents[1]


def _env_example() -> set[str]:
    """The variables .env.example sets or shows commented out."""
    text = ROOT.joinpath(".env.example").read_text()
    return set(re.findall(r"^#?(ZK0_[A-Z0-9_]+)=", text, flags=re.MULTILINE))


def _missing(names: set[str], node_form: str) -> list[str]:
    """Every server field as ZK0_<NAME>; every node field as ZK0_NODE_<i>_<FIELD> (`node_form`), or as
    ZK0_<FIELD> where the server has the same field (one row, one line for both)."""
    server = {f"ZK0_{name.upper()}" for name in ServerSettings.model_fields}
    missing = sorted(server - names)
    for field in NodeSettings.model_fields:
        node = node_form.format(FIELD=field.upper())
        if not re.search(f"^{node}$", "\n".join(names), flags=re.MULTILINE) and f"ZK0_{field.upper()}" not in (
            names & server
        ):
            missing.append(node)
    return missing


def test_env_example_shows_every_setting():
    """.env.example sets, or shows commented out, every server setting and every node setting (per node)."""
    assert _missing(_env_example(), r"ZK0_NODE_\d+_{FIELD}") == []
