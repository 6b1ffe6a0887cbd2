"""A stand-in ``tensorrt`` module with TensorRT 10's refit names (Runtime, Refitter, Weights;
get_all_weights, set_named_weights, get_missing_weights, refit_cuda_engine), recording what the
refit code asks of it. tests/helpers/trt_api.py checks every name it offers exists in the real API."""

from __future__ import annotations

import numpy as np


class Weights:
    def __init__(self, array):
        self.array = array
        self.size = array.size


def fake_tensorrt(refittable, *, missing=(), refit_ok=True, engine_refittable=True, prototypes=None):
    """A stand-in module whose engine refits the weights named ``refittable``.

    Args:
        refittable: the weight names the refitter reports (and accepts).
        missing: names it reports missing until they are set.
        refit_ok: what ``refit_cuda_engine`` returns.
        engine_refittable: the deserialised engine's ``refittable``.
        prototypes: name -> ``Weights`` that ``get_weights_prototype`` returns (None: no prototypes).

    Returns:
        The module and a dict recording the calls (``set``: name -> array, ``refit``: count).
    """
    calls = {"set": {}, "refit": 0}

    class Engine:
        refittable = engine_refittable

        def serialize(self):
            return b"REFITTED:" + ",".join(sorted(calls["set"])).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            calls["engine_bytes"] = data
            return Engine() if data else None

    class Refitter:
        def __init__(self, engine, logger):
            self.pending = set(missing)

        def get_all_weights(self):
            return list(refittable)

        def get_weights_prototype(self, name):
            return None if prototypes is None else prototypes[name]

        def set_named_weights(self, name, weights):
            calls["set"][name] = np.array(weights.array)
            self.pending.discard(name)
            return name in refittable

        def get_missing_weights(self):
            return sorted(self.pending)

        def refit_cuda_engine(self):
            calls["refit"] += 1
            return refit_ok

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    module = type("tensorrt", (), {"Runtime": Runtime, "Refitter": Refitter, "Weights": Weights, "Logger": Logger,
                                   "nptype": staticmethod(lambda dtype: np.float32), "__version__": "10.fake"})
    return module, calls
