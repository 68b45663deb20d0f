"""Token reducers and their schedules as tensor operations: ToE's expansion and merging, Token Merging, PatchDropout,
the stage schedules, the official code's operator kept as a reference, and the per-block token counts. Imports torch
(and timm's PatchDropout layer, which ScheduledPatchDropout drives) and nothing else of toe.
"""
