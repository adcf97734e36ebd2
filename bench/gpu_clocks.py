"""Where a GPU engine's time goes, measured from outside: device time of each launched step
and of each CUDA graph replay (events around them), idle gaps between steps, and host time
spent waiting for sampled tokens."""

from __future__ import annotations

import itertools
import statistics
import time

import torch

from services.engine.engine import LLMEngine


class GpuClock:
    """Device time of each launched step (events around runner.launch) and the idle gaps
    between consecutive steps."""

    def __init__(self, engine: LLMEngine) -> None:
        self.runner = engine.runner if hasattr(engine.runner, "launch") else None
        self.marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.replays: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __enter__(self) -> GpuClock:
        if self.runner is None:
            return self
        original = self.runner.launch
        marks = self.marks
        graphs = self.runner._graphs
        self._graphs = dict(graphs)
        for bs, (graph, logits) in self._graphs.items():
            graphs[bs] = (_TimedGraph(graph, self.replays), logits)

        def timed(so):
            a = torch.cuda.Event(enable_timing=True)
            a.record()
            handle = original(so)
            b = torch.cuda.Event(enable_timing=True)
            b.record()
            marks.append((a, b))
            return handle

        self.runner.launch = timed
        return self

    def __exit__(self, *exc) -> None:
        if self.runner is not None:
            del self.runner.launch
            self.runner._graphs.update(self._graphs)

    def replay_ms(self, first: int) -> float | None:
        """Mean device ms of the graph replays themselves (no input or output copies)."""
        events = self.replays[first:]
        if not events:
            return None
        torch.cuda.synchronize()
        return statistics.fmean(a.elapsed_time(b) for a, b in events)

    def busy_and_idle_ms(self, first: int) -> tuple[float, float] | None:
        """Mean device ms per step, and mean idle ms before a step, from step `first` on."""
        marks = self.marks[first:]
        if len(marks) < 2:
            return None
        torch.cuda.synchronize()
        busy = [a.elapsed_time(b) for a, b in marks]
        idle = [max(0.0, p[1].elapsed_time(n[0])) for p, n in itertools.pairwise(marks)]
        return statistics.fmean(busy), statistics.fmean(idle)


class _TimedGraph:
    def __init__(self, graph: torch.cuda.CUDAGraph, events: list) -> None:
        self.graph, self.events = graph, events

    def replay(self) -> None:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        self.graph.replay()
        b.record()
        self.events.append((a, b))


class WaitClock:
    """Host seconds spent waiting for the GPU's sampled tokens (StepHandle.result)."""

    def __init__(self) -> None:
        self.wait_s = 0.0

    def __enter__(self) -> WaitClock:
        from services.engine import runner_cuda

        self._cls = runner_cuda.StepHandle
        self._original = original = self._cls.result
        clock = self

        def timed(handle):
            t = time.perf_counter()
            out = original(handle)
            clock.wait_s += time.perf_counter() - t
            return out

        self._cls.result = timed
        return self

    def __exit__(self, *exc) -> None:
        self._cls.result = self._original
