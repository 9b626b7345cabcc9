"""The download machinery against a local HTTP server (no internet needed).

:class:`LocalServer` serves in-memory files on 127.0.0.1 with ``Range`` support, records
every request, and can cut a response short to imitate a dropped connection. The
builders of small archives in the real formats (CIFAR-100 python tarball, ImageNet-R tar)
live here too; ``test_scenarios_real.py`` imports them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from clbench import cli
from clbench.data.download import (
    ChecksumMismatchError,
    DataStatus,
    DownloadError,
    Resource,
    UnsafeArchiveError,
    data_marker,
    download,
    download_and_extract,
    extract_tar,
    is_verified,
)
from clbench.errors import DataNotFoundError

FAST = {"backoff_s": 0.01}


# ------------------------------------------------------------------------ local server


@dataclass
class LocalServer:
    """Files by URL path; ``cut[path] = n`` makes the next n responses stop half-way."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


def _handler(server_state: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            server_state.requests.append((self.path, self.headers.get("Range")))
            body = server_state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start, status = 0, 200
            requested = self.headers.get("Range")
            if requested and requested.startswith("bytes="):
                start = int(requested[6:].split("-")[0])
                if start >= len(body):
                    self.send_error(416)
                    return
                status = 206
            payload = body[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            if server_state.cut.get(self.path, 0) > 0:
                server_state.cut[self.path] -= 1
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server() -> Iterator[LocalServer]:
    state = LocalServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files a download or extraction might have left behind."""
    if not folder.exists():
        return []
    return [p.name for p in folder.rglob("*") if p.name.endswith((".part", ".tmp", ".extracting"))]


# ------------------------------------------------------------- archives in real formats


def tar_bytes(entries: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def cifar100_tarball(train_per_class: int = 3, test_per_class: int = 1) -> bytes:
    """A cifar-100-python.tar.gz in the real pickle format, a few images per class."""
    rng = np.random.default_rng(0)

    def split(per_class: int, name: str) -> bytes:
        labels = np.repeat(np.arange(100), per_class)
        rng.shuffle(labels)
        # the class id in every pixel keeps the archive small and the labels checkable
        data = np.repeat(labels[:, None], 3072, axis=1).astype(np.uint8)
        return pickle.dumps(
            {
                "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
                "batch_label": f"{name} batch",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": data,
            }
        )

    meta = {
        "fine_label_names": [f"class{c:02d}" for c in range(100)],
        "coarse_label_names": [f"super{c:02d}" for c in range(20)],
    }
    return tar_bytes(
        {
            "cifar-100-python/train": split(train_per_class, "train"),
            "cifar-100-python/test": split(test_per_class, "test"),
            "cifar-100-python/meta": pickle.dumps(meta),
        },
        mode="w:gz",
    )


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGENET_R_SIZES = {"n01443537": 10, "n01484850": 11, "n01494475": 12, "n01498041": 7}


def imagenet_r_tar(sizes: dict[str, int] = IMAGENET_R_SIZES) -> bytes:
    """An ImageNet-R-shaped tar: imagenet-r/<wnid>/<rendition>_<i>.jpg plus README.txt."""
    entries = {"imagenet-r/README.txt": b"n01443537 goldfish\nn01484850 great_white_shark\n"}
    for c, (wnid, count) in enumerate(sizes.items()):
        for i in range(count):
            kind = ("art", "cartoon", "sketch")[i % 3]
            entries[f"imagenet-r/{wnid}/{kind}_{i}.jpg"] = jpeg_bytes(100 * c + i)
    return tar_bytes(entries)


# ---------------------------------------------------------------------------- download


def test_download_success_then_no_second_download(server, tmp_path):
    body = b"x" * 100_000
    server.files["/data.bin"] = body
    resource = Resource("data.bin", server.url("/data.bin"), md5=md5(body))
    path = download(resource, tmp_path / "root", **FAST)
    assert path.read_bytes() == body
    assert (tmp_path / "root" / "data.bin.verified").is_file()
    assert leftovers(tmp_path / "root") == []
    assert download(resource, tmp_path / "root", **FAST) == path
    assert server.count("/data.bin") == 1  # the verified file was not fetched again


def test_downloaded_files_are_readable_as_open_makes_them(server, tmp_path):
    # the atomic rename must not leave a shared data root readable by its owner only
    server.files["/data.bin"] = b"shared"
    path = download(Resource("data.bin", server.url("/data.bin"), md5=md5(b"shared")), tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "data.bin.verified").stat().st_mode & 0o777 == 0o666 & ~umask


def test_data_marker_reads_the_scenario_spec(tmp_path, monkeypatch):
    from clbench.scenario import ScenarioSpec

    @dataclass
    class NoOptions:
        pass

    def probe(options: NoOptions, data_root: Path) -> DataStatus:
        return DataStatus(True, data_root / "here")

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path))
    spec = ScenarioSpec(default_backbone="b", modality="text", family="vision")
    assert data_marker("x", None, NoOptions) == " [data: built in]"
    assert data_marker("x", spec, NoOptions) == " [data: built in]"
    with_data = ScenarioSpec("b", "text", "vision", data_status=probe)
    assert data_marker("x", with_data, NoOptions) == f" [data: present in {tmp_path / 'here'}]"


def test_sha256_is_checked_too(server, tmp_path):
    body = b"payload"
    server.files["/f"] = body
    resource = Resource("f", server.url("/f"), sha256=hashlib.sha256(body).hexdigest())
    assert download(resource, tmp_path, **FAST).read_bytes() == body
    with pytest.raises(ValueError, match="no checksum"):
        Resource("f", server.url("/f"))


def test_checksum_mismatch_keeps_nothing(server, tmp_path):
    server.files["/data.bin"] = b"tampered"
    expected = "0" * 32
    resource = Resource("data.bin", server.url("/data.bin"), md5=expected)
    folder = tmp_path / "root" / "cifar100"
    with pytest.raises(ChecksumMismatchError) as info:
        download(resource, folder, **FAST)
    message = str(info.value)
    assert resource.url in message and expected in message and md5(b"tampered") in message
    assert isinstance(info.value, DataNotFoundError)  # the CLI prints it and exits 2
    assert not folder.exists()  # not even the empty folder it created


def test_interrupted_download_resumes(server, tmp_path):
    body = bytes(range(256)) * 2000
    server.files["/big"] = body
    server.cut["/big"] = 1  # the first response stops half-way
    resource = Resource("big", server.url("/big"), md5=md5(body))
    assert download(resource, tmp_path, **FAST).read_bytes() == body
    ranges = [r for p, r in server.requests if p == "/big"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(body) // 2}-"  # resumed
    assert leftovers(tmp_path) == []


def test_download_that_keeps_failing_fails_cleanly(server, tmp_path):
    server.files["/big"] = b"y" * 10_000
    server.cut["/big"] = 100
    resource = Resource("big", server.url("/big"), md5=md5(b"y" * 10_000))
    with pytest.raises(DownloadError, match="4 attempts") as info:
        download(resource, tmp_path / "root", retries=3, backoff_s=0.01)
    assert server.url("/big") in str(info.value)
    assert str(tmp_path / "root" / "big") in str(info.value)  # says where to put it by hand
    assert server.count("/big") == 4
    assert not (tmp_path / "root").exists()


def test_not_found_is_not_retried(server, tmp_path):
    resource = Resource("gone", server.url("/gone"), md5="0" * 32)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(resource, tmp_path, retries=3, backoff_s=0.01)
    assert server.count("/gone") == 1


def test_corrupt_local_file_is_downloaded_again(server, tmp_path):
    body = b"the real file"
    server.files["/f"] = body
    resource = Resource("f", server.url("/f"), md5=md5(body))
    (tmp_path / "f").write_bytes(b"the real fi")  # truncated by an earlier crash
    assert not is_verified(tmp_path / "f", resource)
    assert download(resource, tmp_path, **FAST).read_bytes() == body
    assert server.count("/f") == 1


# -------------------------------------------------------------------------- extraction


def test_extraction_is_atomic_and_refuses_traversal(tmp_path):
    good = tmp_path / "good.tar"
    good.write_bytes(tar_bytes({"top/a.txt": b"a", "top/sub/b.txt": b"b"}))
    out = extract_tar(good, tmp_path / "data" / "extracted", "top")
    assert (out / "sub" / "b.txt").read_bytes() == b"b"

    evil = tmp_path / "evil.tar"
    evil.write_bytes(tar_bytes({"top/a.txt": b"a", "../../escaped.txt": b"boom"}))
    with pytest.raises(UnsafeArchiveError, match="outside the target"):
        extract_tar(evil, tmp_path / "data" / "evil", "top")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "data" / "evil").exists()

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("top/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    linked = tmp_path / "link.tar"
    linked.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_tar(linked, tmp_path / "data" / "link", "top")

    with pytest.raises(DataNotFoundError, match="no top-level folder 'other'"):
        extract_tar(good, tmp_path / "data" / "other", "other")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(good.read_bytes()[:700])
    with pytest.raises(DataNotFoundError, match="not a readable tar"):
        extract_tar(broken, tmp_path / "data" / "broken", "top")
    assert leftovers(tmp_path / "data") == []


def test_download_and_extract_once(server, tmp_path):
    archive = tar_bytes({"top/file.txt": b"content"})
    server.files["/a.tar"] = archive
    resource = Resource("a.tar", server.url("/a.tar"), md5=md5(archive))
    out = download_and_extract(resource, tmp_path, "top", tmp_path / "data", **FAST)
    assert (out / "file.txt").read_bytes() == b"content"
    (out / "file.txt").write_bytes(b"changed by the user")
    download_and_extract(resource, tmp_path, "top", tmp_path / "data", **FAST)
    assert server.count("/a.tar") == 1
    assert (out / "file.txt").read_bytes() == b"changed by the user"  # not re-extracted


# ------------------------------------------------------------------ clbench download


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_download_cifar100_and_list(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path / "unused"))
    archive = cifar100_tarball(train_per_class=1, test_per_class=1)
    server.files["/cifar-100-python.tar.gz"] = archive
    url, digest = server.url("/cifar-100-python.tar.gz"), md5(archive)
    root = tmp_path / "data"
    argv = ["download", "split-cifar100", "--data-root", str(root), "--set", f"url={url}"]
    code, out, err = run_cli([*argv, "--set", f"scenario.md5={digest}"], capsys)
    assert code == 0, err
    assert (root / "cifar100" / "cifar-100-python" / "meta").is_file()
    assert "data ready" in out
    code, out, _ = run_cli([*argv, "--set", f"md5={digest}"], capsys)
    assert code == 0 and server.count("/cifar-100-python.tar.gz") == 1

    code, _, err = run_cli([*argv, "--set", "md5=" + "1" * 32], capsys)
    assert code == 2 and "1" * 32 in err and digest in err  # a mirror serving other bytes


def list_scenarios(capsys) -> dict[str, str]:
    code, out, _ = run_cli(["list", "scenarios"], capsys)
    assert code == 0
    return {line.split()[0]: line for line in out.splitlines()[1:]}


def test_cli_download_tacred_explains_the_license(tmp_path, capsys):
    code, _, err = run_cli(["download", "tacred", "--data-root", str(tmp_path)], capsys)
    assert code == 2
    assert "LDC2018T24" in err and str(tmp_path / "tacred") in err and "train.json" in err
    (tmp_path / "tacred").mkdir()
    for name in ("train.json", "dev.json", "test.json"):
        (tmp_path / "tacred" / name).write_text("[]")
    code, out, _ = run_cli(["download", "tacred", "--data-root", str(tmp_path)], capsys)
    assert code == 0 and str(tmp_path / "tacred") in out


def test_cli_download_fewrel_from_a_mirror(server, tmp_path, capsys, monkeypatch):
    from clbench.data import fewrel_files
    from clbench.scenarios import relation_extraction as rex

    files = {
        "train_wiki.json": json.dumps({"P1": []}).encode(),
        "val_wiki.json": json.dumps({"P2": []}).encode(),
        "pid2name.json": json.dumps({"P1": ["one", "the first"]}).encode(),
    }
    for name, body in files.items():
        server.files[f"/mirror/{name}"] = body
    monkeypatch.setattr(rex, "FEWREL_MD5", {name: md5(body) for name, body in files.items()})
    monkeypatch.setattr(fewrel_files, "REPO_ROOT", tmp_path / "no-repo")  # no shared copies
    argv = ["download", "fewrel", "--data-root", str(tmp_path), "--set"]
    code, _, err = run_cli([*argv, f"base_url={server.url('/mirror')}"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "fewrel").glob("*.json")) == sorted(files)
    code, _, err = run_cli([*argv, f"base_url={server.url('/mirror')}"], capsys)
    assert code == 0 and len(server.requests) == 3

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path))
    lines = list_scenarios(capsys)
    assert f"[data: present in {tmp_path / 'fewrel'}]" in lines["fewrel"]
    assert "[data: missing; `clbench download imagenet-r`]" in lines["imagenet-r"]
    assert "[data: missing; `clbench download split-cifar100`]" in lines["split-cifar100"]
    assert "licensed" in lines["tacred"]
    assert "[data: built in]" in lines["digits-offline"]


def test_cli_download_needs_a_known_scenario(capsys):
    code, _, err = run_cli(["download", "no-such-scenario"], capsys)
    assert code == 2 and "split-cifar100" in err
    code, out, _ = run_cli(["download", "digits-offline"], capsys)
    assert code == 0 and "nothing to download" in out


def test_data_root_option_leaves_the_environment_as_it_was(tmp_path, capsys, monkeypatch):
    # an in-process `clbench ... --data-root` must not redirect later callers' data root
    monkeypatch.delenv("CLBENCH_DATA", raising=False)
    run_cli(["download", "tacred", "--data-root", str(tmp_path)], capsys)
    assert "CLBENCH_DATA" not in os.environ
    monkeypatch.setenv("CLBENCH_DATA", "/somewhere")
    run_cli(["download", "tacred", "--data-root", str(tmp_path)], capsys)
    assert os.environ["CLBENCH_DATA"] == "/somewhere"
