"""Fill the generated blocks of experiments.md and postmortem.md from the report files.

A block is
    <!-- generated: reports/break/break.md -->
    ...replaced text...
    <!-- end generated -->
Only the text between the markers changes, so the prose around them survives
every regeneration. A missing report file is an error naming it: run the make
target that produces it.

    python -m launch.render_docs [experiments.md postmortem.md ...]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated: (?P<src>[^ ]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def render(text: str, root: Path = ROOT) -> str:
    def fill(m: re.Match) -> str:
        src = root / m["src"]
        if not src.exists():
            raise FileNotFoundError(f"{m['src']} is missing: run the make target that generates it")
        return m.group(1) + src.read_text().rstrip("\n") + "\n" + m.group(4)

    return BLOCK.sub(fill, text)


def main(paths: list[str]) -> int:
    for name in paths or ["experiments.md", "postmortem.md", "docs/performance.md", "docs/distributed.md"]:
        path = ROOT / name
        if not path.exists():
            continue
        try:
            new = render(path.read_text())
        except FileNotFoundError as e:
            print(f"render_docs: {name}: {e}", file=sys.stderr)
            return 1
        path.write_text(new)
        print(f"rendered {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
