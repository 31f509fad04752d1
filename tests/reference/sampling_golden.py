"""The sampling filters of prefpipe's generate stage against transformers.

For each case (a row of float32 logits and SamplingParams), the probabilities
a sampler draws from: transformers' own warpers, in the order
`GenerationMixin._get_logits_processor` applies them (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper; min_tokens_to_keep=1),
then softmax. Scores are float64 so the comparison is exact up to summation
order. Writes tests/golden/sampling/golden.json; the Rust test
`generate::tests::filtered_probs_match_transformers_warpers` reads it.

    .venv/bin/python tests/reference/sampling_golden.py
"""

import json
import pathlib

import numpy as np
import torch
import transformers
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

OUT = pathlib.Path(__file__).resolve().parents[1] / "golden" / "sampling" / "golden.json"


def filtered(logits, temperature, top_k, top_p, min_p):
    scores = torch.tensor([logits], dtype=torch.float64)
    ids = torch.zeros((1, 1), dtype=torch.long)
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    for w in warpers:
        scores = w(ids, scores)
    return scores.softmax(dim=-1)[0].tolist()


def main():
    rng = np.random.default_rng(20261202)
    cases = []
    # Hand-made rows: a tie at the k-th score (transformers keeps every tied token),
    # a peaked row, a flat row.
    rows = [
        [3.0, 2.9, 2.8, -1.0, -2.0],
        [1.0, 2.0, 2.0, 2.0, 0.5, -3.0],
        [8.0, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0],
        [0.1, 0.1, 0.1, 0.1, 0.2, 0.0],
    ]
    rows += [list(map(float, (rng.standard_normal(n) * s).astype(np.float32))) for n, s in [(64, 1.0), (300, 2.5), (1000, 4.0)]]
    params = [
        (1.0, 0, 1.0, 0.0),
        (1.0, 2, 1.0, 0.0),
        (0.7, 3, 1.0, 0.0),
        (1.0, 0, 0.5, 0.0),
        (1.3, 0, 0.9, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.8, 10, 0.8, 0.05),
        (1.0, 50, 0.95, 0.0),
    ]
    # Rows 1 and 3 have tied scores: top-k keeps every token tied with the k-th
    # (as prefpipe), but which of several tied tokens straddling the top-p
    # boundary survives depends on torch.sort's order among equal values
    # (prefpipe keeps the lower token id), so they get no top-p case.
    tied = {1, 3}
    for i, row in enumerate(rows):
        row = [float(np.float32(x)) for x in row]
        for temperature, top_k, top_p, min_p in params:
            if i in tied and top_p < 1.0:
                continue
            cases.append({
                "row": i,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "min_p": min_p,
                "probs": filtered(row, temperature, top_k, top_p, min_p),
            })
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "generated_by": "tests/reference/sampling_golden.py",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "rows": [[float(np.float32(x)) for x in r] for r in rows],
        "cases": cases,
    }, indent=1) + "\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
