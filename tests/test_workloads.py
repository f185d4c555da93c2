"""Named workloads → attention shapes (docs/design.md, "Workloads"), and the errors for bad names and batches."""

from __future__ import annotations

import pytest

from qflash_gen import workloads

# docs/design.md "Workloads", restated as the test's spec: (N, D, heads) of the ViT/DeiT family, Swin stages.
VIT_HEADS = {"t": 3, "s": 6, "b": 12, "l": 16}
SWIN_STAGES = {"t": ((64, 3), (16, 6), (4, 12), (1, 24)), "s": ((64, 3), (16, 6), (4, 12), (1, 24))}
SWIN_STAGES["b"] = ((64, 4), (16, 8), (4, 16), (1, 32))


@pytest.mark.parametrize("size,heads", VIT_HEADS.items())
def test_vit_and_deit_shapes(size, heads):
    families = ["vit"] + (["deit"] if size != "l" else [])
    for family in families:
        for suffix, n in (("", 197), ("_384", 577)):
            w = workloads.get(f"{family}_{size}{suffix}")
            assert (w.n, w.d, w.heads, w.windows, w.masked) == (n, 64, heads, 1, False)
            assert workloads.shapes(w, 8) == (8, heads, n, 64)


@pytest.mark.parametrize("size", "tsb")
def test_swin_stages_expand_with_windows_and_bias(size):
    stages = workloads.resolve(f"swin_{size}")
    assert [w.name for w in stages] == [f"swin_{size}_s{i}" for i in range(1, 5)]
    for w, (windows, heads) in zip(stages, SWIN_STAGES[size], strict=True):
        assert (w.n, w.d, w.heads, w.windows, w.masked) == (49, 32, heads, windows, True)
        assert workloads.shapes(w, 64) == (64 * windows, heads, 49, 32)


def test_paper_workloads_are_vit_tsb_and_swin_t_stages():
    paper = workloads.resolve("paper")
    sources = workloads.resolve("vit_t,vit_s,vit_b,swin_t")
    assert [w.name for w in paper] == [f"A{i}" for i in range(1, 8)]
    for a, src in zip(paper, sources, strict=True):
        assert (a.n, a.d, a.heads, a.windows, a.masked) == (src.n, src.d, src.heads, src.windows, src.masked)
    assert workloads.get("a5").name == "A5"  # case-insensitive


def test_resolve_keeps_order_and_drops_repeats():
    names = [w.name for w in workloads.resolve(" vit_b , swin_t_s2,vit_b,A3")]
    assert names == ["vit_b", "swin_t_s2", "A3"]


def test_unknown_workload_lists_known_names():
    with pytest.raises(ValueError) as info:
        workloads.resolve("vit_b,vit_xl")
    msg = str(info.value)
    assert "'vit_xl'" in msg
    for name in ("vit_b", "swin_t", "swin_s_s3", "A7", "deit_b_384"):
        assert name in msg
    with pytest.raises(ValueError, match="known"):
        workloads.resolve("")
    with pytest.raises(ValueError, match="several workloads"):
        workloads.get("swin_t")


def test_attention_shapes_rows():
    rows = workloads.attention_shapes("swin_t", batch=2)
    assert rows[0] == ("swin_t_s1", (128, 3, 49, 32), True)
    assert len(rows) == 4
    assert workloads.attention_shapes("vit_b") == [("vit_b", (1, 12, 197, 64), False)]


@pytest.mark.parametrize("bad", ["0", "x", "", "1,-8"])
def test_bad_batches_name_the_flag(bad):
    with pytest.raises(ValueError, match="--batches"):
        workloads.parse_batches(bad)


def test_batches_parse_and_default():
    assert workloads.parse_batches("1, 8,64,8") == (1, 8, 64)
    assert workloads.DEFAULT_BATCHES == (1, 8, 64)
    with pytest.raises(ValueError, match="batch"):
        workloads.shapes("vit_b", 0)
