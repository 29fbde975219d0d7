"""Write word problems of the embedded task's arithmetic (difficulty 1: two 2-digit numbers, + or -) in
sentence shapes the embedded task never uses, plain or varied, as a MATH-style jsonl ({problem, answer}):
a check of whether a trained model learned the arithmetic or the template.

    python benchmarks/other_phrasings.py --out /tmp/other_phrasings.jsonl
    python -m shell.evaluate --model.name-or-path runs/<run>/final --data.path /tmp/other_phrasings.jsonl --data.limit 200

The numbers are drawn from the embedded task's validation expressions (never trained on).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ADD = (
    "A baker made {a} loaves in the morning and {b} more in the afternoon. How many loaves did the baker make?",
    "What is the sum of {a} and {b}?",
    "A train carries {a} passengers. At the next station {b} more get on. How many passengers are on the train?",
    "There were {a} birds in a tree and {b} more birds landed. How many birds are in the tree?",
    "Add {b} to {a}. What number do you get?",
    "A library had {a} visitors on Monday and {b} on Tuesday. How many visitors came over the two days?",
    "Our team scored {a} points in the first half and {b} points in the second half. What was our total score?",
    "If a farmer plants {a} trees and then plants {b} more, how many trees has the farmer planted?",
)
SUB = (
    "A shop had {a} umbrellas and sold {b} of them. How many umbrellas remain?",
    "What is {a} minus {b}?",
    "There were {a} fish in the pond. {b} fish were caught. How many fish are still in the pond?",
    "A bus left the depot with {a} seats free; {b} people sat down. How many seats are still free?",
    "Subtract {b} from {a}. What is left?",
    "A jar held {a} marbles until a child took {b} out. How many marbles are in the jar now?",
    "The temperature was {a} degrees and dropped by {b} degrees. What is the temperature now?",
    "A book has {a} pages and I have read {b}. How many pages do I still have to read?",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/other_phrasings.jsonl")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from shell.data import embedded_dataset
    from shell.files import atomic_write_jsonl

    rng = random.Random(a.seed)
    problems = embedded_dataset(split="validation", n=a.n, seed=a.seed)
    rows = []
    for ex in problems:
        left, op, right = ex.meta["expression"].split()
        template = rng.choice(ADD if op == "+" else SUB)
        rows.append({"problem": template.format(a=left, b=right), "answer": ex.answer})
    atomic_write_jsonl(a.out, rows)
    print(f"wrote {len(rows)} problems to {a.out}")


if __name__ == "__main__":
    main()
