"""Regenerate the Python code of protos/plexrec/v1/*.proto, importable as ``protos.plexrec.v1``.

    python -m protos.generate          # rewrite the generated files
    python -m protos.generate --check  # exit 1 if the checked-in files are stale

grpc_tools writes top-level imports such as ``from plexrec.v1 import x_pb2``;
they are rewritten to ``from protos.plexrec.v1 import ...`` so the generated code
works as a package without touching sys.path.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = sorted((HERE / "plexrec" / "v1").glob("*.proto"))
IMPORT = re.compile(r"^(from |import )plexrec\.v1", re.MULTILINE)


def generate(out: Path) -> dict[Path, str]:
    """Run protoc into ``out``; returns {path relative to protos/: fixed source}."""
    from grpc_tools import protoc

    args = ["protoc", f"-I{HERE}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    args += [str(p.relative_to(HERE)) for p in PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: see the message above")
    files = {}
    for path in sorted(out.rglob("*.py*")):
        text = IMPORT.sub(lambda m: f"{m.group(1)}protos.plexrec.v1", path.read_text())
        if path.name.endswith("_grpc.py") and "def " not in text.split("GRPC_GENERATED_VERSION", 1)[-1]:
            continue  # a messages-only proto gets an empty service module; skip it
        files[path.relative_to(out)] = text
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the generated files are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
    stale = [rel for rel, text in files.items()
             if not (HERE / rel).exists() or (HERE / rel).read_text() != text]
    if args.check:
        if stale:
            sys.exit(f"stale generated code: {', '.join(map(str, stale))}; run `python -m protos.generate`")
        print("generated code is up to date")
        return
    for rel in stale:
        (HERE / rel).parent.mkdir(parents=True, exist_ok=True)
        (HERE / rel).write_text(files[rel])
        print(f"wrote protos/{rel}")


if __name__ == "__main__":
    main()
