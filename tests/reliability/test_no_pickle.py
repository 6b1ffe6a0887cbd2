"""No pickle on any load path: the package is searched for unsafe loads, and the search itself is
tested on lines it must catch and lines it must let through."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

PACKAGE = Path(__file__).resolve().parents[2] / "hypermerge"

# (pattern, why): a match is unsafe unless the call (parentheses matched, across lines) also
# holds one of the `safe_if` strings.
RULES = [
    (r"\btorch\.load\(", "torch.load unpickles unless weights_only=True", ("weights_only=True",)),
    (r"\b(c?[Pp]ickle|_pickle)\.(load|loads|Unpickler)\b", "unpickling runs arbitrary code", ()),
    (r"^\s*(import|from)\s+(c?[Pp]ickle|_pickle|dill|joblib|cloudpickle|shelve)\b", "a pickle library", ()),
    (r"\b(dill|joblib|cloudpickle|shelve)\.", "a pickle library", ()),
    (r"\b(np|numpy)\.load\(", "numpy.load with allow_pickle=True unpickles", ("allow_pickle=False",)),
    (r"allow_pickle\s*=\s*True", "allow_pickle=True unpickles", ()),
    (r"\byaml\.(unsafe_load|full_load)\(", "an unsafe YAML loader builds Python objects", ()),
    (r"\byaml\.load\(", "yaml.load needs a safe loader", ("Loader=yaml.SafeLoader", "Loader=yaml.CSafeLoader",
                                                           "Loader=_RecipeLoader")),
    (r"\b(Auto\w*Model\w*|cls|auto|model_class)\.from_pretrained\(", "from_pretrained may read pickle weights",
     ("use_safetensors=True", "gguf_file=")),
]


def _call_text(text: str, start: int) -> str:
    """The text of the call whose opening parenthesis is at or after ``start`` (to its closing one)."""
    opening = text.find("(", start)
    if opening < 0:
        return text[start:start + 200]
    depth = 0
    for index in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index + 1]
    return text[start:]


def unsafe_loads(text: str) -> list[tuple[int, str, str]]:
    """``(line number, line, why)`` of every unsafe load in Python source ``text``."""
    found = []
    for pattern, why, safe_if in RULES:
        for match in re.finditer(pattern, text, flags=re.MULTILINE):
            call = _call_text(text, match.start())
            if safe_if and any(marker in call for marker in safe_if):
                continue
            line_number = text.count("\n", 0, match.start()) + 1
            found.append((line_number, text.splitlines()[line_number - 1].strip(), why))
    return found


def test_the_package_has_no_unsafe_load():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line_number, line, why in unsafe_loads(path.read_text()):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{line_number}: {line}  ({why})")
    assert not found, "unsafe loads:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    "state = torch.load(path)",
    "state = torch.load(path, map_location='cpu', weights_only=False)",
    "state = torch.load(\n    path,\n    map_location='cpu',\n)",
    "import pickle",
    "from pickle import loads",
    "data = pickle.loads(blob)",
    "import dill",
    "import joblib",
    "model = joblib.load('m.pkl')",
    "array = np.load(path, allow_pickle=True)",
    "array = np.load(path)",
    "config = yaml.load(text, Loader=yaml.Loader)",
    "config = yaml.unsafe_load(text)",
    "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)",
    "model = cls.from_pretrained(\n    folded,\n    dtype=reference_dtype,\n)",
])
def test_the_search_catches(line):
    assert unsafe_loads(line), line


@pytest.mark.parametrize("line", [
    "state = torch.load(path, map_location='cpu', weights_only=True)",
    "state = torch.load(\n    path,\n    weights_only=True,\n)",
    "array = np.load(path, allow_pickle=False)",
    "config = yaml.load(text, Loader=yaml.SafeLoader)",
    "config = yaml.safe_load(text)",
    "model = AutoModel.from_pretrained(path, use_safetensors=True)",
    "tokenizer = AutoTokenizer.from_pretrained(path)",
    "# refuses pickle checkpoints (unpickling runs arbitrary code)",
    "PICKLE_WEIGHTS = ('pytorch_model.bin',)",
])
def test_the_search_lets_through(line):
    assert not unsafe_loads(line), line


def test_the_recipe_loader_is_a_safe_loader():
    from hypermerge.training.recipe import _RecipeLoader

    assert issubclass(_RecipeLoader, yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=_RecipeLoader)  # noqa: S506
