"""Latency of the bundled shapes model (DPM++ 2M, 20 steps, guidance 7.5: 40 UNet calls) against its LCM distillation
(`reverie generate --fast`: lcm, 4 steps, guidance as a network input: 4 calls), one 64x64 image each, the two
interleaved so the machine's noise falls on both; prints the medians and their ratio.

    python bench/fast_latency.py [--runs 5]
"""

import argparse
import statistics
import time

import torch

from reverie import Pipeline
from reverie.loading import fast_model_path, model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    base, fast = Pipeline.from_pretrained(model_path("shapes")), Pipeline.from_pretrained(fast_model_path("shapes"))
    prompt = "a red circle above a blue square"
    for _ in range(2):  # warm-up
        base(prompt, steps=20, seed=0, progress=False)
        fast(prompt, seed=0, progress=False)
    times = {"base": [], "fast": []}
    for i in range(args.runs):
        for name, call in (("base", lambda: base(prompt, steps=20, seed=i, progress=False)),
                           ("fast", lambda: fast(prompt, seed=i, progress=False))):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    b, f = statistics.median(times["base"]), statistics.median(times["fast"])
    print(f"shapes on cpu ({torch.get_num_threads()} threads), median of {args.runs}: base dpmpp_2m 20 steps "
          f"{b * 1e3:.0f} ms, --fast lcm 4 steps {f * 1e3:.0f} ms, {b / f:.2f}x faster")


if __name__ == "__main__":
    main()
