"""Arrow logs: readable by pyarrow, pandas, polars and duckdb, also while being written; rotation."""

import duckdb
import polars as pl
import pyarrow as pa

from editstream.arrowlog import EVAL_SCHEMA, ArrowLog, read_log


def rows(n, start=0):
    return [
        {
            "time": 1_700_000_000_000 + i,
            "replica": "replica-0",
            "version": i,
            "kind": "reliability",
            "edit_id": f"e{i}",
            "edit_seq": i,
            "age_edits": 0,
            "age_s": 0.5,
            "score": 1.0,
            "fired": True,
            "method": "recipe",
        }
        for i in range(start, start + n)
    ]


def test_readers_see_batches_while_the_writer_is_open(tmp_path):
    log = ArrowLog(tmp_path, "eval", EVAL_SCHEMA, rotate_rows=5)
    log.append(rows(3))
    log.append(rows(3, 3))  # 6 rows > 5: the next append rotates
    log.append(rows(2, 6))
    table = read_log(tmp_path, "eval")  # writer still open
    assert table.num_rows == 8
    assert table.schema.metadata[b"editstream.schema_version"] == b"1"
    assert len(list((tmp_path / "eval").glob("eval-*.arrows"))) == 2
    log.close()

    first = sorted((tmp_path / "eval").glob("*.arrows"))[0]
    with pa.OSFile(str(first)) as f:
        assert pa.ipc.open_stream(f).read_all().num_rows == 6
    df = table.to_pandas()
    assert df["version"].tolist() == list(range(8))
    assert pl.from_arrow(table).filter(pl.col("version") > 5).height == 2
    assert pl.read_ipc_stream(first).height == 6
    con = duckdb.connect()
    con.register("eval", table)
    assert con.execute("select count(*), max(version) from eval").fetchone() == (8, 7)


def test_a_log_file_created_but_not_yet_written_reads_as_empty(tmp_path):
    log = ArrowLog(tmp_path, "eval", EVAL_SCHEMA)
    log.append(rows(2))
    (tmp_path / "eval" / "eval-99999.arrows").touch()  # a writer that has opened its next file
    assert read_log(tmp_path, "eval").num_rows == 2
    log.close()


def test_writers_keep_their_own_file_series(tmp_path):
    a = ArrowLog(tmp_path, "eval", EVAL_SCHEMA, writer="ns.replica-1")
    b = ArrowLog(tmp_path, "eval", EVAL_SCHEMA, writer="ns.replica-10")
    a.append(rows(2))
    b.append(rows(3))
    a.close()
    again = ArrowLog(tmp_path, "eval", EVAL_SCHEMA, writer="ns.replica-1")  # a restarted writer
    again.append(rows(1, 2))
    again.close()
    b.close()
    assert read_log(tmp_path, "eval").num_rows == 6
    assert read_log(tmp_path, "eval", writer="ns.replica-1")["version"].to_pylist() == [0, 1, 2]
