"""Evaluation: `evaluators` (captioning, VQA, retrieval, built from config.eval), `retrieval`
(LAVIS's ITC + ITM re-ranking, batched), `runner` (results.json, predictions.jsonl), `report`
(the HTML page and training-curve PNGs). `eval.py` is the command."""
