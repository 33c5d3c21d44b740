"""Where a model name leads: a local directory, an installed pretrained package, or a Hugging Face Hub repo.

Downloads, the cache (``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``), revisions, tokens and offline mode
(``HF_HUB_OFFLINE=1``) are ``huggingface_hub``'s; capkit only asks for the three files of its format.
"""
from __future__ import annotations

import os
import re
from importlib.metadata import entry_points
from pathlib import Path

from capkit.errors import ModelNotFoundError, PluginError
from capkit.pretrained.format import FILES

__all__ = ["ENTRY_POINT_GROUP", "installed_models", "resolve_model", "download", "upload"]

ENTRY_POINT_GROUP = "capkit.pretrained"  # name -> a callable returning the model's directory
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TRUE = {"1", "on", "yes", "true"}


def installed_models() -> dict[str, object]:
    """The models installed pip packages declare: entry point name -> entry point."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_model(
    name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None, local_files_only: bool = False,
) -> Path:
    """The local directory of a model: ``name_or_path`` itself when it is a directory, the directory of the
    installed package of that name (entry point group ``capkit.pretrained``), or the Hub repo ``owner/name``
    downloaded (or found in the cache) at ``revision``.

    Raises:
        ModelNotFoundError: none of these, in one line with the installed names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    models = installed_models()
    if name in models:
        try:
            located = Path(models[name].load()())
        except Exception as err:  # an installed package is code the user chose to install: report, do not hide
            raise PluginError(f"the pretrained package of {name!r} ({models[name].value}) failed: {err}") from err
        if not located.is_dir():
            raise ModelNotFoundError(f"the pretrained package of {name!r} points at {located}, which is no directory; "
                                     f"reinstall it")
        return located
    if REPO_ID.match(name) and not path.exists():
        return download(name, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    known = ", ".join(sorted(models)) or "none"
    raise ModelNotFoundError(
        f"no model {name!r}: it is no directory, no installed pretrained model (installed: {known}) and no Hugging "
        f"Face Hub repo id (owner/name)"
    )


def download(
    repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None, local_files_only: bool = False,
) -> Path:
    """``snapshot_download`` of a capkit model repo (its three files), offline from the cache when
    ``local_files_only`` or ``HF_HUB_OFFLINE`` says so."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # the variable is read at every call, not only when huggingface_hub was imported
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE
    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, token=token, local_files_only=offline,
            allow_patterns=list(FILES), library_name="capkit",
        )
    except LocalEntryNotFoundError as err:
        why = ("capkit is offline (HF_HUB_OFFLINE or local_files_only)" if offline else
               "the Hugging Face Hub could not be reached")
        raise ModelNotFoundError(
            f"{at} is not in the Hugging Face cache and {why}: download it once online, or give a local directory"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelNotFoundError(f"{at}: no such Hub repository or revision (private? log in with `hf auth login`)") \
            from err
    except (HfHubHTTPError, OSError) as err:
        raise ModelNotFoundError(f"{at}: the download failed ({type(err).__name__}: {err}); set HF_HUB_OFFLINE=1 "
                                 f"to use the cached copy") from err
    return Path(folder)


def upload(
    folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
    revision: str | None = None, commit_message: str = "Upload capkit model", create_pr: bool = False,
) -> str:
    """Create the model repo if needed and upload ``folder`` to it; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=os.fspath(folder), repo_type="model", revision=revision,
        commit_message=commit_message, create_pr=create_pr,
    )
    return str(info.commit_url)
