"""`init_from` names a checkpoint directory or a Hugging Face Hub id; `resolve_checkpoint` gives its directory.

A Hub id (`Qwen/Qwen2.5-Math-1.5B`, optionally `@revision`) is looked up in the local Hugging Face cache with
`huggingface_hub.snapshot_download(..., local_files_only=True)`: no network request is ever made, so a training
job on a TPU VM never hangs on the Hub or downloads 3 GB behind the user's back. When the files are not in the
cache, the error says what to download and how. The cache is the one `huggingface_hub` uses: $HF_HUB_CACHE, else
$HF_HOME/hub, else ~/.cache/huggingface/hub, read when called (so a job's own environment decides).
"""

from __future__ import annotations

import glob
import os

# What a checkpoint needs to be loaded (load.py, r1jax.data.tokenizer); the rest of a Hub repo is not read.
REQUIRED = ("config.json",)
WEIGHTS = "*.safetensors"


def hub_cache() -> str:
    """The Hugging Face hub cache directory, from the environment at call time (huggingface_hub's rule)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name` (optionally `@revision`): no leading `/`, `.` or `~`, at most one `/`."""
    repo = name.split("@", 1)[0]
    return bool(repo) and not repo.startswith(("/", ".", "~")) and repo.count("/") <= 1 and not repo.endswith("/")


def resolve_checkpoint(name_or_dir: str) -> str:
    """The local directory of a checkpoint: `name_or_dir` itself when it is a directory, else the snapshot of the Hub
    id `name_or_dir` (`org/name[@revision]`) in the local Hugging Face cache. Never downloads.

    Raises FileNotFoundError naming the path, or the Hub id with the cache searched and the command that fetches it;
    ValueError when the directory (or snapshot) lacks config.json or safetensors weights.
    """
    path = os.path.expanduser(str(name_or_dir))
    if os.path.isdir(path):
        return _check_dir(os.path.abspath(path), str(name_or_dir))
    if not looks_like_hub_id(path):
        raise FileNotFoundError(f"init_from={name_or_dir!r}: no such directory (and not a Hub id `org/name`)")
    repo_id, _, revision = path.partition("@")
    from huggingface_hub import snapshot_download  # noqa: PLC0415 (only for Hub ids)
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    cache = hub_cache()
    try:
        snapshot = snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        snapshot = None
    if snapshot is None or not os.path.isfile(os.path.join(snapshot, "config.json")):
        rev = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(
            f"init_from={name_or_dir!r}: not a directory, and Hub model {repo_id!r}"
            f"{f' at revision {revision!r}' if revision else ''} is not in the local Hugging Face cache ({cache}). "
            f"r1jax never downloads at run time; fetch it first, on a machine with network access to the same "
            f"cache (HF_HOME / HF_HUB_CACHE): `hf download {repo_id}{rev}` (huggingface_hub >= 0.34; older: "
            f"`huggingface-cli download {repo_id}{rev}`), or pass the checkpoint's directory instead")
    return _check_dir(snapshot, str(name_or_dir))


def _check_dir(path: str, given: str) -> str:
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(path, f))]
    if missing or not glob.glob(os.path.join(path, WEIGHTS)):
        what = ", ".join(missing + ([] if glob.glob(os.path.join(path, WEIGHTS)) else ["*.safetensors weights"]))
        raise ValueError(f"init_from={given!r} ({path}): not a Hugging Face checkpoint directory, it lacks {what} "
                         "(an r1jax run directory is read by r1jax.train.checkpoint, not here)")
    return path
