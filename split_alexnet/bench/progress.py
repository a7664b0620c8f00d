"""The bench's progress, on rank 0 and on stderr (stdout keeps the tables): a tqdm bar per layout-step
when stderr is a terminal, else a plain line every `every` layout-steps (default: one per round of
every layout), each with an estimate of the time left."""
import sys
import time


def _duration(seconds):
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class BenchProgress:
    def __init__(self, total, rank, every=0, stream=None):
        self.total, self.every, self.done = total, every, 0
        self.stream = stream or sys.stderr
        self.on = rank == 0
        self.t0 = time.perf_counter()
        self.bar = None
        if self.on and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="bench", unit="step", file=self.stream, dynamic_ncols=True)

    def step(self, batch, i, warmup, steps, label, runs):
        """One layout's step i (warm-up steps first) at this batch size is done."""
        self.done += 1
        if not self.on:
            return
        what = f"step {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''}"
        if self.bar is not None:
            self.bar.set_description(f"bench batch {batch} {what} {label}", refresh=False)
            self.bar.update(1)
            return
        every = self.every or runs
        if self.done % every == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / self.done * (self.total - self.done)
            print(f"bench: batch {batch}, {label} {what} done; {self.done}/{self.total} layout-steps in "
                  f"{_duration(elapsed)}, about {_duration(left)} left", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
