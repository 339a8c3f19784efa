"""Shared test set-up: offline hub, one BLAS thread per test process, tiny teacher folders."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and most repeatably) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_tiny_teacher(out, steps: int = 2, **transformer):
    """A WanPipeline folder trained for ``steps`` steps by the real teacher command's code path."""
    from anystep.train.teacher import TeacherConfig, train_teacher

    return train_teacher(TeacherConfig(out=str(out), steps=steps, batch_size=4, probe_every=1000, ckpt_every=1000,
                                       transformer=dict(transformer)))
