"""The benchmark's task set: grounded work (the answer is largely in the prompt) and open-ended chat.

Shipped as package data (``mlx_elm/data/speculative_tasks.jsonl``, one JSON object per line:
``id``, ``kind`` = grounded | chat | long, ``task``, ``prompt``, ``source``). Grounded tasks
cover what people do with pasted text: quote, summarize, extract fields, rewrite a paragraph,
edit a code file, answer from a document. ``long`` is one ~8K-token document with a question at
its end (the SnapKV measurement). Excerpts come from the CPython 3.11 tutorial (PSF documentation
licence); the rest is written here. Rebuild the file with::

    python -m mlx_elm.speculative.tasks --docs /usr/share/doc/python3.11/html/_sources \\
        --out mlx_elm/data/speculative_tasks.jsonl

(the docs path is read only then; the shipped file is all the bench needs).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import SpeculativeError

KINDS = ("grounded", "chat", "long")
PACKAGE_FILE = "speculative_tasks.jsonl"


@dataclass(frozen=True)
class Task:
    id: str
    kind: str
    task: str
    prompt: str
    source: str


def load_tasks(path: Optional[Path] = None, kinds: Sequence[str] = ("grounded", "chat")) -> List[Task]:
    """The shipped tasks (or those of ``path``) of the given kinds."""
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise SpeculativeError(f"unknown task kind {bad[0]!r}; use {', '.join(KINDS)}")
    if path is None:
        text = resources.files("mlx_elm").joinpath("data", PACKAGE_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    tasks = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            task = Task(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as e:
            raise SpeculativeError(f"line {n} of the task file is not a task ({e}); rebuild it with "
                                   "python -m mlx_elm.speculative.tasks") from e
        if task.kind in kinds:
            tasks.append(task)
    return tasks


# --- building the file -------------------------------------------------------------------------------------
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")


def clean_rst(text: str) -> str:
    """reStructuredText → plain text: roles to their text, no directives or labels, ``x`` → `x`."""
    lines, skip = [], False
    for line in text.splitlines():
        if line.startswith(".. "):
            skip = True  # a directive or label, and its indented body
            continue
        if skip and (line.startswith("   ") or not line.strip()):
            if not line.strip():
                skip = False
            continue
        skip = False
        if line.strip() and set(line.strip()) <= set("=-*^~"):
            continue  # a heading's underline
        lines.append(line)
    out = "\n".join(lines)
    out = _ROLE.sub(lambda m: m.group(1), out)
    out = out.replace("``", "`").replace("::\n", ":\n")
    return re.sub(r"\n{3,}", "\n\n", out).strip() + "\n"


def section(text: str, title: str, stop: Optional[str] = None) -> str:
    """The cleaned text from heading ``title`` up to heading ``stop`` (or the end)."""
    clean = clean_rst(text)
    start = clean.index(title)
    end = clean.index(stop, start + len(title)) if stop else len(clean)
    return clean[start:end].strip()


EMAIL = """From: Maria Lindqvist <maria.lindqvist@example.org>
To: orders@northwind-books.example
Date: Tue, 4 March 2025 09:12
Subject: Order NB-48213 arrived damaged

Hello,

I received order NB-48213 yesterday (placed on 24 February). Two of the three books were fine, but
"The Art of Field Recording" (hardcover, 34.90 EUR) arrived with a torn cover and water damage on
the first forty pages. The other items were "Maps of the Baltic Coast" (19.50 EUR) and "A Short
History of Lighthouses" (24.00 EUR), so the order total was 78.40 EUR including free shipping.

I would prefer a replacement rather than a refund. My delivery address is unchanged:
Sjögatan 14, 413 04 Göteborg, Sweden. You can reach me on +46 31 555 0142 during office hours.

Kind regards,
Maria Lindqvist
"""

MEETING = """Project Falcon weekly sync, 12 May

Present: Aiko (lead), Bruno, Chen, Dalia.

Aiko opened with the release status: the beta build is feature complete but the installer still
fails on machines without a network connection. Bruno will rewrite the installer's download step
so that it falls back to the bundled packages, and he expects to finish by Thursday. Chen reported
that the crash in the export dialog is fixed on macOS; the same fix still has to be ported to
Windows, which Chen will do after the code review with Dalia on Wednesday. Dalia raised that the
user guide still shows screenshots of the old settings page; she will replace them before the
release candidate. The team agreed to move the release candidate from 20 May to 23 May. Aiko will
tell the support team about the new date today.
"""

TYPOS = """Their are many reason why people enjoy walking in the mountains. The air is fresh and
clean, the views is beautifull, and the quiet help you to think more clearly. Many walkers says
that a long day on the trail make them sleep better then anything else. However, it is importent
to prepare carefuly: check the wheather before you leave, bring enough water, and allways tell
someone where you are going. A good pair of boots and a map can make the diffrence between a
pleasant day and a dangerous one."""

CODE = '''import csv
from pathlib import Path


def load_rows(path):
    """Read a CSV file and return its rows as dictionaries."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def total_by_customer(rows):
    totals = {}
    for row in rows:
        name = row["customer"]
        totals[name] = totals.get(name, 0.0) + float(row["amount"])
    return totals


def write_report(totals, out_path):
    lines = [f"{name}: {amount:.2f}" for name, amount in sorted(totals.items())]
    Path(out_path).write_text("\\n".join(lines) + "\\n")


def main(in_path, out_path):
    rows = load_rows(in_path)
    totals = total_by_customer(rows)
    write_report(totals, out_path)
    print(f"wrote {len(totals)} customers to {out_path}")


if __name__ == "__main__":
    main("sales.csv", "report.txt")
'''

SERVER = '''from http.server import HTTPServer, SimpleHTTPRequestHandler

HOST = "127.0.0.1"
PORT = 8080
DIRECTORY = "public"


class Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=DIRECTORY, **kwargs)

    def log_message(self, format, *args):
        print("[server]", format % args)


def serve():
    server = HTTPServer((HOST, PORT), Handler)
    print(f"serving {DIRECTORY} on http://{HOST}:{PORT}")
    server.serve_forever()


if __name__ == "__main__":
    serve()
'''

CHAT = [
    ("poem", "Write a short poem about the first snow of winter."),
    ("ideas", "Give me three ideas for a birthday party for a ten-year-old who loves space."),
    ("explain", "Why is the sky blue? Explain it to me simply."),
    ("advice", "How can I stay motivated when I am learning a new language on my own?"),
    ("story", "Tell me a short story about a dragon who wants to become a baker."),
    ("opinion", "What are the advantages and disadvantages of working from home?"),
]


def build(docs: Path) -> List[Task]:
    """The task list, reading the tutorial excerpts from ``docs`` (CPython's ``html/_sources``)."""
    tut = Path(docs) / "tutorial"
    read = lambda name: (tut / name).read_text(encoding="utf-8")  # noqa: E731
    appetite = clean_rst(read("appetite.rst.txt"))
    appetite = appetite[appetite.index("If you do much work"): appetite.index("By the way")].strip()
    handling = section(read("errors.rst.txt"), "Handling Exceptions", "A class in an")
    loops = section(read("controlflow.rst.txt"), "break and continue Statements", "pass Statements")
    floating = section(read("floatingpoint.rst.txt"), "Floating-point numbers are represented", "The problem is easier")
    comprehensions = section(read("datastructures.rst.txt"), "List Comprehensions", "Nested List Comprehensions")
    pydocs = "CPython 3.11 tutorial, {} (PSF documentation licence)"
    grounded = [
        ("quote-interpreted", "quote", f"{appetite}\n\nQuote, word for word, the paragraph of the text above that "
         "explains why Python is an interpreted language.", pydocs.format("appetite.rst")),
        ("summarize-exceptions", "summarize", f"{handling}\n\nSummarize how the try statement works, as a "
         "bulleted list of the steps described above.", pydocs.format("errors.rst")),
        ("answer-loop-else", "answer", f"{loops}\n\nAccording to the text above, when does the else clause of a "
         "loop run? Answer by quoting the relevant sentence.", pydocs.format("controlflow.rst")),
        ("rewrite-floating", "rewrite", f"{floating}\n\nRewrite the paragraphs above in simpler English for a "
         "beginner, keeping every fact and example.", pydocs.format("floatingpoint.rst")),
        ("quote-listcomp-code", "quote", f"{comprehensions}\n\nCopy exactly every code example from the text above "
         "that uses a list comprehension, one after the other.", pydocs.format("datastructures.rst")),
        ("extract-order", "extract", f"{EMAIL}\nExtract these fields from the email above as JSON: customer_name, "
         "email, order_number, order_date, damaged_item, damaged_item_price, order_total, delivery_address, "
         "phone, requested_resolution.", "written for mlx-elm"),
        ("extract-actions", "extract", f"{MEETING}\nList every action item from the meeting notes above as "
         "'- owner: task (deadline)'.", "written for mlx-elm"),
        ("rewrite-typos", "rewrite", f"{TYPOS}\n\nCorrect the spelling and grammar of the paragraph above. "
         "Return the whole corrected paragraph and nothing else.", "written for mlx-elm"),
        ("edit-rename", "edit-code", f"```python\n{CODE}```\n\nRename the function load_rows to read_rows "
         "everywhere in the file above and return the whole updated file.", "written for mlx-elm"),
        ("edit-port", "edit-code", f"```python\n{SERVER}```\n\nChange the port to 9090 and the directory to "
         "\"static\" in the file above, and return the whole updated file.", "written for mlx-elm"),
    ]
    tasks = [Task(i, "grounded", t, p, s) for i, t, p, s in grounded]
    tasks += [Task(f"chat-{name}", "chat", "chat", prompt, "written for mlx-elm") for name, prompt in CHAT]
    flow = clean_rst(read("controlflow.rst.txt"))
    flow = flow[: flow.index("Lambda Expressions")].strip()  # about 7.9K tokens with the question
    tasks.append(Task("long-controlflow", "long", "quote", f"{flow}\n\nQuote, word for word, the paragraph of the "
                      "document above that explains the pass statement, including its code examples.",
                      pydocs.format("controlflow.rst, up to 'Lambda Expressions'")))
    return tasks


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build the speculative-decoding task set (package data).")
    parser.add_argument("--docs", type=Path, required=True, help="CPython docs html/_sources folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    tasks = build(args.docs)
    with atomic_file(args.out) as tmp:
        tmp.write_text("".join(json.dumps(asdict(t), ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")
    print(f"wrote {len(tasks)} tasks to {args.out}")


if __name__ == "__main__":
    main()
