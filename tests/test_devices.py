"""--device and --precision: resolution, clear errors without a GPU, the decode paths, and a
bundle's identity that does not depend on where it was built."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedsearch.bundle import load_bundle
from embedsearch.cli import main
from embedsearch.encoders import load_encoder
from embedsearch.encoders.devices import default_batch_size, resolve_device
from embedsearch.encoders.identity import encoder_key
from embedsearch.errors import EncoderError
from embedsearch.pipeline import build_index

torch = pytest.importorskip("torch")

ENCODING_COMMANDS = ["build-index", "predict", "dedupe", "leakage", "benchmark", "serve"]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the torch models and their device; exported runtimes
    (OpenVINO/ONNX, tests of their own) would only add export time."""
    monkeypatch.setenv("EMBEDSEARCH_BACKEND", "torch")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CUDA devices that exist only for device resolution."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("embedsearch.encoders.devices._mps_available", lambda: False)


def test_auto_is_cpu_without_accelerators(no_cuda: None) -> None:
    assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu"
    assert resolve_device("CPU") == "cpu"


def test_auto_prefers_cuda(fake_cuda: None) -> None:
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(EncoderError, match=r"there are 2 CUDA devices"):
        resolve_device("cuda:2")


def test_missing_devices_are_clear_errors(no_cuda: None) -> None:
    with pytest.raises(EncoderError, match="CUDA is not available") as err:
        resolve_device("cuda")
    assert "--device cpu" in err.value.hint
    with pytest.raises(EncoderError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(EncoderError, match="unknown device 'gpu'") as err:
        resolve_device("gpu")
    assert "cuda:N" in err.value.hint


def test_batch_size_follows_the_device() -> None:
    assert default_batch_size("cpu") == 32
    assert default_batch_size("cuda:1") == default_batch_size("cuda") == 256


@pytest.mark.parametrize("command", ENCODING_COMMANDS)
def test_every_encoding_command_has_device(command: str) -> None:
    params = {p.name: p for p in main.commands[command].params}
    assert "device" in params and params["device"].default == "auto"


def test_cli_device_cuda_without_cuda_fails_cleanly(collection: Path, no_cuda: None) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["build-index", str(collection), "--name", "c", "--model",
                               "test:tiny", "--device", "cuda"])
    assert out.exit_code == 3 and "CUDA is not available" in out.output
    assert "Traceback" not in out.output
    out = runner.invoke(main, ["build-index", str(collection), "--name", "c", "--model",
                               "test:tiny", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(main, ["predict", str(collection / "red"), "--index", "c",
                               "--device", "cuda:0"])
    assert out.exit_code == 3 and "CUDA is not available" in out.output


def test_device_is_not_identity_precision_is(collection: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle is queried on whatever device the query asks for, at its own precision."""
    build_index(collection, name="fp16", model="test:tiny", precision="fp16", device="cpu")
    b = load_bundle("fp16")
    assert b.encoder_identity["precision"] == "fp16" and "device" not in b.encoder_identity
    seen = {}
    real = load_encoder

    def spy(spec, weights=None, precision="fp32", channels_last=True, device="auto"):
        seen.update(precision=precision, device=device)
        return real(spec, weights, precision=precision, channels_last=channels_last,
                    device="cpu")

    monkeypatch.setattr("embedsearch.encoders.load_encoder", spy)
    b.device = "cuda:1"  # as `predict --device cuda:1` sets it
    enc = b.encoder()
    assert seen == {"precision": "fp16", "device": "cuda:1"}
    assert encoder_key(enc.identity()) == encoder_key(b.encoder_identity)
    # fp16 and fp32 are different encoders: an fp32 rebuild of the bundle is refused.
    assert encoder_key(load_encoder("test:tiny", precision="fp16").identity()) != \
        encoder_key(load_encoder("test:tiny", precision="fp32").identity())


def test_fp16_vectors_close_to_fp32() -> None:
    from tests.test_encoder_fidelity import _test_image

    pytest.importorskip("open_clip")
    a = load_encoder("openclip:ViT-S-32", device="cpu")
    b = load_encoder("openclip:ViT-S-32", device="cpu", precision="fp16")
    b.model.load_state_dict(a.model.state_dict())
    img = _test_image()
    va, vb = a.encode_images([img])[0], b.encode_images([img])[0]
    assert b.identity()["precision"] == "fp16"
    assert not np.array_equal(va, vb)  # autocast did run in half precision
    assert float(va @ vb) > 0.99


def test_process_decoding_gives_what_threads_give(collection: Path) -> None:
    """The GPU path (DataLoader processes, stacked in the worker) decodes exactly as the CPU
    path (threads) does, bad files included."""
    from embedsearch.embed import _Decoder, _process_batches, _thread_batches

    (collection / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    paths = sorted(collection.rglob("*.jpg"))
    enc = load_encoder("test:tiny", device="cpu")
    decode = _Decoder(enc.preprocess.worker_transform, enc.preprocess.resize, 10**8)
    threads = list(_thread_batches(decode, paths, 10, 2))
    procs = list(_process_batches(decode, paths, 10, 2, pin_memory=False))
    assert len(threads) == len(procs) == 3
    for (ta, ia), (tb, ib) in zip(threads, procs, strict=True):
        assert torch.equal(ta, tb)
        assert [(i.status, i.sha256) for i in ia] == [(i.status, i.sha256) for i in ib]
    assert sum(i.status != "ok" for _, infos in procs for i in infos) == 1
    # A concatenation of two input sizes (32 and 224 px): padded parts, in processes too.
    from embedsearch.encoders.combine import combine

    both = combine(["test:tiny", "efficientnet-lite0"], device="cpu")
    decode = _Decoder(both.preprocess.worker_transform, both.preprocess.resize, 10**8)
    threads = list(_thread_batches(decode, paths[:6], 6, 2))
    procs = list(_process_batches(decode, paths[:6], 6, 2, pin_memory=False))
    assert threads[0][0].shape == (6, 6, 224, 224)
    assert threads[0][0][0].numel() == both.preprocess.worker_bytes  # uint8: one byte each
    assert torch.equal(threads[0][0], procs[0][0])


def test_fp32_on_a_gpu_is_ieee_fp32() -> None:
    """cuDNN's TF32 default is switched off around an fp32 forward, and restored."""
    from embedsearch.encoders.base import _ieee_fp32_convolutions

    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        with _ieee_fp32_convolutions(True):
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is True
        with _ieee_fp32_convolutions(False):
            assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before


def test_every_encoding_command_passes_its_device_on(collection: Path, no_cuda: None,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--device reaches the encoder in each command: cuda without CUDA is the same clean
    error everywhere (exit 3), before any image is encoded."""
    uvicorn = pytest.importorskip("uvicorn")

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve started a server: --device was not applied")

    monkeypatch.setattr(uvicorn, "run", no_server)
    runner = CliRunner()
    build_index(collection, name="c", model="test:tiny", device="cpu")
    other = tmp_path / "other"
    other.mkdir()
    for argv in (["serve", "--index", "c"],
                 ["dedupe", str(collection), "--model", "test:tiny"],
                 ["leakage", str(collection), str(other), "--model", "test:tiny"],
                 ["benchmark", str(collection), "--model", "test:tiny", "--out",
                  str(tmp_path / "rep")]):
        out = runner.invoke(main, [*argv, "--device", "cuda"])
        assert out.exit_code == 3, (argv, out.output)
        assert "CUDA is not available" in out.output, argv


def test_decode_processes_fit_in_shared_memory(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A container's 64 MB /dev/shm gets fewer decode processes and a warning, not a bus
    error; enough shared memory keeps them all."""
    import shutil
    from collections import namedtuple

    from embedsearch.embed import fit_shared_memory

    usage = namedtuple("usage", "total used free")
    batch = 256 * 3 * 224 * 224  # uint8
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(64 << 20, 0, 64 << 20))
    with caplog.at_level(logging.WARNING, logger="embedsearch.embed"):
        assert fit_shared_memory(15, batch) == 0
    assert "--shm-size" in caplog.text
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 0, 1 << 30))
    assert fit_shared_memory(15, batch) == 10
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(24 << 30, 0, 24 << 30))
    assert fit_shared_memory(15, batch) == 15


def test_gpu_path_end_to_end_on_cpu(collection: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """embed_sources' accelerator path (decode processes, batches stacked in the workers,
    device batch size, normalisation after the copy) run on the CPU: the same vectors and
    statuses as the CPU path."""
    import warnings

    import embedsearch.encoders.devices as devices
    from embedsearch.embed import embed_sources

    (collection / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    paths = sorted(collection.rglob("*.jpg")) * 2  # 50: two batches at the CPU's 32
    enc = load_encoder("test:tiny", device="cpu")
    cpu = list(embed_sources(enc, paths, batch_size=10))
    monkeypatch.setattr(devices, "device_type", lambda device: "cuda")  # "a GPU"
    monkeypatch.setattr(devices, "default_decode_processes", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without a GPU
        gpu = list(embed_sources(enc, paths))
    assert len(gpu) == 1 and len(gpu[0][0]) == len(paths)  # one batch: the GPU's 256
    np.testing.assert_array_equal(np.concatenate([v for _, v, _ in cpu]), gpu[0][1])
    assert [i.status for _, _, infos in cpu for i in infos] == [i.status for i in gpu[0][2]]
