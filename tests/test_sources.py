"""Download sources and the download stage, on a small synthetic data set whose checksums
the tests pin in place of the official ones: source order, fallback, a mirror served over
HTTP on 127.0.0.1, the error when nothing is reachable, and a bad named source that leaves
data/raw/ exactly as it was."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import write_raw
from fmnist import cli
from fmnist.data import DataError
from fmnist.data import sources
from fmnist.commands import download

NAMES = [f.name for f in sources.FILES]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The same small data set as plain files and as gzip files; sources.FILES pinned to it, and
    no real local copy, mirror or FMNIST_SOURCE in the way."""
    plain = write_raw(tmp_path / "plain", n_train=60, n_test=20)
    gz = write_raw(tmp_path / "gz", n_train=60, n_test=20, gz=True)
    content = {name: (plain / name).read_bytes() for name in NAMES}
    files = tuple(sources.RawFile(n, hashlib.sha256(b).hexdigest(), len(b)) for n, b in content.items())
    monkeypatch.setattr(sources, "FILES", files)
    monkeypatch.setattr(sources, "LOCAL_COPIES", ())
    monkeypatch.setattr(sources, "MIRRORS", ())
    monkeypatch.delenv("FMNIST_SOURCE", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    sleeps: list[float] = []
    monkeypatch.setattr(sources.time, "sleep", sleeps.append)  # retries without the waiting
    return SimpleNamespace(plain=plain, gz=gz, content=content, files=files, sleeps=sleeps, tmp=tmp_path)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; answers 500 under /broken/; records every path asked for."""

    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/broken/"):
            self.send_error(500, "broken mirror")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(data: SimpleNamespace):
    """An HTTP mirror on 127.0.0.1: <url>/good/ holds the gzip files, <url>/broken/ fails."""
    root = data.tmp / "www"
    (root / "good").mkdir(parents=True)
    for name in NAMES:
        (root / "good" / (name + ".gz")).write_bytes((data.gz / (name + ".gz")).read_bytes())
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield SimpleNamespace(url=url, good=url + "/good/", broken=url + "/broken/", requests=handler.requests)
    httpd.shutdown()
    httpd.server_close()


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every entry of a folder (temp files included) with its bytes and mtime."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def assert_raw_ok(out: Path, data: SimpleNamespace) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)  # no temp or .gz files left
    for name in NAMES:
        assert (out / name).read_bytes() == data.content[name]




# --------------------------------------------------------------------------- source order

def test_source_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setattr(sources, "LOCAL_COPIES", (str(tmp_path / "missing"), str(b), str(a)))
    monkeypatch.setattr(sources, "MIRRORS", ("https://one.example/", "http://two.example/"))
    monkeypatch.delenv("FMNIST_SOURCE", raising=False)

    # Nothing given: local copies that exist, in their order, then the mirrors in theirs.
    assert [(s.kind, s.location) for s in sources.candidates()] == [
        ("local", str(b)), ("local", str(a)), ("mirror", "https://one.example/"), ("mirror", "http://two.example/")]
    # A given source is the only one: a wrong one must be heard about, not silently replaced.
    assert sources.candidates("/given") == [sources.Source("given", "/given")]
    monkeypatch.setenv("FMNIST_SOURCE", "/from-env")
    assert sources.candidates() == [sources.Source("given", "/from-env")]
    assert sources.candidates("/given") == [sources.Source("given", "/given")]  # --source beats the environment
    monkeypatch.setenv("FMNIST_SOURCE", "")
    assert sources.candidates()[0].kind == "local"


def test_local_copy_comes_before_mirrors(data, server, monkeypatch):
    monkeypatch.setattr(sources, "LOCAL_COPIES", (str(data.gz),))
    monkeypatch.setattr(sources, "MIRRORS", (server.good,))
    download.run(out=data.tmp / "raw", progress=False)
    assert_raw_ok(data.tmp / "raw", data)
    assert server.requests == []


# --------------------------------------------------------------------------- same output from every source

def test_output_identical_from_every_source(data, server, monkeypatch):
    """Plain folder, gzip folder, re-gzipped copies with other headers, an HTTP mirror, a
    given URL: the same bytes in data/raw/."""
    regz = data.tmp / "regz"
    regz.mkdir()
    for i, name in enumerate(NAMES):  # other gzip headers and level; same content
        (regz / (name + ".gz")).write_bytes(gzip.compress(data.content[name], compresslevel=1 + i, mtime=12345 + i))

    outs = {}
    for label, kwargs, locals_, mirrors in (
        ("plain", {"source": str(data.plain)}, (), ()),
        ("gz-local", {}, (str(data.gz),), ()),
        ("regz", {"source": str(regz)}, (), ()),
        ("mirror", {}, (), (server.good,)),
        ("given-url", {"source": server.good}, (), ()),
    ):
        monkeypatch.setattr(sources, "LOCAL_COPIES", locals_)
        monkeypatch.setattr(sources, "MIRRORS", mirrors)
        out = data.tmp / "out" / label
        written = download.run(out=out, progress=False, **kwargs)
        assert written == [out / name for name in NAMES]
        assert_raw_ok(out, data)
        outs[label] = {name: (out / name).read_bytes() for name in NAMES}
    assert all(o == outs["plain"] for o in outs.values())
    assert sorted(set(server.requests)) == sorted(f"/good/{n}.gz" for n in NAMES)


def test_present_verified_files_are_kept_and_no_source_is_needed(data, monkeypatch):
    out = data.tmp / "raw"
    download.run(source=str(data.plain), out=out, progress=False)
    before = snapshot(out)
    monkeypatch.setattr(sources, "MIRRORS", (refused_url(),))
    download.run(out=out, progress=False)  # nothing reachable, nothing needed
    assert snapshot(out) == before
    assert data.sleeps == []


def test_a_corrupt_file_in_data_raw_is_replaced(data, monkeypatch):
    out = data.tmp / "raw"
    download.run(source=str(data.plain), out=out, progress=False)
    damaged = out / NAMES[2]
    blob = bytearray(damaged.read_bytes())
    blob[100] ^= 0x01
    damaged.write_bytes(bytes(blob))
    kept = (out / NAMES[0]).stat().st_mtime_ns
    monkeypatch.setattr(sources, "LOCAL_COPIES", (str(data.gz),))
    download.run(out=out, progress=False)
    assert_raw_ok(out, data)
    assert (out / NAMES[0]).stat().st_mtime_ns == kept


# --------------------------------------------------------------------------- fallback

def test_missing_local_copy_falls_back_to_mirror(data, server, monkeypatch):
    partial = data.tmp / "partial"
    partial.mkdir()
    for name in NAMES[:2]:
        (partial / (name + ".gz")).write_bytes((data.gz / (name + ".gz")).read_bytes())
    monkeypatch.setattr(sources, "LOCAL_COPIES", (str(data.tmp / "not-installed"), str(partial)))
    monkeypatch.setattr(sources, "MIRRORS", (server.good,))
    download.run(out=data.tmp / "raw", progress=False)
    assert_raw_ok(data.tmp / "raw", data)
    assert sorted(server.requests) == sorted(f"/good/{n}.gz" for n in NAMES[2:])


@pytest.mark.parametrize("damage", ["bitflip-plain", "bitflip-gz", "truncate-gz"])
def test_corrupt_local_copy_falls_back_to_mirror(data, server, monkeypatch, caplog, damage):
    local = data.tmp / "local"
    local.mkdir()
    for name in NAMES:
        kind = "plain" if damage.endswith("plain") else "gz"
        fname = name if kind == "plain" else name + ".gz"
        (local / fname).write_bytes(((data.plain if kind == "plain" else data.gz) / fname).read_bytes())
    bad = NAMES[1]
    path = local / (bad if damage.endswith("plain") else bad + ".gz")
    blob = bytearray(path.read_bytes())
    if damage.startswith("bitflip"):
        blob[len(blob) // 2] ^= 0x10
    else:
        del blob[len(blob) // 2:]
    path.write_bytes(bytes(blob))
    monkeypatch.setattr(sources, "LOCAL_COPIES", (str(local),))
    monkeypatch.setattr(sources, "MIRRORS", (server.good,))
    download.run(out=data.tmp / "raw", progress=False)
    assert_raw_ok(data.tmp / "raw", data)
    assert server.requests == [f"/good/{bad}.gz"]
    assert any(bad in r.getMessage() and "trying the next source" in r.getMessage() for r in caplog.records)


def test_unreachable_mirror_is_not_retried_for_the_other_files(data, server, monkeypatch):
    monkeypatch.setattr(sources, "MIRRORS", (server.broken, server.good))
    download.run(out=data.tmp / "raw", progress=False)
    assert_raw_ok(data.tmp / "raw", data)
    broken = [r for r in server.requests if r.startswith("/broken/")]
    assert broken == [f"/broken/{NAMES[0]}.gz"] * 3  # three tries for the first file, then skipped
    assert len(data.sleeps) == 2


def test_nothing_reachable_says_how_to_provide_the_data(data, monkeypatch):
    mirror = refused_url()
    monkeypatch.setattr(sources, "LOCAL_COPIES", (str(data.tmp / "not-installed"),))
    monkeypatch.setattr(sources, "MIRRORS", (mirror,))
    out = data.tmp / "data" / "raw"
    with pytest.raises(DataError) as e:
        download.run(out=out, progress=False)
    msg = str(e.value)
    assert msg.startswith(NAMES[0]) and "no source could provide it" in msg and mirror in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "FMNIST_SOURCE=" in msg and "--source" in msg
    assert not out.exists()


def test_nothing_reachable_through_the_cli(data, monkeypatch, capsys, restore_sigterm):
    monkeypatch.setattr(sources, "MIRRORS", (refused_url(),))
    monkeypatch.chdir(data.tmp)
    assert cli.main(["download", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fmnist download: error:") and "dataset-fashion-mnist" in err
    assert not (data.tmp / "data" / "raw").exists()


# --------------------------------------------------------------------------- a bad named source

def damage_file(folder: Path, name: str, how: str) -> None:
    path = next(p for p in (folder / name, folder / (name + ".gz")) if p.exists())
    blob = bytearray(path.read_bytes())
    if how == "truncate":
        del blob[-7:]
    elif how == "alter":
        blob[-1] ^= 0xFF  # last pixel: the size stays right, the checksum does not
    elif how == "bitflip":
        blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


BAD_SOURCES = [  # (folder, how, what the message must say)
    ("plain", "truncate", "size mismatch"),
    ("plain", "alter", "SHA-256 mismatch"),
    ("gz", "truncate", "corrupt gzip data"),
    ("gz", "bitflip", "corrupt gzip data"),
]


@pytest.mark.parametrize("raw_before", ["complete", "partial", "absent"])
@pytest.mark.parametrize("kind,how,says", BAD_SOURCES)
def test_bad_given_source_fails_and_leaves_data_raw_unchanged(data, monkeypatch, kind, how, says, raw_before):
    out = data.tmp / "data" / "raw"
    if raw_before != "absent":
        download.run(source=str(data.plain), out=out, progress=False)
    if raw_before == "partial":
        (out / NAMES[0]).unlink()
        (out / NAMES[3]).write_bytes(b"junk")
    before = snapshot(out) if out.exists() else None

    source = data.tmp / "bad"
    source.mkdir()
    for p in (data.plain if kind == "plain" else data.gz).iterdir():
        (source / p.name).write_bytes(p.read_bytes())
    bad = NAMES[2]  # two good files are fetched first: all or nothing
    damage_file(source, bad, how)
    monkeypatch.setattr(sources, "LOCAL_COPIES", (str(data.gz),))  # a good copy that must not be used instead

    with pytest.raises(DataError) as e:
        download.run(source=str(source), out=out, progress=False)
    msg = str(e.value)
    assert msg.startswith(bad) and says in msg and str(source) in msg
    assert (snapshot(out) if out.exists() else None) == before


def test_given_source_missing_a_file_is_not_replaced_by_another_source(data, monkeypatch):
    source = data.tmp / "given"
    source.mkdir()
    for name in NAMES[:3]:
        (source / name).write_bytes(data.content[name])
    monkeypatch.setattr(sources, "LOCAL_COPIES", (str(data.gz),))
    with pytest.raises(DataError) as e:
        download.run(source=str(source), out=data.tmp / "raw", progress=False)
    assert e.value.args[0].startswith(NAMES[3]) and "cannot read it from" in str(e.value)
    assert not (data.tmp / "raw").exists()


def test_given_url_with_a_bad_file(data, server, monkeypatch):
    damage_file(data.tmp / "www" / "good", NAMES[1], "bitflip")
    with pytest.raises(DataError) as e:
        download.run(source=server.good, out=data.tmp / "raw", progress=False)
    assert str(e.value).startswith(NAMES[1]) and server.good in str(e.value)
    assert not (data.tmp / "raw").exists()


@pytest.mark.parametrize("how", ["--source", "FMNIST_SOURCE"])
def test_bad_source_through_the_cli(data, monkeypatch, capsys, restore_sigterm, how):
    monkeypatch.chdir(data.tmp)
    assert cli.main(["download", "--no-progress", "--source", str(data.plain)]) == 0
    capsys.readouterr()
    before = snapshot(data.tmp / "data" / "raw")

    source = data.tmp / "altered"
    source.mkdir()
    for name in NAMES:
        (source / name).write_bytes(data.content[name])
    damage_file(source, NAMES[1], "alter")
    if how == "FMNIST_SOURCE":
        monkeypatch.setenv("FMNIST_SOURCE", str(source))
        argv = ["download", "--no-progress"]
    else:
        argv = ["download", "--no-progress", "--source", str(source)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fmnist download: error: {NAMES[1]} (from {source / NAMES[1]}): SHA-256 mismatch")
    assert len(err.splitlines()) == 1
    assert snapshot(data.tmp / "data" / "raw") == before


# --------------------------------------------------------------------------- verify

def test_verify_accepts_plain_and_any_gzip_of_the_content(data):
    f = data.files[1]
    content = data.content[f.name]
    assert sources.verify(content, f, "x") == content
    assert sources.verify(gzip.compress(content, compresslevel=9, mtime=0), f, "x") == content
    assert sources.verify(gzip.compress(content, compresslevel=1, mtime=99), f, "x") == content


def test_verify_bounds_decompression(data):
    """A gzip stream that inflates past the expected size is refused without inflating it all."""
    f = data.files[1]
    bomb = gzip.compress(data.content[f.name] + bytes(10 * 2**20))
    with pytest.raises(DataError) as e:
        sources.verify(bomb, f, "somewhere")
    assert str(e.value).startswith(f"{f.name} (from somewhere): size mismatch, {f.size + 1} bytes after decompression")


def test_oversized_source_file_is_refused_unread(data, monkeypatch):
    monkeypatch.setattr(sources, "MAX_COMPRESSED", 100)
    big = data.plain / NAMES[0]
    with pytest.raises(DataError, match="larger than any Fashion-MNIST file") as e:
        sources.fetch(sources.Source("given", str(data.plain)), data.files[0], progress=False)
    assert str(big) in str(e.value)


def test_fetch_from_file_url(data):
    url = "file://" + os.fspath(data.gz)
    assert sources.fetch(sources.Source("given", url), data.files[0], progress=False) == data.content[NAMES[0]]
