"""Reading documents out of text corpora, one small reader per format and a dispatcher by suffix.

    .txt                 the whole file is one document
    .jsonl .jsonl.gz     one JSON object per line, the text under the text field
    .jsonl.zst
    .parquet .arrow      one row per document, the text in the text column (Arrow IPC file or stream)
    a directory holding a Hugging Face dataset saved with ``datasets.Dataset.save_to_disk``

Other directories are searched recursively for all of these, in sorted path order. Every reader
streams: Parquet and Arrow in record batches, compressed files through a decompressing stream, line by
line, so a file larger than memory is never held whole. Every error is a ValueError naming the file and
the record (line number or row index) it stopped at.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

MIB = 1 << 20
DEFAULT_MAX_RECORD_BYTES = 64 * MIB
ROW_BATCH = 1024  # rows per Parquet/Arrow/HF record batch: bounded memory, few Python round trips
HF_DATASET_FILE = "state.json"  # with dataset_info.json, what save_to_disk leaves in a Dataset's directory
HF_DICT_FILE = "dataset_dict.json"  # what save_to_disk leaves in a DatasetDict's directory
HF_FORMAT = "hf-dataset"

_FORMATS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".txt", ".parquet", ".arrow")
SUFFIXES = _FORMATS
"""The file name endings `data prepare` reads (a Hugging Face dataset is a directory)."""


def input_format(path: Path) -> str | None:
    """The format of ``path`` (a suffix in SUFFIXES, or HF_FORMAT), or None when no reader takes it."""
    if path.is_dir():
        if (path / HF_DATASET_FILE).is_file() and (path / "dataset_info.json").is_file():
            return HF_FORMAT
        if (path / HF_DICT_FILE).is_file():
            return HF_FORMAT
        return None
    name = path.name.lower()
    return next((suffix for suffix in _FORMATS if name.endswith(suffix)), None)


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories into the inputs to read, in a fixed order.

    A directory that is a saved Hugging Face dataset is one input; any other directory is searched
    recursively (sorted, so the order never depends on the file system) and must hold at least one
    readable input. A file named explicitly must have a supported suffix.
    """
    if not inputs:
        raise ValueError("no input paths given")
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"input path {str(path)!r} does not exist")
        if path.is_dir() and input_format(path) is None:
            inside = _search(path)
            if not inside:
                raise ValueError(
                    f"input directory {str(path)!r} holds no readable inputs "
                    f"(files ending {list(SUFFIXES)} or a saved Hugging Face dataset)"
                )
            found.extend(inside)
        elif input_format(path) is None:
            raise ValueError(
                f"input file {str(path)!r} has unsupported extension {''.join(path.suffixes)!r} "
                f"(expected one of {list(SUFFIXES)}, or a saved Hugging Face dataset directory)"
            )
        else:
            found.append(path)
    return found


def _search(root: Path) -> list[Path]:
    found: list[Path] = []
    for entry in sorted(root.iterdir()):
        kind = input_format(entry)
        if kind is not None:
            found.append(entry)  # a Hugging Face dataset's own .arrow files are not read twice
        elif entry.is_dir():
            found.extend(_search(entry))
    return found


def read_documents(path: Path, *, text_field: str, max_record_bytes: int) -> Iterator[str]:
    """Yield the non-empty documents of one input, in order; empty texts are skipped."""
    kind = input_format(path)
    readers: dict[str | None, Callable[[Path, str, int], Iterator[str]]] = {
        ".txt": _read_txt,
        ".jsonl": _read_jsonl,
        ".jsonl.gz": _read_jsonl,
        ".jsonl.zst": _read_jsonl,
        ".parquet": _read_parquet,
        ".arrow": _read_arrow,
        HF_FORMAT: _read_hf,
    }
    if kind not in readers:
        raise ValueError(f"no reader for input {str(path)!r}")
    try:
        for text in readers[kind](path, text_field, max_record_bytes):
            if text:
                yield text
    except PermissionError as exc:
        raise ValueError(f"cannot read input {str(path)!r}: permission denied ({exc.strerror})") from exc
    except IsADirectoryError as exc:
        raise ValueError(f"input {str(path)!r} is a directory, not a {kind} file") from exc


def _require(module: str, package: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"reading {what} needs the {package!r} package: pip install {package}") from exc


def _too_large(path: Path, where: str, size: int, limit: int) -> ValueError:
    return ValueError(
        f"{str(path)!r} {where} is {size:,} bytes, over --max-record-bytes ({limit:,}); "
        "raise the limit or split the record"
    )


# ---------------------------------------------------------------------------------------------
# Text and JSON lines
# ---------------------------------------------------------------------------------------------


def _read_txt(path: Path, text_field: str, max_record_bytes: int) -> Iterator[str]:
    size = path.stat().st_size
    if size > max_record_bytes:
        raise _too_large(path, "(one document)", size, max_record_bytes)
    data = path.read_bytes()
    try:
        # utf-8-sig drops a leading byte-order mark, an editor artefact rather than text. Decoding the
        # bytes keeps "\r\n" as written: the tokens reflect the file, not the OS.
        yield data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"input file {str(path)!r} is not valid UTF-8: byte offset {exc.start} ({exc.reason})"
        ) from exc


def _open_lines(path: Path) -> Any:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(path), buffer_size=MIB)
    return path.open("rb", buffering=MIB)


class _ZstdStream(io.RawIOBase):
    """A .zst file decompressed frame by frame, as a readable stream.

    zstandard's own stream_reader ends quietly at a truncated frame, which would drop the documents
    after it without a word; this one raises ZstdError when the file stops inside a frame.
    """

    def __init__(self, path: Path) -> None:
        self.zstandard = _require("zstandard", "zstandard", ".zst files")
        self.raw = path.open("rb")
        self.decompressor = self.zstandard.ZstdDecompressor().decompressobj()
        self.pending = b""  # decompressed bytes not yet returned, from self.position on
        self.position = 0
        self.in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.position == len(self.pending):
            self.pending, self.position = b"", 0
            compressed = self.raw.read(MIB)
            if not compressed:
                if self.in_frame:
                    raise self.zstandard.ZstdError("the file ends inside a compressed frame")
                return 0
            while compressed:
                self.in_frame = True
                self.pending += self.decompressor.decompress(compressed)
                compressed = b""
                if self.decompressor.eof:  # a frame ended: any bytes after it start the next one
                    compressed = self.decompressor.unused_data
                    self.decompressor = self.zstandard.ZstdDecompressor().decompressobj()
                    self.in_frame = False
        size = min(len(buffer), len(self.pending) - self.position)
        buffer[:size] = memoryview(self.pending)[self.position : self.position + size]
        self.position += size
        return size

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decode_errors(path: Path) -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    if path.name.lower().endswith(".zst"):
        errors.append(_require("zstandard", "zstandard", ".zst files").ZstdError)
    return tuple(errors)


def _read_jsonl(path: Path, text_field: str, max_record_bytes: int) -> Iterator[str]:
    corrupt = _decode_errors(path)
    line_number, offset = 0, 0
    try:
        with _open_lines(path) as stream:
            while True:
                # One byte over the limit tells a line that is too long from one that just fits, without
                # ever reading more than the limit into memory.
                line = stream.readline(max_record_bytes + 1)
                if not line:
                    return
                line_number += 1
                where = f"line {line_number}"
                if len(line) > max_record_bytes:
                    raise _too_large(path, where, len(line) + _rest_of_line(stream), max_record_bytes)
                if line_number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line, offset = line[3:], 3
                yield _parse_line(path, where, offset, line, text_field)
                offset += len(line)
    except corrupt as exc:
        raise ValueError(
            f"{str(path)!r} is corrupt or truncated: decompression failed after line {line_number} ({exc})"
        ) from exc
    except OSError as exc:
        if isinstance(exc, PermissionError | IsADirectoryError | FileNotFoundError):
            raise
        raise ValueError(f"{str(path)!r} could not be read after line {line_number}: {exc}") from exc


def _rest_of_line(stream: Any) -> int:
    """Bytes left in the current line, counted a chunk at a time (the line may not fit in memory)."""
    size = 0
    while chunk := stream.readline(MIB):
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return size


def _parse_line(path: Path, where: str, offset: int, line: bytes, text_field: str) -> str:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{str(path)!r} {where} is not valid UTF-8 (byte offset {offset + exc.start} of the "
            f"{'decompressed ' if not path.name.endswith('.jsonl') else ''}file: {exc.reason})"
        ) from exc
    if not decoded.strip():
        return ""
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} {where} is not valid JSON: {exc.msg}") from exc
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        present = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{str(path)!r} {where} has no string field {text_field!r} (fields: {present})")
    return record[text_field]


# ---------------------------------------------------------------------------------------------
# Columnar: Parquet, Arrow IPC, Hugging Face datasets on disk
# ---------------------------------------------------------------------------------------------


def _column_texts(
    path: Path, batches: Iterator[Any], text_field: str, max_record_bytes: int
) -> Iterator[str]:
    """The text column of a stream of pyarrow record batches, checked row by row."""
    row = 0
    for batch in batches:
        column = batch.column(batch.schema.get_field_index(text_field))
        for text in column.to_pylist():
            where = f"row {row}"
            if not isinstance(text, str):
                kind = "null" if text is None else type(text).__name__
                raise ValueError(f"{str(path)!r} {where} has a {kind} {text_field!r}, expected a string")
            # A character takes at most 4 bytes, so only long texts need encoding to be measured.
            if len(text) * 4 > max_record_bytes and len(text.encode("utf-8")) > max_record_bytes:
                raise _too_large(path, where, len(text.encode("utf-8")), max_record_bytes)
            yield text
            row += 1


def _check_column(path: Path, names: list[str], text_field: str) -> None:
    if text_field not in names:
        raise ValueError(f"{str(path)!r} has no column {text_field!r} (columns: {names}); pass --text-field")


def _rows_of(path: Path, kind: str, texts: Iterator[str]) -> Iterator[str]:
    """`texts`, read from a columnar file, with pyarrow's and the file system's errors (a permission error
    aside) turned into one naming the file, its format and the row it stopped at."""
    pa = _require("pyarrow", "pyarrow", f".{kind.lower()} files")
    rows = 0
    try:
        for text in texts:
            yield text
            rows += 1
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, PermissionError):
            raise
        where = f"{str(path)!r} is not a readable {kind} file (stopped at row {rows})"
        raise ValueError(f"{where}: {exc}") from exc


def _read_parquet(path: Path, text_field: str, max_record_bytes: int) -> Iterator[str]:
    pq = _require("pyarrow.parquet", "pyarrow", ".parquet files")

    def texts() -> Iterator[str]:
        parquet = pq.ParquetFile(path)
        _check_column(path, parquet.schema_arrow.names, text_field)
        batches = parquet.iter_batches(batch_size=ROW_BATCH, columns=[text_field])
        yield from _column_texts(path, batches, text_field, max_record_bytes)

    yield from _rows_of(path, "Parquet", texts())


def _read_arrow(path: Path, text_field: str, max_record_bytes: int) -> Iterator[str]:
    pa = _require("pyarrow", "pyarrow", ".arrow files")
    ipc = _require("pyarrow.ipc", "pyarrow", ".arrow files")

    def texts() -> Iterator[str]:
        with pa.memory_map(str(path), "r") as source:
            try:
                reader = ipc.open_file(source)
                schema = reader.schema
                batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # not the random-access file format: try the stream format
                source.seek(0)
                reader = ipc.open_stream(source)
                schema = reader.schema
                batches = iter(reader)
            _check_column(path, schema.names, text_field)
            yield from _column_texts(path, batches, text_field, max_record_bytes)

    yield from _rows_of(path, "Arrow", texts())


def _read_hf(path: Path, text_field: str, max_record_bytes: int) -> Iterator[str]:
    """A Dataset written by save_to_disk: the Arrow streams its state.json lists, in order. Read with pyarrow
    rather than ``datasets.load_from_disk``, so that no file outside the directory is ever opened and the
    `datasets` package is not needed."""
    if (path / HF_DICT_FILE).is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(
            f"{str(path)!r} is a Hugging Face DatasetDict with splits {splits}; pass one split's "
            f"directory, e.g. {str(path / splits[0]) if splits else str(path / 'train')!r}"
        )
    state_path = path / HF_DATASET_FILE
    if not os.access(state_path, os.R_OK):
        raise PermissionError(13, "permission denied", str(state_path))
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{str(state_path)!r} does not list the dataset's Arrow files: {exc}") from exc
    for name in names:
        # state.json may name files inside the dataset directory only: no separators, no "..".
        inside = isinstance(name, str) and Path(name).name == name and name not in (".", "..")
        if not inside or not (path / name).is_file():
            raise ValueError(f"{str(state_path)!r} names {name!r}, which is not a file in {str(path)!r}")
    for name in names:
        yield from _read_arrow(path / name, text_field, max_record_bytes)
