"""pspctl.digests: sha256 prefetched in the background equals sha256 computed when asked, and a
file changed since its prefetch is hashed again."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pspctl import digests
from pspctl.cli import app
from pspctl.digests import forget_prefetched, prefetch, sha256_checkpoint, sha256_file
from pspctl.fileformat import SuperposedFile
from tests.conftest import mlp, save_models


@pytest.fixture(autouse=True)
def _clean():
    forget_prefetched()
    yield
    forget_prefetched()


def _taken(path) -> None:
    """Wait until the prefetch of `path` is done."""
    key = os.path.realpath(path)
    digests._PREFETCHED[key][1].result()


def test_a_prefetched_digest_is_the_digest_and_is_taken_once(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"superposition" * 1000)
    prefetch([path, tmp_path / "missing.bin", "auto"])  # names that are no file are left alone
    assert list(digests._PREFETCHED) == [os.path.realpath(path)]
    _taken(path)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not digests._PREFETCHED  # taken: a later call hashes afresh


def test_a_file_changed_after_its_prefetch_is_hashed_again(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"a" * 4096)
    stat = path.stat()
    prefetch([path])
    _taken(path)
    path.write_bytes(b"b" * 4096)  # same size, same inode; the modification time put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(path) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_forgotten_prefetches_are_not_taken(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    prefetch([path])
    _taken(path)
    forget_prefetched()
    calls = []
    real = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda p, chunk: calls.append(p) or real(p, chunk))
    assert sha256_file(path) == hashlib.sha256(b"x" * 100).hexdigest() and calls == [path]


def test_merge_records_the_inputs_sha256_with_the_prefetch(tmp_path, monkeypatch):
    """The command line prefetches the inputs' and the base's digests as it parses them."""
    paths = save_models([mlp(i) for i in range(3)], tmp_path, ".safetensors")
    started = []
    monkeypatch.setattr(digests, "prefetch", lambda p: started.append(list(p)) or None)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "w.safetensors"
    result = CliRunner().invoke(app, ["merge", *map(str, paths), "--base", str(paths[0]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted([str(p) for p in s] for s in started) == sorted([[str(p) for p in paths], [str(paths[0])]])
    recorded = [i["sha256"] for i in SuperposedFile(out).header.inputs]
    assert recorded == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert recorded == [sha256_checkpoint(p) for p in paths]


def test_commands_import_torch_with_the_collector_paused_then_frozen(tmp_path):
    """In-process (as tests run commands) and from `main` (the console script, which pauses the
    collector from the start): torch imported, its objects frozen, the collector running."""
    code = (
        "import gc, sys\n"
        "from pspctl.cli import common\n"
        "assert 'torch' not in sys.modules\n"
        "common._import_libraries()\n"
        "assert 'torch' in sys.modules and gc.isenabled() and gc.get_freeze_count() > 100_000\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = (
        "import gc, sys\n"
        "from pspctl.cli import common\n"
        f"sys.argv = ['pspctl', 'info', {str(tmp_path / 'missing.safetensors')!r}]\n"
        "def finished(code):\n"  # main ends the process (os._exit): look before it does
        "    raise SystemExit(code)\n"
        "common._finished = finished\n"
        "try:\n"
        "    common.main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 2, e.code\n"
        "assert 'torch' in sys.modules and gc.isenabled() and gc.get_freeze_count() > 100_000\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
