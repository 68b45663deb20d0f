"""Benchmarks that measure side by side in one run: the op, the train step, end-to-end epochs, the input pipeline's
capacity and the analytic FLOPs (``toe-bench``).
"""
