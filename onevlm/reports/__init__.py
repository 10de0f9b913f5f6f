"""Results written for other systems: the routing SR (with the specialty result), box SEG, bulk annotations, metadata.json."""
