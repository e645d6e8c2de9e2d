"""Writes the documents of another kind that issue 22's rulers score beside the validation books: Debian's
license texts (GPL-3, GPL-2, GFDL-1.3, LGPL-2.1, MPL-2.0 from /usr/share/common-licenses), one JSON line
each, legal English unlike the plays and novels of ../shared/corpus.

    python studies/license_docs.py runs/licenses.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LICENSES = ("GPL-3", "GPL-2", "GFDL-1.3", "LGPL-2.1", "MPL-2.0")
SOURCE = Path("/usr/share/common-licenses")


def main(out: str) -> int:
    missing = [name for name in LICENSES if not (SOURCE / name).is_file()]
    if missing:
        print(f"license_docs.py: {SOURCE} lacks {', '.join(missing)} (Debian's base-files ships them)", file=sys.stderr)
        return 2
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for name in LICENSES:
            path = SOURCE / name
            f.write(json.dumps({"id": name, "source": str(path), "text": path.read_text()}) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
