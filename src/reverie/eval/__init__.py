"""Evaluation: the shapes analyzer, which reads generated shapes images back into labels and scores them."""

from ..data.shapes import ShapeObject, ShapesLabel, parse_caption
from .shapes import DetectedObject, find_objects, relation, score

__all__ = ["DetectedObject", "ShapeObject", "ShapesLabel", "find_objects", "parse_caption", "relation", "score"]
