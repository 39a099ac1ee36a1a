"""Small file helpers: every shared file is written to a temp name and renamed into place, so a
crash or a second writer never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files owner-only; run files are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def temp_dir_beside(target) -> Path:
    """A fresh hidden dir next to `target`, to write into before `move_into_place`.

    Not mkdtemp: its 0700 mode would stick to the target; mkdir honours the user's umask."""
    import secrets
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def move_into_place(tmp, target) -> None:
    """Rename the finished dir `tmp` to `target`. An existing `target` is moved aside first and
    deleted only once the new one is in place; on failure the old one is put back and OSError
    propagates. The caller decides whether replacing `target` is allowed."""
    import shutil
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.is_dir():
        if any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        else:
            target.rmdir()
    try:
        os.rename(tmp, target)
    except OSError:
        if old is not None:
            os.replace(old / target.name, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(out_dir: Path, overwrite: bool, marker: str, kind: str, flag: str) -> None:
    """A directory a command is about to fill must be absent or empty, or (with --overwrite) be a
    `kind` recognised by its `marker` file: --overwrite deletes the old directory, so never
    anything else. `flag` is the option that names the directory, for the message."""
    from dsgpt.errors import UserError
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"The output '{out_dir}' exists and is not a directory. Choose another {flag}.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"The output directory '{out_dir}' already exists and is not empty. Choose another "
                        f"{flag}, or pass --overwrite to replace it.")
    if not (out_dir / marker).is_file():
        raise UserError(f"The output directory '{out_dir}' is not empty and holds no {marker}, so it is not "
                        f"{kind}; refusing to replace it even with --overwrite. Choose another {flag}.")


def read_jsonl(f, where, hint: str):
    """(n, record) for each non-blank line n of a JSON Lines file `f`, opened by the caller as
    UTF-8 text (its message for a missing file knows which option named it). A line that is not
    JSON, or bytes that are not UTF-8, are a UserError naming the file and line (`where(n)`);
    `hint` ends the JSON message with what each line should hold."""
    from dsgpt.errors import UserError
    n = 0
    while True:
        try:
            line = f.readline()
        except UnicodeDecodeError:  # decoded in chunks: the bad byte is at or a little after line n + 1
            raise UserError(f"{f.name} is not valid UTF-8 (near line {n + 1}). Convert it to UTF-8 "
                            "(e.g. `iconv -f latin1 -t utf-8`) or leave it out.") from None
        if not line:
            return
        n += 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where(n)} is not valid JSON ({err.msg} at column {err.colno}). {hint}") from None
        yield n, record
