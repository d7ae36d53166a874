"""Evaluation metrics: official VQA accuracy, GQA exact match, COCO caption metrics."""
