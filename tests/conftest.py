"""Shared test set-up: offline hub, one BLAS thread per test process, tiny teacher folders."""

import os
import signal

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


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_at_a_terminal():
    """A shell without job control starts background commands (``cmd &``) with SIGINT ignored,
    and every child inherits that: the Ctrl-C tests would see no Ctrl-C. Give the suite (and the
    processes it starts) what a terminal gives."""
    old = signal.getsignal(signal.SIGINT)
    if old == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def make_tiny_teacher(out, steps: int = 2, **transformer):
    """A WanPipeline folder trained for ``steps`` steps by the real teacher command's code path."""
    from anystep.train.teacher import TeacherConfig, train_teacher

    return train_teacher(TeacherConfig(out=str(out), steps=steps, batch_size=4, probe_every=1000, ckpt_every=1000,
                                       transformer=dict(transformer)))
