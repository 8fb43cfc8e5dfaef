"""Reading documents out of corpus files, one small reader per format, all streaming.

Formats, by name:
    .txt                    the whole file is one document
    .jsonl .jsonl.gz .jsonl.zst   one JSON object per line, the text under `text_field`
    .parquet                a column `text_field`, read one row group batch at a time (pyarrow)
    .arrow                  an Arrow IPC file or stream with a column `text_field` (pyarrow)
    a directory holding dataset_info.json and state.json: a Hugging Face dataset written by
    `datasets.Dataset.save_to_disk`, read as the Arrow streams its state.json lists, in order (pyarrow;
    the `datasets` package itself is not needed)

Every reader yields non-empty strings and never holds more than one batch of records. Every error is a
ValueError that names the file and the record (line number or row index), so a bad corpus is found, not
silently skipped.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FILE_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
HF_MARKERS = ("dataset_info.json", "state.json")
ARROW_BATCH_ROWS = 1024
DEFAULT_MAX_RECORD_BYTES = 64 * 2**20


def suffix_of(path: Path) -> str | None:
    """The supported format of `path` by its name (".jsonl.gz", ...), or None."""
    name = path.name.lower()
    return next((s for s in sorted(FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def is_hf_dataset(path: Path) -> bool:
    """Whether directory `path` is a dataset written by `datasets.Dataset.save_to_disk`."""
    return path.is_dir() and all((path / m).is_file() for m in HF_MARKERS)


def input_sources(inputs: list[str | Path]) -> list[Path]:
    """The files and Hugging Face dataset directories to read, in order; ValueError naming a bad input."""
    if not inputs:
        raise ValueError("no input paths given")
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if is_hf_dataset(path):
            found.append(path)
        elif path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and suffix_of(p))
            # A saved HF dataset inside the directory is read as one source, not as loose .arrow files.
            datasets = sorted({p.parent for p in path.rglob("state.json") if is_hf_dataset(p.parent)})
            inside = [p for p in inside if not any(d in p.parents for d in datasets)]
            if not inside and not datasets:
                raise ValueError(
                    f"input directory {str(path)!r} holds no {', '.join(FILE_SUFFIXES)} files and no saved "
                    "Hugging Face dataset"
                )
            found.extend(sorted([*inside, *datasets]))
        elif path.is_file():
            if suffix_of(path) is None:
                raise ValueError(
                    f"input file {str(path)!r} has unsupported extension {path.suffix!r} (expected a name "
                    f"ending in {', '.join(FILE_SUFFIXES)}, or a saved Hugging Face dataset directory)"
                )
            found.append(path)
        else:
            raise ValueError(f"input path {str(path)!r} does not exist")
    return found


def documents(
    source: Path, text_field: str, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[str]:
    """Every non-empty document of one source (a file or a saved HF dataset directory)."""
    try:
        if is_hf_dataset(source):
            yield from _hf_dataset(source, text_field, max_record_bytes)
            return
        kind = suffix_of(source)
        if kind == ".txt":
            yield from _text_file(source, max_record_bytes)
        elif kind in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
            with _open_binary(source, kind) as raw:
                yield from _json_lines(source, raw, text_field, max_record_bytes)
        elif kind == ".parquet":
            yield from _parquet(source, text_field, max_record_bytes)
        elif kind == ".arrow":
            yield from _arrow(source, text_field, max_record_bytes)
        else:
            raise ValueError(f"input {str(source)!r} has an unsupported format")
    except PermissionError as exc:
        raise ValueError(f"input {str(source)!r} cannot be read: {exc.strerror}") from exc
    except _STREAM_ERRORS + _zstd_errors() as exc:
        # gzip's and zstandard's errors for a damaged stream are OSErrors or EOFError.
        raise ValueError(f"input {str(source)!r} is damaged or not in its format: {exc}") from exc


_STREAM_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error)


def _zstd_errors() -> tuple[type[Exception], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


def _check_size(where: str, text: str, limit: int) -> None:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        raise ValueError(f"{where} holds {size:,} bytes of text, over --max-record-bytes ({limit:,})")


def _text_file(path: Path, limit: int) -> Iterator[str]:
    size = path.stat().st_size
    if size > limit:
        raise ValueError(
            f"{str(path)!r} is one document of {size:,} bytes, over --max-record-bytes ({limit:,})"
        )
    data = path.read_bytes()
    try:
        # utf-8-sig drops a leading byte-order mark (an editor artefact); "\r\n" stays as written.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{str(path)!r} is not valid UTF-8: byte {exc.start} (line {line})") from exc
    if text:
        yield text


def _open_binary(path: Path, kind: str) -> IO[bytes]:
    if kind == ".jsonl.gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if kind == ".jsonl.zst":
        try:
            import zstandard
        except ImportError as exc:
            raise ValueError(
                f"reading {str(path)!r} needs the zstandard package: pip install zstandard"
            ) from exc
        stream = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
        return io.BufferedReader(stream)  # line iteration over the stream
    return path.open("rb")


def _json_lines(path: Path, raw: IO[bytes], field: str, limit: int) -> Iterator[str]:
    for number, line in enumerate(raw, start=1):
        where = f"{str(path)!r} line {number}"
        if len(line) > limit + 1024:
            raise ValueError(f"{where} is {len(line):,} bytes long, over --max-record-bytes ({limit:,})")
        try:
            text_line = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where} is not valid UTF-8 (byte {exc.start} of the line)") from exc
        if not text_line.strip():
            continue
        try:
            record = json.loads(text_line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc.msg}") from exc
        yield from _field(where, record, field, limit)


def _field(where: str, record: Any, field: str, limit: int) -> Iterator[str]:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object with field {field!r}")
    if field not in record:
        present = sorted(record)[:20]
        raise ValueError(
            f"{where} has no string field {field!r} (its fields: {present}); choose one with --text-field"
        )
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where} has no string field {field!r} (it holds a {type(value).__name__})")
    _check_size(where, value, limit)
    if value:
        yield value


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise ValueError("reading Parquet or Arrow needs the pyarrow package: pip install pyarrow") from exc
    return pyarrow


def _column_batches(
    path: Path, batches: Iterator[Any], field: str, limit: int, first_row: int = 0
) -> Iterator[str]:
    row = first_row
    for batch in batches:
        names = batch.schema.names
        if field not in names:
            raise ValueError(
                f"{str(path)!r} has no column {field!r} (it has {names}); choose one with --text-field"
            )
        column = batch.column(names.index(field))
        for value in column.to_pylist():
            where = f"{str(path)!r} row {row}"
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where} has {field!r} = {type(value).__name__}, expected a string")
            if value is None:
                raise ValueError(f"{where} has {field!r} = null, expected a string")
            _check_size(where, value, limit)
            if value:
                yield value
            row += 1


def _parquet(path: Path, field: str, limit: int) -> Iterator[str]:
    pa = _pyarrow()
    try:
        file = pa.parquet.ParquetFile(path)
    except pa.lib.ArrowException as exc:
        raise ValueError(f"{str(path)!r} is not a readable Parquet file: {exc}") from exc
    names = file.schema_arrow.names
    if field not in names:
        raise ValueError(
            f"{str(path)!r} has no column {field!r} (it has {names}); choose one with --text-field"
        )
    try:
        yield from _column_batches(
            path, file.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=[field]), field, limit
        )
    except pa.lib.ArrowException as exc:
        raise ValueError(f"{str(path)!r} is damaged: {exc}") from exc


def _arrow_batches(path: Path) -> Iterator[Any]:
    pa = _pyarrow()
    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        except pa.lib.ArrowInvalid:
            source.seek(0)
        yield from pa.ipc.open_stream(source)


def _arrow(path: Path, field: str, limit: int) -> Iterator[str]:
    pa = _pyarrow()
    try:
        yield from _column_batches(path, _arrow_batches(path), field, limit)
    except pa.lib.ArrowException as exc:
        raise ValueError(f"{str(path)!r} is not a readable Arrow file or stream: {exc}") from exc


def _hf_dataset(directory: Path, field: str, limit: int) -> Iterator[str]:
    state_path = directory / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{str(state_path)!r} does not list the dataset's Arrow files: {exc}") from exc
    for name in names:
        path = directory / name
        # state.json names files inside the dataset directory only.
        if Path(name).name != name or not path.is_file():
            raise ValueError(f"{str(state_path)!r} names {name!r}, which is not a file in {str(directory)!r}")
        yield from _arrow(path, field, limit)
