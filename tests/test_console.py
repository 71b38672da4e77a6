"""The console a person reads: progress lines with an ETA, live on a terminal."""

import io

from imagenet_jax.console import Console, format_duration

METRICS = {"images_per_sec": 812.4, "loss": 1.23456, "top1": 0.5, "learning_rate": 0.0875}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _console(live):
    stream, clock = io.StringIO(), FakeClock()
    console = Console(stream, live=live, clock=clock)
    console.start(first_step=0, total_steps=100, steps_per_epoch=10, description="demo")
    return console, stream, clock


def test_eta_is_the_remaining_steps_at_the_rate_since_the_first_update():
    console, stream, clock = _console(live=False)
    console.train(10, METRICS)  # the first update: compilation is behind, no rate yet
    clock.now += 30.0  # 20 steps in 30 s: 1.5 s a step
    console.train(30, METRICS)
    lines = stream.getvalue().splitlines()
    assert lines[1].endswith("ETA ...")
    assert lines[2] == ("epoch 3.0/10 | step 30/100 | 812 img/s | loss 1.2346 | top-1 0.5000 | "
                        "lr 0.0875 | ETA 1m45s")  # 70 steps x 1.5 s


def test_a_terminal_rewrites_the_progress_line_and_keeps_the_others():
    console, stream, clock = _console(live=True)
    console.train(10, METRICS)
    console.train(20, METRICS)
    console.evaluation(20, "val", {"top1": 0.9, "top5": 1.0, "loss": 0.3, "num_examples": 500})
    text = stream.getvalue()
    assert text.count("\r\033[K") == 2 and text.count("step 20/100") == 1
    # The last progress line stays on the screen; the evaluation starts a line of its own.
    assert "ETA ...\n" not in text and "| ETA 0s\neval at step 20 (epoch 2)" in text
    console.finish({"step": 20, "top1": 0.9, "top5": 1.0, "loss": 0.3, "num_examples": 500,
                    "ema_top1": 0.91, "ema_top5": 1.0, "ema_loss": 0.29,
                    "ema_num_examples": 500}, "runs/demo", 75.0)
    table = stream.getvalue().split("Done at step 20 in 1m15s; validation:\n")[1]
    assert table.splitlines()[1].split() == ["final", "0.9000", "1.0000", "0.3000", "500"]
    assert table.splitlines()[2].split() == ["EMA", "0.9100", "1.0000", "0.2900", "500"]


def test_durations_read_at_a_glance():
    assert [format_duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s",
                                                                   "2h07m"]
