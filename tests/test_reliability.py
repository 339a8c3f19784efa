"""Nothing of the user's is destroyed, every failure is one line, a run folder belongs to one run.

Each case checks the exit code, exactly one ``anystep: error:`` line on stderr (progress bars
aside), no traceback, and that every file that existed before is byte-for-byte unchanged.
Ctrl-C cases send SIGINT to the process; disk-full cases run on a small tmpfs when the test can
mount one.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from anystep.cli import main

PROMPT = "a red one moving up"
_NOISE = re.compile(r"it/s\]|s/it\]|\d+%\||Expected types for vae")


# -- helpers ---------------------------------------------------------------------------------------
def snapshot(*roots) -> dict:
    """path -> (sha256, mode) of every file under the roots."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in files:
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode & 0o777)
    return out


def assert_unchanged(before: dict) -> None:
    after = {p: v for p, v in snapshot(*[Path(p) for p in before if Path(p).exists()]).items() if p in before}
    gone = sorted(set(before) - set(after))
    assert not gone, f"deleted: {gone}"
    changed = sorted(p for p in before if before[p] != after[p])
    assert not changed, f"changed: {changed}"


def error_line(err: str) -> str:
    lines = [x for x in re.split(r"[\r\n]", err) if x.strip() and not _NOISE.search(x)]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("anystep: error: "), lines[0]
    return lines[0]


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def refused(capsys, fragment, *argv) -> str:
    rc, err = run_cli(capsys, *argv)
    assert rc == 2, err[-3000:]
    line = error_line(err)
    assert fragment in line, line
    return line


def no_temp_files(folder) -> None:
    left = [p.name for p in Path(folder).rglob(".*") if p.name not in (".anystep",)]
    assert not left, left


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher, a causal (FAR) student and a 2-step Stage-1 run with a checkpoint per step."""
    from conftest import make_tiny_teacher

    from anystep.models.students import student_folder_from_teacher
    from anystep.train.stage1 import Stage1Config

    root = tmp_path_factory.mktemp("rel")
    teacher = make_tiny_teacher(root / "t", steps=1)
    far = student_folder_from_teacher(teacher, root / "far", causal=True, chunk_partition=(1, 3, 3, 3, 3))
    run = root / "run"
    assert main(["train", "stage1", f"teacher={teacher}", f"out={run}", "steps=2", "batch_size=2", "warmup=1",
                 "ckpt_every=1", "log_every=1", "threads=1"]) == 0
    return teacher, far, run, Stage1Config


def subprocess_env():
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _mounted_tmpfs(mnt: Path, options: str, why: str):
    """Mount a tmpfs at ``mnt`` for the test and unmount it after, or skip saying why there is none."""
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount {why} ({p.stderr.strip() or p.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A 40 MiB tmpfs, or a skip saying why there is none."""
    yield from _mounted_tmpfs(tmp_path / "tmpfs", "size=40m", "a tmpfs for the disk-full cases")


@pytest.fixture
def read_only(tmp_path):
    """A read-only tmpfs, or a skip saying why there is none."""
    yield from _mounted_tmpfs(tmp_path / "ro", "ro,size=1m", "a read-only tmpfs")


def fill(folder, leave: int) -> None:
    """Fill the file system of ``folder`` up to ``leave`` free bytes."""
    free = shutil.disk_usage(folder).free - leave
    with open(Path(folder) / "filler", "wb") as f:
        while free > 0:
            n = min(free, 1 << 20)
            try:
                f.write(b"\0" * n)
                f.flush()
            except OSError:
                break
            free -= n


def foreign_folder(path: Path, name: str) -> Path:
    """A folder anystep did not make, holding one file of the user's."""
    path.mkdir()
    (path / name).write_text("the user's\n")
    return path


# -- 1. the user's files are never destroyed -------------------------------------------------------
def test_export_and_student_never_touch_a_foreign_folder_or_file(models, tmp_path, capsys):
    teacher, far, run, _ = models
    d = foreign_folder(tmp_path / "d", "t.txt")
    f = tmp_path / "f.txt"
    f.write_text("hello\n")
    before = snapshot(tmp_path)
    refused(capsys, "not written by anystep", "export", "--run", run, "--out", d)
    refused(capsys, "not written by anystep", "export", "--run", run, "--out", d, "--overwrite")
    refused(capsys, "not written by anystep", "student", "--teacher", teacher, "--out", d)
    refused(capsys, "is not a folder", "export", "--run", run, "--out", f)
    assert_unchanged(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]
    # Our own export is replaced only when asked to.
    e = tmp_path / "e"
    assert run_cli(capsys, "export", "--run", run, "--out", e)[0] == 0
    mine = snapshot(e)
    refused(capsys, "--overwrite", "export", "--run", run, "--out", e)
    assert_unchanged(mine)
    old = os.umask(0o027)
    try:
        assert run_cli(capsys, "export", "--run", run, "--out", e, "--overwrite", "--no-ema")[0] == 0
    finally:
        os.umask(old)
    assert (e / "model_index.json").is_file()
    # The folder follows the umask, not tempfile's 0700 / 0600.
    assert {p.stat().st_mode & 0o777 for p in [e, *e.rglob("*")] if p.is_dir()} == {0o750}
    assert {p.stat().st_mode & 0o777 for p in e.rglob("*") if p.is_file()} == {0o640}
    no_temp_files(tmp_path)


def test_existing_clip_and_png_are_refused_then_replaced_on_request(models, tmp_path, capsys):
    teacher = models[0]
    clip, png = tmp_path / "x.mp4", tmp_path / "x.png"
    clip.write_text("my notes\n")
    png.write_text("my picture\n")
    os.chmod(clip, 0o640)
    before = snapshot(tmp_path)
    gen = ["generate", "--model", teacher, "--prompt", PROMPT, "--steps", "1", "--out", clip]
    refused(capsys, "already exists; pass --overwrite", *gen)
    clip.unlink()
    refused(capsys, "x.png already exists", *gen)  # the unrequested .png counts too
    clip.write_text("my notes\n")
    os.chmod(clip, 0o640)
    assert_unchanged(before)
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, *gen, "--overwrite")[0] == 0
    finally:
        os.umask(old)
    assert clip.read_bytes()[4:8] == b"ftyp" and png.read_bytes()[:4] == b"\x89PNG"
    # Files follow the umask, not tempfile's 0600.
    assert clip.stat().st_mode & 0o777 == 0o644 and png.stat().st_mode & 0o777 == 0o644
    no_temp_files(tmp_path)


def test_ctrl_c_during_far_generation_keeps_the_old_clip(models, tmp_path):
    far = models[1]
    clip, png = tmp_path / "old.mp4", tmp_path / "old.png"
    clip.write_bytes(b"the user's clip")
    png.write_bytes(b"the user's grid")
    before = snapshot(tmp_path)
    # Enough steps that chunk 2 is still running when the signal arrives.
    cmd = [sys.executable, "-m", "anystep", "generate", "--model", str(far), "--prompt", PROMPT, "--steps", "12",
           "--out", str(clip), "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        for line in proc.stdout:
            if line.startswith("chunk 1/"):
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in error_line(err)
    assert_unchanged(before)
    no_temp_files(tmp_path)


def test_full_disk_keeps_the_old_clip(models, tmpfs, capsys):
    teacher = models[0]
    clip = tmpfs / "old.mp4"
    clip.write_bytes(b"the user's clip" * 100)
    fill(tmpfs, 24 * 1024)
    before = snapshot(clip)
    line = refused(capsys, "no space left", "generate", "--model", teacher, "--prompt", PROMPT, "--steps", "1",
                   "--out", clip, "--overwrite")
    assert "free some space" in line
    assert_unchanged(before)
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler", "old.mp4"]


def test_read_only_targets_are_refused_before_any_work(models, read_only, capsys):
    teacher, _, run, _ = models
    refused(capsys, "read-only or no permission", "generate", "--model", teacher, "--prompt", PROMPT,
            "--out", read_only / "x.mp4")
    refused(capsys, "read-only or no permission", "export", "--run", run, "--out", read_only / "e")
    refused(capsys, "read-only or no permission", *_stage1(teacher, read_only / "r", "steps=1"))
    assert not list(read_only.iterdir())


def test_full_disk_during_export_leaves_no_half_folder(models, tmpfs, capsys):
    run = models[2]
    fill(tmpfs, 1 << 20)  # the model folder is ~5 MB
    refused(capsys, "no space left", "export", "--run", run, "--out", tmpfs / "e")
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]


# -- 2. one line for every user-caused failure ---------------------------------------------------
@pytest.mark.parametrize("extra, fragment", [
    (["--num-frames", "65"], "rope_max_seq_len"),
    (["--num-frames", "1000"], "rope_max_seq_len"),
    (["--num-frames", "0"], "--num-frames must be >= 1"),
    (["--height", "0"], "--height must be >= 1"),
    (["--fps", "0"], "--fps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_generate_bad_values(models, tmp_path, capsys, extra, fragment):
    refused(capsys, fragment, "generate", "--model", models[0], "--prompt", PROMPT, "--steps", "1",
            "--out", tmp_path / "c.mp4", *extra)
    assert not list(tmp_path.iterdir())


def test_generate_bad_files(models, tmp_path, capsys):
    teacher = models[0]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a red \xff\xfe one\n")
    (tmp_path / "dir.mp4").mkdir()
    two = tmp_path / "two.txt"
    two.write_text(f"{PROMPT}\na blue two moving left\n")
    (tmp_path / "exists.txt").write_text("keep\n")
    trunc = tmp_path / "trunc"
    shutil.copytree(teacher, trunc)
    st = next((trunc / "text_encoder").glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:1000])
    before = snapshot(tmp_path)
    gen = ["generate", "--model", teacher, "--steps", "1"]
    refused(capsys, "not UTF-8", *gen, "--prompts", bad, "--out", tmp_path / "u")
    refused(capsys, "is a folder", *gen, "--prompt", PROMPT, "--out", tmp_path / "dir.mp4")
    refused(capsys, "not a folder", *gen, "--prompts", two, "--out", tmp_path / "exists.txt")
    refused(capsys, "cannot load model", "generate", "--model", trunc, "--prompt", PROMPT, "--out", tmp_path / "t.mp4")
    assert_unchanged(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "dir.mp4", "exists.txt", "trunc", "two.txt"]


@pytest.mark.parametrize("n", ["0", "-3"])
def test_eval_needs_prompts(models, tmp_path, capsys, n):
    refused(capsys, "--n-prompts must be >= 1", "eval", "--model", models[0], "--steps", "1", "--n-prompts", n,
            "--out", tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("override, fragment", [
    ("betas=[0.9]", "'betas' must be two numbers"),
    ("lr=-1e-4", "'lr' must be a finite number > 0"),
    ("batch_size=0", "'batch_size' must be >= 1"),
    ("log_every=0", "'log_every' must be >= 1"),
    ("ckpt_every=0", "'ckpt_every' must be >= 1"),
    ("loss_weight=bogus", "'loss_weight' must be one of beta, uniform, normal"),
    ("num_frames=0", "'num_frames' must be >= 1"),
    ("steps=0", "'steps' must be >= 1"),
    ("steps=-5", "'steps' must be >= 1"),
])
def test_config_values_are_checked_when_the_config_is_built(models, tmp_path, capsys, override, fragment):
    refused(capsys, fragment, "train", "stage1", f"teacher={models[0]}", f"out={tmp_path / 'r'}", override)
    assert not (tmp_path / "r").exists()


def test_bad_training_data_is_one_line(models, tmp_path, capsys):
    teacher = models[0]
    notjson = tmp_path / "notjson"
    notjson.mkdir()
    (notjson / "manifest.json").write_text("{not json")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "manifest.json").write_text(json.dumps({"num_shards": 1}))
    (trunc / "shard-00000.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"latents\"")
    before = snapshot(tmp_path)
    base = ["train", "stage1", f"teacher={teacher}", "steps=1", "batch_size=2"]
    refused(capsys, "is not a shard folder", *base, f"out={tmp_path / 'a'}", f"data={tmp_path / 'missing'}")
    refused(capsys, "is not a shard manifest", *base, f"out={tmp_path / 'b'}", f"data={notjson}")
    refused(capsys, "cannot be read", *base, f"out={tmp_path / 'c'}", f"data={trunc}")
    assert_unchanged(before)
    assert not any((tmp_path / x).exists() for x in "abc")


def test_divergence_is_one_line_with_what_to_try(models, tmp_path, capsys):
    line = refused(capsys, "training diverged", "train", "stage1", f"teacher={models[0]}", f"out={tmp_path / 'r'}",
                   "steps=3", "batch_size=2", "warmup=1", "lr=1e30", "grad_clip=1e30", "threads=1")
    assert "lower lr" in line


# -- 3. a run folder belongs to one run ------------------------------------------------------------
def _copy_run(run, dest) -> Path:
    shutil.copytree(run, dest)
    return dest


def _stage1(teacher, out, *extra):
    return ["train", "stage1", f"teacher={teacher}", f"out={out}", "batch_size=2", "warmup=1", "ckpt_every=1",
            "log_every=1", "threads=1", *extra]


def test_resume_refuses_changed_settings_before_touching_the_folder(models, tmp_path, capsys):
    teacher, _, run, _ = models
    r = _copy_run(run, tmp_path / "r")
    before = snapshot(r)
    line = refused(capsys, "changed settings: lr 5e-05 -> 0.5", *_stage1(teacher, r, "steps=3", "lr=0.5"))
    assert "--allow-changed lr" in line
    refused(capsys, "global batch 2", *_stage1(teacher, r, "steps=3", "batch_size=4"))
    refused(capsys, "not 'consistency_init'", "train", "consistency_init", f"teacher={teacher}", f"out={r}", "steps=3",
            "batch_size=2")
    assert_unchanged(before)
    assert not (r / ".anystep.lock").exists()
    # Named, the change is accepted and in effect; metrics.jsonl has one line per step.
    rc, err = run_cli(capsys, *_stage1(teacher, r, "steps=3", "lr=0.5"), "--allow-changed", "lr")
    assert rc == 0, err[-3000:]
    assert json.loads((r / "config.json").read_text())["lr"] == 0.5
    rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3]
    assert rows[-1]["lr"] == pytest.approx(0.5)
    assert not (r / ".anystep.lock").exists()


def test_metrics_past_the_checkpoint_are_cut_on_resume(models, tmp_path, capsys):
    teacher, _, run, _ = models
    r = _copy_run(run, tmp_path / "r")
    # A run killed after step 3 was logged but before its checkpoint: step 3 is trained again.
    with open(r / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    assert run_cli(capsys, *_stage1(teacher, r, "steps=3"))[0] == 0
    rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3] and rows[-1]["loss"] != 123.0


def test_incomplete_checkpoint_is_refused_not_restarted(models, tmp_path, capsys):
    teacher, _, run, _ = models
    for piece in ("anystep_checkpoint.json", ".metadata", "__0_0.distcp"):
        r = _copy_run(run, tmp_path / piece.strip("._"))
        (r / "checkpoint" / piece).unlink()
        before = snapshot(r)
        refused(capsys, f"incomplete or damaged ({piece} is missing)", *_stage1(teacher, r, "steps=3"))
        assert_unchanged(before)


def test_foreign_folder_file_and_finished_run(models, tmp_path, capsys):
    teacher, _, run, _ = models
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"a": 1}\n')
    (foreign / "metrics.jsonl").write_text("data\n")
    (tmp_path / "file").write_text("hi\n")
    before = snapshot(tmp_path)
    refused(capsys, "not an anystep run", *_stage1(teacher, foreign, "steps=1"))
    refused(capsys, "is not a folder", *_stage1(teacher, tmp_path / "file", "steps=1"))
    assert_unchanged(before)
    r = _copy_run(run, tmp_path / "done")
    before = snapshot(r)
    capsys.readouterr()
    assert main([str(a) for a in _stage1(teacher, r, "steps=2")]) == 0
    assert f"already finished at step 2 (steps=2); the stage-1 model is in {r / 'model'}" in capsys.readouterr().out
    assert_unchanged(before)


def test_second_run_on_a_locked_folder_is_refused_and_a_stale_lock_taken_over(models, tmp_path, capsys):
    teacher, _, run, _ = models
    r = _copy_run(run, tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (r / ".anystep.lock").write_text(json.dumps({"pid": holder.pid}))
        before = snapshot(r)
        refused(capsys, f"being written by another run (PID {holder.pid})", *_stage1(teacher, r, "steps=3"))
        assert_unchanged(before)
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and the run goes ahead (and lets go of the lock).
    rc, err = run_cli(capsys, *_stage1(teacher, r, "steps=3"))
    assert rc == 0, err[-3000:]
    assert not (r / ".anystep.lock").exists()


def test_ctrl_c_during_a_checkpoint_write_keeps_the_previous_one(models, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from anystep.train.checkpoint import read_meta

    teacher, _, run, _ = models
    r = _copy_run(run, tmp_path / "r")
    before = snapshot(r / "checkpoint")
    real_save = dcp.save

    def save_then_sigint(*a, **kw):  # the tensors are on disk, the swap has not happened yet
        out = real_save(*a, **kw)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(dcp, "save", save_then_sigint)
    rc, err = run_cli(capsys, *_stage1(teacher, r, "steps=3"))
    assert rc == 130
    assert "interrupted" in error_line(err)
    assert_unchanged(before)
    assert not (r / ".checkpoint.tmp").exists() and not (r / ".anystep.lock").exists()
    assert read_meta(r)["step"] == 2


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(models, tmpfs, capsys):
    from anystep.train.checkpoint import read_meta

    teacher, _, run, _ = models
    r = _copy_run(run, tmpfs / "r")  # ~24 MB of checkpoint: a second one does not fit beside it
    shutil.rmtree(r / "model")
    before = snapshot(r / "checkpoint")
    line = refused(capsys, "no space left", *_stage1(teacher, r, "steps=3"))
    assert "free some space" in line
    assert_unchanged(before)
    assert not (r / ".checkpoint.tmp").exists() and not (r / ".anystep.lock").exists()
    assert read_meta(r)["step"] == 2


def test_other_outputs_refuse_a_foreign_folder(models, tmp_path, capsys):
    import torch

    from anystep.io import write_mp4

    teacher, _, run, _ = models
    foreign = foreign_folder(tmp_path / "foreign", "notes.txt")
    clips = tmp_path / "clips"
    clips.mkdir()
    write_mp4(torch.zeros(7, 3, 32, 32), clips / "a.mp4", scale=1)
    (clips / "a.txt").write_text("a red one moving up\n")
    (clips / "b.mp4").write_bytes(b"not a video")
    (clips / "b.txt").write_text("a blue two moving left\n")
    broken = _copy_run(run, tmp_path / "broken")
    (broken / "checkpoint" / ".metadata").unlink()
    before = snapshot(tmp_path)
    refused(capsys, "not a shard folder", "synth", "--teacher", teacher, "--prompt", PROMPT, "--steps", "1",
            "--out", foreign)
    refused(capsys, "not a shard folder", "encode", "--model", teacher, "--clips", clips, "--out", foreign)
    refused(capsys, "not a reproduction", "reproduce", "--quick", "--out", foreign)
    refused(capsys, "holds no toybench.json", "eval", "--model", teacher, "--steps", "1", "--n-prompts", "1",
            "--out", foreign)
    # A clip that cannot be read leaves no manifest-only folder behind.
    refused(capsys, "cannot read", "encode", "--model", teacher, "--clips", clips, "--out", tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
    refused(capsys, ".metadata is missing", "export", "--run", broken, "--out", tmp_path / "exp")
    assert not (tmp_path / "exp").exists()
    assert_unchanged(before)


@pytest.mark.parametrize("left", [".checkpoint.tmp", ".checkpoint.old"])
def test_kill_between_the_checkpoint_renames_resumes_bit_identically(models, tmp_path, capsys, left):
    """A job killed between the two renames of a checkpoint write leaves no ``checkpoint/`` but a
    complete ``.checkpoint.tmp`` (or ``.old``): the resume puts it back and continues exactly as
    from the intact folder."""
    from safetensors.torch import load_file

    teacher, _, run, _ = models
    intact, killed = _copy_run(run, tmp_path / "intact"), _copy_run(run, tmp_path / "killed")
    for r in (intact, killed):
        shutil.rmtree(r / "model")
    os.replace(killed / "checkpoint", killed / left)
    for r in (intact, killed):
        rc, err = run_cli(capsys, *_stage1(teacher, r, "steps=3"))
        assert rc == 0, err[-3000:]
    assert (killed / "checkpoint").is_dir() and not (killed / left).exists()
    a = load_file(next((intact / "model" / "transformer").glob("*.safetensors")))
    b = load_file(next((killed / "model" / "transformer").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    rows = lambda r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(intact)[-1]["loss"] == rows(killed)[-1]["loss"] and rows(killed)[-1]["step"] == 3


def test_clip_folders_are_replaced_only_when_ours_and_asked(models, tmp_path, capsys):
    teacher, _, run, _ = models
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\na blue two moving left\n")
    clips = tmp_path / "clips"
    gen = ["generate", "--model", teacher, "--prompts", prompts, "--steps", "1", "--out"]
    assert run_cli(capsys, *gen, clips)[0] == 0
    mine = snapshot(clips)
    refused(capsys, "already exists; pass --overwrite", *gen, clips)
    assert_unchanged(mine)
    assert run_cli(capsys, *gen, clips, "--overwrite", "--seed", "1")[0] == 0
    assert snapshot(clips) != mine and (clips / "0001-a-blue-two-moving-left.mp4").is_file()
    # Our model folder is not a clip folder: refused even with --overwrite.
    model = snapshot(run / "model")
    refused(capsys, "not a clips folder", *gen, run / "model", "--overwrite")
    assert_unchanged(model)


def test_eval_synth_encode_and_reproduce_folders_are_locked_while_in_use(models, tmp_path, capsys):
    teacher = models[0]
    (tmp_path / "clips").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        commands = {
            "eval": ["eval", "--model", teacher, "--steps", "1", "--n-prompts", "1", "--out"],
            "synth": ["synth", "--teacher", teacher, "--prompt", PROMPT, "--steps", "1", "--out"],
            "reproduce": ["reproduce", "--quick", "--no-cost", "--out"],
        }
        for name, argv in commands.items():
            out = tmp_path / name
            out.mkdir()
            (out / ".anystep.lock").write_text(json.dumps({"pid": holder.pid}))
            before = snapshot(out)
            refused(capsys, f"being written by another run (PID {holder.pid})", *argv, out)
            assert_unchanged(before)
            assert sorted(p.name for p in out.iterdir()) == [".anystep.lock"]
    finally:
        holder.kill()
        holder.wait()
