"""Planning: the spec, the model and hardware catalog, architectures, the planner and its report."""
