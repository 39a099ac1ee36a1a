"""Stream text documents out of the inputs a user names.

An input is a path (text file, folder, JSONL, parquet, a `datasets` directory written by
`save_to_disk`) or a Hugging Face dataset name (`NAME` or `NAME:CONFIG`, split `train`).
Everything here is a generator that holds at most one batch of documents at a time, so memory
does not grow with the corpus. Empty documents are skipped: they would only add a lone EOS.

A text file is one document, unless a document separator is given: a regular expression matched
against each whole line (without its line break). Matching lines end one document and start the
next; they belong to neither. A document is its lines joined as they were, without the last line
break; documents that are empty or only whitespace are skipped. JSONL/parquet/dataset rows are
documents whatever the separator.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Optional

from dsgpt.errors import UserError
from dsgpt.io import read_jsonl

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
FORMATS_HELP = (
    "supported inputs are .txt/.md files (one document per file, or split at --doc-separator lines), "
    "folders of them (searched recursively), .jsonl (one JSON object per line), .parquet, a directory written by "
    "datasets' save_to_disk, or a Hugging Face dataset name (NAME or NAME:CONFIG)"
)
_BATCH_ROWS = 1024  # rows per Arrow batch: big enough to be fast, small enough to stay flat


def iter_documents(inputs: list[str], text_field: str = "text", doc_separator: Optional[str] = None) -> Iterator[str]:
    """Yield every non-empty document of every input, in a fixed deterministic order; text files
    are split into documents at lines that match `doc_separator` (see compile_separator)."""
    separator = compile_separator(doc_separator)
    # Check every input before yielding anything, so a typo in the last one fails at once.
    for item, kind in check_inputs(inputs):
        if kind == "hf":
            yield from _iter_hf_name(item, text_field)
        else:
            yield from _iter_path(Path(item), kind, text_field, separator)


def compile_separator(pattern: Optional[str]) -> Optional[re.Pattern]:
    """The document separator as a compiled regex (None: one document per text file)."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise UserError(
            f"--doc-separator {pattern!r} is not a valid regular expression ({err}). It is Python regex "
            "syntax matched against each whole line, e.g. '%' (a line holding only %), '' (an empty line) "
            "or '-{3,}'; quote it for the shell."
        ) from None


def check_inputs(inputs) -> list[tuple[str, str]]:
    """Each input with its kind; a UserError for one that is missing or of an unknown type."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise UserError("No inputs were given: name at least one file, folder or dataset with --input.")
    return [(str(item), _classify(str(item))) for item in inputs]


def _classify(item: str) -> str:
    path = Path(item).expanduser()
    if path.is_dir():
        return "saved_dataset" if _is_saved_dataset(path) else "folder"
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in KNOWN_SUFFIXES:
            return suffix.lstrip(".")
        raise UserError(
            f"Input {path} has an unsupported file type {suffix or '(no suffix)'!r}: {FORMATS_HELP}. "
            "Convert it to one of these or rename it if it is plain text."
        )
    if path.exists():
        raise UserError(f"Input {path} is neither a file nor a directory: {FORMATS_HELP}.")
    if _looks_like_path(item):
        raise UserError(
            f"Input {path} does not exist. Check the path (relative paths are taken from "
            f"{Path.cwd()}); {FORMATS_HELP}."
        )
    return "hf"


def _looks_like_path(item: str) -> bool:
    # A Hugging Face name is `name` or `org/name` (optionally `:config`); anything with a file
    # suffix, a leading ./ ~ or /, or deeper nesting is surely a mistyped local path.
    if item.startswith((".", "/", "~")) or item.count("/") > 1 or "\\" in item:
        return True
    return Path(item.split(":", 1)[0]).suffix.lower() in KNOWN_SUFFIXES + (".json", ".csv", ".arrow")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _iter_path(path: Path, kind: str, text_field: str, separator: Optional[re.Pattern] = None) -> Iterator[str]:
    path = path.expanduser()
    if kind == "folder":
        yield from _iter_folder(path, text_field, separator)
    elif kind == "saved_dataset":
        yield from _iter_saved_dataset(path, text_field)
    elif kind == "jsonl":
        yield from _iter_jsonl(path, text_field)
    elif kind == "parquet":
        yield from _iter_parquet(path, text_field)
    elif separator is not None:
        yield from _split_text(path, separator)
    else:
        text = _read_text(path)
        if text:
            yield text


def _split_text(path: Path, separator: re.Pattern) -> Iterator[str]:
    """The documents of a text file split at separator lines, read line by line (flat memory)."""
    lines: list[str] = []
    lineno = 0
    with open(path, encoding="utf-8") as f:
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise UserError(
                    f"File {path} is not valid UTF-8 near line {lineno + 1}. Convert it to UTF-8 "
                    "(e.g. `iconv -f latin1 -t utf-8`) or leave it out of the inputs."
                ) from None
            if not line:
                break
            lineno += 1
            if separator.fullmatch(line[:-1] if line.endswith("\n") else line):
                yield from _joined(lines)
                lines = []
            else:
                lines.append(line)
    yield from _joined(lines)


def _joined(lines: list[str]) -> Iterator[str]:
    doc = "".join(lines)
    if doc.endswith("\n"):
        doc = doc[:-1]
    if doc.strip():
        yield doc


def _iter_folder(root: Path, text_field: str, separator: Optional[re.Pattern] = None) -> Iterator[str]:
    files = _folder_files(root)
    if not files:
        raise UserError(
            f"Folder {root} holds no usable files (looked recursively for "
            f"{', '.join(KNOWN_SUFFIXES)}; hidden files are skipped). Point --input at the files "
            "themselves or add them to the folder."
        )
    for path in files:
        yield from _iter_path(path, path.suffix.lower().lstrip("."), text_field, separator)


def _folder_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in KNOWN_SUFFIXES:
                found.append(Path(dirpath) / name)
    # Sort on the path relative to the root so the order is the same wherever the folder lives.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"File {path} is not valid UTF-8 (byte {err.start}: {err.reason}). Convert it to UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`) or leave it out of the inputs."
        ) from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    def line(n):
        return f"{path} line {n}"
    with open(path, encoding="utf-8") as f:
        for n, record in read_jsonl(f, line, "A .jsonl file needs one JSON object per line."):
            yield from _field_text(record, text_field, line(n))


def _field_text(record, text_field: str, where: str) -> Iterator[str]:
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, not an object with a {text_field!r} field.")
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise UserError(
            f"{where} has no {text_field!r} field (keys present: {keys}). Pass the right field "
            "name with --text-field."
        )
    yield from _texts([record[text_field]], f"field {text_field!r}", where)


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"Cannot read parquet file {path}: {err}. Check that it is a complete parquet file.") from None
    names = pf.schema_arrow.names
    _check_column(names, text_field, str(path))
    # Row group by row group (and in bounded batches inside one): never the whole table.
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
        yield from _column_texts(batch.column(0).to_pylist(), text_field, str(path))


def _check_column(names, text_field: str, where: str) -> None:
    if text_field not in names:
        raise UserError(
            f"{where} has no column {text_field!r} (columns: {', '.join(names) or 'none'}). "
            "Pass the right column name with --text-field."
        )


def _column_texts(values, text_field: str, where: str) -> Iterator[str]:
    yield from _texts(values, f"column {text_field!r}", where)


def _texts(values, what: str, where: str) -> Iterator[str]:
    """The non-empty strings among values (None is a missing text); anything else is an error."""
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise UserError(
                f"{where}: {what} holds {type(value).__name__} values, not text. Pick the text "
                "field or column with --text-field."
            )
        if value:
            yield value


def _iter_saved_dataset(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"Cannot load the saved dataset in {path}: {err}. Re-save it with save_to_disk.") from None
    yield from _iter_dataset(_pick_split(ds, str(path)), text_field, str(path))


def _iter_hf_name(item: str, text_field: str) -> Iterator[str]:
    import datasets

    name, _, config = item.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as err:
        raise UserError(
            f"Input {item!r} is not a local file or folder, and loading it as a Hugging Face dataset "
            f"failed: {type(err).__name__}: {err}. Fix the path if you meant a local file; for a hub "
            "dataset this machine needs internet access or a copy in the local cache (with "
            "HF_DATASETS_OFFLINE=1 for offline use), or save it with save_to_disk and pass that folder."
        ) from None
    yield from _iter_dataset(ds, text_field, item)


def _pick_split(ds, where: str):
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    if "train" in ds:
        return ds["train"]
    if len(ds) == 1:
        return next(iter(ds.values()))
    raise UserError(
        f"The saved dataset {where} has splits {', '.join(ds)} and none is called 'train'. Save the "
        "split you want to train on on its own (ds[SPLIT].save_to_disk(DIR)) and pass that folder."
    )


def _iter_dataset(ds, text_field: str, where: str) -> Iterator[str]:
    _check_column(ds.column_names, text_field, where)
    # Arrow-backed and memory-mapped: iterating in batches keeps memory flat.
    for batch in ds.select_columns([text_field]).iter(batch_size=_BATCH_ROWS):
        yield from _column_texts(batch[text_field], text_field, where)
