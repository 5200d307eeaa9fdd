"""A training-data folder of N distinct instruction/response rows, for the data stages at production size.

    python benchmarks/make_rows.py --rows 1000000 --out /tmp/rows-1m                  # JSON Lines, 10 files
    python benchmarks/make_rows.py --rows 1000000 --format parquet --files 4 --out /tmp/rows-1m-parquet
    python benchmarks/data_speed.py --raw /tmp/rows-1m --out benchmarks/results/cpu-data-1m.json

Rows look like the project's: a question on one of its five topics and an answer of two to four sentences
(about 60-120 tokens each), every instruction distinct, every answer its own, so the dedupe, conflict and
leak checks have real work and nothing to reject. Formats: jsonl, csv, parquet (the readers' suffixes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOPICS = {
    "business_finance": ["budget", "loan", "invoice", "savings plan", "pension", "stock", "bond", "tax return"],
    "education": ["lesson", "exam", "essay", "lecture", "course", "library", "study plan", "thesis"],
    "environment": ["forest", "river", "glacier", "wetland", "compost heap", "wind farm", "coral reef", "meadow"],
    "health_wellness": ["diet", "workout", "sleep routine", "vaccine", "checkup", "posture", "stretch", "habit"],
    "science_technology": ["battery", "compiler", "satellite", "router", "sensor", "database", "laser", "microscope"],
}
QUESTIONS = ["How do I improve my {s}", "What makes a good {s}", "Why does a {s} fail", "How is a {s} measured",
             "What should I know before I start a {s}", "How does a {s} change over time"]  # fmt: skip
SENTENCES = [
    "Start with the goal of the {s} and write it down in one line.",
    "Measure it the same way each week so that changes are real and not noise.",
    "Small steps repeated often beat large ones made once.",
    "Ask someone who has done it for the one mistake they would avoid.",
    "Keep a record, because memory flatters what went well.",
    "Compare the cost with what it returns before you commit more to it.",
]


def row(n: int) -> dict:
    topic = list(TOPICS)[n % len(TOPICS)]
    subject = TOPICS[topic][(n // len(TOPICS)) % len(TOPICS[topic])]
    question = QUESTIONS[(n // 40) % len(QUESTIONS)].format(s=subject)
    answer = " ".join(SENTENCES[(n + k) % len(SENTENCES)].format(s=subject) for k in range(2 + n % 3))
    return {"instruction": f"{question} (case {n})?", "response": f"For case {n}: {answer}", "topic": topic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--format", choices=["jsonl", "csv", "parquet"], default="jsonl")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import pandas as pd

    args.out.mkdir(parents=True, exist_ok=True)
    per_file = -(-args.rows // args.files)
    for index in range(args.files):
        rows = [row(n) for n in range(index * per_file, min(args.rows, (index + 1) * per_file))]
        path = args.out / f"part-{index:03d}.{args.format}"
        if args.format == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        elif args.format == "csv":
            pd.DataFrame(rows).to_csv(path, index=False)
        else:
            pd.DataFrame(rows).to_parquet(path, index=False)
    print(json.dumps({"rows": args.rows, "files": args.files, "format": args.format, "folder": str(args.out)}))


if __name__ == "__main__":
    main()
