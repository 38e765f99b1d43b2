"""Time the README's first command as a new user meets it: a fresh clone of the committed HEAD, then the command
verbatim (it makes a virtual environment, installs tinymnist and torch, and trains the answer).

    python scripts/time_first_command.py [--data-dir DIR] [--out results/first-command-time.json]

With --data-dir (or $TINYMNIST_DATA) the MNIST files are taken from there, as offline machines must; without it the
command downloads them, and that download is part of the time. The result, with the host as the machine reports it
(tinymnist.accel.device.cpu_info), the commit and the Python version, is written atomically; the README's set-up line is
generated from it by `tinymnist report`. Run it on a machine doing nothing else: it measures wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tinymnist.accel.device import cpu_info  # noqa: E402
from tinymnist.fileio import write_json  # noqa: E402


def first_command() -> str:
    """The README's first command, exactly as the README shows it."""
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("TINYMNIST_DATA"))
    parser.add_argument("--out", default=str(ROOT / "results" / "first-command-time.json"))
    args = parser.parse_args(argv)
    command = first_command()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    if args.data_dir:
        env["TINYMNIST_DATA"] = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "tinymnist"
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if done.returncode != 0:
        print(f"time_first_command: the command failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}",
              file=sys.stderr)
        return 1
    result = {"command": command, "seconds": round(seconds, 1), "commit": commit,
              "data": "from TINYMNIST_DATA (no download)" if args.data_dir else "downloaded",
              "started": started,
              "python": platform.python_version(), "hardware": cpu_info(),
              "last_line": done.stdout.strip().splitlines()[-1]}
    write_json(args.out, result)
    print(f"wrote {args.out}: {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
