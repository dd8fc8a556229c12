"""Optional Hugging Face Hub features, off by default: a checkpoint from the hub, and
pushing the label store to a hub dataset. Offline, or with a Hub that does not answer, both
fail within `hub_deadline_s()` with a message in words (huggingface_hub's own client waits
forever on a silent server: a push hung for minutes, a start-up download for 391 s)."""
from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Callable, TypeVar

from .checkpoint import BACKBONE_WEIGHTS, CONFIG, WEIGHTS, CheckpointError, read_config
from .errors import CMAClipError
from .labels import LabelStoreError, snapshot
from .runtime import env_number

T = TypeVar("T")


class HubError(CMAClipError, RuntimeError):
    """The hub could not be used (offline, no token, missing repository)."""


def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a checkpoint repository's config.json and model.safetensors, and its
    backbone.safetensors when the backbone was fine-tuned; returns its folder."""
    from huggingface_hub import hf_hub_download

    def fetch() -> Path:
        paths = [hf_hub_download(repo_id, name, revision=revision, etag_timeout=5) for name in (CONFIG, WEIGHTS)]
        folder = Path(paths[0]).parent
        train = read_config(folder).train
        if train.finetune_backbone or train.backbone_weights:
            hf_hub_download(repo_id, BACKBONE_WEIGHTS, revision=revision, etag_timeout=5)
        return folder

    try:
        return _within_deadline(fetch, f"could not download checkpoint {repo_id!r} from the Hugging Face Hub")
    except CheckpointError as exc:
        raise HubError(f"the hub repository {repo_id!r} is not a CMA-CLIP checkpoint: {exc}") from exc


def checkpoint_from_env() -> tuple[str, Path] | None:
    """(name, folder) of the hub checkpoint named by $CMA_CLIP_HUB_CHECKPOINT, if set and reachable."""
    repo_id = os.environ.get("CMA_CLIP_HUB_CHECKPOINT", "").strip()
    if not repo_id:
        return None
    try:
        return f"hub:{repo_id}", download_checkpoint(repo_id)
    except HubError as exc:
        print(f"[cma-clip] {exc}; continuing with the local checkpoints")
        return None


def push_label_store(db_path: str | Path, export_path: str | Path, repo_id: str | None = None) -> str:
    """Upload the label store (a `snapshot`: labels.db alone may hold none of the saves its
    write-ahead log does) and its JSONL export to a hub dataset ($CMA_CLIP_HUB_DATASET); needs
    $HF_TOKEN. The token is passed to the client only, never logged or returned."""
    repo_id = repo_id or os.environ.get("CMA_CLIP_HUB_DATASET", "").strip()
    token = os.environ.get("HF_TOKEN", "").strip()
    if not repo_id or not token:
        raise HubError("pushing labels needs CMA_CLIP_HUB_DATASET (a dataset repository) and HF_TOKEN")
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as folder:
        try:
            store = snapshot(db_path, Path(folder) / Path(db_path).name)
        except (LabelStoreError, sqlite3.Error) as exc:
            raise HubError(f"could not read the label store to push it: {exc}") from exc

        def push() -> None:
            api = HfApi(token=token)
            api.create_repo(repo_id, repo_type="dataset", private=True, exist_ok=True)
            for path in (store, Path(export_path)):
                api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id,
                                repo_type="dataset")

        _within_deadline(push, f"could not push labels to {repo_id!r}")
    return f"https://huggingface.co/datasets/{repo_id}"


def hub_deadline_s() -> float:
    """How long one download or push may take, retries included: $CMA_CLIP_HUB_TIMEOUT, else 60 s."""
    return env_number("CMA_CLIP_HUB_TIMEOUT", 60)


def _within_deadline(call: Callable[[], T], failed: str) -> T:
    """`call()`'s result, run in a thread of its own for at most `hub_deadline_s()`; a failure to reach
    or use the Hub is a HubError, `failed` followed by the reason in words. A call past the deadline
    is left to end in the background (its client has per-request timeouts too, `_hub_client_timeouts`)."""
    _hub_client_timeouts()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="hub", daemon=True)
    worker.start()
    deadline = hub_deadline_s()
    worker.join(deadline)
    if worker.is_alive():
        raise HubError(f"{failed}: the Hub did not answer within {deadline:g} s (CMA_CLIP_HUB_TIMEOUT)")
    if "error" not in outcome:
        return outcome["value"]
    error = outcome["error"]
    if isinstance(error, CMAClipError):
        raise error
    reason = _reason(error)
    if reason is None:
        raise error
    raise HubError(f"{failed}: {reason}") from error


def _hub_client_timeouts() -> None:
    """Give huggingface_hub's shared HTTP client timeouts (it has none: a request to a Hub that
    accepts the connection and never answers waits forever)."""
    import httpx2
    from huggingface_hub import get_session

    get_session().timeout = httpx2.Timeout(30, connect=10)


def _reason(error: BaseException) -> str | None:
    """Why a Hub call failed, in words; None for an error that is no Hub failure (a bug)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub is not asked"
    if isinstance(error, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE:  # a download says so this way
        return "HF_HUB_OFFLINE is set, so the Hub is not asked, and its files are not in the local cache"
    if isinstance(error, HFValidationError):
        return "that is not a repository id (owner/name)"
    if isinstance(error, LocalEntryNotFoundError):
        return "the Hub could not be reached (offline?) and its files are not in the local cache"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repository, or the token has no access to it"
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        words = {401: "the token was refused", 403: "the token may not write there"}.get(status, "the Hub refused it")
        return f"{words} (HTTP {status})" if status else words
    if isinstance(error, httpx2.TimeoutException):
        return "the Hub did not answer in time"
    if isinstance(error, (httpx2.TransportError, OSError)):
        return f"the Hub could not be reached (offline?): {error.__class__.__name__}"
    if isinstance(error, ValueError):
        return f"the Hub client refused it: {str(error)[:200]}"
    return None
