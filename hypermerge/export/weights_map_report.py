"""The report's weights-map section as markdown (``report.md``): how much of the source model the
map located, with which transforms, and what ``hypermerge patch`` will refuse to change."""

from __future__ import annotations


def weights_map_markdown(summary: dict) -> list[str]:
    """report.md lines for the ``weights_map`` section."""
    if not summary.get("file"):
        return ["", f"## Weights map: not recorded ({summary.get('error')})"]
    transforms = ", ".join(f"{k} ×{v}" for k, v in sorted(summary["transforms"].items())) or "none"
    lines = ["", f"## Weights map (`{summary['file']}`): {summary['mapped']} of {summary['tensors']} source "
             f"tensors located", "", f"Transforms: {transforms}. Initializers shared by several tensors: "
             f"{summary['shared_initializers']}."]
    unmapped = summary.get("unmapped") or []
    if unmapped:
        lines += ["", "Not located (`hypermerge patch` refuses to change these):", ""]
        lines += [f"- `{entry['weight']}`: {entry['reason']}" for entry in unmapped[:40]]
        if len(unmapped) > 40:
            lines.append(f"- … and {len(unmapped) - 40} more (see {summary['file']})")
    return lines
