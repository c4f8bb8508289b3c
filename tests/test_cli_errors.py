"""Expected failures of the command line end in one clear line (cause and fix), exit 2, nothing sent."""

from __future__ import annotations

import json

import pytest

from services.cli import main
from services.transport.redis_server import RedisServer, free_port
from services.transport.store import RedisStore, connect

pytestmark = pytest.mark.redis


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_nothing_listening(capsys):
    code, err = run(capsys, "status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert code == 2 and err.startswith("editstream: cannot reach Redis at redis://127.0.0.1:") and "\n" not in err


def test_wrong_and_missing_password(capsys, tmp_path):
    with RedisServer(directory=tmp_path / "redis", password="sesame") as server:
        bad = server.url.replace("sesame", "wrong")
        code, err = run(capsys, "status", "--redis-url", bad)
        assert code == 2 and "refused the credentials" in err and "wrong" not in err  # the password is not echoed
        code, err = run(capsys, "status", "--redis-url", f"redis://127.0.0.1:{server.port}/0")
        assert code == 2 and ("needs a password" in err or "refused the credentials" in err)


def test_feed_refuses_binary_and_contract_breaking_files_and_sends_nothing(capsys, tmp_path, redis_server):
    binary = tmp_path / "facts.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    code, err = run(capsys, "feed", str(binary), "--redis-url", redis_server.url, "--namespace", "feedcheck")
    assert code == 2 and str(binary) in err and "not UTF-8" in err and "JSON" in err
    facts = tmp_path / "facts.jsonl"
    rows = [{"prompt": "The sky is", "target": "green"}, {"prompt": "Bees make", "target": "\u200b"}]
    facts.write_text("\n".join(json.dumps(r) for r in rows))
    code, err = run(capsys, "feed", str(facts), "--redis-url", redis_server.url, "--namespace", "feedcheck")
    assert code == 2 and "nothing sent" in err and "record 1" in err and "'target' is empty" in err
    store = RedisStore(connect(redis_server.url), "feedcheck")
    assert store.facts_size() == 0


def test_serve_refuses_a_snapshot_interval_below_one(capsys):
    code, err = run(capsys, "serve", "--snapshot-every", "0", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert code == 2 and err.startswith("--snapshot-every 0:") and "\n" not in err


def test_serve_refuses_compaction_without_snapshots_or_for_a_sequential_method(capsys):
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, err = run(capsys, "serve", "--compact", "--redis-url", url)
    assert code == 2 and err.startswith("--compact needs --snapshot-dir")
    code, err = run(capsys, "serve", "--compact", "--snapshot-dir", "snaps", "--method", "rome", "--redis-url", url)
    assert code == 2 and err.startswith("--compact: rome is sequential")


def test_serve_names_a_bucket_address_without_a_bucket(capsys):
    code, err = run(
        capsys, "serve", "--snapshot-dir", "s3:///edits", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"
    )
    assert code == 2 and err.startswith("--snapshot-dir: snapshot store 's3:///edits': no bucket named")


def test_serve_takes_method_options_and_names_a_malformed_one():
    from services.cli import build_parser
    from services.cli.common import parse_options

    args = build_parser().parse_args(["serve", "--option", "encoder_int8=true", "--option", "relation_gate=false"])
    assert parse_options(args.option) == {"encoder_int8": True, "relation_gate": False}
    with pytest.raises(SystemExit, match="'encoder_int8': expected KEY=VALUE"):
        parse_options(["encoder_int8"])
