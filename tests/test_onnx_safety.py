"""A corpus of broken ONNX files, built here, each giving its clear error (naming the file) and none reading
outside the model's folder: truncated / garbage protobufs, tensor sizes that disagree with their bytes,
external data with absolute paths, `..`, a symbolic link out, a missing or short data file, unknown ops
(all listed in one error with names, domains and opsets), cycles and undefined inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'rawformer[onnx]'")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from rawformer.export.onnx_executor import OnnxExecutor, UnsupportedOpsError  # noqa: E402
from rawformer.export.onnx_file import OnnxFileError, read_onnx  # noqa: E402

from rawformer.loading import load  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "onnx"


def tiny_model(nodes=None, inits=None, opset=18, extra_opsets=()):
    """y = x @ W + b with x (2, 3): a valid model to break."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "W")
    b = numpy_helper.from_array(np.ones(4, np.float32), "bias")
    nodes = nodes or [helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"),
                      helper.make_node("Add", ["xw", "bias"], ["y"], name="add")]  # fmt: skip
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits if inits is not None else [w, b],
    )  # fmt: skip
    ops = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return helper.make_model(g, opset_imports=ops, ir_version=10)


def save(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def with_external(tmp_path: Path, location: str, *, length=None, offset=0) -> Path:
    """tiny_model with W stored as external data at `location` (written by the caller)."""
    m = tiny_model()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for k, v in entries.items():
        e = w.external_data.add()
        e.key, e.value = k, v
    return save(m, tmp_path / "model.onnx")


W_BYTES = np.arange(12, dtype=np.float32).tobytes()


def test_valid_tiny_model_runs(tmp_path):
    p = save(tiny_model(), tmp_path / "ok.onnx")
    x = np.ones((2, 3), np.float32)
    y = OnnxExecutor(p).run(x=x)["y"]
    np.testing.assert_array_equal(y, x @ np.arange(12, dtype=np.float32).reshape(3, 4) + 1)


def test_valid_external_data_is_read(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 8 + W_BYTES)
    p = with_external(tmp_path, "w.bin", length=48, offset=8)
    m = read_onnx(p)
    np.testing.assert_array_equal(m.initializers["W"], np.arange(12, dtype=np.float32).reshape(3, 4))


def test_truncated_file(tmp_path):
    data = tiny_model().SerializeToString()
    p = tmp_path / "cut.onnx"
    for keep in (len(data) // 2, len(data) - 7, 5):
        p.write_bytes(data[:keep])
        with pytest.raises(OnnxFileError, match=str(p).replace("\\", "\\\\")):
            read_onnx(p)


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all \xff\xfe", bytes(range(256)) * 4])
def test_garbage_and_empty_files(tmp_path, content):
    p = tmp_path / "junk.onnx"
    p.write_bytes(content)
    with pytest.raises(OnnxFileError, match="junk.onnx"):
        read_onnx(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        read_onnx(tmp_path / "nope.onnx")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(OnnxFileError, match="not a regular file"):
        read_onnx(tmp_path / "d.onnx")


def test_inline_tensor_size_mismatch(tmp_path):
    w = numpy_helper.from_array(np.zeros((3, 4), np.float32), "W")
    w.raw_data = w.raw_data[:-4]  # one float short
    b = numpy_helper.from_array(np.ones(4, np.float32), "bias")
    p = save(tiny_model(inits=[w, b]), tmp_path / "short.onnx")
    with pytest.raises(OnnxFileError, match=r"short.onnx: tensor 'W' holds 44 bytes.*need 48"):
        read_onnx(p)


def test_typed_field_count_mismatch(tmp_path):
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 4], [1.0] * 12)
    del w.float_data[-1]  # 11 values for 12 elements
    b = numpy_helper.from_array(np.ones(4, np.float32), "bias")
    p = save(tiny_model(inits=[w, b]), tmp_path / "count.onnx")
    with pytest.raises(OnnxFileError, match=r"tensor 'W' holds 11 values in float_data.*needs 12"):
        read_onnx(p)


def test_huge_declared_dims_are_refused_before_reading(tmp_path):
    w = numpy_helper.from_array(np.zeros((3, 4), np.float32), "W")
    del w.dims[:]
    w.dims.extend([1 << 20, 1 << 20])  # claims 4 TiB
    b = numpy_helper.from_array(np.ones(4, np.float32), "bias")
    p = save(tiny_model(inits=[w, b]), tmp_path / "huge.onnx")
    with pytest.raises(OnnxFileError, match="tensor 'W' holds 48 bytes"):
        read_onnx(p)


@pytest.mark.parametrize("location", ["/etc/passwd", "C:\\Windows\\win.ini", "\\\\server\\share\\w.bin"])
def test_external_absolute_paths(tmp_path, location):
    p = with_external(tmp_path, location, length=48)
    with pytest.raises(OnnxFileError, match="absolute paths are refused"):
        read_onnx(p)


@pytest.mark.parametrize("location", ["../w.bin", "sub/../../w.bin", "..\\w.bin", "a/b/../../../w.bin"])
def test_external_parent_traversal(tmp_path, location):
    inner = tmp_path / "model_dir"
    inner.mkdir()
    (tmp_path / "w.bin").write_bytes(W_BYTES)  # it exists: the refusal must come from the path, not absence
    p = with_external(inner, location, length=48)
    with pytest.raises(OnnxFileError, match=r"'\.\.' is refused"):
        read_onnx(p)


def test_external_symlink_leading_out(tmp_path):
    inner = tmp_path / "model_dir"
    inner.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(W_BYTES)
    os.symlink(secret, inner / "w.bin")
    p = with_external(inner, "w.bin", length=48)
    with pytest.raises(OnnxFileError, match="leads out of the model's folder"):
        read_onnx(p)
    os.symlink(tmp_path, inner / "up")  # a linked folder leading out, then a plain name under it
    p = with_external(inner, "up/secret.bin", length=48)
    with pytest.raises(OnnxFileError, match="leads out of the model's folder"):
        read_onnx(p)


def test_external_symlink_inside_is_fine(tmp_path):
    (tmp_path / "real.bin").write_bytes(W_BYTES)
    os.symlink(tmp_path / "real.bin", tmp_path / "w.bin")
    assert read_onnx(with_external(tmp_path, "w.bin", length=48)).initializers["W"].shape == (3, 4)


def test_external_missing_short_and_wrong_length(tmp_path):
    p = with_external(tmp_path, "absent.bin", length=48)
    with pytest.raises(OnnxFileError, match="no such file"):
        read_onnx(p)
    (tmp_path / "w.bin").write_bytes(W_BYTES[:40])  # truncated data file
    with pytest.raises(OnnxFileError, match=r"needs bytes \[0, 48\).*which has 40"):
        read_onnx(with_external(tmp_path, "w.bin", length=48))
    (tmp_path / "w.bin").write_bytes(W_BYTES)
    with pytest.raises(OnnxFileError, match="declares 40 bytes.*needs 48"):
        read_onnx(with_external(tmp_path, "w.bin", length=40))
    with pytest.raises(OnnxFileError, match=r"needs bytes \[16, 64\)"):
        read_onnx(with_external(tmp_path, "w.bin", offset=16))


def test_unknown_ops_listed_together(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
        helper.make_node("FancyOp", ["a"], ["b"], name="fancy_1"),
        helper.make_node("Loop", ["a"], ["c"], name="loop_7"),
        helper.make_node("MysteryFused", ["b", "c"], ["d"], name="ms_3", domain="com.example"),
        helper.make_node("Add", ["d", "b"], ["y"], name="add"),
    ]
    p = save(tiny_model(nodes, extra_opsets=[("com.example", 2)]), tmp_path / "ops.onnx")
    with pytest.raises(UnsupportedOpsError) as e:
        OnnxExecutor(p)
    msg = str(e.value)
    for part in ("ops.onnx", "3 node(s)", "'fancy_1': ai.onnx::FancyOp (opset 18)", "'loop_7': ai.onnx::Loop",
                 "'ms_3': com.example::MysteryFused (opset 2)"):  # fmt: skip
        assert part in msg, msg
    assert [n[0] for n in e.value.nodes] == ["fancy_1", "loop_7", "ms_3"]
    # load() falls back to the executor, which reports the same list
    with pytest.raises(UnsupportedOpsError, match="fancy_1"):
        load(p, device="cpu")


def test_opset_too_old_for_op(tmp_path):
    nodes = [helper.make_node("LayerNormalization", ["x", "bias", "bias"], ["y"], name="ln")]
    p = save(tiny_model(nodes, opset=16), tmp_path / "old.onnx")
    with pytest.raises(
        UnsupportedOpsError, match=r"'ln': ai.onnx::LayerNormalization \(opset 16\) \(supported from"
    ):
        OnnxExecutor(p)


def test_cycle(tmp_path):
    nodes = [
        helper.make_node("Add", ["x", "c"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("Neg", ["b"], ["c"], name="third"),
        helper.make_node("Identity", ["a"], ["y"], name="out"),
    ]
    p = save(tiny_model(nodes), tmp_path / "cycle.onnx")
    with pytest.raises(OnnxFileError, match=r"cycle.onnx: the graph has a cycle through 4 nodes: 'first'"):
        read_onnx(p)


def test_self_loop_and_undefined_input(tmp_path):
    p = save(tiny_model([helper.make_node("Add", ["x", "y"], ["y"], name="selfie")]), tmp_path / "self.onnx")
    with pytest.raises(OnnxFileError, match="cycle"):
        read_onnx(p)
    p = save(tiny_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="n")]), tmp_path / "undef.onnx")
    with pytest.raises(OnnxFileError, match="node 'n' reads 'ghost', which no node"):
        read_onnx(p)


def test_duplicate_producer(tmp_path):
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="a"),
        helper.make_node("Neg", ["x"], ["y"], name="b"),
    ]
    with pytest.raises(OnnxFileError, match="produced twice"):
        read_onnx(save(tiny_model(nodes), tmp_path / "dup.onnx"))


def test_nodes_listed_out_of_order_still_run(tmp_path):
    nodes = [
        helper.make_node("Add", ["xw", "bias"], ["y"], name="add"),
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"),
    ]
    p = save(tiny_model(nodes), tmp_path / "unordered.onnx")
    assert [n.name for n in read_onnx(p).nodes] == ["mm", "add"]


def test_feed_checks(tmp_path):
    ex = OnnxExecutor(save(tiny_model(), tmp_path / "ok.onnx"))
    with pytest.raises(ValueError, match="missing inputs"):
        ex.run({})
    with pytest.raises(ValueError, match="unknown inputs"):
        ex.run(x=np.ones((2, 3), np.float32), z=1)
    with pytest.raises(ValueError, match="dim 1 is 5, the graph declares 3"):
        ex.run(x=np.ones((2, 5), np.float32))


def test_truncated_fixture_names_the_file(tmp_path):
    data = (FIXTURES / "gpt2.onnx").read_bytes()
    p = tmp_path / "gpt2_cut.onnx"
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(OnnxFileError, match="gpt2_cut.onnx"):
        load(p, device="cpu")
