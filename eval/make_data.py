"""Write the eval tasks' local data files (eval/tasks/data/*.jsonl) from the demo task generator.

The sentences come from `server.train.tasks` with a fixed seed, away from the seeds the shipped adapters
were trained on, so the files are reproducible: `python eval/make_data.py` writes the same bytes again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.train.tasks import answer_template, sentences  # noqa: E402

DATA = Path(__file__).resolve().parent / "tasks" / "data"
SEED = 20251207
COUNT = 40


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    rows = sentences(COUNT, SEED)
    sentiment = [{"input": text, "label": 0 if facts.sentiment == "positive" else 1} for text, facts in rows]
    template = [{"input": text, "target": answer_template(text, facts)} for text, facts in rows[:COUNT // 2]]
    for name, records in (("sentiment", sentiment), ("template", template)):
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
