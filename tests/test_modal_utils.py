"""Volume operations of cs336_basics/modal_utils.py, run against the in-process stand-in for modal.Volume."""

from __future__ import annotations

import inspect
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import modal
import modal.exception
import pytest
from fake_modal_volume import FakeUploadBatch, FakeVolume, MountedVolume, parse_entrypoint_args

from cs336_basics import modal_utils as mu
from cs336_basics.data import metadata_path

# Every modal_utils.py command of COMPLETE_TRAINING_WORKFLOW.md, verbatim (continuation lines joined).
WORKFLOW_COMMANDS = [
    "--action upload --local-path data/train.bin --remote-name train.bin --data-type data",
    "--action upload --local-path data/val.bin --remote-name val.bin --data-type data",
    "--action list --data-type data",
    "--action list --data-type checkpoint",
    "--action download --remote-name checkpoint_final.pt --local-path checkpoints/checkpoint_final.pt "
    "--data-type checkpoint",
    "--action download --remote-name checkpoint_final.pt --local-path checkpoints/checkpoint_final.pt",
    "--action delete --remote-name checkpoint_iter_5000.pt",
]


@pytest.fixture
def vol(tmp_path):
    return FakeVolume(tmp_path / "volume")


def write_bin(path, n_tokens=1000, vocab_size=500):
    """A tiny .bin plus its metadata sidecar, in tokenize_data's format."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    np.arange(n_tokens, dtype=np.uint16).__mod__(vocab_size).astype(np.uint16).tofile(path)
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": vocab_size, "num_tokens": n_tokens,
            "special_tokens": ["<|endoftext|>"], "source": {"name": "x.txt", "size_bytes": 1}, "tokenizer_sha256": None}
    metadata_path(path).write_text(json.dumps(meta))
    return path


# --- the stand-in cannot drift from modal.Volume ---------------------------------------------------------------


STAND_IN_ONLY = {"mount"}  # FakeVolume.mount starts a stand-in container; modal does that itself


def _public_methods(cls):
    return [n for n, v in vars(cls).items() if not n.startswith("_") and callable(v) and n not in STAND_IN_ONLY]


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    "fake_cls, real_cls",
    [(FakeVolume, modal.Volume), (MountedVolume, modal.Volume),
     (FakeUploadBatch, modal.volume.AbstractVolumeUploadContextManager)],
)
def test_fake_volume_signatures_match_installed_modal(fake_cls, real_cls):
    methods = _public_methods(fake_cls)
    assert methods, "the stand-in offers no methods"
    for name in methods:
        assert hasattr(real_cls, name), f"modal {modal.__version__} {real_cls.__name__} has no method {name}"
        assert _params(getattr(fake_cls, name)) == _params(getattr(real_cls, name)), name


def test_every_volume_method_modal_utils_calls_is_in_the_stand_in():
    import ast

    tree = ast.parse(inspect.getsource(mu))
    called = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and isinstance(n.func.value, ast.Name) and n.func.value.id == "volume"}
    assert {"listdir", "read_file", "remove_file", "batch_upload"} <= called
    assert called - {"hydrate", "_get_metadata"} <= set(_public_methods(FakeVolume)), called
    # the upload's progress path reads these on a real volume (the one non-public call is pinned here)
    for name in ("hydrate", "_get_metadata", "object_id", "client"):
        assert hasattr(modal.Volume, name), name
    resolve = inspect.signature(modal.volume.AbstractVolumeUploadContextManager.resolve).parameters
    assert list(resolve) == ["version", "object_id", "client", "progress_cb", "force"]


# --- upload / list / download / delete ----------------------------------------------------------------------


def test_upload_list_download_round_trip(tmp_path, vol):
    src = write_bin(tmp_path / "data" / "train.bin")
    pairs = mu.upload(vol, src, "train.bin", "data", progress=True)
    assert [dst for _, dst in pairs] == ["/data/train.bin", "/data/train.bin.json"]

    files = mu.list_files(vol, "data")
    assert [(f.name, f.size) for f in files] == [("train.bin", 2000), ("train.bin.json", metadata_path(src).stat().st_size)]
    assert abs(files[0].mtime - time.time()) < 600
    assert mu.list_files(vol, "checkpoint") == []

    dest = mu.download(vol, "train.bin", tmp_path / "back" / "deep" / "t.bin", "data", progress=True)
    assert dest.read_bytes() == src.read_bytes()
    assert metadata_path(dest).read_text() == metadata_path(src).read_text()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["t.bin", "t.bin.json"]  # no temporary left behind


def test_upload_never_silently_replaces(tmp_path, vol):
    a = tmp_path / "a.pt"
    a.write_bytes(b"first")
    mu.upload(vol, a, "ckpt.pt", "checkpoint")
    a.write_bytes(b"second")
    with pytest.raises(mu.VolumeError, match=r"/checkpoints/ckpt.pt already exists.*--force"):
        mu.upload(vol, a, "ckpt.pt", "checkpoint")
    assert (vol.root / "checkpoints" / "ckpt.pt").read_bytes() == b"first"
    mu.upload(vol, a, "ckpt.pt", "checkpoint", force=True)
    assert (vol.root / "checkpoints" / "ckpt.pt").read_bytes() == b"second"


def test_upload_defaults_remote_name_and_rejects_bad_input(tmp_path, vol):
    f = tmp_path / "val.bin"
    f.write_bytes(b"\x01\x00")
    assert mu.upload(vol, f, None, "data") == [(str(f), "/data/val.bin")]  # no sidecar: only the .bin
    with pytest.raises(mu.VolumeError, match=r"local file '.*missing.bin' does not exist.*prepare_data.py"):
        mu.upload(vol, tmp_path / "missing.bin", "x.bin", "data")
    with pytest.raises(mu.VolumeError, match="invalid --remote-name"):
        mu.upload(vol, f, "../escape.bin", "data")
    with pytest.raises(mu.VolumeError, match="unknown --data-type 'model'"):
        mu.upload(vol, f, "x.bin", "model")


def test_download_missing_lists_what_exists(tmp_path, vol):
    for name in ("checkpoint_iter_5000.pt", "checkpoint_final.pt"):
        p = tmp_path / name
        p.write_bytes(b"x")
        mu.upload(vol, p, name, "checkpoint")
    with pytest.raises(mu.VolumeError) as err:
        mu.download(vol, "checkpoint_100.pt", tmp_path / "out.pt", "checkpoint")
    msg = str(err.value)
    assert "'checkpoint_100.pt' not found in /checkpoints/" in msg
    assert "checkpoint_final.pt, checkpoint_iter_5000.pt" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out.pt").exists()


def test_download_replaces_a_local_file_only_when_complete(tmp_path, vol):
    p = tmp_path / "c.pt"
    p.write_bytes(b"remote" * 1000)
    mu.upload(vol, p, "c.pt", "checkpoint")
    dest = tmp_path / "local" / "c.pt"
    dest.parent.mkdir()
    dest.write_bytes(b"keep me")

    class Broken(FakeVolume):
        def read_file(self, path):
            yield b"partial"
            raise ConnectionResetError("network went away")

    broken = Broken(vol.root)
    with pytest.raises(ConnectionResetError):
        mu.download(broken, "c.pt", dest, "checkpoint")
    assert dest.read_bytes() == b"keep me"
    assert sorted(x.name for x in dest.parent.iterdir()) == ["c.pt"]  # the partial download was removed

    assert mu.download(vol, "c.pt", dest.parent, "checkpoint") == dest  # a folder as --local-path
    assert dest.read_bytes() == b"remote" * 1000


def test_delete_removes_file_and_metadata(tmp_path, vol):
    mu.upload(vol, write_bin(tmp_path / "train.bin"), "train.bin", "data")
    assert mu.delete(vol, "train.bin", "data") == ["/data/train.bin", "/data/train.bin.json"]
    assert mu.list_files(vol, "data") == []
    with pytest.raises(mu.VolumeError, match=r"'train.bin' not found in /data/.*holds: nothing.*--data-type checkpoint"):
        mu.delete(vol, "train.bin", "data")


def test_listing_shows_name_human_size_and_time(tmp_path, vol):
    big = tmp_path / "checkpoint_final.pt"
    big.write_bytes(b"\0" * (3 * 1024 * 1024 + 512 * 1024))
    mu.upload(vol, big, "checkpoint_final.pt", "checkpoint")
    text = mu.format_listing(mu.list_files(vol, "checkpoint"), "checkpoint")
    line = next(l for l in text.splitlines() if "checkpoint_final.pt" in l)
    assert "3.5 MiB" in line
    assert time.strftime("%Y-%m-%d", time.gmtime()) in line and "UTC" in line
    assert "is empty" in mu.format_listing([], "data")
    assert [mu.human_size(n) for n in (0, 1023, 1536, 5 * 1024**3)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]


# --- CLI: the workflow's commands, parsed as `modal run` parses them -------------------------------------------


def test_workflow_commands_parse_and_do_what_the_doc_says(tmp_path, vol, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_bin(tmp_path / "data" / "train.bin")
    write_bin(tmp_path / "data" / "val.bin", n_tokens=100)
    for name in ("checkpoint_final.pt", "checkpoint_iter_5000.pt"):
        (vol.root / "checkpoints").mkdir(parents=True, exist_ok=True)
        (vol.root / "checkpoints" / name).write_bytes(name.encode())

    outputs = []
    for i, command in enumerate(WORKFLOW_COMMANDS):
        kwargs = parse_entrypoint_args(mu.main, shlex.split(command))
        outputs.append(mu.run_action(vol, progress=False, **kwargs))
        if i == 5:  # the same download again, without --data-type: the local copy is replaced, and it says so
            assert outputs[-1].endswith("(replaced the existing local file)")

    assert sorted(p.name for p in (vol.root / "data").iterdir()) == ["train.bin", "train.bin.json", "val.bin", "val.bin.json"]
    assert "train.bin" in outputs[2] and "checkpoint_final.pt" in outputs[3]
    assert (tmp_path / "checkpoints" / "checkpoint_final.pt").read_bytes() == b"checkpoint_final.pt"
    assert not (vol.root / "checkpoints" / "checkpoint_iter_5000.pt").exists()  # delete defaults to checkpoints
    assert (vol.root / "checkpoints" / "checkpoint_final.pt").exists()


def _error_of(vol, command):
    kwargs = parse_entrypoint_args(mu.main, shlex.split(command))
    with pytest.raises(mu.VolumeError) as err:
        mu.run_action(vol, progress=False, **kwargs)
    return str(err.value)


def test_cli_rejects_bad_arguments(vol):
    with pytest.raises(click.BadParameter):
        parse_entrypoint_args(mu.main, ["--action", "copy"])
    with pytest.raises(click.UsageError):
        parse_entrypoint_args(mu.main, ["--remote-name", "x"])  # --action is required
    assert "needs --local-path" in _error_of(vol, "--action upload --remote-name x.bin")
    assert "needs --remote-name" in _error_of(vol, "--action download")
    assert "unknown --data-type 'ckpt'" in _error_of(vol, "--action list --data-type ckpt")
    listing = mu.run_action(vol, "list", progress=False)
    assert "/data/ is empty" in listing and "/checkpoints/ is empty" in listing


@pytest.mark.parametrize(
    "exc, expected, code",
    [
        (modal.exception.AuthError("Token missing"), "modal setup", 2),
        (modal.exception.ConnectionError("Could not connect"), "modal setup", 1),  # may pass when tried again
        (mu.VolumeError("bad name"), "error: bad name", 2),
    ],
)
def test_entrypoint_prints_one_line_for_user_errors(monkeypatch, capsys, exc, expected, code):
    def fail():
        raise exc

    monkeypatch.setattr(mu, "open_volume", fail)
    with pytest.raises(SystemExit) as done:
        mu.main.info.raw_f(action="list")
    assert done.value.code == code
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err


def test_entrypoint_dispatches_to_the_volume(monkeypatch, capsys, vol):
    monkeypatch.setattr(mu, "open_volume", lambda: vol)
    mu.main.info.raw_f(action="list", data_type="data")
    assert "/data/ is empty" in capsys.readouterr().out


def test_upload_progress_adapter_follows_modal_callback_protocol():
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    cb = mu._TqdmTransfer(bar)
    t0 = cb(name="data/train.bin", size=100)
    t1 = cb(name="data/train.bin.json", size=10)
    assert t0 != t1
    cb(task_id=t0, advance=60)
    cb(t1, advance=10)  # modal also passes task_id positionally
    cb(task_id=t0, reset=True)  # a failed block is retried from zero
    assert bar.n == 10 and cb.sent == 10
    cb(task_id=t0, advance=100)
    cb(task_id=t0, complete=True)
    cb(complete=True)
    assert bar.n == 110 and cb.sent == 110


# --- upload progress against the real modal.Volume class (offline: a stand-in server stub and a local HTTP sink) --


class _BlockSink(threading.Thread):
    """A local HTTP server taking the PUTs of volume blocks, counting the bytes received."""

    def __init__(self):
        import http.server

        sink = self
        self.received, self.lock = 0, threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink.lock:
                    sink.received += len(body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        super().__init__(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/block"


def _offline_volume(version, stub):
    """A real modal.Volume, hydrated without the service: its client's stub is ``stub``."""
    from modal._utils.async_utils import synchronizer
    from modal.client import _Client
    from modal_proto import api_pb2

    client = _Client("https://modal.invalid", api_pb2.CLIENT_TYPE_CLIENT, ("ak-test", "as-test"))
    client._control_plane_stub = stub
    client._opened = True
    vol = modal.Volume.from_name(mu.VOLUME_NAME)
    vol._hydrate("vo-test", synchronizer._translate_out(client), api_pb2.VolumeMetadata(version=version, name="v"))
    return vol


def test_upload_to_a_real_v2_volume_reports_the_bytes_sent(tmp_path, monkeypatch):
    """The bug this replaces: on a real modal.Volume the bar never moved (the progress hook was never attached)."""
    from modal_proto import api_pb2

    sink = _BlockSink()
    sink.start()

    class EmptyListing:
        def unary_stream(self, request):
            async def responses():
                yield api_pb2.VolumeListFiles2Response(entries=[])

            return responses()

    class Stub:  # an empty volume, then the two VolumePutFiles2 round trips: "these blocks are missing", "done"
        requests = []
        VolumeListFiles2 = EmptyListing()

        async def VolumePutFiles2(self, request, retry=None):
            Stub.requests.append(request)
            if len(Stub.requests) > 1:
                return api_pb2.VolumePutFiles2Response()
            return api_pb2.VolumePutFiles2Response(missing_blocks=[
                api_pb2.VolumePutFiles2Response.MissingBlock(file_index=i, block_index=j, put_url=sink.url)
                for i, f in enumerate(request.files) for j in range(len(f.blocks))])

    try:
        vol = _offline_volume(api_pb2.VolumeFsVersion.VOLUME_FS_VERSION_V2, Stub())
        monkeypatch.setattr(modal.Volume, "hydrate", lambda self, client=None: self)
        src = tmp_path / "train.bin"
        src.write_bytes(os.urandom(9 * 1024 * 1024 + 17))  # two 8 MiB blocks
        seen = []
        real_upload_progress = mu._upload_progress

        def spy(total, transfer, context, reports_bytes):
            seen.append((transfer, reports_bytes))
            return real_upload_progress(total, transfer, context, reports_bytes)

        monkeypatch.setattr(mu, "_upload_progress", spy)
        assert mu.upload(vol, src, "train.bin", "data", progress=True) == [(str(src), "/data/train.bin")]
    finally:
        sink.server.shutdown()
    ((transfer, reports_bytes),) = seen
    assert reports_bytes is True
    assert transfer.sent == src.stat().st_size  # reported by modal's own upload code, block by block
    assert sink.received == src.stat().st_size
    (first, _) = Stub.requests
    assert [f.path for f in first.files] == ["/data/train.bin"] and first.disallow_overwrite_existing_files


def test_v1_volumes_get_the_progress_reporting_upload_context_too(monkeypatch):
    from modal_proto import api_pb2

    monkeypatch.setattr(modal.Volume, "hydrate", lambda self, client=None: self)
    vol = _offline_volume(api_pb2.VolumeFsVersion.VOLUME_FS_VERSION_V1, stub=None)
    transfer = mu._TqdmTransfer(None)
    context, reports = mu._upload_context(vol, True, transfer)
    assert reports is True and type(context).__name__ == "VolumeUploadContextManager"
    from modal._utils.async_utils import synchronizer

    impl = synchronizer._translate_in(context)
    assert impl._progress_cb is transfer and impl._force is True


def test_a_volume_without_byte_reports_says_so_instead_of_a_frozen_bar(tmp_path, vol, capsys):
    src = tmp_path / "val.bin"
    src.write_bytes(b"\1\0" * 100)
    context, reports = mu._upload_context(vol, False, mu._TqdmTransfer(None))
    assert reports is False
    mu.upload(vol, src, "val.bin", "data", progress=True)
    out = capsys.readouterr().out
    assert "Hashing and uploading 200 B" in out and "reports no byte progress" in out


# --- arguments are checked before the credentials, before Modal connects ---------------------------------------


def test_modal_run_argv_is_recognised_in_every_form():
    args = ["--action", "list"]
    for argv in (["/x/bin/modal", "run", "cs336_basics/modal_utils.py", *args],
                 ["/x/bin/modal", "run", "--detach", "-e", "dev", "cs336_basics/modal_utils.py::main", *args],
                 ["/x/modal/__main__.py", "run", "-m", "cs336_basics.modal_utils", *args],
                 ["/x/bin/modal", "run", "--name=x", "-q", "./cs336_basics/modal_utils.py", *args]):
        found = mu.modal_run_args(argv, "modal_utils.py")
        assert found is not None and found[0] == args, argv
    assert mu.modal_run_args(["/x/bin/modal", "run", "--detach", "cs336_basics/train_modal.py"], "train_modal.py")[1] \
        == {"--detach"}
    for other in (["pytest"], ["/x/bin/modal", "deploy", "cs336_basics/modal_utils.py"],
                  ["/x/bin/modal", "run", "cs336_basics/train_modal.py", "--gpu", "H100"], ["/x/bin/modal", "run"]):
        assert mu.modal_run_args(other, "modal_utils.py") is None


def test_our_argument_parser_agrees_with_modals():
    raw = mu.main.info.raw_f
    for command in [*WORKFLOW_COMMANDS, "--action upload --local-path=d/t.bin --force", "--action list --no-force"]:
        tokens = shlex.split(command)
        assert mu.parse_cli_args(tokens, raw) == parse_entrypoint_args(mu.main, tokens), command
    for unparsable in (["--help"], ["--action"], ["--local-path", "x"], ["--action", "list", "--colour", "red"],
                       ["list"], ["--action", "list", "--force=yes"]):
        assert mu.parse_cli_args(unparsable, raw) is None  # modal's own parser reports these


@pytest.mark.parametrize("args, expected", [
    ("--action bogus", "unknown --action 'bogus'"),
    ("--action list --data-type bogus", "unknown --data-type 'bogus'"),
    ("--action upload --remote-name x.bin", "needs --local-path"),
    ("--action upload --local-path missing.bin", "'missing.bin' does not exist"),
    ("--action download", "needs --remote-name"),
    ("--action delete --remote-name ../x.pt", "invalid --remote-name"),
])
def test_bad_arguments_are_reported_before_the_missing_credentials(monkeypatch, capsys, tmp_path, args, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mu, "has_credentials", lambda: False)
    argv = ["/x/bin/modal", "run", "cs336_basics/modal_utils.py", *shlex.split(args)]
    with pytest.raises(SystemExit) as done:
        mu.check_before_connecting(argv, "modal_utils.py", mu.main.info.raw_f, mu.check_action_args)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "modal setup" not in err


def test_good_arguments_then_need_credentials(monkeypatch, capsys):
    argv = ["/x/bin/modal", "run", "cs336_basics/modal_utils.py", "--action", "list"]
    monkeypatch.setattr(mu, "has_credentials", lambda: False)
    with pytest.raises(SystemExit) as done:
        mu.check_before_connecting(argv, "modal_utils.py", mu.main.info.raw_f, mu.check_action_args)
    assert done.value.code == 2 and "run `modal setup`" in capsys.readouterr().err
    monkeypatch.setattr(mu, "has_credentials", lambda: True)
    run = mu.check_before_connecting(["/x/bin/modal", "run", "--detach", *argv[2:]], "modal_utils.py",
                                     mu.main.info.raw_f, mu.check_action_args)
    assert run.kwargs["action"] == "list" and run.options == {"--detach"} and run.checked is None
    assert mu.check_before_connecting(["pytest"], "modal_utils.py", mu.main.info.raw_f, mu.check_action_args) is None
    help_argv = argv[:3] + ["--help"]  # Modal's own help, even without credentials
    monkeypatch.setattr(mu, "has_credentials", lambda: False)
    assert mu.check_before_connecting(help_argv, "modal_utils.py", mu.main.info.raw_f, mu.check_action_args).kwargs \
        is None


def test_has_credentials_reads_modals_config(monkeypatch):
    monkeypatch.setattr(mu.modal.config.config, "get", lambda key, **kw: None)
    assert mu.has_credentials() is False
    monkeypatch.setattr(mu.modal.config.config, "get", lambda key, **kw: "ak-123" if key == "token_id" else None)
    assert mu.has_credentials() is True


PROJECT = Path(__file__).resolve().parent.parent


def offline_env(tmp_path) -> dict:
    """No Modal credentials, and a server address that is not Modal's: nothing here can reach the service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    return {**env, "HOME": str(tmp_path), "MODAL_CONFIG_PATH": str(tmp_path / "none.toml"),
            "MODAL_SERVER_URL": "http://127.0.0.1:9", "PYTHONPATH": ""}


def test_the_real_modal_cli_reports_bad_arguments_first(tmp_path):
    modal_cli = Path(sys.executable).parent / "modal"
    cases = [("--action bogus", "unknown --action 'bogus'"), ("--action list", "no Modal credentials")]
    for args, expected in cases:
        proc = subprocess.run([str(modal_cli), "run", "cs336_basics/modal_utils.py", *shlex.split(args)], cwd=PROJECT,
                              env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    plain = subprocess.run([sys.executable, "cs336_basics/modal_utils.py"], cwd=PROJECT, env=offline_env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "modal run cs336_basics/modal_utils.py" in plain.stderr
