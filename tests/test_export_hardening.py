"""Regression tests for issue 11, items 1-6: bounded loading of untrusted files, argument errors, 64-bit
leaves, and what ``save`` does with the umask, read-only files, symbolic links and killed saves.

Memory is measured in a subprocess, as the peak RSS growth of that process alone after a warm-up load:
``resource.getrusage`` in a child forked for the one load, and ``VmHWM`` (reset before the cases) in the
fuzzer, because Linux carries a large parent's (pytest's) high-water mark into ``ru_maxrss`` of a process it
starts. No test asserts a time.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zstandard
from conftest import ROOT, run_python, signed_file

from compressjax.export import FormatError, _container, load, save, size_report
from compressjax.export import _validate as v
from compressjax.qarray import QArray, QuantSpec
from compressjax.quantization import quantize_params

# ------------------------------------------------------------------------------------------ helpers


def forge(path, chunks, raw_len: int, payload: bytes = b"") -> int:
    """Writes a file whose header is the concatenation of ``chunks`` (``raw_len`` bytes of JSON, streamed
    through zstd so that it is never held in memory whole), with a *valid* checksum. Returns the file size."""
    cobj = zstandard.ZstdCompressor(level=1, write_checksum=False).compressobj(size=raw_len)
    header = b"".join(cobj.compress(c) for c in chunks) + cobj.flush()
    path.write_bytes(signed_file(header, raw_len, payload))
    return os.path.getsize(path)


def repeated(prefix: bytes, unit: bytes, count: int, suffix: bytes, block: int = 1 << 16):
    """``prefix + unit * count + suffix`` as chunks, and its length."""
    def gen():
        yield prefix
        left = count
        while left:
            n = min(block, left)
            yield unit * n
            left -= n
        yield suffix
    return gen, len(prefix) + len(unit) * count + len(suffix)


MEASURE = textwrap.dedent(
    """
    import json, os, resource, sys, time
    from compressjax.export import FormatError, load, save
    import jax.numpy as jnp
    save(sys.argv[2], {"w": jnp.ones((4, 4)), "k": [jnp.zeros(3)]})
    load(sys.argv[2])  # warm up: imports, first allocations

    def rss_kib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    # ru_maxrss is a high-water mark, and importing jax peaks above what a small load needs: measure in a
    # forked child, whose high-water mark starts at its resident size at the fork.
    pid = os.fork()
    if pid == 0:
        base = rss_kib()
        start = time.perf_counter()
        try:
            load(sys.argv[1])
            error = None
        except FormatError as e:
            error = str(e)
        except Exception as e:
            error = "NOT A FormatError: " + type(e).__name__ + ": " + str(e)
        seconds = time.perf_counter() - start
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print("RESULT" + json.dumps({"error": error, "seconds": seconds, "growth_mib": growth}), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def load_measured(path, tmp_path) -> dict:
    """``load(path)`` in a fresh process: the error message, seconds and peak RSS growth in MiB."""
    proc = run_python(["-c", MEASURE, str(path), str(tmp_path / "warm.cjx")], timeout=300)
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.fixture
def qfile(tmp_path):
    """A file with a grouped 4-bit QArray (group axis 0, channel axis 1) and an asymmetric 3-bit one."""
    k = jax.random.normal(jax.random.key(0), (16, 8))
    params = {"g": quantize_params({"k": k}, QuantSpec(bits=4, group_size=4))["k"],
              "a": quantize_params({"k": k}, QuantSpec(bits=3, symmetric=False))["k"], "b": jnp.ones(3)}
    path = tmp_path / "q.cjx"
    save(path, params)
    return path


def resign(original: bytes, edit) -> bytes:
    header_json, payload, *_ = _container.parse(original)
    header = json.loads(header_json)
    edit(header)
    return b"".join(bytes(c) for c in _container.assemble(json.dumps(header).encode(), [bytes(payload)]))


# ------------------------------------------------- 1. every header structure bounded before it is parsed


@pytest.mark.parametrize("kind", ["streams", "numbers"])
def test_forged_header_is_rejected_in_bounded_memory(tmp_path, kind):
    # Item 1: a ~20 KB file whose header expands to tens of MiB of JSON (millions of empty streams, or
    # megabytes of numbers). Before the fix these were decompressed and parsed (5.3 GiB at 30 M streams).
    if kind == "streams":
        gen, raw = repeated(b'{"format":"compressjax","tree":{"t":"none"},"leaves":[],"streams":[',
                            b"[0,0,0],", 4_000_000, b"[0,0,0]]}")
    else:
        gen, raw = repeated(b'{"format":"compressjax","tree":{"t":"py","v":[', b"1234567890,", 3_000_000, b'1]},"leaves":[],"streams":[]}')
    size = forge(tmp_path / "forged.cjx", gen(), raw)
    assert size < 64_000 and raw > 30_000_000
    with pytest.raises(FormatError, match="bytes of JSON, more than a"):
        load(tmp_path / "forged.cjx")
    with pytest.raises(FormatError, match="bytes of JSON"):
        size_report(tmp_path / "forged.cjx")
    got = load_measured(tmp_path / "forged.cjx", tmp_path)
    assert got["error"] and "more than a" in got["error"], got
    assert got["growth_mib"] < 16, got


def test_header_within_the_file_limit_but_over_max_bytes(tmp_path):
    # 5000 empty leaves: a legitimate header ~40x its compressed size, within the format's limit ...
    params = [np.zeros(0, np.float32)] * 5000
    save(tmp_path / "many.cjx", params)
    assert len(load(tmp_path / "many.cjx")) == 5000
    # ... but parsing it needs more than a 1 MiB allocation budget: refused before it is decompressed.
    with pytest.raises(FormatError, match="max_bytes"):
        load(tmp_path / "many.cjx", max_bytes=1 << 20)


def test_save_refuses_a_header_that_load_would_refuse(tmp_path):
    with pytest.raises(ValueError, match="more than load"):
        save(tmp_path / "nones.cjx", [None] * 300_000)
    assert not os.listdir(tmp_path)
    assert _container.header_limit(10_000) == _container.HEADER_FLOOR
    assert _container.header_limit(1 << 30) == _container.MAX_HEADER_RAW
    assert _container.header_limit(100_000) == 64 * 100_000


def test_header_lists_more_leaves_than_streams(qfile):
    blob = resign(qfile.read_bytes(), lambda h: h.update(leaves=h["leaves"] * 100))
    qfile.write_bytes(blob)
    with pytest.raises(FormatError, match="leaves but only"):
        load(qfile)


# ------------------------------------------------------------- 2. sizes checked before the file is read


def test_trailing_bytes_are_rejected_before_the_file_is_read(tmp_path):
    path = tmp_path / "padded.cjx"
    save(path, {"w": jnp.ones((8, 8))})
    with open(path, "r+b") as f:  # a sparse 256 MiB tail: costs no disk, but a full read costs 256 MiB
        f.truncate(os.path.getsize(path) + (256 << 20))
    with pytest.raises(FormatError, match="trailing bytes"):
        load(path)
    got = load_measured(path, tmp_path)
    assert "trailing bytes" in got["error"], got
    assert got["growth_mib"] < 16, got  # before the fix the whole file was read first (> 256 MiB)


def test_file_larger_than_max_bytes_is_not_read(tmp_path):
    path = tmp_path / "big.cjx"
    save(path, {"w": np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)})
    with pytest.raises(FormatError, match="max_bytes"):
        load(path, max_bytes=1 << 16)


def test_read_file_reads_only_the_declared_bytes(tmp_path, monkeypatch):
    path = tmp_path / "m.cjx"
    save(path, {"w": jnp.ones(3)})
    data = _container.read_file(path)
    assert bytes(data) == path.read_bytes()
    with pytest.raises(FormatError, match="truncated"):
        _container.check_preamble(path.read_bytes()[:60], 59)


# ------------------------------------------------------- 3. every malformed QArray field is a FormatError

BAD_META = [
    ("group_size", 0), ("group_size", -4), ("group_size", 3), ("group_size", 17), ("group_size", True),
    ("group_size", 2.0), ("group_size", "4"), ("group_axis", 1), ("group_axis", 2), ("group_axis", None),
    ("group_axis", -1), ("bits", 0), ("bits", 9), ("bits", True), ("bits", "4"), ("bits", 8), ("bits", 3),
    ("shape", [8, 16]), ("shape", [16, 8, 1]), ("shape", "16x8"), ("shape", [-16, -8]), ("dtype", "int8"),
    ("dtype", None), ("dtype", "object"), ("symmetric", False), ("symmetric", 1), ("packed", False),
    ("packed", 1), ("channel_axes", [0]), ("channel_axes", [1, 1]), ("channel_axes", [2]),
    ("channel_axes", [True]), ("channel_axes", 1), ("channel_axes", [0, 1, 0]), ("format", "other/1"),
    ("format", None),
]


@pytest.mark.parametrize("dequantize", [True, False])
@pytest.mark.parametrize("key,value", BAD_META, ids=[f"{k}={v!r}" for k, v in BAD_META])
def test_malformed_qarray_metadata_is_a_format_error(qfile, key, value, dequantize):
    # Before the fix, group_size=0 raised ZeroDivisionError from load (with either dequantize setting).
    qfile.write_bytes(resign(qfile.read_bytes(), lambda h: h["leaves"][0]["meta"].__setitem__(key, value)))
    with pytest.raises(FormatError, match="leaf #0"):
        load(qfile, dequantize=dequantize)


@pytest.mark.parametrize("edit", ["drop", "extra"])
@pytest.mark.parametrize("key", ["format", "bits", "shape", "dtype", "symmetric", "packed", "channel_axes",
                                 "group_size", "group_axis"])
def test_missing_or_unknown_qarray_fields(qfile, key, edit):
    def change(h):
        meta = h["leaves"][0]["meta"]
        if edit == "drop":
            del meta[key]
        else:
            meta[key + "_x"] = 1
    qfile.write_bytes(resign(qfile.read_bytes(), change))
    with pytest.raises(FormatError, match="missing field|unknown field"):
        load(qfile)


@pytest.mark.parametrize("which,value", [("scale", "zp"), ("zp", "scale"), ("zp", None)])
def test_scale_and_zero_point_records_must_match_the_layout(qfile, which, value):
    def swap(h):
        rec = h["leaves"][1]  # the asymmetric leaf ("a" sorts before "g")
        assert rec["meta"]["symmetric"] is False
        if value is None:
            del rec[which]
        else:
            rec[which], rec[value] = rec[value], rec[which]
    qfile.write_bytes(resign(qfile.read_bytes(), swap))
    with pytest.raises(FormatError, match="leaf #1"):
        load(qfile)


def test_the_unmodified_quantized_file_still_loads(qfile):
    out = load(qfile, dequantize=False)
    assert isinstance(out["g"], QArray) and out["g"].group_size == 4 and out["a"].zero_point is not None


def test_validation_helpers():
    meta = {"a": 3, "b": True, "c": None, "d": [0, 1], "e": "x"}
    assert v.require_int(meta, "a", 1, 8, "m") == 3
    assert v.require_optional_int(meta, "c", 1, 8, "m") is None
    assert v.require_bool(meta, "b", "m") is True
    assert v.require_int_list(meta, "d", 0, 1, "m", max_len=2) == [0, 1]
    assert v.require_choice(meta, "e", ("x", "y"), "m") == "x"
    for call in (lambda: v.require_int(meta, "b", 0, 8, "m"), lambda: v.require_int(meta, "a", 4, 8, "m"),
                 lambda: v.require_int(meta, "zz", 0, 8, "m"), lambda: v.require_bool(meta, "a", "m"),
                 lambda: v.require_choice({"e": 1}, "e", (True,), "m"),
                 lambda: v.require_int_list(meta, "d", 0, 1, "m", max_len=1),
                 lambda: v.require_keys(meta, "m", required={"a", "q"}),
                 lambda: v.require_keys(meta, "m", required={"a"}, optional={"b"}),
                 lambda: v.require_mapping([], "m")):
        with pytest.raises(FormatError, match="^m"):
            call()


# ------------------------------------------------------------ 4. bad load() arguments are the caller's


@pytest.mark.parametrize("bad,error", [("abc", ValueError), ("AUTO", ValueError), (True, TypeError), (False, TypeError), (1.5, TypeError),
                                       (-1, ValueError), ([1], TypeError), (b"auto", TypeError)])
def test_bad_max_bytes_is_a_type_or_value_error(tmp_path, bad, error):
    save(tmp_path / "m.cjx", {"w": jnp.ones(3)})
    with pytest.raises(error, match="max_bytes") as info:
        load(tmp_path / "m.cjx", max_bytes=bad)
    assert not isinstance(info.value, FormatError)


def test_good_max_bytes_values(tmp_path):
    save(tmp_path / "m.cjx", {"w": jnp.ones(3)})
    for ok in ("auto", None, 1 << 30, np.int64(1 << 30)):
        np.testing.assert_array_equal(load(tmp_path / "m.cjx", max_bytes=ok)["w"], np.ones(3))
    with pytest.raises(TypeError, match="dequantize"):
        load(tmp_path / "m.cjx", dequantize="no")


# ------------------------------------------------------------------- 5. 64-bit leaves with x64 off


def test_complex128_and_every_64_bit_dtype_round_trip_bit_exactly(tmp_path):
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    params = {
        "c128": (rng.standard_normal(7) + 1j * rng.standard_normal(7)).astype(np.complex128),
        "f64": rng.standard_normal(5), "i64": np.array([-(2**62), 3, 2**62]), "u64": np.array([2**64 - 1], np.uint64),
        "c64": (rng.standard_normal(3) + 1j).astype(np.complex64),
    }
    params["c128"][0] = complex(np.nextafter(1.0, 2.0), 1e-300)  # not representable in complex64
    save(tmp_path / "m.cjx", params)
    out = load(tmp_path / "m.cjx")
    for key in ("c128", "f64", "i64", "u64"):
        assert isinstance(out[key], np.ndarray) and out[key].dtype == params[key].dtype, key
        assert out[key].tobytes() == params[key].tobytes(), key
    assert isinstance(out["c64"], jax.Array) and np.asarray(out["c64"]).tobytes() == params["c64"].tobytes()


# ------------------------------------------------------------ 6. umask, read-only, symlinks, temporaries


def test_new_file_honours_the_umask_and_existing_file_keeps_its_mode(tmp_path):
    old = os.umask(0o077)
    try:
        save(tmp_path / "private.cjx", {"w": jnp.ones(2)})
        os.umask(0o022)
        save(tmp_path / "shared.cjx", {"w": jnp.ones(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "private.cjx").st_mode) == 0o600  # was always 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "shared.cjx").st_mode) == 0o644
    os.chmod(tmp_path / "shared.cjx", 0o640)
    save(tmp_path / "shared.cjx", {"w": jnp.zeros(2)})
    assert stat.S_IMODE(os.stat(tmp_path / "shared.cjx").st_mode) == 0o640


def test_read_only_file_is_refused_not_replaced(tmp_path):
    path = tmp_path / "ro.cjx"
    save(path, {"w": jnp.ones(2)})
    before = path.read_bytes()
    os.chmod(path, 0o444)
    with pytest.raises(PermissionError, match="read-only"):
        save(path, {"w": jnp.zeros(2)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ro.cjx"]
    os.chmod(path, 0o644)
    save(path, {"w": jnp.zeros(2)})
    np.testing.assert_array_equal(load(path)["w"], np.zeros(2))


def test_symlink_is_followed_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "model.cjx"
    save(target, {"w": jnp.ones(2)})
    link = tmp_path / "latest.cjx"
    link.symlink_to(target)
    save(link, {"w": jnp.full(2, 7.0)})
    assert link.is_symlink() and os.readlink(link) == str(target)  # was replaced by a regular file
    np.testing.assert_array_equal(load(target)["w"], np.full(2, 7.0))
    dangling = tmp_path / "new.cjx"
    dangling.symlink_to(tmp_path / "real" / "fresh.cjx")
    save(dangling, {"w": jnp.ones(1)})
    assert dangling.is_symlink() and (tmp_path / "real" / "fresh.cjx").is_file()
    assert sorted(os.listdir(tmp_path / "real")) == ["fresh.cjx", "model.cjx"]


def test_long_file_names_save_and_load(tmp_path):
    path = tmp_path / ("m" * 240 + ".cjx")  # its temporary may not just prepend and append to the name
    save(path, {"w": jnp.ones(2)})
    save(path, {"w": jnp.zeros(2)})
    np.testing.assert_array_equal(load(path)["w"], np.zeros(2))
    assert os.listdir(tmp_path) == [path.name]


def test_saving_over_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "dir.cjx").mkdir()
    with pytest.raises(IsADirectoryError):
        save(tmp_path / "dir.cjx", {"w": jnp.ones(2)})


KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from compressjax.export import save
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die after writing, before the rename
    save(sys.argv[1], {"w": np.random.default_rng(0).standard_normal(50_000).astype(np.float32)})
    """
)


def test_a_later_save_removes_the_temporary_of_a_killed_save(tmp_path):
    path = tmp_path / "m.cjx"
    proc = run_python(["-c", KILLED_SAVE, str(path)], check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".m.cjx.") and os.path.getsize(tmp_path / left[0]) > 100_000
    live = tmp_path / f".m.cjx.{os.getpid()}.0123abcd.cjx-tmp"  # a save in progress in a live process
    live.write_bytes(b"x")
    other = tmp_path / ".other.cjx.1.ab.cjx-tmp"  # another target's temporary
    other.write_bytes(b"x")
    save(path, {"w": jnp.ones(2)})
    assert sorted(os.listdir(tmp_path)) == sorted(["m.cjx", live.name, other.name])
    np.testing.assert_array_equal(load(path)["w"], np.ones(2))


# ------------------------------------------------------------------------- fuzzing every field, signed


def _fuzz(cases: int, seed: int) -> dict:
    proc = run_python([str(ROOT / "tests" / "fuzz_export.py"), "--cases", str(cases), "--seed", str(seed)],
                      check=False, timeout=1200)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["failed"] == 0, (result, proc.stderr[-3000:])
    return result


def test_fuzz_every_field_quick():
    result = _fuzz(150, seed=1)
    assert result["FormatError"] > 100


@pytest.mark.slow
def test_fuzz_every_field_thousands_of_signed_files():
    result = _fuzz(3000, seed=0)
    assert result["FormatError"] + result["loaded"] >= 2900  # a few edits produce a header save() refuses
    assert result["peak_growth_mib"] < 256, result  # max_bytes=64 MiB per load, plus XLA compiles


if not sys.platform.startswith("linux"):  # pragma: no cover - /proc, fork, permissions and symlinks
    pytestmark = pytest.mark.skip("these tests measure memory through Linux's /proc and POSIX file semantics")
