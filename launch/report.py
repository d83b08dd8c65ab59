"""Regenerate what experiments.md and postmortem.md cite, then fill their generated blocks.

    python -m launch.report            # run only the producers whose outputs are missing
    python -m launch.report --force    # run every producer again
    python -m launch.report --only break overfitting

A document cites a file in two ways: a generated block (`<!-- generated: reports/x.md -->`) and an image or link
into reports/ (`![..](reports/x.png)`). Each cited file belongs to exactly one producer below (the script a make
target runs); a producer runs when one of its cited files is missing. A cited file no producer owns is an error,
so a document cannot cite something that nothing regenerates. Finally launch/render_docs.py copies each block's
source between its markers, leaving the prose around it alone.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.render_docs import render

REPO = Path(__file__).resolve().parents[1]

DOCUMENTS = ("experiments.md", "postmortem.md", "docs/performance.md", "docs/distributed.md",
             "docs/inside-the-optimizer.md")
# A link from docs/ reaches reports/ through "../".
CITATION = re.compile(r"<!-- generated: (reports/[^ ]+) -->|\]\((?:\.\./)?(reports/[^)#\s]+)\)")


@dataclass(frozen=True)
class Producer:
    name: str
    module: str  # launch.<module>, run in the root with --out <out>, relative, so reports record relative paths
    out: str
    owns: tuple[str, ...]  # path prefixes, relative to the root
    extra: tuple[str, ...] = field(default=())

    def command(self, root: Path) -> list[str]:
        return [sys.executable, "-m", f"launch.{self.module}", "--out", self.out, *self.extra]


PRODUCERS = (
    Producer("overfit-seeds", "overfit_seeds", "reports/overfit", ("reports/overfit/seeds.md",)),
    Producer("overfit-study", "overfit_study", "reports/overfit",
             ("reports/overfit/study", "reports/overfit/boundary.png", "reports/overfit/curves.png")),
    Producer("break", "break_all", "reports/break", ("reports/break/",)),
    Producer("stability", "stability", "reports/stability", ("reports/stability/",)),
    Producer("scale-study", "scale_study", "reports/scale-study", ("reports/scale-study/",)),
    Producer("overfitting", "overfitting", "reports/overfitting", ("reports/overfitting/",)),
    Producer("scale", "scale", "reports/scale", ("reports/scale/",)),
    Producer("bench", "bench", "reports/bench", ("reports/bench/",)),
    Producer("digits", "digits", "reports/digits", ("reports/digits/digits.md",)),
    Producer("compile", "compile_probe", "reports/digits", ("reports/digits/compile.md",)),
    Producer("optimizer", "inside_optimizer", "reports/optimizer", ("reports/optimizer/",)),
)


def cited_files(text: str) -> list[str]:
    return sorted({m[1] or m[2] for m in CITATION.finditer(text)})


def owner(path: str, producers: tuple[Producer, ...]) -> Producer:
    owners = [p for p in producers if any(path.startswith(prefix) for prefix in p.owns)]
    if len(owners) != 1:
        raise LookupError(f"{path} is cited but {'no producer' if not owners else 'several producers'} own it")
    return owners[0]


def plan(root: Path, documents: tuple[str, ...], producers: tuple[Producer, ...], force: bool,
         only: list[str] | None) -> list[Producer]:
    """The producers to run, in the order given: those owning a missing cited file (all cited ones with force)."""
    chosen: set[str] = set()
    for doc in documents:
        path = root / doc
        if not path.exists():
            continue
        for cited in cited_files(path.read_text()):
            producer = owner(cited, producers)
            if force or not (root / cited).exists():
                chosen.add(producer.name)
    if only is not None:
        unknown = set(only) - {p.name for p in producers}
        if unknown:
            raise LookupError(f"unknown producer(s) {sorted(unknown)}; known: {[p.name for p in producers]}")
        chosen = set(only)
    return [p for p in producers if p.name in chosen]


def regenerate(root: Path = REPO, documents: tuple[str, ...] = DOCUMENTS, producers: tuple[Producer, ...] = PRODUCERS,
               force: bool = False, only: list[str] | None = None) -> list[str]:
    """Run what is needed, fill the blocks; returns the names of the producers that ran."""
    todo = plan(root, documents, producers, force, only)
    for producer in todo:
        print(f"report: running {producer.name}: {' '.join(producer.command(root)[1:])}", flush=True)
        start = time.perf_counter()
        # In the root, with relative paths: the files a regeneration writes never record where the clone lives.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        result = subprocess.run(producer.command(root), cwd=root, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{producer.name} failed with exit code {result.returncode}")
        print(f"report: {producer.name} took {time.perf_counter() - start:.0f} s", flush=True)
    for doc in documents:
        path = root / doc
        if not path.exists():
            continue
        text = path.read_text()
        missing = [c for c in cited_files(text) if not (root / c).exists()]
        if missing:
            raise FileNotFoundError(f"{doc} cites {missing}, which its producer did not write")
        path.write_text(render(text, root))
        print(f"report: rendered {doc}")
    return [p.name for p in todo]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="run every producer, not just those with missing outputs")
    p.add_argument("--only", nargs="+", metavar="PRODUCER", help=f"run just these: {[x.name for x in PRODUCERS]}")
    args = p.parse_args()
    try:
        regenerate(force=args.force, only=args.only)
    except (LookupError, RuntimeError, FileNotFoundError) as e:
        print(f"report: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
