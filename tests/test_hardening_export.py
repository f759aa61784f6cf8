"""Issue 22 (export / inspect): forged codebook headers, forged shapes, hostile sizes, zero-size codebooks,
bytes paths. ``inspect`` and ``size_report`` must reject what ``load`` rejects, in bounded memory."""

from __future__ import annotations

import json
import struct
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import resign, set_field

import compressjax as cj
from compressjax.cli import main
from compressjax.codebook import Codebook
from compressjax.export import FormatError, _container, load, save, size_report


@pytest.fixture(scope="module")
def codebook_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 16)).astype(np.float32))
    masks = cj.magnitude_masks({"w": w}, 0.9)
    params = cj.kmeans_codebooks({"w": w}, 4, masks=masks)
    params["b"] = jnp.arange(8.0)
    path = tmp_path_factory.mktemp("forge") / "cb.cjx"
    save(path, params)
    header = json.loads(_container.parse(path.read_bytes())[0])
    idx = next(i for i, rec in enumerate(header["leaves"]) if rec.get("e") == "cb")
    return path, idx, header


def _one_line_exit_1(path, capsys, *args) -> str:
    assert main(["inspect", str(path), *args]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith(f"compressjax inspect: {path}: "), captured.err
    return lines[0]


def _all_reject(path, capsys, pattern: str) -> None:
    with pytest.raises(FormatError, match=pattern):
        load(path)
    with pytest.raises(FormatError, match=pattern):
        size_report(path)
    for extra in ([], ["--json"]):
        assert pattern.split(".*")[0] in _one_line_exit_1(path, capsys, *extra)


def test_sparse_codebook_indices_are_reported(codebook_file):
    path, _, _ = codebook_file
    report = {leaf.path: leaf for leaf in size_report(path).leaves}
    nnz = int(np.count_nonzero(np.asarray(load(path, dequantize=False)["w"].index_array())))
    assert report["w"].encoding.startswith("cb4 sparse") and report["w"].nnz == nnz and 90 < nnz < 115


@pytest.mark.parametrize("nnz", [-5, 10**30, 64 * 16 + 1, 3.5, True])
def test_forged_codebook_nnz_is_rejected_everywhere(codebook_file, tmp_path, capsys, nnz):
    path, i, _ = codebook_file
    bad = tmp_path / "nnz.cjx"
    bad.write_bytes(resign(path.read_bytes(), set_field(["leaves", i, "idx", "nnz"], nnz)))
    _all_reject(bad, capsys, "invalid non-zero count")


@pytest.mark.parametrize("field, value, pattern", [
    ("bits", 3, "do not match the metadata"),          # the 16 centroids are a 4-bit codebook's
    ("bits", 5, "do not match the metadata"),
    ("per_channel", True, "do not match the metadata"),
    ("shape", [16, 64], "do not match the metadata"),    # the index record holds (64, 16)
    ("shape", ["64", 16], "invalid shape"),
])
def test_forged_codebook_metadata_is_rejected_everywhere(codebook_file, tmp_path, capsys, field, value, pattern):
    path, i, _ = codebook_file
    bad = tmp_path / "meta.cjx"
    bad.write_bytes(resign(path.read_bytes(), set_field(["leaves", i, "meta", field], value)))
    _all_reject(bad, capsys, pattern)


def test_forged_dense_shape_with_a_string(tmp_path, capsys):
    save(tmp_path / "d.cjx", {"w": jnp.ones((4, 8))})
    bad = tmp_path / "shape.cjx"
    bad.write_bytes(resign((tmp_path / "d.cjx").read_bytes(), set_field(["leaves", 0, "sh"], ["4", 8])))
    _all_reject(bad, capsys, "invalid shape")


def test_forged_stream_lengths_and_reuse_are_rejected_like_load(codebook_file, tmp_path, capsys):
    path, i, header = codebook_file
    streams = header["leaves"][i]["c"]["s"]
    bad = tmp_path / "twice.cjx"
    bad.write_bytes(resign(path.read_bytes(), set_field(["leaves", i, "c", "s"], [streams[0]] * len(streams))))
    with pytest.raises(FormatError):
        load(bad)
    with pytest.raises(FormatError):
        size_report(bad)
    _one_line_exit_1(bad, capsys)


def test_hundred_gigabyte_sparse_file_is_rejected_in_bounded_memory(tmp_path, capsys):
    save(tmp_path / "small.cjx", {"w": jnp.ones((4, 8)), "b": jnp.zeros(3)})
    blob = (tmp_path / "small.cjx").read_bytes()
    magic, version, flags, header_len, raw_len, _ = struct.unpack_from("<8sHHIIQ", blob)
    payload_len = 100 << 30
    fixed = struct.pack("<8sHHIIQ", magic, version, flags, header_len, raw_len, payload_len)
    huge = tmp_path / "huge.cjx"
    with open(huge, "wb") as f:
        f.write(fixed + bytes(32) + blob[60:60 + header_len])
        f.truncate(60 + header_len + payload_len)  # a sparse file: 100 GB declared, nothing stored
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="streams add up to"):
            size_report(huge)
        assert main(["inspect", str(huge), "--json"]) == 1
        capsys.readouterr()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # the declared 100 GB is never allocated (before the fix: bytearray(size))
    assert "streams add up to" in _one_line_exit_1(huge, capsys)


def test_zero_channel_codebooks_round_trip(tmp_path):
    for shape, per_channel in (((8, 0), True), ((0, 4), True), ((8, 0), False)):
        params = cj.kmeans_codebooks({"w": jnp.zeros(shape)}, 3, per_channel=per_channel, where="w")
        cb = params["w"]
        assert isinstance(cb, Codebook) and cb.decode().shape == shape
        save(tmp_path / "z.cjx", params)
        assert load(tmp_path / "z.cjx")["w"].shape == shape
        back = load(tmp_path / "z.cjx", dequantize=False)["w"]
        assert back.shape == shape and back.centroids.shape == cb.centroids.shape
        assert size_report(tmp_path / "z.cjx").leaves[0].num_elements == 0
        assert cj.reassign_indices(params, {"w": jnp.zeros(shape)})["w"].shape == shape


def test_bytes_paths_everywhere(tmp_path):
    path = bytes(tmp_path / "b.cjx")
    report = save(path, {"w": jnp.arange(6.0)})
    np.testing.assert_array_equal(np.asarray(load(path)["w"]), np.arange(6.0))
    assert size_report(path).total_bytes == report.total_bytes == (tmp_path / "b.cjx").stat().st_size
    with pytest.raises(TypeError, match="save\\(path=...\\) must be a str, bytes or os.PathLike.*int"):
        save(3, {"w": jnp.ones(2)})
