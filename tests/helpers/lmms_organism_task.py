"""A local lmms-eval task folder built from the organism's test split (for the real lmms-eval tests).

`write_organism_task(folder, n)` writes ``folder/organism_vqa.yaml`` (task ``organism_vqa``: a
``generate_until`` task scored by lmms-eval's ``exact_match``), ``folder/utils.py`` (its
``doc_to_visual`` / ``doc_to_text``), ``folder/data/test.jsonl`` and the PNG images. lmms-eval reads
it with ``--include_path folder`` (CLI) or ``TaskManager(include_path=folder)``.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["TASK_NAME", "ORGANISM_MODEL", "ORGANISM_TEMPLATE", "write_organism_task"]

TASK_NAME = "organism_vqa"
#: the organism's weights, as a model name vtprune resolves
ORGANISM_MODEL = "pkg:vtprune.experiments.organism/weights"
#: the organism's prompt (as in experiments/configs/demo.yaml)
ORGANISM_TEMPLATE = "USER: <image> {question} ASSISTANT:"

_UTILS = '''
from pathlib import Path

from PIL import Image

FOLDER = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(FOLDER / "data" / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


def _yaml(data_file: Path, max_new_tokens: int) -> str:
    return f"""task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file))}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
"""


def write_organism_task(folder: Path | str, n: int = 8, max_new_tokens: int = 2) -> Path:
    """Write the task folder for the first ``n`` questions of the organism's test split; returns it."""
    from vtprune.experiments.organism.vqa_task import OrganismTask

    folder = Path(folder)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, sample in enumerate(OrganismTask(split="test", n=n).samples()):
        name = f"{number:04d}.png"
        image = sample.images[0]
        (image if hasattr(image, "save") else __import__("PIL.Image").Image.fromarray(image)).save(data / name)
        lines.append(json.dumps({"id": sample.id, "image": name, "question": sample.question, "answer": sample.answers[0]}))
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "utils.py").write_text(_UTILS.lstrip())
    (folder / f"{TASK_NAME}.yaml").write_text(_yaml(data / "test.jsonl", max_new_tokens))
    return folder
