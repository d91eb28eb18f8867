"""The test tiers: what tests/tiers.py counts as slow, read from code, and what it sees a test start."""

from __future__ import annotations

import sys

import tiers

ZK0 = [sys.executable, "-m", "zk0.cli"]  # as tests/federation.py names the zk0 command


def _plain_helper():
    return sum(range(3))


def _federation_helper():
    return [*ZK0, "local"]  # names the zk0 command: whoever calls this starts a federation


def _calls_the_federation_helper():
    return _federation_helper()


# Reached by no test's code below (a dict is not followed), so this file's own tests stay fast.
SAMPLES = {
    "plain": lambda: _plain_helper() + 1,
    "federation": _calls_the_federation_helper,  # two calls away from the zk0 command
    "script": lambda: ["python", "-c", "import subprocess; subprocess.run(['flower-superlink', '--insecure'])"],
    # Command lines for the runtime check.
    "zk0 local": [sys.executable, "-m", "zk0.cli", "local"],
    "a SuperLink": ["/venv/bin/flower-superlink", "--insecure"],
    "compose": "docker compose up",
}


def test_a_test_two_helpers_away_from_the_zk0_command_is_slow_and_a_plain_one_is_not():
    assert tiers.starts_programs(SAMPLES["federation"]) and tiers.starts_programs(SAMPLES["script"])
    assert not tiers.starts_programs(SAMPLES["plain"])
    assert not tiers.starts_programs(sys.exit)  # code outside the test folder is not read


def test_the_runtime_check_names_what_a_command_line_starts():
    # (The names are compared by their initials: a name itself in this test's code would make it slow.)
    assert [tiers.launches(SAMPLES[k])[:5] for k in ("zk0 local", "a SuperLink", "compose")] == ["zk0.c", "flowe",
                                                                                                 "docke"]
    assert tiers.launches(["sleep", "600"]) is None and tiers.launches([sys.executable, "-c", "print(1)"]) is None
