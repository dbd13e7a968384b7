#!/usr/bin/env python3
"""Writes a generated text corpus for the MapReduce word count: make-corpus.py MEGABYTES OUT [SEED].

Words follow a Zipf-like distribution over a vocabulary of about 30,000 words: lower, upper and
mixed case, digits, and non-ASCII letters, separated by spaces, punctuation and line breaks.
The same seed gives the same file."""
import random
import sys


def vocabulary(rng):
    letters = "abcdefghijklmnopqrstuvwxyz"
    extra = ["straße", "épée", "über", "naïve", "ωmega", "привет", "東京", "x2", "v1_0"]
    words = set(extra)
    while len(words) < 30_000:
        n = rng.randint(1, 12)
        w = "".join(rng.choice(letters) for _ in range(n))
        if rng.random() < 0.05:
            w += str(rng.randint(0, 999))
        words.add(w)
    words = sorted(words)
    rng.shuffle(words)
    return words


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: make-corpus.py MEGABYTES OUT [SEED]")
    target = int(float(sys.argv[1]) * 1_000_000)
    out = sys.argv[2]
    rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 7)
    words = vocabulary(rng)
    weights = [1.0 / (i + 1) for i in range(len(words))]
    seps = [" "] * 12 + [", ", ". ", "; ", "\n", " - ", "!", "? ", "'", "\"", " (", ") ", "—"]
    written = 0
    with open(out, "w", encoding="utf-8") as f:
        while written < target:
            batch = rng.choices(words, weights=weights, k=20_000)
            parts = []
            for w in batch:
                r = rng.random()
                if r < 0.05:
                    w = w.upper()
                elif r < 0.15:
                    w = w.capitalize()
                parts.append(w)
                parts.append(rng.choice(seps))
            text = "".join(parts)
            f.write(text)
            written += len(text.encode("utf-8"))


if __name__ == "__main__":
    main()
