"""The preflight every command runs: what an env-file says, refused or applied as the shell's variables are."""

from __future__ import annotations

import pytest
from federation import run_zk0, write_env

from zk0.deploy.preflight import preflight
from zk0.settings import SettingsError
from zk0.settings_names import check_env_names


def _refusal(env_file, **kwargs) -> tuple[str, list[str]]:
    """(the message, the printed lines) of a preflight that refuses."""
    printed = []
    with pytest.raises(SettingsError) as err:
        preflight(env_file, echo=printed.append, **kwargs)
    return str(err.value), "\n".join(printed).splitlines()


def test_an_env_file_that_is_a_directory_is_refused_as_one(tmp_path):
    res = run_zk0("check", "--env-file", str(tmp_path), timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"env-file {tmp_path} is a directory" in res.stderr and "does not exist" not in res.stderr
    assert "does not exist" in run_zk0("check", "--env-file", str(tmp_path / "nope.env"), timeout=60).stderr


def test_a_misspelt_variable_names_the_nearest_known_one_first(demo, tmp_path):
    with pytest.raises(SettingsError) as err:
        check_env_names({"ZK0_PROXMAL_MU", "ZK0_NODE_2_DATSET", "ZK0_ZZZ"})
    text = str(err.value)
    assert "ZK0_PROXMAL_MU (did you mean ZK0_PROXIMAL_MU?)" in text
    assert "ZK0_NODE_2_DATSET (did you mean ZK0_NODE_2_DATASET?)" in text
    assert "ZK0_ZZZ: check the spelling" in text  # nothing near: no guess
    assert text.index("did you mean") < text.index("known:")
    # The env-file line named is the misspelt one's, not the line of the name suggested for it.
    env_file = write_env(tmp_path / "typo.env", demo, tmp_path / "out", ZK0_PROXMAL_MU="0.1")
    message, _ = _refusal(env_file)
    line = env_file.read_text().splitlines().index("ZK0_PROXMAL_MU=0.1") + 1
    assert f"[typo.env:{line} (ZK0_PROXMAL_MU)] unknown variable(s) ZK0_PROXMAL_MU (did you mean" in message


def test_the_eval_row_is_checked_and_shown_when_other_server_settings_are_invalid(demo, tmp_path):
    out = tmp_path / "out"
    message, printed = _refusal(write_env(tmp_path / "bad.env", demo, out, ZK0_NUM_ROUNDS="three"))
    assert "1 problem(s)" in message and "ZK0_NUM_ROUNDS" in message
    eval_rows = [line for line in printed if line.startswith("eval ")]
    assert len(eval_rows) == 1 and str(demo["datasets"]["server-eval"]) in eval_rows[0]
    assert eval_rows[0].rstrip().endswith("ok")
    # A mistake in the evaluation set's own variables: no row that would repeat it.
    message, printed = _refusal(write_env(tmp_path / "cams.env", demo, out, ZK0_EVAL_CAMERAS="a:b"))
    assert "1 problem(s)" in message and "ZK0_EVAL_CAMERAS" in message
    assert not [line for line in printed if line.startswith("eval ")]


def test_a_generic_node_variable_in_an_env_file_applies_to_every_node_as_the_shells_does(demo, tmp_path, monkeypatch):
    env_file = write_env(tmp_path / "generic.env", demo, tmp_path / "out", ZK0_HELDOUT_EPISODES=0,
                         ZK0_NODE_1_HELDOUT_EPISODES=1)
    found = preflight(env_file, echo=lambda line: None)
    assert [n.heldout_episodes for n in found.nodes] == [0, 1, 0, 0]  # a node's own variable still outranks it
    assert [n.name for n in found.nodes] == [f"node-{i}" for i in range(4)]
    monkeypatch.setenv("ZK0_HELDOUT_EPISODES", "3")  # the shell outranks the env-file, as for every setting
    assert [n.heldout_episodes for n in preflight(env_file, echo=lambda line: None).nodes] == [3, 1, 3, 3]
    monkeypatch.delenv("ZK0_HELDOUT_EPISODES")
    # Refusals name the generic variable and its env-file line, not a ZK0_NODE_<i>_ variable nobody set.
    too_many = write_env(tmp_path / "six.env", demo, tmp_path / "out", ZK0_HELDOUT_EPISODES=6)
    message, _ = _refusal(too_many)
    line = too_many.read_text().splitlines().index("ZK0_HELDOUT_EPISODES=6") + 1
    assert message.count("holding out 6 of its 6 episodes leaves nothing to train on; lower ZK0_HELDOUT_EPISODES") == 4
    assert "ZK0_NODE_0_HELDOUT_EPISODES" not in message
    assert f"six.env:{line} (ZK0_HELDOUT_EPISODES)" in message
    message, _ = _refusal(write_env(tmp_path / "neg.env", demo, tmp_path / "out", ZK0_HELDOUT_EPISODES=-1))
    assert "ZK0_HELDOUT_EPISODES (run/node config" in message and "ZK0_NODE_0_HELDOUT_EPISODES" not in message
