"""Inputs read from, and outputs written to, local directories and buckets alike.

Every path a user gives goes through `controller.config.as_path` (etils.epath; `gs://` through
gcsfs), so joins and opens are the same for both. What a bucket does not do as a local file
system does is handled here:

- `stage`: a remote model directory or data file is copied once into a local cache, because
  the safetensors, tokenizer and Parquet readers want local files. The copy is kept and reused
  while the remote files keep their sizes and versions (GCS object generations).
- `append_text`: an object cannot be appended to, so a remote file is rewritten whole.
- `upload_dir`: a directory written locally is copied into a bucket; `save_hf_model_at` writes
  a Hugging Face export that way.

Credentials are gcsfs's: Application Default Credentials, a service account's metadata
server on GCE/GKE, or `STORAGE_EMULATOR_HOST` for an emulator.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from etils import epath

from controller.config import ConfigError, JobConfig, as_path, is_url

# Where remote inputs are staged; ~/.cache/tandem/staged by default.
STAGING_ENV = "TANDEM_STAGING_DIR"
_MANIFEST = ".tandem-staged.json"
_CHUNK = 8 << 20


class StorageError(ConfigError):
    """A file a user named cannot be read or written; the message names the field and a fix."""


def staging_root() -> Path:
    root = os.environ.get(STAGING_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tandem" / "staged"


def _remote_error(field: str, location: str, e: BaseException) -> StorageError:
    return StorageError(
        f"{field}={location!r} cannot be read ({type(e).__name__}: {e}) (fix: check the URL "
        f"and this machine's credentials, e.g. `gcloud auth application-default login`)")


def stage(location: str, field: str, *, quiet: bool = False) -> Path:
    """A local path holding what `location` holds: `location` itself when it is local, else
    a copy of the remote file, or of the remote directory's files (not its subdirectories),
    in the staging cache, copied again when a file's size or version changes. `field` names
    the config field in errors and progress lines."""
    if not is_url(location):
        return Path(location).expanduser()
    src = as_path(location)
    key = hashlib.sha256(str(src).rstrip("/").encode()).hexdigest()[:16]
    dest = staging_root() / key
    try:
        single = not src.is_dir()
        if not single:
            files = sorted((p for p in src.iterdir() if p.is_file()), key=lambda p: p.name)
            target = dest / src.name
        elif src.exists():
            files, target = [src], dest
        else:
            raise StorageError(f"{field}={location!r} does not exist (fix: check the URL, "
                               f"e.g. `gcloud storage ls {location}`)")
        stats = {p.name: _stat(p) for p in files}
    except StorageError:
        raise
    except Exception as e:  # gcsfs raises its own, google-auth's and aiohttp's errors
        raise _remote_error(field, location, e) from None
    target.mkdir(parents=True, exist_ok=True)
    manifest = target / _MANIFEST
    try:
        staged = json.loads(manifest.read_text()) if manifest.is_file() else {}
    except (OSError, json.JSONDecodeError):
        staged = {}
    todo = [p for p in files
            if staged.get(p.name) != stats[p.name] or not (target / p.name).is_file()]
    total = sum(stats[p.name][0] for p in todo)
    t0 = time.perf_counter()
    done = 0
    for p in todo:
        tmp = target / (p.name + ".part")
        try:
            with p.open("rb") as f, open(tmp, "wb") as out:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if not quiet:
                        _progress(field, done, total, t0)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise _remote_error(field, location, e) from None
        tmp.replace(target / p.name)
        staged[p.name] = stats[p.name]
        manifest.write_text(json.dumps(staged))  # a kill mid-way keeps the files already here
    if todo and not quiet:
        secs = time.perf_counter() - t0
        print(f"\r{field}: {len(todo)} file(s), {total / 1e6:.1f} MB copied from {location} to "
              f"{target} in {secs:.1f} s", file=sys.stderr, flush=True)
    return target / src.name if single else target


def _stat(p: epath.Path) -> list:
    """[size, version] of a remote file: GCS's object generation changes with every write
    (an etag, checksum or modification time where a store has no generations)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(p))
    info = fs.info(path)
    version = next((str(info[k]) for k in ("generation", "etag", "md5Hash", "crc32c", "mtime")
                    if info.get(k) is not None), "")
    return [int(info.get("size") or 0), version]


def _progress(field: str, done: int, total: int, t0: float) -> None:
    if not sys.stderr.isatty():
        return
    secs = max(time.perf_counter() - t0, 1e-9)
    pct = 100.0 * done / total if total else 100.0
    print(f"\r{field}: staging {done / 1e6:.1f}/{total / 1e6:.1f} MB ({pct:.0f}%, "
          f"{done / secs / 1e6:.1f} MB/s)", end="", file=sys.stderr, flush=True)


def write_text(path: epath.Path, text: str) -> None:
    """Writes `text` to `path` (local or remote), creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def append_text(path: epath.Path, text: str) -> None:
    """Appends `text` to `path`: in place for a local file, by rewriting a remote one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_url(path):
        with open(os.fspath(path), "a") as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ""
    path.write_text(old + text)


def upload_dir(local: Path, dest: epath.Path) -> None:
    """Copies the files under `local` to `dest` (a bucket prefix or a local directory)."""
    for file in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        target = dest / file.relative_to(local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "rb") as f, target.open("wb") as out:
            while chunk := f.read(_CHUNK):
                out.write(chunk)


def staged_inputs(cfg: JobConfig) -> JobConfig:
    """`cfg` with a remote `model.path` and `data.path` replaced by their local staged copies
    (the same object when both are local): what the loaders, tokenizers and exporters read."""
    update = {}
    for section, field in (("model", "path"), ("data", "path")):
        value = getattr(getattr(cfg, section), field)
        if is_url(value):
            update[section] = getattr(cfg, section).model_copy(
                update={field: str(stage(value, f"{section}.{field}"))})
    return cfg.model_copy(update=update) if update else cfg


def save_hf_model_at(path: str | os.PathLike, spec: Any, params: Any, *,
                     source_dir: str | os.PathLike | None = None,
                     max_shard_bytes: int = 4 * 1024**3, overwrite: bool = False) -> Any:
    """`trainer.hf.save_hf_model` to a local directory (its path is returned) or a bucket
    (written to a local temporary directory, then uploaded; the URL's path is returned)."""
    from trainer.hf import save_hf_model

    if not is_url(path):
        return save_hf_model(path, spec, params, source_dir=source_dir,
                             max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    dest = as_path(path)
    if not overwrite and dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{path} already holds files (fix: choose a new directory)")
    with tempfile.TemporaryDirectory(prefix="tandem-export-") as tmp:
        local = save_hf_model(Path(tmp) / "model", spec, params, source_dir=source_dir,
                              max_shard_bytes=max_shard_bytes)
        upload_dir(Path(local), dest)
    return dest


def save_peft_adapters_at(path: str | os.PathLike, spec: Any, adapters: Any, *,
                          base_model: str | None, overwrite: bool = False) -> Any:
    """LoRA adapters as PEFT saves them (adapter_config.json, adapter_model.safetensors), to a
    local directory or a bucket (written locally, then uploaded)."""
    import json

    from safetensors.numpy import save_file

    from trainer.lora import peft_config, peft_named_arrays

    def write(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_config.json").write_text(
            json.dumps(peft_config(spec, base_model), indent=2) + "\n")
        save_file(peft_named_arrays(spec, adapters), str(directory / "adapter_model.safetensors"),
                  metadata={"format": "pt"})

    dest = as_path(path)
    if not overwrite and dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{path} already holds files (fix: choose a new directory)")
    if not is_url(path):
        write(Path(path))
        return Path(path)
    with tempfile.TemporaryDirectory(prefix="tandem-export-") as tmp:
        write(Path(tmp) / "adapters")
        upload_dir(Path(tmp) / "adapters", dest)
    return dest
