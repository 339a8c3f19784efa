"""`anystep studio`: its input checks, its clips against `anystep generate`, and the page itself in
headless Chromium (skipped, with the reason, where Chromium or the studio extra is not installed)."""

import shlex
import threading

import numpy as np
import pytest

from anystep.conditioning import read_frames
from anystep.cli import main
from anystep.errors import UserError
from anystep.studio.engine import StudioInputError, check_prompt, check_seed, check_steps, open_models
from studio_driver import TEACHER, Page, Server, browser_missing, first_frame_png, off_machine

PROMPT = "a red three moving left"


@pytest.fixture(scope="module")
def far_folder(tmp_path_factory):
    from anystep.models.students import student_folder_from_teacher

    # Three chunks over the teacher's 7 frames: a quick causal model for the stream and for I2V.
    return student_folder_from_teacher(TEACHER, tmp_path_factory.mktemp("studio") / "far", causal=True,
                                       chunk_partition=(1, 3, 3))


@pytest.fixture(scope="module")
def models(far_folder):
    teacher, far = open_models([TEACHER, far_folder])
    return teacher, far


def test_input_checks_say_what_to_change():
    assert check_prompt("  a red one moving up ") == "a red one moving up"
    assert check_steps(4) == 4 and check_steps(50.0) == 50 and check_seed(7) == 7
    for bad, words in [(lambda: check_prompt("   "), "prompt is empty"), (lambda: check_steps(0), "from 1 to 50, got 0"),
                       (lambda: check_steps(51), "got 51"), (lambda: check_steps(2.5), "got 2.5"),
                       (lambda: check_steps("many"), "'many'"), (lambda: check_seed(-1), "seed")]:
        with pytest.raises(StudioInputError, match=words):
            bad()


def test_folder_that_is_not_a_model_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["studio", "--model", str(TEACHER), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"anystep: error: {tmp_path} is not a diffusers model folder (no model_index.json)"]


def test_clip_is_the_one_its_command_writes(models, tmp_path, capsys):
    teacher, _ = models
    clip = teacher.render(PROMPT, 2, 5)
    assert (clip.steps, clip.nfe, clip.frames) == (2, 4, 7)  # the guided teacher: 2 calls a step
    args = shlex.split(clip.command)
    assert args[:2] == ["anystep", "generate"]
    args[args.index("--out") + 1] = str(tmp_path / "again.mp4")
    assert main(args[1:]) == 0
    np.testing.assert_array_equal(read_frames(tmp_path / "again.mp4").numpy(), read_frames(clip.path).numpy())


def test_far_clip_grows_chunk_by_chunk_and_checks_its_first_frame(models, tmp_path):
    _, far = models
    chunks = list(far.render_chunks(PROMPT, 1, 0))
    part = far.loaded.transformer.config.chunk_partition
    assert [c.index for c in chunks] == list(range(len(part)))
    assert [c.clip.frames for c in chunks] == list(np.cumsum(part))  # the toy codec: one frame a latent frame
    assert "--image" not in chunks[-1].clip.command

    good = first_frame_png(tmp_path / "good.png", "blue", 4, "up")
    last = list(far.render_chunks(PROMPT, 1, 0, image=str(good)))[-1]
    assert last.clip.frames == sum(part) and "--image FIRST_FRAME.png" in last.clip.command
    big = first_frame_png(tmp_path / "big.png", "blue", 4, "up", size=64)
    with pytest.raises(UserError, match="64x64, the clip is 32x32"):
        list(far.render_chunks(PROMPT, 1, 0, image=str(big)))
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(UserError, match="cannot read"):
        list(far.render_chunks(PROMPT, 1, 0, image=str(text)))
    assert not far.lock.locked()  # a failed request leaves the model free for the next


def test_busy_model_tells_the_second_request_to_wait(models):
    pytest.importorskip("gradio", reason="the page needs the studio extra (pip install -r requirements-studio.lock)")
    from anystep.studio.page import Studio

    teacher, _ = models
    studio = Studio([teacher])
    with teacher.lock:  # a first request holds the model
        updates = studio.generate(teacher.name, PROMPT, 0, 1)
        assert next(updates)[0].startswith("Waiting: toy-teacher is busy")
        got = []
        worker = threading.Thread(target=lambda: got.extend(updates))
        worker.start()
        worker.join(timeout=0.5)
        assert not got  # it waits for the lock, it does not run beside the first request
    worker.join()
    message, video, stats = got[-1][:3]
    assert message == "" and "NFE 2" in stats


def test_compare_renders_every_step_count_with_its_time(models):
    pytest.importorskip("gradio", reason="the page needs the studio extra (pip install -r requirements-studio.lock)")
    from anystep.studio.page import Studio

    teacher, _ = models
    *_, last = Studio([teacher]).compare(PROMPT, 3)
    message, *cells = last
    assert message == "" and len(cells) == 5
    labels = [c["label"] for c in cells]
    assert [lab.split(" · ")[0] for lab in labels] == ["1 step", "2 steps", "4 steps", "8 steps", "32 steps"]
    assert [lab.split(" · ")[-1] for lab in labels] == ["NFE 2", "NFE 4", "NFE 8", "NFE 16", "NFE 64"]
    assert len({c["value"] for c in cells}) == 5 and all(c["value"].endswith(".mp4") for c in cells)


@pytest.fixture(scope="module")
def page(far_folder, tmp_path_factory):
    why = browser_missing()
    if why:
        pytest.skip(f"the browser test needs Chromium and the studio extra: {why}")
    server = Server([TEACHER, far_folder], tmp_path_factory.mktemp("studio-log") / "server.log")
    page = Page(server.url)
    yield page
    page.close()
    server.stop()
    assert "Traceback" not in server.log()


def test_page_plays_clips_at_1_and_4_steps(page):
    seen = set()
    for steps, nfe in ((1, 2), (4, 8)):
        page.set_steps("steps", steps)
        video, _ = page.generate("generate", "video")
        assert video["error"] is None and video["ready"] >= 2  # the first frame is decoded: it plays
        assert video["duration"] == pytest.approx(7 / 4, abs=0.05)  # 7 frames at 4 fps
        assert (video["width"], video["height"]) == (128, 128)
        assert f"NFE {nfe} · {steps} step" in page.text("stats")
        assert f"--steps {steps} --seed 0" in page.text("command")
        assert page.visible("download")
        seen.add(video["src"])
    assert len(seen) == 2


def test_page_shows_bad_input_as_a_message(page):
    page.type_into("prompt", "")
    assert page.message("generate") == "Cannot generate: the prompt is empty: type what the clip should show"
    page.type_into("prompt", PROMPT)


def test_page_image_to_video_on_the_far_model(page, tmp_path):
    page.tab("Image to video (FAR)")
    page.set_steps("i2v-steps", 1)
    page.upload("i2v-image", first_frame_png(tmp_path / "big.png", "green", 1, "down", size=64))
    assert "conditioning frames are 64x64, the clip is 32x32" in page.message("i2v-generate")
    page.upload("i2v-image", first_frame_png(tmp_path / "first.png", "green", 1, "down"))
    video, _ = page.generate("i2v-generate", "i2v-video")
    assert video["error"] is None and video["ready"] >= 2
    page.wait(lambda: "chunk 3/3" in page.text("i2v-stats"), 60, "the last chunk")
    final = page.wait(lambda: (v := page.video("i2v-video")) and v["ready"] >= 2 and v, 30, "the whole clip")
    assert final["error"] is None and final["duration"] == pytest.approx(7 / 4, abs=0.05)
    assert "--image FIRST_FRAME.png" in page.text("i2v-command")
    assert page.text("message") == ""  # the earlier message is cleared
    assert off_machine(page.urls()) == []  # the page works offline: nothing but this server
