"""A stand-in for rawformer.runtime.cuda_graphs.CupyCapture, so the CPU tests drive the graph code paths."""


class ReplayCapture:
    """'Capturing' runs the step twice (warm-up, capture) and keeps the output array; a 'launch' recomputes
    the step into that same array, as a graph writes its output buffer."""

    def __init__(self):
        self.released = 0
        self.outputs = {}

    def capture(self, step):
        step()
        out = step()
        self.outputs[id(step)] = out
        return step, out, None

    def launch(self, graph):
        self.outputs[id(graph)][...] = graph()

    def release(self, graph, mempool):
        self.released += 1
        del self.outputs[id(graph)]


def assert_replays_equal(cp, chain, want, replays=3):
    """Capture `chain()` (a tuple of CuPy outputs) in a CUDA graph on a non-blocking stream, then replay it
    `replays` times over NaN-filled outputs: every replay must give exactly `want` (host arrays)."""
    import numpy as np

    from rawformer.kernels import gemm

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gemm.prepare()
        chain()
        stream.begin_capture()
        outs = chain()
        graph = stream.end_capture()
        for _ in range(replays):
            for o in outs:
                o.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            for o, w in zip(outs, want, strict=True):
                assert np.array_equal(cp.asnumpy(o), w)
