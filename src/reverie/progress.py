"""Progress bars for anything a person waits on."""

from __future__ import annotations

from tqdm.auto import tqdm


class ProgressBar:
    """A sampler callback that advances a tqdm bar per step, then calls an optional inner callback."""

    def __init__(self, total: int, desc: str = "sampling", callback=None, disable: bool | None = None):
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=disable, leave=False)
        self.callback = callback

    def __call__(self, step):
        self.bar.set_postfix(sigma=f"{step.sigma:.3g}", refresh=False)
        self.bar.update(1)
        if self.callback is not None:
            self.callback(step)

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
