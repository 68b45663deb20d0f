"""What a token schedule costs: analytic FLOPs of a ViT (:mod:`toe.cost.flops`) and the planner that matches stages and
kept rates to a FLOP budget (:mod:`toe.cost.plan`). Imports :mod:`toe.ops` only.
"""
