"""Upload an exported model directory to the Hugging Face Hub (`push_to_hub=<owner/name>`, `hub.*`).

With huggingface_hub's own client: `create_repo(private=..., exist_ok=True)`, the branch (`hub.revision`) if it
is not `main`, then one `upload_folder` of the directory (its model card included; hidden local records such as
`.distil_fingerprint.json` left out). Authentication is huggingface_hub's: `hf auth login` (or the older
`huggingface-cli login`) stores a token, or `HF_TOKEN` gives one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distil.utils.errors import InputError

log = logging.getLogger(__name__)

# distil's local records (completeness marker, fingerprint cache) are hidden files: not part of the model.
IGNORED = [".*", "**/.*"]


class HubUploadError(InputError):
    """The Hub refused the upload (no token, no write access, a bad revision...)."""


def is_repo_id(value: Any, owner_required: bool = True) -> bool:
    """A Hub repository id as huggingface_hub's own validator accepts it; `owner/name` when `owner_required`
    (an upload target: a bare name would go to whichever account the token belongs to)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value:
        return False
    if owner_required and (value.count("/") != 1 or not all(value.split("/"))):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    key: str = "push_to_hub",
) -> str:
    """Upload `folder` to the model repository `repo_id` (created if missing, `private`; an existing repository
    keeps its visibility) on branch `revision` (None: main); returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    folder = Path(folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} (distil)",
            ignore_patterns=list(IGNORED),
        )
    except (HfHubHTTPError, LocalTokenNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubUploadError(
            f"{key}={repo_id}: the Hub refused the upload of {folder} ({first}); log in with `hf auth login` "
            "(or set HF_TOKEN) with a token that can write to it. The export stays on disk: upload it later "
            f"with `hf upload {repo_id} {folder}`"
        ) from err
    log.info("uploaded %s to %s: %s", folder, repo_id, info.commit_url)
    return str(info.commit_url)


def push_from_config(cfg: Any, folder: str | Path) -> str | None:
    """`push_folder` with a command's `push_to_hub` and `hub.*` keys; None (nothing uploaded) without a repo."""
    repo_id = cfg.get("push_to_hub")
    if not repo_id:
        return None
    hub = cfg.get("hub") or {}
    return push_folder(
        folder,
        str(repo_id),
        private=bool(hub.get("private", True)),
        revision=hub.get("revision"),
        commit_message=hub.get("commit_message"),
    )
