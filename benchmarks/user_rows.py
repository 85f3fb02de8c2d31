"""Text rows of many users as JSONL files, each user's rows spread over several files, for the
scale benchmarks that run the CLI on real files."""
from __future__ import annotations

import json
from pathlib import Path


def write_jsonl_users(folder: Path, users: int, rows: int, files: int = 8) -> None:
    """`rows` rows for each of `users` users (`user-0000000`, …) into `files` JSONL files in `folder`."""
    folder.mkdir(parents=True)
    outs = [(folder / f"part-{i}.jsonl").open("w") for i in range(files)]
    for user in range(users):
        for row in range(rows):
            text = f"user {user} writes row {row} in their own style"
            outs[(user + row) % files].write(json.dumps({"user_id": f"user-{user:07d}", "text": text}) + "\n")
    for out in outs:
        out.close()
