"""Pictures of what the reducers keep and merge on real images of a run (``toe-vis``)."""
