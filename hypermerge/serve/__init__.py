"""Serving: an exported directory over HTTP (FastAPI + uvicorn on onnxruntime), and a Triton
Inference Server model repository for those who serve with Triton.

    hypermerge serve exported --port 8000        # or: serve("exported", ServeSettings(port=8000))
    hypermerge triton exported triton-repo       # or: write_triton_repo("exported", "triton-repo")

``create_app(hm.OnnxModel.load(dir))`` gives the ASGI app to run under any ASGI server.
Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); the Triton writer needs ``onnx``.
"""

from hypermerge.serve.triton import TritonResult, write_triton_repo


def __getattr__(name: str):
    # the HTTP parts import fastapi and uvicorn: only when asked for, so `write_triton_repo` works without them
    if name in ("create_app", "ServeSettings"):
        from hypermerge.serve import app

        return getattr(app, name)
    if name == "serve":
        from hypermerge.serve.server import serve

        return serve
    raise AttributeError(f"module 'hypermerge.serve' has no attribute {name!r}")


__all__ = ["ServeSettings", "TritonResult", "create_app", "serve", "write_triton_repo"]
