"""Optional Hugging Face Hub features, off by default: a checkpoint from the hub, and
pushing the label store to a hub dataset. Offline, both fail fast with a clear message."""
from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import BACKBONE_WEIGHTS, CONFIG, WEIGHTS, CheckpointError, read_config
from .errors import CMAClipError


class HubError(CMAClipError, RuntimeError):
    """The hub could not be used (offline, no token, missing repository)."""


def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a checkpoint repository's config.json and model.safetensors, and its
    backbone.safetensors when the backbone was fine-tuned; returns its folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        paths = [hf_hub_download(repo_id, name, revision=revision, etag_timeout=5) for name in (CONFIG, WEIGHTS)]
        folder = Path(paths[0]).parent
        train = read_config(folder).train
        if train.finetune_backbone or train.backbone_weights:
            hf_hub_download(repo_id, BACKBONE_WEIGHTS, revision=revision, etag_timeout=5)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:  # ValueError: a bad repo id
        raise HubError(f"could not download checkpoint {repo_id!r} from the Hugging Face Hub "
                       f"(offline or no access): {exc.__class__.__name__}") from exc
    except CheckpointError as exc:
        raise HubError(f"the hub repository {repo_id!r} is not a CMA-CLIP checkpoint: {exc}") from exc
    return folder


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
    """Upload the label store and its JSONL export to a hub dataset ($CMA_CLIP_HUB_DATASET);
    needs $HF_TOKEN. The token is passed to the client only, never logged or returned."""
    repo_id = repo_id or os.environ.get("CMA_CLIP_HUB_DATASET", "").strip()
    token = os.environ.get("HF_TOKEN", "").strip()
    if not repo_id or not token:
        raise HubError("pushing labels needs CMA_CLIP_HUB_DATASET (a dataset repository) and HF_TOKEN")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=True, exist_ok=True)
        for path in (Path(db_path), Path(export_path)):
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id, repo_type="dataset")
    except (HfHubHTTPError, OSError, ValueError) as exc:  # ValueError: a bad repo id
        raise HubError(f"could not push labels to {repo_id!r}: {exc.__class__.__name__}") from exc
    return f"https://huggingface.co/datasets/{repo_id}"
