"""Mask-guided attention bias for self-supervised vision transformers: SAM masks, biased timm ViTs, DINO/MAE with fastai, distillation and evaluation, with JupyterLab widgets.

Modules:

- `mgab.demo`: One command that runs the whole study: masks, pretraining with and without the bias, distillation, evaluation, and the paper-style report."""

__version__ = "0.0.1"
