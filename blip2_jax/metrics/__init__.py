"""Evaluation metrics: official VQA accuracy, GQA exact match, COCO caption metrics."""


class MetricInputError(ValueError, TypeError):
    """References and predictions a metric cannot score (ids that do not line up, a value of
    the wrong type, the wrong number of answers); the message says which ids. A ValueError, and
    a TypeError where a value has the wrong type."""
