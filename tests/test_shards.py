"""`anystep synth` shards and the shard loader: naming, resume, rank split, determinism, training on them."""

import json

import shutil

import pytest
import torch

from anystep.cli import main
from anystep.data.shards import LatentShards, ShardError, shard_name, write_synthetic
from anystep.sampling import generate_latents, load_model
from anystep.models.toy import TOY_TRANSFORMER

TOY_CHANNELS = TOY_TRANSFORMER["in_channels"]  # latent channels of the shipped toy

PROMPTS = ["a red one moving left", "a blue two moving up", "a green three moving down", "a yellow four moving right",
           "a red five moving up"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("t"), steps=2)


def test_shards_hold_the_teachers_samples_and_resume(teacher, tmp_path):
    model = load_model(teacher)
    out = tmp_path / "syn"
    # Two "ranks" write disjoint shards; together they cover every prompt.
    p0 = write_synthetic(model, PROMPTS, out, steps=3, shard_size=2, seed=10, rank=0, world_size=2, progress=lambda m: None)
    p1 = write_synthetic(model, PROMPTS, out, steps=3, shard_size=2, seed=10, rank=1, world_size=2, progress=lambda m: None)
    assert [p.name for p in p0] == [shard_name(0), shard_name(2)] and [p.name for p in p1] == [shard_name(1)]
    data = LatentShards(out)
    assert data.prompts == PROMPTS and data.latents.shape == (5, 7, TOY_CHANNELS, 8, 8)
    # Clip i is the teacher's sample from seed 10 + i, whichever rank wrote it.
    ref = generate_latents(model, PROMPTS[2:4], 3, seed=12)
    assert torch.allclose(data.latents[2:4], ref, atol=1e-5)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    write_synthetic(model, PROMPTS, out, steps=3, shard_size=2, seed=10, rank=0, world_size=1, progress=lambda m: None)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == mtimes  # nothing regenerated
    with pytest.raises(ShardError, match="different settings"):
        write_synthetic(model, PROMPTS, out, steps=4, shard_size=2, seed=10, progress=lambda m: None)
    # A teacher retrained in place (same path, other bytes) does not add shards to its old ones.
    moved = tmp_path / "teacher"
    shutil.copytree(teacher, moved)
    write_synthetic(load_model(moved), PROMPTS[:2], tmp_path / "syn2", steps=1, shard_size=2, progress=lambda m: None)
    sched = moved / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text() + "\n")
    with pytest.raises(ShardError, match="teacher_sha256"):
        write_synthetic(load_model(moved), PROMPTS[:2], tmp_path / "syn2", steps=1, shard_size=2, progress=lambda m: None)


def test_loader_is_deterministic_rank_aware_and_trains(teacher, tmp_path):
    from anystep.train.stage1 import Stage1Config, train_stage1

    out = tmp_path / "syn"
    assert main(["synth", "--teacher", str(teacher), "--prompts", _write(tmp_path, PROMPTS), "--out", str(out),
                 "--steps", "2", "--shard-size", "2"]) == 0
    a, b = LatentShards(out, seed=3), LatentShards(out, seed=3)
    x0, p0 = a.batch(7, 2, rank=0, world_size=2)
    x1, p1 = a.batch(7, 2, rank=1, world_size=2)
    assert torch.equal(x0, b.batch(7, 2, rank=0, world_size=2)[0])  # same step, same clips
    # One epoch of the stream visits every clip exactly once.
    idx = a.indices(0, len(a))
    assert sorted(idx.tolist()) == list(range(len(a)))
    assert a.embed(p0).shape[0] == 2
    run = train_stage1(Stage1Config(teacher=str(teacher), data=str(out), out=str(tmp_path / "s1"), steps=2, batch_size=2,
                                    warmup=1, ema_start=0))
    m = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert run.exists() and m[-1]["step"] == 2


def test_synth_bad_input(teacher, tmp_path, capsys):
    assert main(["synth", "--teacher", str(tmp_path / "nope"), "--prompt", "a red one moving left", "--out", str(tmp_path / "o")]) == 2
    assert main(["synth", "--teacher", str(teacher), "--prompt", "a red one moving left", "--out", str(tmp_path / "o"),
                 "--num-frames", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("anystep: error:") for e in err)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ShardError, match="not a shard folder"):
        LatentShards(tmp_path)


def _write(tmp_path, prompts):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    return str(f)


def test_own_clips_encode_to_shards_exactly(teacher, tmp_path, capsys):
    """mp4 + caption pairs -> shards; the toy codec is exact, so the latents are the clips' own
    (up to mp4 compression) and the captions come back in file order."""
    from anystep.data.moving_digits import MovingDigits
    from anystep.io import write_mp4
    from anystep.models.latents import encode_pixels

    clips = tmp_path / "clips"
    clips.mkdir()
    ds = MovingDigits("heldout")
    for i in range(3):
        c = ds[i]
        write_mp4(c.video, clips / f"c{i}.mp4", scale=1)
        (clips / f"c{i}.txt").write_text(c.prompt + "\n")
    out = tmp_path / "own"
    assert main(["encode", "--model", str(teacher), "--clips", str(clips), "--out", str(out), "--shard-size", "2"]) == 0
    data = LatentShards(out)
    assert data.prompts == [ds[i].prompt for i in range(3)]
    model = load_model(teacher)
    ref = encode_pixels(model.codec, torch.from_numpy(ds.batch(range(3))[0]))
    # Exact codec: what is left is mp4 (yuv420) compression, small against the latent scale.
    assert data.latents.shape == ref.shape and (data.latents - ref).abs().mean() < 0.15
    # A caption the toy text path cannot take is refused before anything is written.
    (clips / "c2.txt").write_text("a red three moving left and then up and down\n")
    capsys.readouterr()
    assert main(["encode", "--model", str(teacher), "--clips", str(clips), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anystep: error: prompt 'a red three moving left and then up and down' is 11 tokens")
    assert len(err.splitlines()) == 1 and not (tmp_path / "o3").exists()
    (clips / "c1.txt").unlink()
    capsys.readouterr()
    assert main(["encode", "--model", str(teacher), "--clips", str(clips), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip().startswith("anystep: error: c1.mp4 has no caption")
