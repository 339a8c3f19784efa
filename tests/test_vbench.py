"""`anystep eval vbench`: VBench's naming and aggregation, checked on CPU with a tiny teacher."""

import pytest

from anystep.cli import main
from anystep.eval.vbench import NORMALIZE, QUALITY_DIMS, SEMANTIC_DIMS, aggregate


def _raw(norm_of):
    return {d: lo + norm_of(d) * (hi - lo) for d, (lo, hi) in NORMALIZE.items()}


def test_aggregation_by_hand():
    assert len(QUALITY_DIMS) == 7 and len(SEMANTIC_DIMS) == 9 and set(QUALITY_DIMS) | set(SEMANTIC_DIMS) == set(NORMALIZE)
    top = aggregate(_raw(lambda d: 1.0))
    assert top["Quality"] == pytest.approx(100) and top["Total"] == pytest.approx(100)
    assert aggregate(_raw(lambda d: 0.0))["Total"] == pytest.approx(0)
    # Every dimension normalised to 0.5 except dynamic degree at 1.0 (weight 0.5):
    # Quality = (6 * 0.5 + 0.5 * 1.0) / 6.5, Semantic = 0.5, Total = (4 Q + S) / 5.
    r = aggregate(_raw(lambda d: 1.0 if d == "dynamic degree" else 0.5))
    q = 3.5 / 6.5
    assert r["Quality"] == pytest.approx(100 * q) and r["Semantic"] == pytest.approx(50)
    assert r["Total"] == pytest.approx(100 * (4 * q + 0.5) / 5)
    with pytest.raises(ValueError, match="missing VBench dimensions"):
        aggregate({"color": 0.5})


def test_generation_naming_and_resume(tmp_path, capsys):
    from conftest import make_tiny_teacher

    teacher = make_tiny_teacher(tmp_path / "t", steps=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red one moving left\na blue two moving up\n")
    aug = tmp_path / "aug.txt"
    aug.write_text("a red one moving left\na blue two moving up\n")
    out = tmp_path / "vb"
    assert main(["eval", "vbench", "--model", str(teacher), "--steps", "1", "--prompts", str(prompts),
                 "--augmented", str(aug), "--out", str(out)]) == 0
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == sorted(f"{p}-{i}.mp4" for p in ("a red one moving left", "a blue two moving up") for i in range(5))
    assert "not scored" in capsys.readouterr().out
    before = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    assert main(["eval", "vbench", "--model", str(teacher), "--steps", "1", "--prompts", str(prompts), "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()} == before  # reused, not regenerated
    aug.write_text("only one line\n")
    assert main(["eval", "vbench", "--model", str(teacher), "--steps", "1", "--prompts", str(prompts),
                 "--augmented", str(aug), "--out", str(tmp_path / "vb2")]) == 2
    assert main(["eval", "vbench", "--model", str(teacher), "--steps", "1,2", "--prompts", str(prompts),
                 "--out", str(tmp_path / "vb3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("anystep: error:") for e in err)
    assert not (tmp_path / "vb2").exists() and not (tmp_path / "vb3").exists()
