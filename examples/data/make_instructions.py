#!/usr/bin/env python3
"""Writes examples/data/instructions.jsonl and instructions_eval.jsonl.

The README demo fine-tunes a LoRA on a random tiny Llama (written by
`ftune-rank init-model`). A random model can only learn what is regular, so
every task here is templated: arithmetic, unit conversions, string reversal
and upper-casing, sorting, next/previous weekday, capital cities and a few
fixed how-to answers. Each record is a conversation in the `messages` format
(an optional system turn, then user/assistant turns; some have two rounds),
the layout of HuggingFaceH4/no_robots. The content is original and generated
here; nothing is copied from a dataset.

Deterministic: the same script writes the same bytes (random.Random with a
fixed seed; no hash-order or time dependence). Standard library only.

    python3 examples/data/make_instructions.py            # writes next to itself
    python3 examples/data/make_instructions.py --out DIR  # elsewhere
"""
import argparse
import json
import os
import random

SEED = 20261121
NUM_TRAIN = 400
NUM_EVAL = 40

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a careful assistant who shows the answer plainly.",
]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Greece", "Athens"),
    ("Hungary", "Budapest"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"), ("Colombia", "Bogotá"), ("Peru", "Lima"),
    ("Australia", "Canberra"), ("Turkey", "Ankara"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Morocco", "Rabat"),
]

CAPITAL_QUESTIONS = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
]

UNITS = [
    # (from, its singular, to, factor)
    ("kilometers", "kilometer", "meters", 1000),
    ("meters", "meter", "centimeters", 100),
    ("kilograms", "kilogram", "grams", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("liters", "liter", "milliliters", 1000),
    ("days", "day", "hours", 24),
    ("feet", "foot", "inches", 12),
]

WORDS = [
    "apple", "planet", "garden", "rocket", "silver", "window", "python", "castle",
    "forest", "bridge", "candle", "yellow", "marble", "pencil", "orange", "dragon",
    "summer", "winter", "button", "rabbit", "mirror", "harbor", "jungle", "violet",
    "kitten", "ladder", "meadow", "nickel", "oyster", "pepper", "quartz", "saddle",
]

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

HOWTO = [
    ("How do I boil an egg?",
     "Put the egg in boiling water for 9 minutes, then cool it in cold water and peel it."),
    ("How do I make a cup of tea?",
     "Boil water, pour it over a tea bag in a cup, wait 3 minutes, then remove the bag."),
    ("How do I reverse a list in Python?",
     "Use my_list.reverse() to reverse it in place, or my_list[::-1] to get a reversed copy."),
    ("How do I check my disk space on Linux?",
     "Run df -h to see the free space of every mounted file system."),
    ("How do I count the lines of a file on Linux?",
     "Run wc -l FILE; it prints the number of lines followed by the file name."),
    ("How do I undo my last git commit but keep the changes?",
     "Run git reset --soft HEAD~1; the changes stay staged."),
    ("How do I water a cactus?",
     "Water it deeply every two to three weeks and let the soil dry out in between."),
    ("How do I remember a new word?",
     "Say it aloud, write it in a sentence, and review it again the next day."),
]


def arithmetic(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["plus", "minus", "times"])
    if op == "plus":
        return f"What is {a} plus {b}?", f"{a} + {b} = {a + b}."
    if op == "minus":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} - {b} = {a - b}."
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} x {b} = {a * b}."


def conversion(rng):
    src, one, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 20)
    return (f"Convert {n} {src} to {dst}.",
            f"{n} {src} is {n * factor} {dst}, because 1 {one} is {factor} {dst}.")


def reverse_word(rng):
    w = rng.choice(WORDS)
    return f'Reverse the word "{w}".', f'"{w}" reversed is "{w[::-1]}".'


def upper_case(rng):
    words = " ".join(rng.sample(WORDS, 2))
    return f'Write "{words}" in capital letters.', f'"{words}" in capital letters is "{words.upper()}".'


def sort_numbers(rng):
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    listed = ", ".join(map(str, nums))
    return (f"Sort these numbers from smallest to largest: {listed}.",
            f"From smallest to largest: {', '.join(map(str, sorted(nums)))}.")


def weekday(rng):
    i = rng.randrange(7)
    if rng.random() < 0.5:
        return f"What day comes after {WEEKDAYS[i]}?", f"{WEEKDAYS[(i + 1) % 7]} comes after {WEEKDAYS[i]}."
    return f"What day comes before {WEEKDAYS[i]}?", f"{WEEKDAYS[(i - 1) % 7]} comes before {WEEKDAYS[i]}."


def capital(rng):
    country, city = rng.choice(CAPITALS)
    q = rng.choice(CAPITAL_QUESTIONS).format(country=country)
    return q, f"The capital of {country} is {city}."


def howto(rng):
    return rng.choice(HOWTO)


TASKS = [arithmetic, conversion, reverse_word, upper_case, sort_numbers, weekday, capital, howto]


def record(rng):
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    rounds = 2 if rng.random() < 0.15 else 1
    for _ in range(rounds):
        user, assistant = rng.choice(TASKS)(rng)
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages}


def write(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    rng = random.Random(SEED)
    train, seen = [], set()
    eval_rng = random.Random(SEED + 1)
    evals = []
    # Held-out records: no eval conversation also appears in training.
    while len(evals) < NUM_EVAL:
        r = record(eval_rng)
        key = json.dumps(r)
        if key not in seen:
            seen.add(key)
            evals.append(r)
    eval_keys = set(seen)
    while len(train) < NUM_TRAIN:
        r = record(rng)
        if json.dumps(r) not in eval_keys:
            train.append(r)
    write(os.path.join(args.out, "instructions.jsonl"), train)
    write(os.path.join(args.out, "instructions_eval.jsonl"), evals)
    print(f"wrote {len(train)} training and {len(evals)} eval records to {args.out}")


if __name__ == "__main__":
    main()
