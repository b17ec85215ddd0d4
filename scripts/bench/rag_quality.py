"""Retrieval quality on a labeled set: Python's own language reference topics
(`pydoc_data.topics`, shipped with CPython) as documents, and questions
written for this set whose answering topic is known. Reports recall@3 and
MRR@10 per search mode, and the ingest and search times seen from a client.

    python3 scripts/bench/rag_quality.py http://127.0.0.1:8000 [--rerank]

The server needs an embedding model; the collection `pydoc` is replaced.
"""

import json
import statistics
import sys
import time
import urllib.request

import pydoc_data.topics

# (question, the topics that answer it). Phrased as a user would ask, not
# copied from the text.
QUESTIONS = [
    ("How do I check a condition and stop with an error while debugging?", ["assert"]),
    ("How does unpacking several values into several variables work?", ["assignment"]),
    ("What does x += 1 do to a list compared with x = x + 1?", ["augassign"]),
    ("How do I suspend a coroutine until an awaitable finishes?", ["await"]),
    ("How do I leave a loop early?", ["break"]),
    ("How do I skip the rest of the loop body and go to the next iteration?", ["continue"]),
    ("How do I define a class that inherits from a base class?", ["class"]),
    ("What is the difference between == and is when comparing objects?", ["comparisons"]),
    ("Which methods must an object define to be used in a with statement?", ["context-managers", "with"]),
    ("How do I handle an exception and always run cleanup code?", ["try"]),
    ("How do I delete a variable or remove an item from a list by index?", ["del"]),
    ("What methods does a dictionary have, like get, setdefault and update?", ["typesmapping"]),
    ("How do I write a dictionary comprehension?", ["dict"]),
    ("How do I raise an exception from another exception?", ["raise"]),
    ("How do I give back a value from a function?", ["return"]),
    ("How do generator functions produce values one at a time?", ["yield"]),
    ("How do I change a module-level variable from inside a function?", ["global"]),
    ("How do I assign to a variable of an enclosing function?", ["nonlocal"]),
    ("How do I write a small anonymous function inline?", ["lambda"]),
    ("How do I load a module or import a name from a package?", ["import"]),
    ("How does a for loop iterate over the items of a sequence?", ["for"]),
    ("When does the else clause of a while loop run?", ["while"]),
    ("Which values count as false in a boolean context?", ["truth"]),
    ("How do I set the width and precision of a number in a format string?", ["formatstrings"]),
    ("Which string methods split, strip and join text?", ["string-methods"]),
    ("How do I write a raw string or use escape sequences in string literals?", ["strings"]),
    ("How does slicing with a step work?", ["slicings"]),
    ("Which operations do all sequences support, like len, min and concatenation?", ["typesseq"]),
    ("How do I append to a list or sort it in place?", ["typesseq-mutable"]),
    ("Which operators bind tighter than others?", ["operator-summary"]),
    ("How do the bitwise and, or and exclusive or operators work?", ["bitwise"]),
    ("What does the power operator return for a negative exponent?", ["power"]),
    ("How do the left and right shift operators work?", ["shifting"]),
    ("How are floating point numbers written as literals?", ["floating", "numbers"]),
    ("How do I write an integer in hexadecimal or binary?", ["integers", "numbers"]),
    ("How do I write a complex number literal?", ["imaginary", "numbers"]),
    ("How can a class customize what happens when a missing attribute is read?", ["attribute-access"]),
    ("Which special methods control how an object is printed and initialized?", ["customization", "specialnames"]),
    ("How do I set a breakpoint and step through code with pdb?", ["debugger"]),
    ("What is the None object?", ["bltin-null-object"]),
    ("What is the Ellipsis object used for?", ["bltin-ellipsis-object"]),
    ("How do default argument values and annotations work in a function definition?", ["function"]),
    ("How are names bound and looked up in nested scopes?", ["naming"]),
    ("What does the pass statement do?", ["pass"]),
    ("What does the __dict__ attribute of an object hold?", ["specialattrs"]),
    ("How do I write a coroutine with async def, async for and async with?", ["async"]),
    ("What happens to positional and keyword arguments in a call?", ["calls"]),
    ("How do I test whether a value is in a container?", ["in"]),
    ("How do the and, or and not operators evaluate?", ["booleans"]),
    ("How do I make my class behave like a container with __getitem__ and __len__?", ["sequence-types"]),
    ("How do I make my class support arithmetic operators like __add__?", ["numeric-types"]),
    ("How do I make instances of my class callable?", ["callable-types"]),
    ("What is a bound method and how is it different from a function?", ["typesmethods"]),
    ("How are exceptions propagated and handled at run time?", ["exceptions"]),
    ("What are identifiers with leading and trailing double underscores reserved for?", ["id-classes"]),
    ("How do I write a list display?", ["lists"]),
    ("How do the unary minus and invert operators work?", ["unary"]),
    ("How do I index a container with square brackets?", ["subscriptions"]),
]


def call(base, path, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def main():
    base = sys.argv[1].rstrip("/")
    rerank = "--rerank" in sys.argv
    topics = pydoc_data.topics.topics
    try:
        call(base, "/v1/rag/collections/pydoc", method="DELETE")
    except urllib.error.HTTPError:
        pass
    names = sorted(topics)
    started = time.perf_counter()
    answer = call(base, "/v1/rag/documents", {
        "texts": [topics[n] for n in names], "ids": names, "collection": "pydoc",
        "metadata": [{"source": n} for n in names],
    })
    elapsed = time.perf_counter() - started
    chunks = answer["chunks"]
    print(f"ingest: {len(names)} topics, {chunks} chunks, {answer['embedded_tokens']} tokens "
          f"in {elapsed:.1f} s ({chunks / elapsed:.0f} chunks/s)")
    modes = [("dense", False), ("sparse", False), ("hybrid", False)]
    if rerank:
        modes += [("dense", True), ("hybrid", True)]
    print("\n| mode | recall@1 | recall@3 | MRR@10 | search p50 ms | p95 ms |")
    print("|---|---|---|---|---|---|")
    for mode, reranked in modes:
        ranks, times = [], []
        for question, expected in QUESTIONS:
            t0 = time.perf_counter()
            result = call(base, "/v1/rag/search", {
                "query": question, "collection": "pydoc", "mode": mode, "top_k": 30,
                "score_threshold": -1.0, "rerank": reranked,
            })
            times.append((time.perf_counter() - t0) * 1000)
            documents = []
            for hit in result["results"]:
                if hit["document_id"] not in documents:
                    documents.append(hit["document_id"])
            rank = next((i + 1 for i, d in enumerate(documents[:10]) if d in expected), None)
            ranks.append(rank)
        n = len(ranks)
        recall1 = sum(1 for r in ranks if r == 1) / n
        recall3 = sum(1 for r in ranks if r and r <= 3) / n
        mrr = sum(1 / r for r in ranks if r) / n
        times.sort()
        p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
        name = mode + (" + rerank" if reranked else "")
        print(f"| {name} | {recall1:.2f} | {recall3:.2f} | {mrr:.3f} | "
              f"{statistics.median(times):.1f} | {p95:.1f} |")


if __name__ == "__main__":
    main()
