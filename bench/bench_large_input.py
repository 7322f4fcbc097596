"""Peak memory (and time) for large input: a data file whose first line is 100 MB (then one short row)
ingested into a state file, and a 10 MB text embedded by the SLM's encoder (next to a short one). Each
measurement runs in a fresh process, so its peak RSS (ru_maxrss) is its own; a baseline process (imports
only) is measured the same way.

`--tree` runs the measurements against another checkout of the code (e.g. an export of an older commit), so
before and after can be compared side by side in one run:

    git archive <old commit> | tar -x -C /tmp/before
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice -n 10 .venv/bin/python -m bench.bench_large_input \
        --tree /tmp/before --tree .
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CASES = {
    "baseline (imports only)": """
from freeal_stream import intake, store
from freeal_stream.slm import encoder
""",
    "ingest a 100 MB one-line CSV": """
from freeal_stream.config import parse_job
from freeal_stream.intake import ingest
from freeal_stream.progress import Progress
from freeal_stream.store import Store
job = parse_job({"name": "big", "data": {"path": str(DATA / "one_line.csv")}, "task": {"description": "d",
                 "classes": {"a": ["a"], "b": ["b"]}}, "state_dir": str(DATA / "state")})
s = Store(DATA / "state.duckdb")
ingest(job, s, Progress())
s.close()
""",
    "ingest a 100 MB one-line JSONL": """
from freeal_stream.config import parse_job
from freeal_stream.intake import ingest
from freeal_stream.progress import Progress
from freeal_stream.store import Store
job = parse_job({"name": "big", "data": {"path": str(DATA / "one_line.jsonl")}, "task": {"description": "d",
                 "classes": {"a": ["a"], "b": ["b"]}}, "state_dir": str(DATA / "state")})
s = Store(DATA / "state2.duckdb")
ingest(job, s, Progress())
s.close()
""",
    "embed a short text (max_length 64)": """
import torch
torch.set_num_threads(1)
from freeal_stream.slm.encoder import Encoder
enc = Encoder("all-MiniLM-L6-v2", max_length=64)
enc.embed(["a short text"])
""",
    "embed a 10 MB text (max_length 64)": """
import torch
torch.set_num_threads(1)
from freeal_stream.slm.encoder import Encoder
enc = Encoder("all-MiniLM-L6-v2", max_length=64)
enc.embed([(DATA / "ten_mb.txt").read_text()])
""",
}

_RUNNER = """
import json, resource, sys, time
from pathlib import Path
DATA = Path(sys.argv[1])
t = time.perf_counter()
exec(sys.argv[2])
print(json.dumps({"seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def make_data(folder: Path) -> None:
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 2).split()
    line = " ".join(words[i % len(words)] for i in range(18_000_000))[:100_000_000]
    (folder / "one_line.csv").write_text("text\n" + line + "\na short row\n", encoding="utf-8")
    (folder / "one_line.jsonl").write_text(json.dumps({"text": line}) + '\n{"text": "a short row"}\n', encoding="utf-8")
    (folder / "ten_mb.txt").write_text(line[:10_000_000], encoding="utf-8")


def measure(tree: Path, data: Path, code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(data), code],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="a checkout to measure (repeatable; default .)")
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.tree or ["."]]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        make_data(data)
        for name, code in _CASES.items():
            for tree in trees:
                for f in data.glob("state*"):
                    f.unlink() if f.is_file() else None
                print(json.dumps({"case": name, "tree": str(tree), **measure(tree, data, code)}), flush=True)


if __name__ == "__main__":
    main()
