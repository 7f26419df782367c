"""Training: arguments, CPU compatibility, optimizer, checkpoints, the loop, metrics.

Entry point: ``pretrain_mosaic.py`` (``megatron_mosaic.training.pretrain.main``).
"""
