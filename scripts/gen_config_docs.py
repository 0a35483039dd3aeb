"""Generate docs/configuration.md from the config schema (never edit that file by hand).

gen_config_docs.py           rewrite docs/configuration.md
gen_config_docs.py --check   exit 1 when docs/configuration.md differs from the schema
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.config.reference import markdown  # noqa: E402

TARGET = ROOT / "docs" / "configuration.md"


def main(argv: list[str]) -> int:
    text = markdown()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run scripts/gen_config_docs.py")
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
