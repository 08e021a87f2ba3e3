"""Plans applied to models, and the inference copy of a model (above :mod:`curlprune.graph` only).

    surgery.py     validate_plan, mask (same shapes, zeros), apply (the physically smaller GraphModule)
    inference.py   optimize_for_inference: BN folded into the convs, residual adds in place
"""
from curlprune.surgery.inference import optimize_for_inference
from curlprune.surgery.surgery import apply, consumer_input_dim, mask, removed_positions, validate_plan

__all__ = ["apply", "consumer_input_dim", "mask", "optimize_for_inference", "removed_positions", "validate_plan"]
