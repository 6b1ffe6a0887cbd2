"""Settings every test process needs before hypermerge or transformers is imported: no downloads,
quiet transformers, and no tokenizers thread pool forked into the CLI subprocesses.

Helpers live in the ``tests.helpers`` package (imported as ``from tests.helpers.common import ...``:
the repository root is on ``sys.path`` through pytest's ``pythonpath`` setting); fixtures live in the
``conftest.py`` of the directory whose tests use them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
