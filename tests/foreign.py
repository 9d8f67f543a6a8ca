"""A stand-in for another framework's tensor in tests: it speaks DLPack and nothing else."""


class DLPackOnly:
    """Wraps an array and exposes only `__dlpack__` and `__dlpack_device__`, as a PyTorch tensor would."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()
