"""The measured dispatch order (dermfast/ops/dispatch_table.py) as the registry reads it.

A fake GPU: `torch.cuda.is_available` is patched to True and the device's name pre-filled, so the registry's
table lookup runs for a CUDA Query on this CPU machine; the toy op's backends accept anything.
"""
import json
import warnings

import pytest
import torch

from dermfast.bench import write_dispatch_table
from dermfast.ops import dispatch_table, selftest
from dermfast.ops.dispatch_table import DispatchTableWarning
from dermfast.ops.registry import Op, Query

GPU = "Fake GPU 80GB"
Q = Query(torch.device("cuda", 0), torch.bfloat16, {"D": 80, "layout": 1, "L": 65}, True)
KEY = "bfloat16|fwd+bwd|packed/D80/L128"


@pytest.fixture(autouse=True)
def fake_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DERMFAST_CACHE", str(tmp_path))
    monkeypatch.delenv("DERMFAST_DISPATCH_TABLE", raising=False)
    monkeypatch.setenv("DERMFAST_SELFTEST", "0")
    monkeypatch.setattr(dispatch_table.torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(dispatch_table._names, "cuda:0", GPU)
    dispatch_table.reset()
    selftest.reset()
    yield
    dispatch_table.reset()


def toy() -> Op:
    op = Op("toy_attention")
    for b in ("triton", "torch", "sdpa_nested", "flash_attn"):
        op.register(b)((lambda name: lambda: name)(b))
    op.default_order["cuda"] = ("flash_attn", "sdpa_nested", "triton", "torch")
    op.shape_class = lambda q: f"packed/D{q.sizes['D']}/L{dispatch_table.bucket(q.sizes['L'])}"
    return op


def write(tmp_path, devices):
    (tmp_path / "dispatch_table.json").write_text(json.dumps({"format": 1, "devices": devices}))


def table_warnings(record):
    return [w for w in record if issubclass(w.category, DispatchTableWarning)]


def test_a_fake_table_changes_the_choice_and_is_read_once(tmp_path):
    op = toy()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert op.select(Q).backend == "flash_attn"  # no table: the documented order, one warning
        write(tmp_path, {GPU: {"entries": {"toy_attention": {KEY: {"order": ["triton", "sdpa_nested"]}}}}})
        dispatch_table.reset()
        assert op.select(Q).backend == "triton"
        assert op.order(Q) == (["triton", "sdpa_nested", "flash_attn", "torch"], "measured")
        for _ in range(5):
            op.select(Q)
    assert dispatch_table.reads == 1
    assert len(table_warnings(record)) == 1 and "no dispatch table" in str(table_warnings(record)[0].message)
    # another shape class, dtype or pass has no entry: the documented order
    other = Query(torch.device("cuda", 0), torch.bfloat16, {"D": 64, "layout": 1, "L": 65}, True)
    assert op.select(other).backend == "flash_attn"
    no_grad = Query(Q.device, Q.dtype, Q.sizes, False)
    assert op.select(no_grad).backend == "flash_attn"
    # a backend named explicitly is honoured whatever the table says
    assert op.select(Q, backend="torch").backend == "torch"
    assert op.select(Q, backend="flash_attn").backend == "flash_attn"


def test_the_measured_first_that_cannot_serve_is_passed_over(tmp_path):
    op = toy()
    op.impls["triton"].supports = lambda q: "head dim not supported"
    write(tmp_path, {GPU: {"entries": {"toy_attention": {KEY: {"order": ["triton", "sdpa_nested"]}}}}})
    assert op.select(Q).backend == "sdpa_nested"


@pytest.mark.parametrize("content,why", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": 99, "devices": {}}), "not a format-1 table"),
    (json.dumps({"format": 1, "devices": {"Other GPU": {"entries": {}}}}), "measured on Other GPU, not on " + GPU),
])
def test_a_corrupt_or_other_device_table_falls_back_with_one_warning(tmp_path, content, why):
    op = toy()
    (tmp_path / "dispatch_table.json").write_text(content)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        chosen = [op.select(Q).backend for _ in range(3)]
    assert chosen == ["flash_attn"] * 3
    ws = table_warnings(record)
    assert len(ws) == 1 and why in str(ws[0].message), [str(w.message) for w in ws]
    assert dispatch_table.reads == 1


def test_cpu_never_reads_a_table(tmp_path):
    op = toy()
    write(tmp_path, {"cpu": {"entries": {"toy_attention": {KEY: {"order": ["triton"]}}}}})
    cpu = Query(torch.device("cpu"), torch.bfloat16, Q.sizes, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert op.order(cpu)[1] == "default"
    assert dispatch_table.reads == 0


def rows(op, key, times):
    return [{"op": op, "backend": b, "dispatch_key": key, "median_ms": str(ms), "status": "ok", "workload": "w"}
            for b, ms in times.items()]


def test_bench_rows_become_the_table_the_registry_reads(tmp_path):
    measured = (rows("toy_attention", KEY, {"flash_attn": 2.0, "triton": 1.6, "sdpa_nested": 2.5, "torch": 9.0})
                + rows("toy_attention", KEY.replace("fwd+bwd", "fwd"), {"flash_attn": 0.5, "triton": 0.8})
                + [{"op": "toy_attention", "backend": "flex", "dispatch_key": KEY, "median_ms": "",
                    "status": "absent: no", "workload": "w"}])
    path = write_dispatch_table(measured, GPU, source="x.csv")
    data = json.loads(path.read_text())
    entry = data["devices"][GPU]["entries"]["toy_attention"][KEY]
    assert entry["order"] == ["triton", "flash_attn", "sdpa_nested", "torch"]
    assert entry["ratio_to_best_peer"] == pytest.approx(2.0 / 1.6, abs=1e-3)  # best peer over best dermfast
    fwd = data["devices"][GPU]["entries"]["toy_attention"][KEY.replace("fwd+bwd", "fwd")]
    assert fwd["order"] == ["flash_attn", "triton"] and fwd["ratio_to_best_peer"] == pytest.approx(0.625)
    op = toy()
    assert op.select(Q).backend == "triton"
    assert op.select(Query(Q.device, Q.dtype, Q.sizes, False)).backend == "flash_attn"
    # a second device merges into the same file; the first device's table stays
    write_dispatch_table(rows("toy_attention", KEY, {"flash_attn": 1.0}), "Other GPU", path=path)
    assert set(json.loads(path.read_text())["devices"]) == {GPU, "Other GPU"}
    assert "triton > flash_attn > sdpa_nested > torch" in dispatch_table.describe(torch.device("cuda", 0))


def test_masked_attention_shape_classes():
    from dermfast.ops.masked_attention_op import query_for, shape_class
    q = torch.empty(2, 3, 65, 80)
    assert shape_class(query_for(q, q, q, "dense", None)) == "dense/D80/L128"
    p = torch.empty(70, 3, 80)
    assert shape_class(query_for(p, p, p, "packed", 49)) == "packed/D80/L64"
    assert shape_class(query_for(p, p, p, "packed", None)) == "packed/D80/L?"
    assert [dispatch_table.bucket(n) for n in (1, 2, 49, 64, 65, 257)] == [1, 2, 64, 64, 128, 512]
