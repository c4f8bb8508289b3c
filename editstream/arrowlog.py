"""Arrow IPC stream logs: append-only record batches in rotated files under a run directory.

Each log is `<run_dir>/<name>/<name>-<NNNNN>.arrows`, an Arrow IPC *stream* file, flushed after
every batch, so readers (pyarrow, pandas, polars, duckdb) see complete batches while the writer
runs. A file is rotated after `rotate_rows` rows. Schemas are versioned in their metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

SCHEMA_VERSION = "1"

EVAL_SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("ms", tz="UTC")),
        ("replica", pa.string()),
        ("version", pa.int64()),  # replica version (edits applied) when probed
        ("kind", pa.string()),  # reliability | generality | locality | perplexity
        ("edit_id", pa.string()),  # the probed edit (empty for locality)
        ("edit_seq", pa.int64()),
        ("age_edits", pa.int64()),  # version - edit_seq
        ("age_s", pa.float64()),  # seconds since the edit entered the stream
        ("score", pa.float64()),  # token accuracy (agreement for locality; the value for perplexity)
        ("fired", pa.bool_()),  # whether an edit fired on the probe
        ("method", pa.string()),
    ],
    metadata={"editstream.schema": "eval", "editstream.schema_version": SCHEMA_VERSION},
)

EDIT_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("edit_id", pa.string()),
        ("op", pa.string()),
        ("method", pa.string()),
        ("ingest_ms", pa.float64()),  # when the fact entered the facts stream
        ("replica", pa.string()),
        ("applied_ms", pa.float64()),  # when it took effect on that replica
        ("latency_ms", pa.float64()),  # applied_ms - ingest_ms
        ("artifact_bytes", pa.int64()),
    ],
    metadata={"editstream.schema": "edits", "editstream.schema_version": SCHEMA_VERSION},
)


class ArrowLog:
    """Appends rows (dicts) as record batches to rotated Arrow IPC stream files."""

    def __init__(
        self, run_dir: Path, name: str, schema: pa.Schema, rotate_rows: int = 100_000, writer: str = ""
    ) -> None:
        """`writer` names one of several processes writing the same log (files `name-writer-NNNNN`);
        a restarted writer continues its numbering, so nothing is overwritten."""
        self.dir = Path(run_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.schema, self.rotate_rows = name, schema, rotate_rows
        self.stem = f"{name}-{writer}" if writer else name
        self._index = len(list(self.dir.glob(f"{self.stem}-[0-9]*.arrows")))
        self._writer: ipc.RecordBatchStreamWriter | None = None
        self._sink = None
        self._rows = 0

    def _open(self) -> None:
        path = self.dir / f"{self.stem}-{self._index:05d}.arrows"
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = ipc.new_stream(self._sink, self.schema)
        self._rows = 0

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self._writer is None or self._rows >= self.rotate_rows:
            self.close()
            self._open()
        batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        self._writer.write_batch(batch)
        self._sink.flush()
        self._rows += len(rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None
            self._index += 1


def read_log(run_dir: Path, name: str, writer: str = "") -> pa.Table:
    """Every complete batch of a log (also while it is being written); only `writer`'s files if given."""
    tables = []
    pattern = f"{name}-{writer}-[0-9]*.arrows" if writer else f"{name}-*.arrows"
    for path in sorted((Path(run_dir) / name).glob(pattern)):
        with pa.OSFile(str(path), "rb") as f:
            try:
                reader = ipc.open_stream(f)
            except pa.ArrowInvalid:  # just created: its schema is not written yet, so no batches either
                continue
            batches = []
            try:
                for batch in reader:
                    batches.append(batch)
            except pa.ArrowInvalid:  # a batch still being written
                pass
            tables.append(pa.Table.from_batches(batches, schema=reader.schema))
    if not tables:
        schema = EVAL_SCHEMA if name == "eval" else EDIT_SCHEMA
        return schema.empty_table()
    return pa.concat_tables(tables)
