"""Files that are either whole or absent: every writer goes through a temporary file in the target's
folder and an atomic rename, so a crash, a kill or a full disk never leaves a torn file behind."""
import glob
import hashlib
import json
import os
import tempfile

import numpy as np

TMP_PREFIX = ".tmp-"


class WriteError(OSError):
    """A file that could not be written (no space, no permission, a file where a folder should be)."""


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename onto `path`. Any failure removes the temporary file and raises
    WriteError with one readable line; an earlier file at `path` stays as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.basename(path))
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result should read like any other file
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise WriteError(f"could not write {path}: {describe_write_error(e, directory)}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def describe_write_error(error: Exception, directory: str) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        if os.statvfs(directory).f_bavail == 0:
            return "No space left on device"
    except OSError:
        pass
    return str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__


def remove_stale_temporaries(directory: str) -> list:
    """Delete the temporary files a killed writer left in `directory` (never a finished file)."""
    stale = glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*"))
    for path in stale:
        os.remove(path)
    return stale


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_npz(path: str, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checksums(path: str) -> dict:
    """{file name: sha256} from a SHA256SUMS file (the `sha256sum` format); {} if there is none."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {name.lstrip("*"): digest for digest, name in (line.split() for line in f if line.strip())}
