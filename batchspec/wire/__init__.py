"""Formats both sides of a Batch API share: request lines, result lines, dialect mappings."""
