"""Generate the calc dataset: arithmetic word problems in simple English, graded by difficulty, seeded.

Levels (share of each split): 1 = one-step addition of numbers 2-9 (30%), 2 = one-step addition or
subtraction up to 99 (25%), 3 = one-step multiplication or exact division (25%), 4 = two steps (20%).
Answers are non-negative integers. Train and val never share a question.

    python -m examples.calc.make_dataset            # rewrites examples/calc/data/{train,val}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
SEED = 1234
LEVEL_SHARES = {1: 0.30, 2: 0.25, 3: 0.25, 4: 0.20}

NAMES = ["Tom", "Anna", "Sam", "Mia", "Ben", "Lucy", "Max", "Emma", "Leo", "Zoe", "Jack", "Lily", "Noah"]
ITEMS = ["apples", "pens", "cookies", "marbles", "stickers", "books", "eggs", "cards", "candies", "flowers"]
ITEMS += ["toys", "balls", "shells", "stamps", "crayons"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"), ("pack", "packs")]

Problem = tuple[str, int]


def _add_small(rng: random.Random) -> Problem:
    name, items, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        return (
            f"{name} has {a} {items}. {name} gets {b} more {items}. How many {items} does {name} have now?",
            a + b,
        )
    return (
        f"There are {a} {items} on the table and {b} {items} in a bag. How many {items} are there in total?",
        a + b,
    )


def _add_sub(rng: random.Random) -> Problem:
    name, other, items = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return (
            f"{name} has {a} {items} and {other} has {b} {items}. How many {items} do they have together?",
            a + b,
        )
    big, small = max(a, b), min(a, b)
    return (
        f"{name} had {big} {items}. {name} gave away {small} {items}. How many {items} does {name} have left?",
        big - small,
    )


def _mul_div(rng: random.Random) -> Problem:
    name, items, (box, boxes) = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if rng.random() < 0.5:
        return (
            f"{name} has {a} {boxes}. Each {box} has {b} {items}. How many {items} does {name} have?",
            a * b,
        )
    return (
        f"{name} shares {a * b} {items} equally among {a} friends. How many {items} does each friend get?",
        b,
    )


def _two_step(rng: random.Random) -> Problem:
    name, other, items = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    (box, boxes), a, b = rng.choice(CONTAINERS), rng.randint(2, 9), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        c = rng.randint(1, a * b - 1)
        text = f"{name} has {a} {boxes} with {b} {items} in each {box}. {name} gives away {c} {items}."
        return f"{text} How many {items} are left?", a * b - c
    if kind == 1:
        c = rng.randint(2, 30)
        text = f"{name} buys {a} {boxes} of {items} with {b} in each {box}. {other} gives {name} {c} more {items}."
        return f"{text} How many {items} does {name} have now?", a * b + c
    if kind == 2:
        money = rng.randint(a * b, a * b + 40)
        text = f"{name} has {money} dollars. {name} buys {a} {items} that cost {b} dollars each."
        return f"{text} How many dollars does {name} have left?", money - a * b
    total = a * b
    first = rng.randint(1, total - 1)
    text = f"{name} has {first} {items} and finds {total - first} more. {name} puts them equally into {a} {boxes}."
    return f"{text} How many {items} are in each {box}?", b


GENERATORS: dict[int, Callable[[random.Random], Problem]] = {
    1: _add_small,
    2: _add_sub,
    3: _mul_div,
    4: _two_step,
}


def level_counts(n: int) -> dict[int, int]:
    """How many problems of each level a split of ``n`` holds (shares rounded, remainder to level 1)."""
    counts = {level: int(n * share) for level, share in LEVEL_SHARES.items()}
    counts[1] += n - sum(counts.values())
    return counts


def make_split(name: str, n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    """``n`` unique problems not in ``taken`` (which grows), shuffled, with ids ``calc-{name}-NNNN``."""
    rows = []
    for level, count in level_counts(n).items():
        made = 0
        while made < count:
            question, answer = GENERATORS[level](rng)
            if question not in taken:
                taken.add(question)
                rows.append({"question": question, "answer": answer, "level": level})
                made += 1
    rng.shuffle(rows)
    return [{"id": f"calc-{name}-{i:04d}", **row} for i, row in enumerate(rows)]


def generate(seed: int = SEED, n_train: int = 2000, n_val: int = 100) -> dict[str, list[dict]]:
    """Both splits, deterministically from ``seed``; val is drawn first, train avoids its questions."""
    rng, taken = random.Random(seed), set()
    val = make_split("val", n_val, rng, taken)
    train = make_split("train", n_train, rng, taken)
    return {"train": train, "val": val}


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    for split, rows in generate(args.seed, args.train, args.val).items():
        write_jsonl(rows, args.out / f"{split}.jsonl")
        print(f"{split}: {len(rows)} rows -> {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
