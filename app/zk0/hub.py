"""Policies and datasets named by Hugging Face Hub id: `owner/name[@revision]`, read through huggingface_hub.

A spec is a local folder when it starts like a path (/, ., ~) or exists on disk (`local_path`, the one rule
every command follows); anything else is a Hub id, optionally pinned to a branch, tag or commit after `@`.
Downloads go to the Hub cache (HF_HOME / HF_HUB_CACHE) through huggingface_hub: a download cut off midway
resumes on the next run, and with HF_HUB_OFFLINE=1 what was downloaded is reused without a request. Every
failure becomes a HubError naming the setting, the id and what to do. Nothing here imports torch or LeRobot.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

# A branch, tag or commit as Git allows them in practice; no spaces, no "..", no leading "/" or "-".
REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*")
COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(DatasetError):
    """A Hub id cannot be used (syntax, access, network, offline); the message says which and what to do."""

    def __init__(self, head: str, reason: str):
        super().__init__(f"{head}: {reason}")
        self.reason = reason  # without the `SETTING=spec` head, for messages that name it themselves


def local_path(spec: str | None) -> Path | None:
    """The folder a dataset or policy spec names, `~` expanded; None for a Hub id (owner/name[@revision]).

    The one rule every command follows, so a spec means the same to `zk0 check`, the node and the
    server: a spec that starts like a path (/, ., ~) or exists on disk is a local folder.
    """
    if not spec:
        return None
    path = Path(spec).expanduser()
    return path if spec.startswith(("/", ".", "~")) or path.exists() else None


@dataclass(frozen=True)
class HubRef:
    """A Hub repo at a revision (None: the repo's default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def pinned(self) -> bool:
        """Whether the revision is a commit, which never moves (and needs no request once downloaded)."""
        return bool(self.revision and COMMIT.fullmatch(self.revision))


def parse_ref(spec: str) -> HubRef:
    """`owner/name[@revision]` as a HubRef; ValueError saying what is wrong with the id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = spec.partition("@")
    if repo_id.count("/") != 1:
        raise ValueError(f"{spec!r} is neither a local folder (none there) nor a Hub id of the form owner/name"
                         "[@revision]; check the path, or write the Hub id as e.g. lerobot/svla_so100_pickplace")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a valid Hub id ({err})") from None
    if at and (not REVISION.fullmatch(revision) or ".." in revision):
        raise ValueError(f"{spec!r}: revision {revision!r} is not a branch, tag or commit name; "
                         "write owner/name@main, owner/name@v3.0 or owner/name@<40-hex commit>")
    return HubRef(repo_id, revision or None)


def check_spec(spec: str | None) -> str | None:
    """The spec unchanged when it is a local path or a valid Hub id; ValueError otherwise (settings validators)."""
    if spec and local_path(spec) is None:
        parse_ref(spec)
    return spec


def repo_name(spec: str) -> str:
    """The Hub repo id of a spec without its revision (the id as the Hub's metadata names it)."""
    return spec if local_path(spec) is not None else spec.partition("@")[0]


def snapshot(spec: str, repo_type: str, setting: str) -> Path:
    """The local folder of a Hub repo at its revision: downloaded (or resumed) into the Hub cache, or reused."""
    from huggingface_hub import snapshot_download

    ref = _ref(spec, setting)
    try:
        return Path(snapshot_download(ref.repo_id, repo_type=repo_type, revision=ref.revision))
    except Exception as err:  # noqa: BLE001 - every failure becomes one refusal that says what to do
        raise HubError(f"{setting}={ref}", explain(err, ref, repo_type)) from None


def pin(spec: str, repo_type: str, setting: str) -> str:
    """Download a Hub spec and name the commit it got (owner/name@<commit>), so every process of a run reads
    the same files and none needs the Hub again."""
    folder = snapshot(spec, repo_type, setting)
    return f"{_ref(spec, setting).repo_id}@{folder.name}"  # the cache names a snapshot after its commit


def read_file(spec: str, filename: str, repo_type: str, setting: str) -> Path:
    """One file of a Hub repo at its revision (from the Hub cache when it is there)."""
    from huggingface_hub import hf_hub_download

    ref = _ref(spec, setting)
    try:
        return Path(hf_hub_download(ref.repo_id, filename, repo_type=repo_type, revision=ref.revision))
    except Exception as err:  # noqa: BLE001 - every failure becomes one refusal that says what to do
        raise HubError(f"{setting}={ref}", explain(err, ref, repo_type, filename)) from None


def _ref(spec: str, setting: str) -> HubRef:
    try:
        return parse_ref(spec)
    except ValueError as err:
        raise HubError(f"{setting}={spec}", str(err)) from None


def explain(err: Exception, ref: HubRef, repo_type: str, filename: str = "") -> str:
    """What went wrong reading `ref` from the Hub, and what to do: the refusal's text."""
    import httpx
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind, hub = f"{repo_type} repo", f"the Hub ({constants.ENDPOINT})"
    token = "HF_TOKEN is set but cannot read it" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    if constants.HF_HUB_OFFLINE and isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return ("not downloaded yet and HF_HUB_OFFLINE=1 forbids downloading it; run once with "
                "HF_HUB_OFFLINE=0 where the Hub is reachable (`zk0 local` and `zk0 supernode` download what the "
                "experiment names), or point the variable at a local folder")
    if isinstance(err, RevisionNotFoundError):
        return f"{ref.repo_id} has no revision {ref.revision!r} on {hub}; use {_revisions(ref, repo_type)}"
    if isinstance(err, RepositoryNotFoundError):  # the Hub answers the same for missing, private and gated repos
        return (f"no {kind} {ref.repo_id} on {hub}, or it is private or gated and {token}; set HF_TOKEN to a "
                f"token with read access to it, or check the id (and that it is a {repo_type})")
    if isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
        what = "a LeRobot dataset" if repo_type == "dataset" else "a saved LeRobot policy"
        return f"{ref} has no {filename} on {hub}, so it is not {what}; point the variable at one (check the id)"
    if isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code == 401:
        return f"{hub} refused HF_TOKEN (invalid or expired); set HF_TOKEN to a valid token"
    unreachable = (LocalEntryNotFoundError, httpx.HTTPError, OSError)  # connection lost, refused, timed out, 5xx
    if isinstance(err, unreachable):
        return (f"cannot reach {hub}, or it stopped answering mid-download ({_short(err)}); check the network "
                "and HF_ENDPOINT, then run the command again: files downloaded before are kept and only the "
                "unfinished ones are fetched again. With HF_HUB_OFFLINE=1 what was downloaded is used without the Hub")
    return f"cannot read it from {hub} ({_short(err)})"


def _revisions(ref: HubRef, repo_type: str) -> str:
    """The branches and tags a repo has, for a refusal of a revision it lacks."""
    from huggingface_hub import HfApi

    try:
        refs = HfApi().list_repo_refs(ref.repo_id, repo_type=repo_type)
    except Exception:  # noqa: BLE001 - the listing only helps; the refusal stands without it
        return "a branch, tag or commit it has"
    names = [b.name for b in refs.branches] + [t.name for t in refs.tags]
    return f"one it has ({', '.join(names)}) or a commit id"


def _short(err: Exception) -> str:
    """The first line of an error, with its type."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
