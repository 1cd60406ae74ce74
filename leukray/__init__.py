"""leukray: MobileNetV2 classification of acute lymphoblastic leukemia blood smears at lab scale."""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
"""Canonical class names, in the order of the model's outputs."""
